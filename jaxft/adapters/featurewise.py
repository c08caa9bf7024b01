"""Shared parts of the adapters that attach per-channel or small modules to linears.

Used by the feature-wise (SSF, (IA)³), bottleneck (series / parallel adapters,
Compacter), prompt (prompt / prefix tuning), spectral (FourierFT, LoCA), Monarch
and intrinsic-dimension (SAID) members: target matching over linear paths, the
logical axes of leaves that sit beside a kernel, a `Member` namespace for files
that define several members, and the error a member that cannot merge raises.

Leaves beside a targeted `kernel` are stacked over layers like it: a leaf of
shape (…, d_out) under 'layers/mlp/up' has the kernel's leading `layers` axis.
"""
from __future__ import annotations

import types
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.adapters import base

LINEARS = (r"attn/(q|k|v|o)$", r"mlp/(gate|up|down)$")
ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu, "silu": jax.nn.silu,
               "identity": lambda x: x}

# How a leaf beside a kernel maps to logical axes: (lead axes, in axis, out axis) -> axes.
AxesFn = Callable[[tuple, Any, Any], tuple]
OUT = lambda lead, ai, ao: (*lead, ao)          # (…, d_out) vectors
IN = lambda lead, ai, ao: (*lead, ai)           # (…, d_in) vectors
LEAD = lambda lead, ai, ao: lead                # per-layer scalars


def replicated(n_extra: int) -> AxesFn:
  """Leaves of the kernel's lead axes plus `n_extra` unnamed (replicated) axes."""
  return lambda lead, ai, ao: (*lead, *([None] * n_extra))


def linear_targets(params: Mapping[str, Any], spec: Mapping[str, Any]) -> list[str]:
  """Linear paths (e.g. 'layers/attn/q') the spec's `targets` select; none matched = error."""
  return base.match(base.linear_paths(params), spec["targets"], what="linear layer")


def activation(spec: Mapping[str, Any]):
  name = spec["activation"]
  if name not in ACTIVATIONS:
    raise ValueError(f"adapter.activation={name!r} is invalid; valid choices: "
                     f"{', '.join(sorted(ACTIVATIONS))}")
  return ACTIVATIONS[name]


def axes_for(model_axes, tree, table: Mapping[str, AxesFn]):
  """Logical axes for every leaf of `tree` (arrays or ShapeDtypeStructs).

  A model param keeps the model's axes; a leaf named in `table` beside a linear
  kernel gets `table[leaf](lead, ax_in, ax_out)`; any other leaf is replicated.
  """
  flat_axes = base.flatten(model_axes)
  out = {}
  for path, x in base.flatten(tree).items():
    if path in flat_axes:
      out[path] = tuple(flat_axes[path])
      continue
    parent, _, leaf = path.rpartition("/")
    kernel = flat_axes.get(parent + "/kernel")
    if kernel is not None and leaf in table:
      *lead, ai, ao = kernel
      axes = tuple(table[leaf](tuple(lead), ai, ao))
    else:
      axes = (None,) * np.ndim(x)
    if len(axes) != np.ndim(x):
      raise ValueError(f"adapter leaf {path!r}: axes {axes} do not match shape {np.shape(x)}")
    out[path] = axes
  return base.unflatten(out)


def logical_axes_fn(table: Mapping[str, AxesFn]):
  """A member's `logical_axes(model_axes, trainable, spec)`; frozen keeps the model's axes."""

  def logical_axes(model_axes, trainable, spec):
    del spec
    return model_axes, axes_for(model_axes, trainable, table)

  return logical_axes


def not_mergeable(name: str, why: str):
  """`merge` for a member whose update is not a change of the base weights."""

  def merge(frozen, trainable, spec):
    del frozen, trainable, spec
    raise ValueError(
        f"adapter {name!r} cannot be merged into the base weights ({why}); run it unmerged: "
        f"params = adapter.combine(frozen, trainable, spec) with linear=adapter.linear_hook(spec)")

  return merge


def member(name: str, doc: str, **functions) -> types.SimpleNamespace:
  """A registry entry for one of several members defined in one file.

  Has the attributes of an adapter module (DEFAULTS, init, logical_axes, combine,
  linear_hook, materialize, merge, MERGEABLE) and its docstring.
  """
  ns = types.SimpleNamespace(**functions)
  ns.__doc__ = doc
  ns.__name__ = name
  ns.MERGEABLE = functions.get("MERGEABLE", True)
  return ns


def kaiming_uniform(key, shape, fan_in: int, dtype) -> jax.Array:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's nn.Linear default (as LoRA's A)."""
  bound = 1.0 / (fan_in ** 0.5)
  return jax.random.uniform(key, shape, dtype, -bound, bound)
