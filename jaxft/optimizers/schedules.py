"""Learning-rate schedules for continual pre-training: re-warm/re-decay and infinite.

Paper: "Simple and Scalable Strategies to Continually Pre-train Large Language
Models".

* `rewarm`: linear warmup from 0 to lr_max over `warmup` steps (1% of the run by
  default), then cosine decay to `min_ratio * lr_max` (0.1) at `total_steps`.
* `infinite_lr`: warmup 0 -> lr_max; cosine cooldown lr_max -> lr_const over
  `cooldown` steps; constant lr_const for any number of steps; when a checkpoint
  is wanted, a linear anneal from lr_const to lr_min over `anneal` steps that
  begins at `anneal_start` (default: so that it ends exactly at `total_steps`).
  The constant phase is budget-free: only the anneal depends on where it ends.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import optax


def rewarm(lr_max: float, total_steps: int, warmup: int | None = None,
           min_ratio: float = 0.1) -> optax.Schedule:
  """Re-warm (linear, default ceil(1% of the steps)) then re-decay (cosine to min_ratio lr)."""
  warmup = max(1, math.ceil(0.01 * total_steps)) if not warmup else int(warmup)
  decay = optax.cosine_decay_schedule(lr_max, max(total_steps - warmup, 1), alpha=min_ratio)
  return optax.join_schedules([optax.linear_schedule(0.0, lr_max, warmup), decay], [warmup])


def infinite_lr(lr_max: float, total_steps: int, warmup: int = 0, cooldown: int = 0,
                const_ratio: float = 0.25, anneal: int = 0, anneal_start: int = -1,
                min_ratio: float = 0.0) -> optax.Schedule:
  """Warmup -> cooldown -> constant -> anneal (see the module docstring)."""
  lr_const, lr_min = lr_max * const_ratio, lr_max * min_ratio
  if anneal_start < 0:
    anneal_start = total_steps - anneal
  if anneal and anneal_start < warmup + cooldown:
    raise ValueError(f"the anneal starts at step {anneal_start}, before warmup + cooldown = "
                     f"{warmup + cooldown} end")

  def sched(count):
    t = jnp.asarray(count, jnp.float32)
    warm = lr_max * t / max(warmup, 1)
    frac = jnp.clip((t - warmup) / max(cooldown, 1), 0.0, 1.0)
    cool = lr_const + (lr_max - lr_const) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    a = jnp.clip((t - anneal_start) / max(anneal, 1), 0.0, 1.0)
    ann = lr_const + (lr_min - lr_const) * a
    out = jnp.where(t < warmup, warm, jnp.where(t < warmup + cooldown, cool, lr_const))
    return jnp.where((anneal > 0) & (t >= anneal_start), ann, out)
  return sched


def make(spec, total_steps: int) -> optax.Schedule | None:
  """The schedule named by `spec['schedule']` if it is one of these, else None."""
  kind, lr = spec["schedule"], float(spec["lr"])
  a = {**ARGS, **dict(spec.get("schedule_args") or {})}
  if kind == "rewarm":
    return rewarm(lr, total_steps, int(spec["warmup_steps"]), float(spec["min_lr_ratio"]))
  if kind == "infinite_lr":
    return infinite_lr(lr, total_steps, int(spec["warmup_steps"]), int(a["cooldown_steps"]),
                       float(a["const_lr_ratio"]), int(a["anneal_steps"]), int(a["anneal_start"]),
                       float(spec["min_lr_ratio"]))
  return None


NAMES = ("rewarm", "infinite_lr")
# `optimizer.schedule_args`: what infinite_lr reads beyond lr / warmup_steps / min_lr_ratio.
ARGS = {"cooldown_steps": 0, "const_lr_ratio": 0.25, "anneal_steps": 0, "anneal_start": -1}
