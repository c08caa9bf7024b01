"""LoRA-XS, the architecture of "Initialization using Update Approximation is a Silver Bullet for
Extremely Efficient Low-Rank Fine-Tuning" (Ponkshe et al., 2024); LoRA-XS init.

Only an r×r matrix trains between frozen SVD factors of W0 (x W convention):

    W_eff = W0 + s A R B,    A = U_r, B = S_r Vh_r (frozen),  R (r, r) trainable,

(METHODS.md's (d_out, d_in) form: B R A with B = U_r S_r, A = V_rᵀ), r² parameters
per matrix. R ~ N(0, r_init_std²); the default 0 keeps W_eff == W0 at init (the
paper's small random R is `r_init_std > 0`). ∂L/∂R = s Aᵀ G Bᵀ. LoRA-SB (part B's
`lora_sb`) shares this architecture with a gradient-based init.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.adapters import lowrank

DEFAULTS = {**lowrank.COMMON, "r_init_std": 0.0}


def init_matrix(key, w, spec, stats=None):
  del stats
  rank = lowrank.check_rank(spec, w)
  u, s, vh = lowrank.top_or_bottom(*lowrank.svd(w), rank, "top")
  r = float(spec["r_init_std"]) * jax.random.normal(key, (*w.shape[:-2], rank, rank), jnp.float32)
  return {"lora_a": u, "lora_b": jnp.expand_dims(s, -1) * vh, "lora_m": r}


MEMBER = lowrank.Member("lora_xs", __doc__, DEFAULTS, init_matrix,
                        leaves=("lora_a", "lora_b", "lora_m"), trains=("lora_m",))
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
