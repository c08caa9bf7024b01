"""DSEE: "DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language Models"
(Chen et al., 2021).

A low-rank plus a sparse update whose support comes from W0 (x W convention):

    W_eff = W0 + s A B + S,   S on Ω = the `density` largest |entries| of the sparse
    part W0 - SVD_k(W0) of a low-rank + sparse decomposition of W0 (k = `decomp_rank`),

A kaiming, B = 0, S values 0 (W_eff == W0 at init); A, B and S's values train, Ω
is fixed. The second sparsity (magnitude pruning of the merged weights,
`prune(params, sparsity, paths)`) is a post-training step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.adapters import base, lora, lowrank, sltrain

DEFAULTS = {**lowrank.COMMON, "density": 0.01, "decomp_rank": 8}


def init_matrix(key, w, spec, stats=None):
  *lead_shape, d_in, d_out = w.shape
  nnz = sltrain.nnz_of(spec, d_in, d_out)
  k = min(int(spec["decomp_rank"]), d_in, d_out)
  u, s, vh = lowrank.top_or_bottom(*lowrank.svd(w), k, "top")
  sparse_part = w - (u * jnp.expand_dims(s, -2)) @ vh
  flat = jnp.abs(sparse_part).reshape(*lead_shape, d_in * d_out)
  _, index = jax.lax.top_k(flat, nnz)
  out = lora.init_matrix(key, w, spec, stats)
  out["sparse_index"] = jnp.sort(index, axis=-1).astype(jnp.int32)
  out["sparse_values"] = jnp.zeros((*lead_shape, nnz), jnp.float32)
  return out


def prune(params, sparsity: float, paths):
  """Magnitude-prunes each kernel at `paths` (per matrix) so a `sparsity` fraction is 0."""
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
  flat = base.flatten(params)
  for path in paths:
    w = flat[path + "/kernel"]
    *lead_shape, d_in, d_out = w.shape
    k = int(round(sparsity * d_in * d_out))
    mags = jnp.abs(w).reshape(*lead_shape, d_in * d_out)
    order = jnp.argsort(mags, axis=-1)  # ascending: the first k go
    keep = jnp.ones_like(mags, bool)
    keep = jnp.put_along_axis(keep, order[..., :k], False, axis=-1, inplace=False)
    flat[path + "/kernel"] = jnp.where(keep.reshape(w.shape), w, jnp.zeros_like(w))
  return base.unflatten(flat)


MEMBER = lowrank.Member("dsee", __doc__, DEFAULTS, init_matrix, leaves=sltrain.LEAVES,
                        trains=("lora_a", "lora_b", "sparse_values"))
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
