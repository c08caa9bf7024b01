"""SVFit: "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values"
(Sun et al., 2024).

Only the top-r singular values move (x W convention, W0 = U S Vh):

    W_eff = U_r diag(σ_r + δ) Vh_r + W_rest = W0 + U_r diag(δ) Vh_r,

δ ∈ R^r per matrix trainable (init 0, so W_eff == W0); U_r, Vh_r frozen; scale 1
(alpha unused). ∂L/∂δ_i = u_iᵀ G v_i with G = ∂L/∂W. r is `rank`: the paper's
"over 99% of the matrix's information" rule picks r per matrix from the data, which a
jitted init cannot do — `energy_rank(w, 0.99)` reports the r it would choose.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxft.adapters import lowrank

DEFAULTS = {**lowrank.COMMON, "dropout": 0.0}


def init_matrix(key, w, spec, stats=None):
  del key, stats
  rank = lowrank.check_rank(spec, w)
  u, _, vh = lowrank.top_or_bottom(*lowrank.svd(w), rank, "top")
  return {"lora_a": u, "lora_b": vh, "lora_d": jnp.zeros((*w.shape[:-2], rank), jnp.float32)}


def energy_rank(w, energy: float = 0.99) -> int:
  """Smallest r with Σ_{i<=r} σ_i² / Σ σ_i² >= energy (the paper's rule) for one matrix."""
  s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
  ratio = np.cumsum(s ** 2) / np.sum(s ** 2)
  return int(np.searchsorted(ratio, energy) + 1)


MEMBER = lowrank.Member("svfit", __doc__, DEFAULTS, init_matrix,
                        leaves=("lora_a", "lora_b", "lora_d"), trains=("lora_d",),
                        scale=lowrank.unit_scale)
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
