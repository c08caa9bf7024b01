"""SSF: "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning" (Lian et al., 2022).

After each targeted linear y = x W (+ b), a per-channel scale and shift:

    y' = γ ⊙ y + β,    γ ~ N(1, init_std²),  β ~ N(0, init_std²)   (paper: init_std 0.02)

Only γ and β train (2 parameters per output channel per linear). Merged at
inference by re-parameterisation: W' = W diag(γ), b' = γ ⊙ b + β — a linear
without a bias gains one, so the merged tree has `bias` leaves beside the
targeted kernels (the decoder's `dense` adds them). With `shift=False` only γ
trains (and the merge adds no bias).

The paper also scales and shifts after norms; here every insertion point is a
linear output (norm outputs feed q/k/v and gate/up, whose input-side SSF would
have to be shared across the three linears and is not modelled).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.adapters import base, featurewise
from jaxft.models import decoder
from jaxft.models.layers import lead

DEFAULTS = {"targets": featurewise.LINEARS, "init_std": 0.02, "shift": True}
MERGEABLE = True


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """-> (frozen unchanged, trainable {path: {'ssf_scale'[, 'ssf_shift']}})."""
  del calib
  std = float(spec["init_std"])
  if std < 0:
    raise ValueError(f"adapter.init_std must be >= 0, got {std}")
  flat = base.flatten(frozen)
  out = {}
  for i, path in enumerate(featurewise.linear_targets(frozen, spec)):
    w = flat[path + "/kernel"]
    shape = (*w.shape[:-2], w.shape[-1])
    k_scale, k_shift = jax.random.split(jax.random.fold_in(key, i))
    out[path + "/ssf_scale"] = (1.0 + std * jax.random.normal(k_scale, shape)).astype(w.dtype)
    if spec["shift"]:
      out[path + "/ssf_shift"] = (std * jax.random.normal(k_shift, shape)).astype(w.dtype)
  return frozen, base.unflatten(out)


logical_axes = featurewise.logical_axes_fn({"ssf_scale": featurewise.OUT,
                                            "ssf_shift": featurewise.OUT})


def combine(frozen, trainable, spec):
  del spec
  return base.merge_trees(frozen, trainable)


def linear_hook(spec):
  del spec

  def linear(p, x, name, rng):
    y = decoder.dense(p, x, name, rng)
    if "ssf_scale" not in p:
      return y
    y = y * lead(p["ssf_scale"], y.ndim).astype(y.dtype)
    if "ssf_shift" in p:
      y = y + lead(p["ssf_shift"], y.ndim).astype(y.dtype)
    return y

  return linear


def materialize(frozen, trainable, spec):
  """W' = W diag(γ) (kernel columns scaled), b' = γ ⊙ b + β."""
  del spec
  flat = base.flatten(frozen)
  leaves = base.flatten(trainable)
  for path in {p.rsplit("/", 1)[0] for p in leaves}:
    w = flat[path + "/kernel"]
    g = leaves[path + "/ssf_scale"]
    flat[path + "/kernel"] = (w * g[..., None, :]).astype(w.dtype)
    b = flat.get(path + "/bias", jnp.zeros(g.shape, w.dtype))
    beta = leaves.get(path + "/ssf_shift")
    if beta is not None or path + "/bias" in flat:
      new_b = g * b + (0.0 if beta is None else beta)
      flat[path + "/bias"] = new_b.astype(w.dtype)
  return base.unflatten(flat)


merge = materialize
