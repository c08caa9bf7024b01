"""PiSSA: "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language
Models" (Meng et al., 2024); with `component='bottom'` the MiLoRA member.

With W0 = U S Vh (x W convention, W (d_in, d_out)) and the r chosen triplets,

    A = U_r S_r^{1/2} / sqrt(s),   B = S_r^{1/2} Vh_r / sqrt(s),   W_res = W0 - s A B,
    W_eff = W_res + s A B,

so W_eff == W0 at init; architecture and training as LoRA (A, B train, W_res
frozen). METHODS.md's (d_out, d_in) form: B = U_r S_r^{1/2}, A = S_r^{1/2} V_rᵀ.
'top' (PiSSA) takes the principal triplets (‖W_res‖₂ = σ_{r+1}); 'bottom'
(MiLoRA) the minor ones (‖W_res‖₂ = σ₁). The SVD is exact below 2048×2048, else
randomized with `niter` subspace iterations.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxft.adapters import lowrank

DEFAULTS = {**lowrank.COMMON, "dropout": 0.0, "component": "top", "niter": 4}


def init_matrix(key, w, spec, stats=None):
  del stats
  rank = lowrank.check_rank(spec, w)
  component = spec.get("component", "top")
  sv_rank = rank if component == "top" else 0  # minor triplets need the full spectrum
  u, s, vh = lowrank.svd(w, rank=sv_rank, niter=int(spec.get("niter", 4)), key=key)
  u, s, vh = lowrank.top_or_bottom(u, s, vh, rank, component)
  root = jnp.sqrt(s / lowrank.lora_scale(spec))
  a = u * jnp.expand_dims(root, -2)
  b = jnp.expand_dims(root, -1) * vh
  return {"kernel": w - lowrank.lora_scale(spec) * (a @ b), "lora_a": a, "lora_b": b}


MEMBER = lowrank.Member("pissa", __doc__, DEFAULTS, init_matrix, peft="lora_residual")
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
