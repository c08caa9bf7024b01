"""CAST Weight Scaling: a positive per-output-channel scale on the N:M weights.

From "CAST: Continuous and Differentiable Semi-Structured Sparsity-Aware Training
for Large Language Models": the L1 decay of AdamS shrinks the weights it prunes
and, through the shared statistics, the magnitude of the layer; a learned
positive scale per output channel undoes the loss while keeping the pattern:

    W_eff = s * (M * W)     (forward="masked")      or      s * W   (forward="dense")
    s = exp(log_s)  (scale_mode="learned", log_s trained, init 0)
    s = ||W||_col / ||M * W||_col, stop-gradient   (scale_mode="norm_ratio")

Groups of M run along the input axis (-2 in jaxft's (d_in, d_out) kernels) and s
is shared by a whole output column, so s > 0 never changes which weights a group
keeps. At export s folds into W (W <- s * W) and the N:M projection is exact.
The exact form of s is not fixed by the sources: `scale_mode` is the switch.

In a run (`optimizer.weight_scaling` of `adams_cast`, wired by `jaxft.extras.with_extras`):
the scales live in `trainable['weight_scale']` as `<linear path>/scale` leaves holding
log s (shape (..., 1, d_out), init 0, trained by the same optimizer, never N:M
targeted or weight-decayed: the leaf is named `scale`); the forward of every step
runs on `apply_flat(params, scales)`; the exported / merged model is
`export_flat(params, scales)` = the N:M projection of s * W (W is already exactly
N:M after adams_cast's final projection, so the fold changes no zero).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft import names
from jaxft.adapters import base
from jaxft.optimizers import nm_mask

SCALE_MODES = ("learned", "norm_ratio")


def init(params, targets: str = nm_mask.DEFAULT_TARGETS, m: int = 4, axis: int = -2):
  """log-scales (zeros, shape (..., 1, d_out)) for the N:M-targeted leaves, None elsewhere."""
  chosen = nm_mask.target_tree(params, targets, m, axis)
  def make(p, t):
    if not t:
      return None
    shape = list(p.shape)
    shape[axis] = 1
    return jnp.zeros(shape, p.dtype)
  return jax.tree.map(make, params, chosen)


def _scale(w, log_s, mode, keep, axis):
  if mode == "learned":
    return jnp.exp(log_s)
  dense = jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=axis, keepdims=True))
  sparse = jnp.sqrt(jnp.sum(jnp.square(jnp.where(keep, w, 0).astype(jnp.float32)), axis=axis,
                            keepdims=True))
  return jax.lax.stop_gradient(jnp.where(sparse > 0, dense / jnp.maximum(sparse, 1e-30), 1.0))


def effective(params, log_scales, mode: str = "learned", masked: bool = False, n: int = 2,
              m: int = 4, axis: int = -2, targets: str = nm_mask.DEFAULT_TARGETS):
  """W_eff = s * (M * W) (masked) or s * W for targeted leaves; others unchanged."""
  if mode not in SCALE_MODES:
    raise ValueError(names.unknown_message("optimizer.scale_mode", mode, SCALE_MODES))
  if log_scales is None or mode == "norm_ratio":
    log_scales = init(params, targets, m, axis)
  chosen = nm_mask.target_tree(params, targets, m, axis)
  def apply(w, log_s, t):
    if not t:
      return w
    keep = nm_mask.nm_mask(w, n, m, axis)
    base = jnp.where(keep, w, 0) if masked else w
    return (_scale(w, log_s, mode, keep, axis) * base).astype(w.dtype)
  return jax.tree.map(apply, params, log_scales, chosen, is_leaf=lambda x: x is None)


def export(params, log_scales, mode: str = "learned", n: int = 2, m: int = 4, axis: int = -2,
           targets: str = nm_mask.DEFAULT_TARGETS):
  """Folds s into W and hard-projects to N:M: the exactly sparse weights to ship."""
  return nm_mask.project(effective(params, log_scales, mode, True, n, m, axis, targets),
                         n, m, axis, targets)


# ---------------------------------------------------------------------------
# Flat form used in a run: {"<linear path>/scale": log s} for the targeted kernels.

FORWARDS = ("dense", "masked")


def _kernel_path(scale_path: str) -> str:
  return scale_path[: -len("scale")] + "kernel"


def init_flat(params, targets: str = nm_mask.DEFAULT_TARGETS, m: int = 4, axis: int = -2):
  """{'<path>/scale': zeros (..., 1, d_out)} for every N:M-targeted `<path>/kernel`."""
  tree = init(params, targets, m, axis)
  flat = base.flatten(tree)
  return base.unflatten({k[: -len("kernel")] + "scale": v for k, v in flat.items()
                         if v is not None and k.endswith("kernel")})


def flat_axes(model_axes, scales, axis: int = -2):
  """Logical axes of the scale leaves: their kernel's, with the grouped (input) axis None."""
  axes = base.flatten(model_axes)
  def one(path):
    a = list(axes[_kernel_path(path)])
    a[axis] = None
    return tuple(a)
  return base.unflatten({p: one(p) for p in base.flatten(scales)})


def apply_flat(params, scales, mode: str = "learned", forward: str = "dense", n: int = 2,
               m: int = 4, axis: int = -2):
  """params with W <- s * W (forward='dense') or s * (M * W) ('masked') at each scaled kernel."""
  if forward not in FORWARDS:
    raise ValueError(names.unknown_message("optimizer.weight_scaling_forward", forward, FORWARDS))
  if mode not in SCALE_MODES:
    raise ValueError(names.unknown_message("optimizer.weight_scaling", mode, SCALE_MODES))
  flat = dict(base.flatten(params))
  for path, log_s in base.flatten(scales).items():
    w = flat[_kernel_path(path)]
    keep = nm_mask.nm_mask(w, n, m, axis)
    base_w = jnp.where(keep, w, 0) if forward == "masked" else w
    flat[_kernel_path(path)] = (_scale(w, log_s, mode, keep, axis) * base_w).astype(w.dtype)
  return base.unflatten(flat)


def export_flat(params, scales, mode: str = "learned", n: int = 2, m: int = 4, axis: int = -2):
  """The weights to ship: s folded into W, then the hard N:M projection of each scaled kernel."""
  flat = dict(base.flatten(apply_flat(params, scales, mode, "masked", n, m, axis)))
  for path in base.flatten(scales):
    w = flat[_kernel_path(path)]
    flat[_kernel_path(path)] = jnp.where(nm_mask.nm_mask(w, n, m, axis), w, jnp.zeros_like(w))
  return base.unflatten(flat)
