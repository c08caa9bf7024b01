"""Optimizers by name, built from the `optimizer` config section.

Every optimizer is an `optax.GradientTransformation`; `build(spec, total_steps)`
adds what all of them share, once: global-norm clipping and the learning-rate
schedule (linear warmup, then constant / cosine / linear decay to
`lr * min_lr_ratio`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import optax

from jaxft import names

COMMON = {
    "lr": 1e-3,
    "schedule": "cosine",
    "warmup_steps": 0,
    "min_lr_ratio": 0.1,
    "clip_norm": 1.0,
    "weight_decay": 0.0,
}


def _adamw(lr, spec):
  """AdamW (optax.adamw): Adam with decoupled weight decay."""
  return optax.adamw(lr, b1=spec["b1"], b2=spec["b2"], eps=spec["eps"],
                     weight_decay=spec["weight_decay"])


def _sgd(lr, spec):
  """SGD with (Nesterov) momentum (optax.sgd), optional L2 weight decay."""
  tx = optax.sgd(lr, momentum=spec["momentum"] or None, nesterov=spec["nesterov"])
  if spec["weight_decay"]:
    tx = optax.chain(optax.add_decayed_weights(spec["weight_decay"]), tx)
  return tx


OPTIMIZERS: dict[str, tuple[Callable, Mapping[str, Any]]] = {
    "adamw": (_adamw, {"b1": 0.9, "b2": 0.999, "eps": 1e-8}),
    "sgd": (_sgd, {"momentum": 0.9, "nesterov": False}),
}
DEFAULTS = {name: {**COMMON, **extra} for name, (_, extra) in OPTIMIZERS.items()}
SCHEDULES = ("constant", "cosine", "linear")


def schedule(spec: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Warmup (linear from 0) then the named decay over the remaining steps."""
  kind = spec["schedule"]
  if kind not in SCHEDULES:
    raise ValueError(names.unknown_message("optimizer.schedule", kind, SCHEDULES))
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
  tx = factory(sched, spec)
  if spec["clip_norm"] and float(spec["clip_norm"]) > 0:
    tx = optax.chain(optax.clip_by_global_norm(float(spec["clip_norm"])), tx)
  return tx, sched
