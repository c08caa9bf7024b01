"""N:M semi-structured sparsity masks, the hard N:M projection and its check.

Used by CAST ("CAST: Continuous and Differentiable Semi-Structured Sparsity-Aware
Training for Large Language Models"): in every group of M consecutive *input*
weights of a linear layer, the N of largest magnitude are kept:

    M[g] = 1 for the top-N |W| in group g, 0 for the other M - N.

jaxft stores kernels as (..., d_in, d_out) (y = x W), so the groups run along
axis -2 by default. Ties are broken by position (the earlier entry wins), so a
mask always keeps exactly N per group. `project` applies a mask hard (exact
zeros); `nm_report` counts nonzeros per group, which is how an export is verified.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxft_kernels.nm_sparse import reference as kernel_reference

# Linear-layer weights in jaxft models are leaves named `kernel`; embeddings and the
# head (`embed/embedding`) stay dense.
DEFAULT_TARGETS = r"kernel$"


def _check(shape, n: int, m: int, axis: int):
  if not 0 < n <= m:
    raise ValueError(f"N:M sparsity needs 0 < N <= M, got N={n}, M={m}")
  if shape[axis] % m:
    raise ValueError(f"N:M groups of M={m} along axis {axis} do not divide shape {tuple(shape)}")


def _grouped(w, m: int, axis: int):
  """(..., d, ...) -> (..., d/m, m) with the group axis moved last."""
  moved = jnp.moveaxis(w, axis, -1)
  return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


def nm_mask(w, n: int = 2, m: int = 4, axis: int = -2):
  """Boolean mask: True for the top-`n` |w| in each group of `m` along `axis` (the
  kernels' `nm_mask`, applied to `w` with `axis` moved first and the rest flattened)."""
  _check(w.shape, n, m, axis)
  moved = jnp.moveaxis(w, axis, 0)
  keep = kernel_reference.nm_mask(moved.reshape(moved.shape[0], -1), n, m)
  return jnp.moveaxis(keep.reshape(moved.shape), 0, axis)


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def target_tree(params, targets: str = DEFAULT_TARGETS, m: int = 4, axis: int = -2):
  """Bool tree: which leaves are N:M sparsified (path matches `targets`, >= 2 dims, divisible)."""
  pattern = re.compile(targets)
  def pick(path, p):
    return bool(p.ndim >= 2 and pattern.search(path_str(path)) and p.shape[axis] % m == 0)
  return jax.tree_util.tree_map_with_path(pick, params)


def masks(params, n: int = 2, m: int = 4, axis: int = -2, targets: str = DEFAULT_TARGETS):
  """N:M masks for the targeted leaves; None for the others."""
  chosen = target_tree(params, targets, m, axis)
  return jax.tree.map(lambda p, t: nm_mask(p, n, m, axis) if t else None, params, chosen)


def project(params, n: int = 2, m: int = 4, axis: int = -2, targets: str = DEFAULT_TARGETS,
            scales=None):
  """Hard N:M projection: targeted leaves keep their top-n per group, the rest become 0.

  `scales` (optional, a tree of positive per-output-column scales or None) is folded
  in first (W <- s * W, CAST's Weight Scaling); a positive scale never moves the mask.
  """
  if scales is not None:
    params = jax.tree.map(lambda p, s: p if s is None else (p * s).astype(p.dtype), params,
                          scales, is_leaf=lambda x: x is None)
  tree = masks(params, n, m, axis, targets)
  return jax.tree.map(lambda p, k: p if k is None else jnp.where(k, p, jnp.zeros_like(p)),
                      params, tree, is_leaf=lambda x: x is None)


def nm_report(params, n: int = 2, m: int = 4, axis: int = -2,
              targets: str = DEFAULT_TARGETS) -> dict[str, dict[str, Any]]:
  """Per targeted leaf: groups, groups with more than n nonzeros, max nonzeros, zero fraction."""
  out = {}
  chosen = target_tree(params, targets, m, axis)
  for (path, p), t in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(chosen)):
    if not t:
      continue
    nonzero = np.asarray(_grouped(jnp.asarray(p) != 0, m, axis)).sum(-1)
    out[path_str(path)] = {"groups": int(nonzero.size), "violations": int((nonzero > n).sum()),
                           "max_nonzeros": int(nonzero.max()),
                           "zero_fraction": float(1.0 - nonzero.sum() / np.asarray(p).size)}
  return out


def assert_nm(params, n: int = 2, m: int = 4, axis: int = -2, targets: str = DEFAULT_TARGETS):
  """Raises ValueError unless every targeted M-group has at most n nonzeros; returns the report."""
  report = nm_report(params, n, m, axis, targets)
  if not report:
    raise ValueError(f"no parameter matches N:M targets {targets!r}")
  bad = {k: v for k, v in report.items() if v["violations"]}
  if bad:
    raise ValueError(f"not {n}:{m} sparse: {bad}")
  return report
