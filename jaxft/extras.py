"""Method extras a config switches on, wrapped around the adapter (`with_extras`, called by
`jaxft.build.build_task`): a dense self-teacher for distillation (objective 'kd': a frozen
copy of the initial weights in `state.frozen['teacher']`, run on every batch by
`jaxft.train.loss_and_metrics`), CAST's learned weight scales (`optimizer.weight_scaling`:
log-scales in `state.trainable['weight_scale']`), and an adapter's optimizer transform
(`Task.post_update`, e.g. CoDyRA's l1 prox), applied to every update after the optimizer.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.objectives import kd
from jaxft.optimizers import weight_scale


TEACHER = "teacher"        # state.frozen[TEACHER]: the dense self-teacher (objective 'kd')
SCALES = "weight_scale"    # state.trainable[SCALES]: CAST's log weight scales


class Extended:
  """An adapter module plus method extras, used everywhere in place of the module.

  `teacher`: `init` adds a copy of the initial params as frozen[TEACHER] (sharded like
  the params, never checkpointed: rebuilt from the config like every frozen leaf).
  `scaling` ({mode, forward, n, m, targets}): `init` adds trainable[SCALES] (log s per
  N:M-targeted kernel, see `weight_scale.init_flat`); `combine` runs the model on
  s * W (or s * (M * W)); `merge` exports s folded into W and hard-projected to N:M.
  Everything else (hook, DEFAULTS, MERGEABLE, periodic updates, ...) is the module's.
  """

  def __init__(self, inner, teacher: bool = False, scaling: Mapping[str, Any] | None = None):
    self.inner, self.teacher, self.scaling = inner, teacher, scaling

  def __getattr__(self, name):
    if name == "regularizer" and hasattr(self.inner, "regularizer"):
      return self._regularizer
    return getattr(self.inner, name)

  @staticmethod
  def split(frozen, trainable):
    """(module's frozen, module's trainable, scales or None)."""
    return ({k: v for k, v in frozen.items() if k != TEACHER},
            {k: v for k, v in trainable.items() if k != SCALES}, trainable.get(SCALES))

  def init(self, key, params, spec, calib=None):
    frozen, trainable = self.inner.init(key, params, spec, calib)
    if self.teacher:
      frozen = {**frozen, TEACHER: jax.tree.map(jnp.copy, params)}
    scales = self.scaling and weight_scale.init_flat(trainable, self.scaling["targets"],
                                                     self.scaling["m"])
    if scales:  # none when no trained kernel is an N:M target (e.g. a low-rank adapter)
      trainable = {**trainable, SCALES: scales}
    return frozen, trainable

  def logical_axes(self, model_axes, trainable, spec):
    _, tr, scales = self.split({}, trainable)
    frozen_axes, trainable_axes = self.inner.logical_axes(model_axes, tr, spec)
    if self.teacher:
      frozen_axes = {**frozen_axes, TEACHER: model_axes}
    if scales is not None:
      trainable_axes = {**trainable_axes, SCALES: weight_scale.flat_axes(model_axes, scales)}
    return frozen_axes, trainable_axes

  def _scaled(self, params, scales, forward=None):
    if scales is None:
      return params
    s = self.scaling
    return weight_scale.apply_flat(params, scales, s["mode"], forward or s["forward"], s["n"],
                                   s["m"])

  def combine(self, frozen, trainable, spec):
    f, t, scales = self.split(frozen, trainable)
    return self._scaled(self.inner.combine(f, t, spec), scales)

  def materialize(self, frozen, trainable, spec):
    f, t, scales = self.split(frozen, trainable)
    return self._scaled(self.inner.materialize(f, t, spec), scales)

  def merge(self, frozen, trainable, spec):
    f, t, scales = self.split(frozen, trainable)
    merged = self.inner.merge(f, t, spec)
    if scales is None:
      return merged
    s = self.scaling
    return weight_scale.export_flat(merged, scales, s["mode"], s["n"], s["m"])

  def _regularizer(self, frozen, trainable, spec):
    f, t, _ = self.split(frozen, trainable)
    return self.inner.regularizer(f, t, spec)


def with_extras(task, cfg):
  """`task` (a `jaxft.train.Task`) with what `cfg` switches on: the dense teacher (objective 'kd' with
  teacher='initial'), CAST's weight scaling (`optimizer.weight_scaling` != 'none'), and
  the adapter's optimizer transform (`optimizer_transform(spec, schedule)`)."""
  from jaxft import optimizers  # pylint: disable=g-import-not-at-top
  from jaxft.optimizers import compose  # pylint: disable=g-import-not-at-top
  opt, obj = cfg.optimizer.to_dict(), task.objective_spec
  teacher = False
  if obj.get("name") == "kd":
    if obj.get("teacher", "initial") not in kd.TEACHERS:
      raise ValueError(f"unknown objective.teacher {obj['teacher']!r} (valid: "
                       f"{', '.join(kd.TEACHERS)})")
    teacher = obj.get("teacher", "initial") == "initial"
  mode = opt.get("weight_scaling", "none")
  if mode not in ("none",) + weight_scale.SCALE_MODES:
    raise ValueError(f"unknown optimizer.weight_scaling {mode!r} (valid: none, "
                     f"{', '.join(weight_scale.SCALE_MODES)})")
  scaling = None if mode == "none" else {
      "mode": mode, "forward": opt.get("weight_scaling_forward", "dense"), "n": int(opt["n"]),
      "m": int(opt["m"]), "targets": opt["targets"]}
  adapter = Extended(task.adapter, teacher, scaling) if teacher or scaling else task.adapter
  post = compose.adapter_transform(task.adapter, task.adapter_spec,
                                   optimizers.schedule(opt, int(cfg.steps)))
  return task._replace(adapter=adapter, post_update=post)
