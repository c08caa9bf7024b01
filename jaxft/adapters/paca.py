"""PaCA: "PaCA: Partial Connection Adaptation for Efficient Fine-Tuning" (Woo et al., 2025).

For each targeted linear y = x W (W stored (d_in, d_out)) a random fixed set S of r
input features — the paper's r columns of W in (d_out, d_in) notation, here r rows —
is trained; the rest of W stays at W0:

    y = x (W0 + scatter_rows(S, Δ)),   dΔ = x[..., S]ᵀ g,   dx = g Wᵀ,

one merged matmul with no adapter branch; the custom VJP
(`sparse_delta.row_matmul`) saves only x[..., S] (r/d_in of the activation) and
never forms the full weight gradient. Trainable count r·d_out per matrix. S is
drawn per matrix (and per layer of a stack).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.adapters import base, featurewise, sparse_delta as sd

DEFAULTS = {"targets": (r"attn/(q|k|v|o)$", r"mlp/(gate|up|down)$"), "rank": 8}
MERGEABLE = True


def random_rows(key, shape, r: int):
  """(…, r) distinct random rows of a (…, d_in, d_out) kernel, sorted."""
  *lead, d_in, _ = shape
  if not 0 < r <= d_in:
    raise ValueError(f"adapter.rank={r!r} is invalid for d_in={d_in}; valid: 1..{d_in}")
  _, rows = jax.lax.top_k(jax.random.uniform(key, (*lead, d_in)), r)
  return jnp.sort(rows, axis=-1).astype(jnp.int32)


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """-> (frozen + `sd_rows` S, trainable `sd_rows_delta` Δ = 0 of shape (…, r, d_out))."""
  del calib
  flat = base.flatten(frozen)
  chosen = {path: random_rows(jax.random.fold_in(key, i), flat[path + "/kernel"].shape,
                              int(spec["rank"]))
            for i, path in enumerate(featurewise.linear_targets(frozen, spec))}
  return sd.rows_init(frozen, chosen)


logical_axes, combine, linear_hook = sd.logical_axes, sd.combine, sd.linear_hook
materialize = merge = sd.materialize
