"""LT-SFT: "Composable Sparse Fine-Tuning for Cross-Lingual Transfer" (Ansell et al., 2022).

Lottery-ticket sparse fine-tuning: full fine-tuning θ0 → θ1, keep the K entries
with the largest |θ1 − θ0| per matrix, reset to θ0 and train only those:

    θ = θ0 + scatter(η, φ),   η = top-K |θ1 − θ0|,   φ = 0 at the start,

(`jaxft.adapters.sparse_delta`, element granularity; no full weight gradient).
Sparse diffs compose by addition: θ0 + φ_L + φ_T (`compose`, exact).

Where θ1 comes from (`source`):
  'grad'  (default, one `jaxft train` run) θ1 − θ0 = −lr·G, G the full-FT gradient
          averaged over the first `calib_batches` training batches, i.e. the mask
          of one full SGD step (a cheap stand-in for the paper's full FT phase);
  'finetuned'  the real two-phase recipe in Python: `init_from_finetuned(θ0, θ1, spec)`.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from jaxft.adapters import base, calibrate, featurewise, sparse_delta as sd

DEFAULTS = {"targets": (r"attn/(q|k|v|o)$", r"mlp/(gate|up|down)$"), "density": 0.01,
            "grad_impl": "sddmm",
            "source": "grad", **calibrate.CALIB_DEFAULTS}
SOURCES = ("grad", "finetuned")
MERGEABLE = True


def CALIBRATION(spec) -> bool:  # pylint: disable=invalid-name
  return spec.get("source", "grad") == "grad"


def _k(spec, w) -> int:
  return sd.count(float(spec["density"]), w.shape[-2] * w.shape[-1])


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """η = top-K |G| (source='grad', G from calibration batches); φ = 0."""
  del key
  if spec["source"] != "grad":
    raise ValueError(f"adapter.source={spec['source']!r}: `jaxft train` supports 'grad'; "
                     f"valid: {', '.join(SOURCES)} ('finetuned' via lt_sft.init_from_finetuned)")
  paths = featurewise.linear_targets(frozen, spec)
  stats = calibrate.statistics(calibrate.require(calib, "lt_sft"), frozen, paths, grad=True,
                               tokens=spec.get("calib_tokens", "all"))
  select = lambda i, path, w: sd.top_k_indices(jnp.abs(stats[path].grad), _k(spec, w))
  return sd.element_init(frozen, spec, select)


def init_from_finetuned(theta0, theta1, spec):
  """(frozen, trainable) for phase 2: η = top-K |θ1 − θ0| per targeted matrix, φ = 0."""
  f1 = base.flatten(theta1)
  f0 = base.flatten(theta0)

  def select(i, path, w):
    w1, w0 = f1[path + "/kernel"], f0[path + "/kernel"]
    change = jnp.abs(w1.astype(jnp.float32) - w0.astype(jnp.float32))
    return sd.top_k_indices(change, _k(spec, w))

  return sd.element_init(theta0, spec, select)


logical_axes, combine, linear_hook = sd.logical_axes, sd.combine, sd.linear_hook
materialize = merge = sd.materialize
compose, diff_of = sd.compose, sd.diff_of
