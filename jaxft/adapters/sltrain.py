"""SLTrain: "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
pretraining" (Han et al., 2024).

A low-rank plus a fixed-support sparse update (x W convention):

    W_eff = T(W0) + s A B + S,   S = scatter(Ω, values),

Ω drawn uniformly at random once (density `density`, default 0.03) and fixed,
stored as flat indices (frozen, int32) with trainable values; A kaiming, B = 0,
values 0. `base='keep'` (default) fine-tunes on top of W0; `base='drop'` is the
paper's from-scratch form (T(W0) = 0, B ~ kaiming too, so the layer starts random).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxft.adapters import lora, lowrank

DEFAULTS = {**lowrank.COMMON, "density": 0.03, "base": "keep"}
BASES = ("keep", "drop")


def random_support(key, lead_shape, size: int, nnz: int):
  """(…, nnz) sorted flat indices, a uniform draw without replacement per matrix."""
  n = int(math.prod(lead_shape))
  keys = jax.random.split(key, max(n, 1))
  draw = jax.vmap(lambda k: jnp.sort(jax.random.choice(k, size, (nnz,), replace=False)))(keys)
  return draw.astype(jnp.int32).reshape(*lead_shape, nnz)


def nnz_of(spec, d_in: int, d_out: int) -> int:
  density = float(spec["density"])
  if not 0.0 < density <= 1.0:
    raise ValueError(f"adapter.density must be in (0, 1], got {density}")
  return max(1, int(round(density * d_in * d_out)))


def init_matrix(key, w, spec, stats=None):
  if spec["base"] not in BASES:
    raise ValueError(f"adapter.base={spec['base']!r} is invalid; valid choices: {BASES}")
  *lead_shape, d_in, d_out = w.shape
  nnz = nnz_of(spec, d_in, d_out)
  out = lora.init_matrix(key, w, spec, stats)
  out["sparse_index"] = random_support(jax.random.fold_in(key, 1), lead_shape, d_in * d_out, nnz)
  out["sparse_values"] = jnp.zeros((*lead_shape, nnz), jnp.float32)
  if spec["base"] == "drop":
    out["kernel"] = jnp.zeros_like(w)
    bound = 1.0 / math.sqrt(out["lora_b"].shape[-2])
    out["lora_b"] = jax.random.uniform(jax.random.fold_in(key, 2), out["lora_b"].shape,
                                       jnp.float32, -bound, bound)
  return out


LEAVES = ("lora_a", "lora_b", "sparse_index", "sparse_values")
MEMBER = lowrank.Member("sltrain", __doc__, DEFAULTS, init_matrix, leaves=LEAVES,
                        trains=("lora_a", "lora_b", "sparse_values"))
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
