"""Adapters by name. Each member is a module with the same functions:

  DEFAULTS                         its config fields (`adapter.<field>`) and defaults
  init(key, frozen, spec, calib)   -> (frozen', trainable); only trainable is optimized
  logical_axes(model_axes, trainable, spec) -> (frozen axes, trainable axes)
  combine(frozen, trainable, spec) -> the params tree the model runs on (unmerged)
  linear_hook(spec)                -> the model's `linear(p, x, name, rng)` hook
  materialize(frozen, trainable, spec) / merge -> plain effective params (export)
"""
from jaxft.adapters import base, full, lora
from jaxft.adapters.base import TargetError, count_params

ADAPTERS = {"full": full, "lora": lora}
DEFAULTS = {name: module.DEFAULTS for name, module in ADAPTERS.items()}
