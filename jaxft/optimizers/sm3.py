"""SM3: memory-efficient second moments (cover sets = the axes of each tensor).

From "Memory-Efficient Adaptive Optimization" (Anil et al., 2019), used for the
regrowth scores of "Scaling Sparse Fine-Tuning to Large Language Models". For a
matrix gradient g with row / column accumulators r, c:

    nu_ij = b2' min(r_i, c_j) + (1 - b2)' g_ij^2      (b2 = 1: plain sum, the paper's SM3)
    r_i <- max_j nu_ij;   c_j <- max_i nu_ij
    mu <- b1 mu + (1 - b1) g / sqrt(nu)               (update = mu)

and for any rank the accumulators are one vector per axis (vectors keep a full
accumulator), so memory is O(sum of dims) besides the momentum. Equal to
`optax.sm3` step for step. The accumulators are stored per axis as
params-structured trees with keepdims shapes (1, n, 1, ...) so every state leaf
follows its parameter (and its sharding) through `optax.tree_map_params`.
`regrowth_scores` gives SpIEL's momentum-approximation score min(r_i, c_j).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxft.optimizers import core

MAX_RANK = 4


class ScaleBySM3State(NamedTuple):
  count: jax.Array
  acc: tuple       # MAX_RANK params-structured trees: the accumulator of axis i (keepdims)
  mu: Any          # momentum of g / sqrt(nu), params-shaped


def _acc_shape(p, i):
  if p.ndim < 2:
    return p.shape if i == 0 else (1,) * p.ndim
  if i >= p.ndim:
    return (1,) * p.ndim
  return tuple(d if j == i else 1 for j, d in enumerate(p.shape))


def _cover_min(acc_leaves, g):
  """min over the axis accumulators, broadcast to g's shape (vectors: the full accumulator)."""
  if g.ndim < 2:
    return acc_leaves[0]
  return functools.reduce(jnp.minimum, acc_leaves[:g.ndim])


def regrowth_scores(state: ScaleBySM3State):
  """SpIEL's momentum-approximation score min_i(acc_i) per element (params-shaped)."""
  accs = jax.tree.map(lambda *a: a, *state.acc)
  return jax.tree.map(lambda a, m: jnp.broadcast_to(_cover_min(a, m), m.shape), accs, state.mu,
                      is_leaf=lambda x: isinstance(x, tuple))


def scale_by_sm3(b1: float = 0.9, b2: float = 1.0, eps: float = 1e-8) -> optax.GradientTransformation:
  """SM3 preconditioning with momentum b1 (see the module docstring)."""

  def init_fn(params):
    for p in jax.tree.leaves(params):
      if p.ndim > MAX_RANK:
        raise ValueError(f"sm3 supports tensors of rank <= {MAX_RANK}, got shape {p.shape}")
    acc = tuple(jax.tree.map(lambda p, i=i: jnp.zeros(_acc_shape(p, i), p.dtype), params)
                for i in range(MAX_RANK))
    return ScaleBySM3State(jnp.zeros([], jnp.int32), acc, optax.tree.zeros_like(params))

  def leaf(g, mu, *acc):
    coeffs = ((1.0 - b2) if b2 != 1.0 else 1.0, b2)
    nu = coeffs[0] * g ** 2 + coeffs[1] * _cover_min(acc, g)
    up = g * jnp.where(nu > 0, jax.lax.rsqrt(nu + eps), 0.0)
    mu = ((1.0 - b1) * up + b1 * mu).astype(mu.dtype)
    if g.ndim < 2:
      new_acc = (nu,) + acc[1:]
    else:
      new_acc = tuple(
          jnp.max(nu, axis=[j for j in range(g.ndim) if j != i], keepdims=True) if i < g.ndim
          else acc[i] for i in range(MAX_RANK))
    return mu, tuple(a.astype(old.dtype) for a, old in zip(new_acc, acc))

  def update_fn(updates, state, params=None):
    del params
    out = jax.tree.map(leaf, updates, state.mu, *state.acc)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)
    mu = jax.tree.map(lambda o: o[0], out, is_leaf=is_pair)
    acc = tuple(jax.tree.map(lambda o, i=i: o[1][i], out, is_leaf=is_pair)
                for i in range(MAX_RANK))
    return mu, ScaleBySM3State(optax.safe_increment(state.count), acc, mu)

  return optax.GradientTransformation(init_fn, update_fn)


def sm3(learning_rate, b1: float = 0.9, b2: float = 1.0, eps: float = 1e-8,
        weight_decay: float = 0.0, mask=None) -> optax.GradientTransformation:
  """SM3 with momentum and decoupled weight decay."""
  return optax.chain(scale_by_sm3(b1, b2, eps), optax.add_decayed_weights(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


def _sm3(lr, spec):
  """SM3: memory-efficient adaptive second moments from per-row/column maxima (cover sets)."""
  return sm3(lr, b1=spec["b1"], b2=spec["b2"], eps=spec["eps"],
             weight_decay=spec["weight_decay"], mask=core.decay_mask(spec))


REGISTRY = {"sm3": (_sm3, {"b1": 0.9, "b2": 1.0, "eps": 1e-8, "decay_mask": "matrices"})}
