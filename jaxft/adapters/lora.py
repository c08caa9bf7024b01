"""LoRA: "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., 2021).

For each targeted linear y = x W (W stored (d_in, d_out), stacked over layers):

    y = x W0 + s * dropout(x) A B,    s = alpha / rank,

with A (d_in, r) kaiming-uniform (bound 1/sqrt(d_in), PyTorch's a=sqrt(5)), B
(r, d_out) zero, so the model is unchanged at init. Only A and B train. The merged
weight is W0 + s A B. In METHODS.md's (d_out, d_in) notation this is W0 + s B A.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.adapters import base
from jaxft.models import decoder

DEFAULTS = {
    "targets": (r"attn/(q|k|v|o)$", r"mlp/(gate|up|down)$"),
    "rank": 8,
    "alpha": 16.0,
    "dropout": 0.05,
}


def scale(spec: Mapping[str, Any]) -> float:
  return float(spec["alpha"]) / int(spec["rank"])


def targets(params, spec) -> list[str]:
  """Linear paths (e.g. 'layers/attn/q') the spec selects."""
  return base.match(base.linear_paths(params), spec["targets"], what="linear layer")


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """-> (frozen unchanged, trainable {path: {'lora_a', 'lora_b'}})."""
  del calib
  rank = int(spec["rank"])
  if rank < 1:
    raise ValueError(f"adapter.rank must be >= 1, got {rank}")
  flat = base.flatten(frozen)
  trainable = {}
  for i, path in enumerate(targets(frozen, spec)):
    w = flat[path + "/kernel"]
    *lead, d_in, d_out = w.shape
    bound = 1.0 / (d_in ** 0.5)
    a = jax.random.uniform(jax.random.fold_in(key, i), (*lead, d_in, rank), w.dtype, -bound, bound)
    trainable[path + "/lora_a"] = a
    trainable[path + "/lora_b"] = jnp.zeros((*lead, rank, d_out), w.dtype)
  return frozen, base.unflatten(trainable)


def logical_axes(model_axes, trainable, spec):
  del spec
  flat_axes = base.flatten(model_axes)
  out = {}
  for path in base.flatten(trainable):
    linear, leaf = path.rsplit("/", 1)
    *lead, ax_in, ax_out = flat_axes[linear + "/kernel"]
    out[path] = (*lead, ax_in, "lora_rank") if leaf == "lora_a" else (*lead, "lora_rank", ax_out)
  return model_axes, base.unflatten(out)


def combine(frozen, trainable, spec):
  """Model params with 'lora_a'/'lora_b' beside each targeted kernel (run unmerged)."""
  del spec
  return base.merge_trees(frozen, trainable)


def linear_hook(spec):
  """The model's linear hook: x W0 (+ bias) + s dropout(x) A B where a LoRA pair is present."""
  s, rate = scale(spec), float(spec["dropout"])

  def linear(p, x, name, rng):
    y = decoder.dense(p, x, name, rng)
    if "lora_a" not in p:
      return y
    h = x
    if rate > 0.0 and rng is not None:
      keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
      h = jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
    delta = (h @ p["lora_a"].astype(x.dtype)) @ p["lora_b"].astype(x.dtype)
    return y + (s * delta).astype(y.dtype)

  return linear


def materialize(frozen, trainable, spec):
  """Effective params: W0 + s A B for every targeted kernel."""
  s = scale(spec)
  flat = base.flatten(frozen)
  pairs = base.flatten(trainable)
  for path in {p.rsplit("/", 1)[0] for p in pairs}:
    a, b = pairs[path + "/lora_a"], pairs[path + "/lora_b"]
    w = flat[path + "/kernel"]
    flat[path + "/kernel"] = (w + s * jnp.matmul(a, b).astype(w.dtype)).astype(w.dtype)
  return base.unflatten(flat)


merge = materialize
