"""Fields every training config has, with their defaults (not a runnable config).

Named sections (`model`, `adapter`, `objective`, `optimizer`) only need `name` and
the fields that differ: the rest is filled from that member's defaults when the
config is loaded (`jaxft list` shows them).
"""
import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.steps = 100
  c.batch_size = 8           # global rows per step (all hosts, all microbatches)
  c.seq_len = 128
  c.grad_accum = 1           # microbatches per step; batch_size must divide by it
  c.log_every = 10
  c.eval_every = 50          # 0 = no evaluation
  c.eval_batches = 8
  c.eval_examples = 0        # task accuracy (greedy + verifier) on this many held-out examples
  c.eval_max_new_tokens = 64
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  c.compute_dtype = "float32"   # or 'bfloat16' (activations, matmuls)
  c.param_dtype = "float32"     # master weights; optimizer state follows them
  c.frozen_dtype = ""           # the adapter's frozen weights ('' = param_dtype; 'bfloat16' halves a LoRA base)

  c.model = ml_collections.ConfigDict({"name": "decoder"})
  c.adapter = ml_collections.ConfigDict({"name": "full"})
  c.objective = ml_collections.ConfigDict({"name": "xent"})
  c.optimizer = ml_collections.ConfigDict({"name": "adamw", "lr": 1e-3})
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.data = ml_collections.ConfigDict({
      "name": "tiny_shakespeare",   # shakespeare | tiny_shakespeare | text | jsonl
      "path": "",                   # file or glob, for text / jsonl
      "eval_path": "",
      "text_field": "text",
      "on_malformed": "raise",      # or "skip" (counted and reported)
      "doc_chars": 2000,
      "eval_fraction": 0.05,
      "tokenizer": "auto",          # auto: a pretrained model's own, else shakespeare_bpe
      "chat_template": False,       # SFT tasks: format with the model's chat template
      "packing": True,
      "shuffle": True,
      # Task sources (SFT examples: gsm8k, reasoning_gym, natural_instructions, ...):
      "generator": "basic_arithmetic",   # reasoning_gym generator
      "generator_kwargs": "{}",          # JSON object of generator options
      "train_size": config_dict.placeholder(int),  # unset = the loader's default
      "eval_size": config_dict.placeholder(int),
      "task_seed": 0,
      "prompt_field": "prompt",          # jsonl_examples / parquet_examples
      "response_field": "response",
  })
  return c
