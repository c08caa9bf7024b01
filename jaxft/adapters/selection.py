"""Shared parts of the selection and post-hoc sparse members of issue 5 (P2).

* Task vectors τ = θ_ft − θ0 per targeted linear: from two param trees
  (`task_vectors`), from a finished run's workdir (`run_params` gives θ0 and the
  run's merged θ_ft), or — inside `jaxft train`, which has no θ_ft — the stand-in
  of one full fine-tuning step from the calibration batches (`grad_task_vectors`,
  τ ∝ −G, G the mean full-FT gradient, as LT-SFT's default).
* Element-form members whose sparse delta φ is a function of their own leaves
  (`element_member`): grafting's φ = sigmoid(S) ⊙ τ_η, ComPEFT's φ = scale · sign.
  Beside each targeted kernel sit the frozen indices η (`sd_idx`), the member's
  frozen leaves and its trainable leaves; `combine` turns them into
  `sparse_delta`'s (`sd_idx`, `sd_delta`) pair, so the merged matmul, its
  custom VJP (no full weight gradient of W0) and the exact merge are
  `jaxft.adapters.sparse_delta`'s.
* `knapsack`: GreenTrainer's exact tensor selection under a backprop-FLOPs budget
  (`jaxft.adapters.freezing`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.adapters import base, calibrate, featurewise, sparse_delta as sd

SOURCES = ("grad",)


def task_vectors(pre, ft, paths) -> dict[str, jax.Array]:
  """{linear path: θ_ft − θ0 of its kernel} in float32."""
  f0, f1 = base.flatten(pre), base.flatten(ft)
  return {p: f1[p + "/kernel"].astype(jnp.float32) - f0[p + "/kernel"].astype(jnp.float32)
          for p in paths}


def grad_task_vectors(frozen, spec: Mapping[str, Any], calib, name: str) -> dict[str, jax.Array]:
  """{linear path: −G} for the targeted linears (G: calibration full-FT gradient)."""
  paths = featurewise.linear_targets(frozen, spec)  # a target matching nothing fails first
  source = spec.get("source", "grad")
  if source not in SOURCES:
    raise ValueError(f"adapter.source={source!r} is invalid for `jaxft train`; valid: "
                     f"{', '.join(SOURCES)} (a real fine-tuned θ_ft: {name}.from_finetuned)")
  stats = calibrate.statistics(calibrate.require(calib, name), frozen, paths, grad=True,
                               tokens=spec.get("calib_tokens", "all"))
  return {p: -stats[p].grad.astype(jnp.float32) for p in paths}


def run_params(workdir: str):
  """(θ0, θ_ft) of a finished `jaxft train` run: its base params and its merged params.

  θ0 is the pretrained checkpoint, or for a from-scratch config the params the run was
  initialised with (same key as `train.init_state`).
  """
  from jaxft import build, train  # pylint: disable=g-import-not-at-top
  cfg, tuned, _, _ = build.restore_params(workdir)
  model = build.load_model(cfg)
  pre = model.params
  if pre is None:
    k_model = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)[0]
    pre = train.cast_floating(model.module.init(k_model, model.cfg), train.DTYPES[cfg.param_dtype])
  return pre, tuned.params


def element_count(spec: Mapping[str, Any], w, field: str = "density") -> int:
  return sd.count(float(spec[field]), w.shape[-2] * w.shape[-1])


def element_init(frozen, paths, build: Callable[[str, jax.Array], tuple]):
  """(frozen', trainable): `build(path, w) -> (idx, {frozen leaf: x}, {trainable leaf: x})`."""
  flat = dict(base.flatten(frozen))
  train = {}
  for path in paths:
    idx, fixed, trained = build(path, flat[path + "/kernel"])
    flat[path + "/" + sd.IDX] = jnp.asarray(idx, jnp.int32)
    flat.update({f"{path}/{k}": v for k, v in fixed.items()})
    train.update({f"{path}/{k}": v for k, v in trained.items()})
  return base.unflatten(flat), base.unflatten(train)


def element_member(frozen_leaves: tuple[str, ...], trainable_axes: Mapping[str, Any],
                   phi: Callable[[Mapping[str, jax.Array]], jax.Array]):
  """(combine, logical_axes, materialize) of an element member with φ = phi(its leaves).

  `frozen_leaves`: the member's frozen (…, K) leaves beside `sd_idx`; `trainable_axes`:
  {trainable leaf: featurewise AxesFn}; `phi(leaves)` gets both kinds by leaf name.
  """

  def combine(frozen, trainable, spec):
    del spec
    flat = dict(base.flatten(frozen))
    groups: dict[str, dict] = {}
    for path, value in base.flatten(trainable).items():
      linear, leaf = path.rsplit("/", 1)
      groups.setdefault(linear, {})[leaf] = value
    for linear, leaves in groups.items():
      leaves.update({k: flat.pop(f"{linear}/{k}") for k in frozen_leaves})
      flat[f"{linear}/{sd.DELTA}"] = phi(leaves).astype(flat[linear + "/kernel"].dtype)
    return base.unflatten(flat)

  def logical_axes(model_axes, trainable, spec):
    del spec
    flat_axes = base.flatten(model_axes)
    frozen_out = dict(flat_axes)
    for path in base.flatten(trainable):
      linear = path.rsplit("/", 1)[0]
      *lead_ax, _, _ = flat_axes[linear + "/kernel"]
      frozen_out.update({f"{linear}/{k}": (*lead_ax, None) for k in (sd.IDX, *frozen_leaves)})
    return base.unflatten(frozen_out), featurewise.axes_for(model_axes, trainable, trainable_axes)

  def materialize(frozen, trainable, spec):
    """θ0 + scatter(η, φ): plain params, index and member leaves dropped."""
    params = combine(frozen, trainable, spec)
    fixed, delta = base.split(params, lambda p: p.endswith("/" + sd.DELTA))
    return sd.materialize(fixed, delta, spec)

  return combine, logical_axes, materialize


def knapsack(importance, dw_cost, dx_cost, budget: int, selectable=None) -> np.ndarray:
  """0/1 mask over tensors in backprop order (output first) maximising Σ importance s.t.

      Σ_{j < d} dx_cost[j] + Σ_{selected} dw_cost[j] <= budget,   d = the deepest selected,

  with integer costs; exact dynamic programming over depth (prefix knapsack per d).
  """
  imp = np.asarray(importance, np.float64)
  dw, dx = np.asarray(dw_cost, np.int64), np.asarray(dx_cost, np.int64)
  ok = np.ones(len(imp), bool) if selectable is None else np.asarray(selectable, bool)
  n, b_max = len(imp), max(int(budget), 0)
  table = np.zeros((n + 1, b_max + 1))           # best value over items < j with dW cost <= b
  for j in range(n):
    table[j + 1] = table[j]
    if ok[j] and dw[j] <= b_max:
      table[j + 1, dw[j]:] = np.maximum(table[j, dw[j]:], table[j, :b_max + 1 - dw[j]] + imp[j])
  above = np.concatenate([[0], np.cumsum(dx)])
  best, best_d, best_b = 0.0, -1, 0
  for d in range(n):
    room = b_max - above[d] - dw[d]
    if ok[d] and room >= 0 and table[d, room] + imp[d] > best:
      best, best_d, best_b = table[d, room] + imp[d], d, room
  mask = np.zeros(n, bool)
  if best_d >= 0:
    mask[best_d] = True
    b = best_b
    for j in range(best_d - 1, -1, -1):
      if table[j + 1, b] != table[j, b]:
        mask[j] = True
        b -= dw[j]
  return mask
