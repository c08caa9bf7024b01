"""Full fine-tuning: the targeted params train, the rest stay frozen.

With the default target `.*` every parameter trains; a narrower regex gives
partial fine-tuning (e.g. `'mlp/'` for the MLPs only).
"""
from __future__ import annotations

from typing import Any, Mapping

from jaxft.adapters import base
from jaxft.models import decoder

DEFAULTS = {"targets": (".*",)}


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """-> (frozen, trainable): the matched leaves move to `trainable`."""
  del key, calib
  chosen = set(base.match(base.flatten(frozen), spec["targets"]))
  return base.split(frozen, lambda p: p in chosen)


def logical_axes(model_axes, trainable, spec):
  """(frozen axes, trainable axes) from the model's logical-axes tree."""
  del spec
  chosen = set(base.flatten(trainable))
  return base.split(model_axes, lambda p: p in chosen)


def combine(frozen, trainable, spec):
  del spec
  return base.merge_trees(frozen, trainable)


def linear_hook(spec):
  del spec
  return decoder.dense


def materialize(frozen, trainable, spec):
  return combine(frozen, trainable, spec)


merge = materialize
