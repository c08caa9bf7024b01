"""Bottleneck adapters: "LLM-Adapters: An Adapter Family for Parameter-Efficient Fine-Tuning of Large Language Models" (Hu et al., 2023).

Beside each targeted linear y = x W (+ b), a bottleneck of width m:

    series:    y' = y + s · σ(y W_down) W_up          (W_down (d_out, m), after the linear)
    parallel:  y' = y + s · σ(x W_down) W_up          (W_down (d_in, m), beside the linear)

W_up = 0 at init (the model is unchanged; at init only W_up gets a gradient),
W_down ~ U(±1/sqrt(fan_in)); s = `scaling`, σ = `activation` (LLM-Adapters: tanh).
Placement follows the paper's finding (series after the MLP, parallel beside it):
the default target is the MLP's down projection, whose output is the MLP output,
so the series adapter is exactly "after the MLP sub-layer"; the parallel adapter
reads the down projection's input (the MLP's hidden activation) instead of the
MLP's input, which the per-linear hook cannot see. Neither merges into W (σ is
nonlinear): run them unmerged.

The projections are pluggable: `dense` (above) or `phm` — W = Σ_i A_i ⊗ (s_i t_iᵀ),
the Compacter layer (see `compacter`), with A_i shared by every adapter.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.adapters import base, featurewise
from jaxft.models import decoder

SERIES_DEFAULTS = {"targets": (r"mlp/down$",), "bottleneck": 256, "activation": "tanh",
                   "scaling": 1.0}
PARALLEL_DEFAULTS = dict(SERIES_DEFAULTS)
DENSE = ("adapter_down", "adapter_up")
PHM = ("phm_down_s", "phm_down_t", "phm_up_s", "phm_up_t")
RULE = "phm_rule"   # top-level trainable {'down', 'up'}: (n, n, n) each, shared by all adapters


def phm_matrix(rule_NxNxN, s_NxA, t_NxB) -> jax.Array:
  """Σ_i A_i ⊗ (s_i t_iᵀ): (n·A, n·B); leading axes of s and t broadcast with the rule's."""
  n, a, b = rule_NxNxN.shape[-1], s_NxA.shape[-1], t_NxB.shape[-1]
  w = jnp.einsum("...ixy,...ic,...ie->...xcye", rule_NxNxN, s_NxA, t_NxB)
  return w.reshape(*w.shape[:-4], n * a, n * b)


def _weights(p):
  """(W_down, W_up) of one linear's adapter, dense or PHM."""
  if "adapter_down" in p:
    return p["adapter_down"], p["adapter_up"]
  return (phm_matrix(p["phm_rule_down"], p["phm_down_s"], p["phm_down_t"]),
          phm_matrix(p["phm_rule_up"], p["phm_up_s"], p["phm_up_t"]))


def _check(spec, n: int, dims: dict[str, int]):
  m = int(spec["bottleneck"])
  if m < 1:
    raise ValueError(f"adapter.bottleneck must be >= 1, got {m}")
  for what, d in {**dims, "adapter.bottleneck": m}.items():
    if n > 1 and d % n:
      raise ValueError(f"{what}={d} is not divisible by adapter.phm_dim={n}")
  return m


