"""Optimizers by name, built from the `optimizer` config section.

Every optimizer is an `optax.GradientTransformation`. Each module lists its
optimizers in `REGISTRY = {name: (factory(lr_schedule, spec), defaults)}`;
`OPTIMIZERS` merges the registries of `_MODULES`. `build(spec, total_steps)`
adds what all of them share, once: global-norm clipping and the learning-rate
schedule (linear warmup, then constant / cosine / linear decay to
`lr * min_lr_ratio`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import optax

from jaxft import names
from jaxft.optimizers import adams_cast, core, fira, lion, sign_momentum, sm3
from jaxft.optimizers import compose, schedules, sharpness, subspace, zo

COMMON = {
    "lr": 1e-3,
    "schedule": "cosine",
    "warmup_steps": 0,
    "min_lr_ratio": 0.1,
    "clip_norm": 1.0,
    "weight_decay": 0.0,
    "wrappers": (),                      # compose.WRAPPERS names, innermost first
    "wrapper_args": dict(compose.ARGS),
    "schedule_args": dict(schedules.ARGS),
}

# Every module with optimizers, merged into OPTIMIZERS (add a module here, on this one line).
_MODULES = (core, lion, sign_momentum, adams_cast, sm3, fira, sharpness, zo, subspace)
OPTIMIZERS: dict[str, tuple[Callable, Mapping[str, Any]]] = {
    name: entry for module in _MODULES for name, entry in module.REGISTRY.items()}

# Aliases importable as `jaxft.optimizers.<name>` (after _MODULES: they shadow module names).
from jaxft.optimizers.core import matrix_mask, state_shardings  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxft.optimizers.lion import lion, scale_by_lion  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxft.optimizers.sign_momentum import scale_by_sign_momentum, signsgd, signum  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxft.optimizers.subspace import orthogonal_subspace  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxft.optimizers.sharpness import sam, tram  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxft.optimizers.zo import fedkseed, spsa, zo_subspace  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxft.optimizers.wrappers import momentum_reset, refactorize, reptile  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxft.optimizers.param_groups import layerwise_lr_decay  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxft.optimizers.sparsity import prune_schedule  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxft.optimizers.schedules import infinite_lr, rewarm  # pylint: disable=g-import-not-at-top,wrong-import-position
DEFAULTS = {name: {**COMMON, **extra} for name, (_, extra) in OPTIMIZERS.items()}
SCHEDULES = ("constant", "cosine", "linear") + schedules.NAMES


def schedule(spec: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Warmup (linear from 0) then the named decay over the remaining steps."""
  kind = spec["schedule"]
  if kind not in SCHEDULES:
    raise ValueError(names.unknown_message("optimizer.schedule", kind, SCHEDULES))
  if kind in schedules.NAMES:  # continual pre-training: rewarm, infinite_lr
    return schedules.make(spec, total_steps)
  lr, warmup = float(spec["lr"]), int(spec["warmup_steps"])
  end = lr * float(spec["min_lr_ratio"])
  decay_steps = max(total_steps - warmup, 1)
  if kind == "constant":
    decay = optax.constant_schedule(lr)
  elif kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(spec["min_lr_ratio"]))
  else:
    decay = optax.linear_schedule(lr, end, decay_steps)
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def build(spec: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(transformation, schedule) for the `optimizer` config section."""
  factory, _ = names.lookup(OPTIMIZERS, spec["name"], "optimizer")
  sched = schedule(spec, total_steps)
  # Factories also see the run length (CAST's lambda ramp and final N:M projection use it).
  tx = factory(sched, {**dict(spec), "total_steps": int(total_steps)})
  if spec["clip_norm"] and float(spec["clip_norm"]) > 0:
    tx = optax.chain(optax.clip_by_global_norm(float(spec["clip_norm"])), tx)
  return compose.wrap(tx, spec, total_steps), sched
