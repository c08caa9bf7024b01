"""What every adapter shares: param paths, regex targets, tree splitting, counting.

Params are nested dicts; a leaf's path is its keys joined by '/', e.g.
`layers/attn/q/kernel`. Adapters select what they touch with regular expressions
searched (`re.search`) in these paths, and a pattern that matches nothing is an
error, never a silent no-op.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

SEP = "/"


class TargetError(ValueError):
  """An adapter target pattern that matches no parameter path."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}. Leaves are anything that is not a Mapping."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{SEP}{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(flatten(value, path))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten`."""
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split(SEP)
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out


def merge_trees(*trees: Mapping[str, Any]) -> dict[str, Any]:
  """Union of nested dicts with disjoint leaves (frozen + trainable -> params)."""
  flat: dict[str, Any] = {}
  for tree in trees:
    for path, value in flatten(tree).items():
      if path in flat:
        raise ValueError(f"param {path!r} is in more than one tree")
      flat[path] = value
  return unflatten(flat)


def as_patterns(targets: str | Sequence[str]) -> tuple[str, ...]:
  return (targets,) if isinstance(targets, str) else tuple(targets)


def match(paths: Iterable[str], targets: str | Sequence[str], *, what: str = "param") -> list[str]:
  """Paths matched by any pattern; every pattern must match at least one path."""
  paths = list(paths)
  chosen = set()
  for pattern in as_patterns(targets):
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise TargetError(f"adapter target {pattern!r} is not a valid regular expression: {e}") from None
    hits = [p for p in paths if regex.search(p)]
    if not hits:
      listing = "\n  ".join(paths)
      raise TargetError(
          f"adapter target {pattern!r} matches no {what} path. The {what} paths are:\n  {listing}")
    chosen.update(hits)
  return [p for p in paths if p in chosen]


def split(params: Mapping[str, Any], predicate: Callable[[str], bool]) -> tuple[dict, dict]:
  """(leaves where predicate is False, leaves where it is True), both nested."""
  flat = flatten(params)
  yes = {p: v for p, v in flat.items() if predicate(p)}
  no = {p: v for p, v in flat.items() if not predicate(p)}
  return unflatten(no), unflatten(yes)


def count_params(tree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def linear_paths(params: Mapping[str, Any]) -> list[str]:
  """Paths of the linear layers (dicts holding a 'kernel' of ndim >= 2), e.g. 'layers/attn/q'."""
  out = []
  for path, value in flatten(params).items():
    if path.endswith(SEP + "kernel") and np.ndim(value) >= 2:
      out.append(path[: -len(SEP + "kernel")])
  return out


def with_adapter_losses(adapter, spec, frozen, trainable, loss, metrics, aux=None):
  """(loss + the adapter's `regularizer` + the model's auxiliary losses, metrics with each).

  `aux` is what `decoder.apply(..., return_aux=True)` returns (e.g. MixLoRA's
  load-balance loss); adapters without a regulariser and a model without aux give
  back `loss` unchanged.
  """
  extra = dict(aux or {})
  metrics = dict(metrics)
  fn = getattr(adapter, "regularizer", None)
  if fn is not None:
    reg, reg_metrics = fn(frozen, trainable, spec)
    extra["adapter_reg"] = reg
    metrics.update(reg_metrics)
  for name, value in extra.items():
    loss = loss + value
    metrics[name] = value
  metrics["loss"] = loss
  return loss, metrics
