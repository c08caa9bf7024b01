"""Wrappers by name: `optimizer.wrappers` composes them around any optimizer.

    --config.optimizer.wrappers="('layerwise_lr_decay', 'reptile')"
    --config.optimizer.wrapper_args.layer_decay=0.8

Wrappers apply in the listed order, the first innermost (closest to the base
optimizer, after global-norm clipping). Their hyper-parameters live in
`optimizer.wrapper_args` (`ARGS`); step counts given as fractions (`prune_start`,
`prune_end`, `dense_from`) are fractions of the run's total steps.

Adapter transforms (the contract): an adapter module may define
`optimizer_transform(spec, schedule) -> optax.GradientTransformation`, a transform
of the final updates that sees the params (e.g. CoDyRA's ℓ1 prox:
u -> prox(p + u) − p with threshold λ·η_t). `adapter_transform` returns it (or
None). The train step (`jaxft.train`, `Task.post_update`) applies it after the
optimizer and its wrappers, on every update, with `step=` the number of updates
already applied (so η_t = schedule(step) is the learning rate of that update);
its state is not kept between steps, so it must depend only on (updates, params,
step). `with_adapter` chains it instead, for use outside the train step.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import optax

from jaxft import names
from jaxft.optimizers import param_groups, sparsity, wrappers

ARGS: dict[str, Any] = {
    "reset_every": 500,               # momentum_reset: period K
    "reset_second_moment": False,
    "refactor_every": 500,            # refactorize: period K
    "reptile_k": 4,                   # reptile: inner steps k
    "reptile_eps": 0.5,               # reptile: meta step size
    "layer_decay": 0.9,               # layerwise_lr_decay: xi
    "prune_mode": "spdf",             # prune_schedule: spdf | gradual
    "sparsity": 0.5,                  # s_f (spdf: the static mask's sparsity)
    "initial_sparsity": 0.0,          # s_i (gradual)
    "prune_start": 0.25,              # gradual window start t0 / total steps
    "prune_end": 0.75,                # gradual window end t1 / total steps
    "dense_from": 1.0,                # spdf: release the mask at this fraction (>= 1: never)
}


def _momentum_reset(tx, a, total_steps):
  return wrappers.momentum_reset(tx, int(a["reset_every"]), bool(a["reset_second_moment"]))


def _refactorize(tx, a, total_steps):
  return wrappers.refactorize(tx, int(a["refactor_every"]))


def _reptile(tx, a, total_steps):
  return wrappers.reptile(tx, int(a["reptile_k"]), float(a["reptile_eps"]))


def _layerwise_lr_decay(tx, a, total_steps):
  return param_groups.layerwise_lr_decay(tx, float(a["layer_decay"]))


def _prune_schedule(tx, a, total_steps):
  dense = float(a["dense_from"])
  return sparsity.prune_schedule(
      tx, a["prune_mode"], float(a["sparsity"]), float(a["initial_sparsity"]),
      round(float(a["prune_start"]) * total_steps), round(float(a["prune_end"]) * total_steps),
      2 ** 30 if dense >= 1.0 else round(dense * total_steps))


WRAPPERS: dict[str, Callable] = {
    "momentum_reset": _momentum_reset,
    "refactorize": _refactorize,
    "reptile": _reptile,
    "layerwise_lr_decay": _layerwise_lr_decay,
    "prune_schedule": _prune_schedule,
}


def wrapper_names(value) -> tuple[str, ...]:
  """('a', 'b') | 'a,b' | 'a' -> ('a', 'b')."""
  items = value.split(",") if isinstance(value, str) else list(value or ())
  return tuple(s.strip() for item in items for s in str(item).split(",") if s.strip())


def wrap(tx: optax.GradientTransformation, spec: Mapping[str, Any],
         total_steps: int) -> optax.GradientTransformation:
  """`tx` inside the wrappers `spec['wrappers']` names (none: `tx` unchanged)."""
  args = {**ARGS, **dict(spec.get("wrapper_args") or {})}
  for name in wrapper_names(spec.get("wrappers", ())):
    tx = names.lookup(WRAPPERS, name, "optimizer wrapper")(tx, args, total_steps)
  return tx


def adapter_transform(adapter, adapter_spec: Mapping[str, Any],
                      schedule) -> optax.GradientTransformation | None:
  """`adapter.optimizer_transform(spec, schedule)` when the adapter defines one, else None."""
  fn = getattr(adapter, "optimizer_transform", None)
  return None if fn is None else fn(adapter_spec, schedule)


def with_adapter(tx: optax.GradientTransformation, adapter, adapter_spec: Mapping[str, Any],
                 schedule) -> optax.GradientTransformation:
  """`tx` followed by the adapter's transform (its own count gives eta_t); `tx` if none."""
  extra = adapter_transform(adapter, adapter_spec, schedule)
  return tx if extra is None else optax.chain(tx, extra)
