"""LoRA-SB: "Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning" (Ponkshe et al., 2024).

LoRA-XS architecture (x W layout): W_eff = W0 + s A M B with A (d_in, r) and
B (r, d_out) frozen and only the r x r matrix M trained (r^2 parameters per matrix).
LoRA-SB initialises it from an approximation of the first full fine-tuning update:
with G the full-weight gradient averaged over `calib_batches` batches and
SVD(-G) = U S V^T,

    A = U_r,   B = V_r^T   (orthonormal),   M = r_scale * diag(S_r),   s = 1,

so s A M B = -r_scale G_r, the best rank-r approximation of an SGD step of size
r_scale (no alpha to tune). Because A, B are orthonormal, dL/dM = s A^T G B^T and
each later step moves W_eff by -lr s^2 A A^T G B^T B: the gradient projected onto
the same subspace. Uncertain details are switches: `r_scale` (the step size of the
approximated first update, default 1e-3) and `offset_base` (default False; True
freezes W0 - s A M B so the model is unchanged at init).
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxft.adapters import calibrate, lowrank

DEFAULTS = {**lowrank.COMMON, **calibrate.CALIB_DEFAULTS, "dropout": 0.0,
            "r_scale": 1e-3, "offset_base": False}
CALIBRATION = True


def init_matrix(key, w, spec, stats):
  rank = lowrank.check_rank(spec, w)
  u, s, vh = calibrate.per_layer(lambda g: lowrank.svd(-g, rank=rank, key=key),
                                 w.ndim - 2)(stats.grad)
  a, b = u[..., :rank], vh[..., :rank, :]
  m = jnp.einsum("...r,rk->...rk", float(spec["r_scale"]) * s[..., :rank],
                 jnp.eye(rank, dtype=s.dtype))
  out = {"lora_a": a, "lora_b": b, "lora_m": m}
  if spec["offset_base"]:
    out["kernel"] = w - a @ m @ b
  return out


MEMBER = calibrate.Calibrated(
    name="lora_sb", doc=__doc__, defaults=DEFAULTS, init_matrix=init_matrix,
    leaves=("lora_a", "lora_b", "lora_m"), trains=("lora_m",), scale=lowrank.unit_scale, needs_grad=True)
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
