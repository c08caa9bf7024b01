"""CAST on the tiny model: AdamS (`adams_cast`) + learned Weight Scaling + dense self-teacher KD.

"CAST: Continuous and Differentiable Semi-Structured Sparsity-Aware Training for Large
Language Models", end to end through `jaxft train` in seconds on a CPU:

    jaxft train tiny_cast --workdir /tmp/tiny_cast
    jaxft export /tmp/tiny_cast --format hf --out /tmp/tiny_cast_hf   # exactly 2:4 sparse

Every `kernel` (attention q/k/v/o, MLP gate/up/down) is trained towards 2:4 along its
input axis; the embedding/head stays dense. The teacher is a frozen copy of the
initial weights (here a random init; `smollm2_cast` uses the pretrained model).
Loss = ce_weight * CE + kd_weight * T^2 KL(teacher || student) (objective fields;
kd_weight is the distillation weight lambda, T the temperature). The last update
projects the weights exactly onto 2:4, and export folds the learned scales in.
Expected (2-core CPU, 10-25 s compile): 20 steps, loss 7.6 -> 6.6, `kl` logged each
log step, checkpoint and export exactly 2:4 (zero fraction 0.5 in all 7 kernels).
"""
from jaxft_configs import tiny


def get_config(arg=None):
  c = tiny.get_config(arg)
  c.objective.update(name="kd", ce_weight=1.0, kd_weight=0.5, temperature=1.0)
  c.optimizer.update(name="adams_cast", lr=3e-3, warmup_steps=2, lam=1e-2, mask_every=5,
                     weight_scaling="learned", weight_scaling_forward="dense")
  return c