def make_init(kind: str, projection: str):
  """init for a `kind` ('series' | 'parallel') adapter with `projection` ('dense' | 'phm')."""

  def init(key, frozen, spec: Mapping[str, Any], calib=None):
    del calib
    featurewise.activation(spec)
    flat = base.flatten(frozen)
    n = int(spec.get("phm_dim", 1))
    out = {}
    for i, path in enumerate(featurewise.linear_targets(frozen, spec)):
      w = flat[path + "/kernel"]
      *lead, d_in, d_out = w.shape
      d_src = d_out if kind == "series" else d_in
      m = _check(spec, n if projection == "phm" else 1, {f"{path} input": d_src,
                                                          f"{path} output": d_out})
      k1, k2 = jax.random.split(jax.random.fold_in(key, i))
      if projection == "dense":
        out[path + "/adapter_down"] = featurewise.kaiming_uniform(k1, (*lead, d_src, m), d_src,
                                                                  w.dtype)
        out[path + "/adapter_up"] = jnp.zeros((*lead, m, d_out), w.dtype)
      else:  # var(W_down) = n · (1/n) · 1 · (1/d_src): kaiming-normal; W_up = 0 through t_up = 0
        out[path + "/phm_down_s"] = jax.random.normal(k1, (*lead, n, d_src // n), w.dtype)
        out[path + "/phm_down_t"] = (jax.random.normal(k2, (*lead, n, m // n), w.dtype)
                                     / jnp.sqrt(jnp.asarray(d_src, w.dtype)))
        out[path + "/phm_up_s"] = jax.random.normal(jax.random.fold_in(k1, 1),
                                                    (*lead, n, m // n), w.dtype)
        out[path + "/phm_up_t"] = jnp.zeros((*lead, n, d_out // n), w.dtype)
    if projection == "phm":
      kd, ku = jax.random.split(jax.random.fold_in(key, 10_000))
      std = 1.0 / (n ** 0.5)
      out[RULE + "/down"] = std * jax.random.normal(kd, (n, n, n))
      out[RULE + "/up"] = std * jax.random.normal(ku, (n, n, n))
    return frozen, base.unflatten(out)

  return init


def make_logical_axes(kind: str):
  src = featurewise.OUT if kind == "series" else featurewise.IN
  table = {"adapter_down": lambda lead, ai, ao: (*src(lead, ai, ao), None),
           "adapter_up": lambda lead, ai, ao: (*lead, None, ao)}
  table.update({leaf: featurewise.replicated(2) for leaf in PHM})
  return featurewise.logical_axes_fn(table)


def combine(frozen, trainable, spec):
  """Model params with the adapter leaves beside their kernels; PHM rules copied into each."""
  del spec
  trainable = dict(trainable)
  rule = trainable.pop(RULE, None)
  if rule is None:
    return base.merge_trees(frozen, trainable)
  flat = base.flatten(trainable)
  for path in [p.rsplit("/", 1)[0] for p in flat if p.endswith("/phm_down_s")]:
    lead = flat[path + "/phm_down_s"].shape[:-2]
    for side in ("down", "up"):
      flat[f"{path}/phm_rule_{side}"] = jnp.broadcast_to(rule[side], (*lead, *rule[side].shape))
  return base.merge_trees(frozen, base.unflatten(flat))


def make_linear_hook(kind: str):

  def linear_hook(spec):
    act, s = featurewise.activation(spec), float(spec["scaling"])

    def linear(p, x, name, rng):
      y = decoder.dense(p, x, name, rng)
      if "adapter_down" not in p and "phm_down_s" not in p:
        return y
      down, up = _weights(p)
      src = y if kind == "series" else x
      h = act(src @ down.astype(x.dtype)) @ up.astype(x.dtype)
      return y + (s * h).astype(y.dtype)

    return linear

  return linear_hook


def make_member(name: str, kind: str, projection: str, doc: str, defaults: Mapping[str, Any]):
  return featurewise.member(
      name, doc, DEFAULTS=dict(defaults), init=make_init(kind, projection),
      logical_axes=make_logical_axes(kind), combine=combine, linear_hook=make_linear_hook(kind),
      materialize=featurewise.not_mergeable(name, f"a {kind} bottleneck is nonlinear"),
      merge=featurewise.not_mergeable(name, f"a {kind} bottleneck is nonlinear"),
      MERGEABLE=False)


series = make_member(
    "series_adapter", "series", "dense",
    'Series adapter: "LLM-Adapters: An Adapter Family for Parameter-Efficient Fine-Tuning of '
    'Large Language Models" — y + s·σ(y W_down) W_up after each target (default: after the MLP).',
    SERIES_DEFAULTS)
parallel = make_member(
    "parallel_adapter", "parallel", "dense",
    'Parallel adapter: "LLM-Adapters: An Adapter Family for Parameter-Efficient Fine-Tuning of '
    'Large Language Models" — y + s·σ(x W_down) W_up beside each target (default: MLP down).',
    PARALLEL_DEFAULTS)
