"""(IA)³: "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning" (Liu et al., 2022).

Learned vectors rescale inner activations: l_k and l_v the key and value
projections' outputs, l_ff the MLP's intermediate activation (the input of the
down projection):

    k = l_k ⊙ (x W_k),   v = l_v ⊙ (x W_v),   out = (l_ff ⊙ h) W_down,

all initialised to ones, so the model is unchanged at init. Only the vectors
train. Merge: l_k, l_v scale the columns of W_k, W_v (and their biases); l_ff
scales the rows of W_down. `targets` picks the linears; those also matched by
`input_side` are scaled on their input (PEFT's `feedforward_modules`), the rest
on their output.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax.numpy as jnp

from jaxft.adapters import base, featurewise
from jaxft.models import decoder
from jaxft.models.layers import lead

DEFAULTS = {"targets": (r"attn/(k|v)$", r"mlp/down$"), "input_side": (r"mlp/down$",)}
MERGEABLE = True


def _input_side(path: str, spec) -> bool:
  return any(re.search(p, path) for p in base.as_patterns(spec["input_side"]))


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """-> (frozen unchanged, trainable {path: {'ia3_in' (…, d_in) | 'ia3_out' (…, d_out)}})."""
  del key, calib
  flat = base.flatten(frozen)
  out = {}
  for path in featurewise.linear_targets(frozen, spec):
    w = flat[path + "/kernel"]
    if _input_side(path, spec):
      out[path + "/ia3_in"] = jnp.ones(w.shape[:-1], w.dtype)
    else:
      out[path + "/ia3_out"] = jnp.ones((*w.shape[:-2], w.shape[-1]), w.dtype)
  return frozen, base.unflatten(out)


logical_axes = featurewise.logical_axes_fn({"ia3_in": featurewise.IN, "ia3_out": featurewise.OUT})


def combine(frozen, trainable, spec):
  del spec
  return base.merge_trees(frozen, trainable)


def linear_hook(spec):
  del spec

  def linear(p, x, name, rng):
    if "ia3_in" in p:
      x = x * lead(p["ia3_in"], x.ndim).astype(x.dtype)
    y = decoder.dense(p, x, name, rng)
    if "ia3_out" in p:
      y = y * lead(p["ia3_out"], y.ndim).astype(y.dtype)
    return y

  return linear


def materialize(frozen, trainable, spec):
  """W_k diag(l_k), W_v diag(l_v) (and biases); diag(l_ff) W_down."""
  del spec
  flat = base.flatten(frozen)
  for path, l in base.flatten(trainable).items():
    linear, leaf = path.rsplit("/", 1)
    w = flat[linear + "/kernel"]
    if leaf == "ia3_in":
      flat[linear + "/kernel"] = (w * l[..., :, None]).astype(w.dtype)
    else:
      flat[linear + "/kernel"] = (w * l[..., None, :]).astype(w.dtype)
      if linear + "/bias" in flat:
        flat[linear + "/bias"] = (flat[linear + "/bias"] * l).astype(w.dtype)
  return base.unflatten(flat)


merge = materialize
