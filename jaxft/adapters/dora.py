"""DoRA: "DoRA: Weight-Decomposed Low-Rank Adaptation" (Liu et al., 2024).

Magnitude and direction trained apart (x W convention, W (d_in, d_out)):

    V = W0 + s A B,    W_eff = mag ⊙ V / ‖V‖_col,

‖V‖_col the norm of each output unit's weight vector (over d_in; a row of the
(d_out, d_in) matrix, as in the reference code), mag (d_out,) initialised to
‖W0‖_col so W_eff == W0 at init; A, B as LoRA. mag, A, B train. With
`detach_norm=True` (default, the paper's memory saving) ‖V‖ is a constant in the
backward pass; False differentiates through it.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxft.adapters import lora, lowrank

DEFAULTS = {**lowrank.COMMON, "detach_norm": True}


def init_matrix(key, w, spec, stats=None):
  out = lora.init_matrix(key, w, spec, stats)
  out["dora_mag"] = jnp.linalg.norm(w, axis=-2)
  return out


MEMBER = lowrank.Member("dora", __doc__, DEFAULTS, init_matrix,
                        leaves=("lora_a", "lora_b", "dora_mag"),
                        trains=("lora_a", "lora_b", "dora_mag"), decompose=True, peft="dora")
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
