"""LQ-LoRA: "LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient Language Model Finetuning" (Guo et al., 2023).

Each pretrained matrix is decomposed into a quantized part and a high-precision
low-rank part by alternating (x W layout, L = s A B):

    L <- 0;  repeat `iters` times:  Q <- NF(W0 - L);  L <- SVD_r(W0 - dequant(Q)),

with A = U_r S_r^(1/2) / sqrt(s), B = S_r^(1/2) V_r^T / sqrt(s). Q is frozen (NF-k codes
with double-quantized block scales, as QLoRA: `bits`, `block`, `dq_block`), only A, B
train, and W_eff = dequant(Q) + s A B starts closer to W0 than QLoRA's NF(W0) + 0.

Not implemented here: the integer linear program over per-matrix (bits, block)
configurations under a memory budget, and the Fisher-weighted (data-aware) variant;
every targeted matrix uses the configured `bits` / `block`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.adapters import calibrate, lowrank, qlora

DEFAULTS = {**lowrank.COMMON, **qlora.QUANT_DEFAULTS, "iters": 4}


def _low_rank(residual, rank, s):
  u, sv, vh = jnp.linalg.svd(residual, full_matrices=False)
  root = jnp.sqrt(sv[..., :rank] / s)
  return u[..., :rank] * root[..., None, :], root[..., :, None] * vh[..., :rank, :]


def init_matrix(key, w, spec, stats=None):
  del key, stats
  return calibrate.per_layer(lambda m: _decompose(m, spec), w.ndim - 2)(w)


def _decompose(w, spec):
  rank = lowrank.check_rank(spec, w)
  iters = int(spec["iters"])
  if iters < 1:
    raise ValueError(f"adapter.iters must be >= 1, got {iters}")
  s = lowrank.lora_scale(spec)

  def step(low, _):
    q = qlora.quantized_leaves(w - low, spec)
    a, b = _low_rank(w - qlora.dequant_base(q), rank, s)
    return s * (a @ b), None

  low, _ = jax.lax.scan(step, jnp.zeros_like(w), None, length=iters - 1)
  q = qlora.quantized_leaves(w - low, spec)
  a, b = _low_rank(w - qlora.dequant_base(q), rank, s)
  return {"lora_a": a, "lora_b": b, **q}


def decomposition_error(w, spec) -> jax.Array:
  """||W0 - dequant(Q) - s A B||_F of the init (for tests and reports)."""
  leaves = init_matrix(None, w.astype(jnp.float32), spec)
  low = lowrank.lora_scale(spec) * (leaves["lora_a"] @ leaves["lora_b"])
  return jnp.linalg.norm(w - qlora.dequant_base(leaves) - low)


MEMBER = qlora.quantized_member("lq_lora", __doc__, DEFAULTS, init_matrix)
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
