"""Sparsity schedules: SPDF (sparse pre-training, dense fine-tuning) and gradual pruning.

Papers: "SPDF: Sparse Pre-training and Dense Fine-tuning for Large Language
Models" and "The Journey Matters: Average Parameter Count over Pre-training
Unifies Sparse and Dense Scaling Laws".

* `spdf`: a static random mask, the same sparsity in every layer (each stacked
  layer slice loses exactly round(s * size) weights), re-applied after every
  update until step `dense_from`; from then on all weights train (dense FT).
* `gradual`: magnitude pruning to s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3
  over the window [t0, t1] (default 25%-75% of the steps); s_t = s_f after t1.
  Each update keeps the largest-|w| (1 - s_t) fraction per layer slice.

Masked weights are set exactly to 0 (the update is -w there). The loss law
L = E + A / N_bar^alpha + B / D^beta uses the average parameter count N_bar over
training: `mean_param_count` gives it in closed form.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxft import names

MODES = ("spdf", "gradual")


class PruneState(NamedTuple):
  count: jax.Array
  inner: optax.OptState


def sparsity_at(t, s_i: float, s_f: float, t0: int, t1: int):
  """The cubic schedule s_t (s_i before t0, s_f from t1 on)."""
  frac = jnp.clip((jnp.asarray(t, jnp.float32) - t0) / max(t1 - t0, 1), 0.0, 1.0)
  return s_f + (s_i - s_f) * (1.0 - frac) ** 3


def mean_param_count(n: float, s_i: float, s_f: float, t0: float, t1: float, total: float):
  """N_bar = mean over t in [0, total] of n (1 - s_t), in closed form (integral of the cubic)."""
  integral = s_i * t0 + (t1 - t0) * (s_f + (s_i - s_f) / 4.0) + s_f * (total - t1)
  return n * (1.0 - integral / total)


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _slices(x, path: str, layers_key: str):
  lead = x.shape[0] if layers_key in path.split("/") and x.ndim > 2 else 1
  return x.reshape(lead, -1)


def _keep_mask(scores, sparsity):
  """True for entries whose rank (per row) is >= floor(sparsity * row size)."""
  n = scores.shape[-1]
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  k = jnp.floor(sparsity * n + 1e-6).astype(jnp.int32)
  return ranks >= k


def prune_schedule(inner: optax.GradientTransformation, mode: str = "spdf",
                   sparsity: float = 0.5, initial_sparsity: float = 0.0, start: int = 0,
                   end: int = 1, dense_from: int = 2 ** 30, targets: Sequence[str] = (r"kernel$",),
                   key: int = 0, layers_key: str = "layers") -> optax.GradientTransformationExtraArgs:
  """Applies the sparsity mask of `mode` after each update of `inner`.

  Args:
    mode: 'spdf' (static random mask until `dense_from`) or 'gradual' (magnitude,
      s_i = initial_sparsity -> s_f = sparsity over steps [start, end]).
    targets: regexes over leaf paths ('layers/attn/q/kernel') that get pruned.
  """
  if mode not in MODES:
    raise ValueError(names.unknown_message("prune mode", mode, MODES))
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
  pattern = re.compile("|".join(f"(?:{t})" for t in targets))
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return PruneState(jnp.zeros((), jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None, **extra):
    if params is None:
      raise ValueError("prune_schedule needs params in update()")
    out, inner_state = inner.update(updates, state.inner, params, **extra)
    t = state.count + 1
    new = optax.apply_updates(params, out)
    leaves = jax.tree_util.tree_leaves_with_path(new)

    def masked(i, path, n, p, u):
      name = _path(path)
      if n.ndim < 2 or not pattern.search(name):
        return u
      if mode == "spdf":
        scores = jax.random.uniform(jax.random.fold_in(jax.random.PRNGKey(key), i), n.shape)
        keep = _keep_mask(_slices(scores, name, layers_key), sparsity) | (t >= dense_from)
      else:
        s_t = sparsity_at(t, initial_sparsity, sparsity, start, end)
        keep = _keep_mask(_slices(jnp.abs(n.astype(jnp.float32)), name, layers_key), s_t)
      keep = keep.reshape(n.shape)
      return jnp.where(keep, u, -p).astype(u.dtype)

    flat_out = jax.tree.leaves(out)
    flat_p = jax.tree.leaves(params)
    res = [masked(i, path, n, p, u)
           for i, ((path, n), p, u) in enumerate(zip(leaves, flat_p, flat_out))]
    return jax.tree.unflatten(jax.tree.structure(out), res), PruneState(t, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
