"""Fira: "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?".

Adam keeps its state on the low-rank projection R = P^T G of each weight matrix
(`lowrank_projection`, P refreshed from the SVD of G every `update_proj_gap`
steps); the residual G - P R, which GaLore drops, is trained too, scaled per
column by how much Adam rescaled that column of R:

    psi(R)  = Adam(R)                                   (bias-corrected, state r x n)
    phi_j   = ||psi(R)_{:,j}|| / ||R_{:,j}||
    S       = phi * (G - P R)                           (alpha_in_residual: G - alpha P R)
    limiter: if ||S_t|| > gamma ||S_{t-1}||, S_t <- S_t * gamma ||S_{t-1}|| / ||S_t||
    W      <- W - lr (alpha P psi(R) + S + wd W)

alpha = 0.25 and gamma = 1.01 follow the paper's release (whose code subtracts
alpha P R in the residual: `alpha_in_residual`). `residual=False` and
`limiter=False` give GaLore (the `galore` entry, equal to optax.contrib.galore).
Leaves that are not weight matrices, or whose smaller side is <= rank, get plain
Adam (so rank >= min(m, n) is exactly Adam). Stacked layers (..., m, n) are a
batch of matrices. Every state leaf keeps its parameter's rank (the low-rank
moments are (..., r, small), P is (..., big, r), the limiter norm (..., 1, 1)) so it
can follow the parameter's sharding.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxft.optimizers import core
from jaxft.optimizers import lowrank_projection as lrp


class ScaleByFiraState(NamedTuple):
  count: jax.Array
  proj: Any        # P (..., big, r) for projected leaves; (1,)*ndim placeholder otherwise
  mu: Any          # Adam first moment of R (projected) or of G
  nu: Any          # Adam second moment
  prev_norm: Any   # ||S_{t-1}|| per matrix (..., 1, 1); placeholder otherwise


def _plan(params, rank):
  return jax.tree_util.tree_map_with_path(lambda path, p: lrp.projectable(path, p, rank), params)


def scale_by_fira(rank: int = 64, update_proj_gap: int = 200, alpha: float = 0.25,
                  b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, residual: bool = True,
                  limiter: bool = True, gamma: float = 1.01,
                  alpha_in_residual: bool = False) -> optax.GradientTransformation:
  """Fira's direction alpha P psi(R) + S (GaLore's alpha P psi(R) with residual=False)."""
  if rank < 1 or update_proj_gap < 1:
    raise ValueError(f"fira needs rank >= 1 and update_proj_gap >= 1, got {rank}, {update_proj_gap}")

  def init_fn(params):
    plan = _plan(params, rank)
    stub = lambda p: jnp.zeros((1,) * p.ndim, p.dtype)
    def moments(p, lr_):
      return jnp.zeros(lrp.shapes(p, rank)[1], p.dtype) if lr_ else jnp.zeros_like(p)
    proj = jax.tree.map(lambda p, lr_: jnp.zeros(lrp.shapes(p, rank)[0], p.dtype) if lr_
                        else stub(p), params, plan)
    norm = jax.tree.map(lambda p, lr_: jnp.zeros((*p.shape[:-2], 1, 1), jnp.float32) if lr_
                        else stub(p).astype(jnp.float32), params, plan)
    return ScaleByFiraState(jnp.zeros([], jnp.int32), proj, jax.tree.map(moments, params, plan),
                            jax.tree.map(moments, params, plan), norm)

  def adam(x, mu, nu, count):
    mu = (1 - b1) * x + b1 * mu
    nu = (1 - b2) * x * x + b2 * nu
    step = (mu / (1 - b1 ** count)) / (jnp.sqrt(nu / (1 - b2 ** count)) + eps)
    return step, mu, nu

  def leaf(g, proj, mu, nu, prev, lowrank, refresh, count):
    if not lowrank:
      step, mu, nu = adam(g, mu, nu, count)
      return step.astype(g.dtype), proj, mu.astype(g.dtype), nu.astype(g.dtype), prev
    proj = jax.lax.cond(refresh, lambda: lrp.projector(g, rank), lambda: proj)
    r = lrp.project(g, proj)
    psi, mu, nu = adam(r, mu, nu, count)
    out = alpha * lrp.project_back(psi, proj, g.shape)
    if residual:
      phi = (jnp.linalg.norm(psi.astype(jnp.float32), axis=-2, keepdims=True)
             / (jnp.linalg.norm(r.astype(jnp.float32), axis=-2, keepdims=True) + 1e-8))
      back = lrp.project_back(r, proj, g.shape) * (alpha if alpha_in_residual else 1.0)
      s = lrp.from_tall(phi * lrp.to_tall(g - back, lrp.is_tall(g.shape)), lrp.is_tall(g.shape))
      norm = jnp.linalg.norm(s.astype(jnp.float32), axis=(-2, -1), keepdims=True)
      if limiter:
        too_big = (prev > 0) & (norm > gamma * prev)
        shrink = jnp.where(too_big, gamma * prev / jnp.maximum(norm, 1e-30), 1.0)
        s, norm = s * shrink.astype(s.dtype), norm * shrink
      out, prev = out + s, norm
    return out.astype(g.dtype), proj, mu.astype(g.dtype), nu.astype(g.dtype), prev

  def update_fn(updates, state, params=None):
    del params
    plan = _plan(updates, rank)
    count = optax.safe_increment(state.count)
    refresh = state.count % update_proj_gap == 0
    out = jax.tree.map(lambda *a: leaf(*a, refresh, count), updates, state.proj, state.mu,
                       state.nu, state.prev_norm, plan)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], updates, out,
                                  is_leaf=lambda x: isinstance(x, tuple))
    return pick(0), ScaleByFiraState(count, pick(1), pick(2), pick(3), pick(4))

  return optax.GradientTransformation(init_fn, update_fn)


def fira(learning_rate, rank: int = 64, update_proj_gap: int = 200, alpha: float = 0.25,
         b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
         residual: bool = True, limiter: bool = True, gamma: float = 1.01,
         alpha_in_residual: bool = False, mask=None) -> optax.GradientTransformation:
  """Fira with decoupled weight decay (in the full parameter space)."""
  return optax.chain(
      scale_by_fira(rank, update_proj_gap, alpha, b1, b2, eps, residual, limiter, gamma,
                    alpha_in_residual),
      optax.add_decayed_weights(weight_decay, mask), optax.scale_by_learning_rate(learning_rate))


def galore(learning_rate, rank: int = 64, update_proj_gap: int = 200, alpha: float = 0.25,
           b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
           mask=None) -> optax.GradientTransformation:
  """GaLore: Fira without the residual (W <- W - lr (alpha P psi(R) + wd W))."""
  return fira(learning_rate, rank, update_proj_gap, alpha, b1, b2, eps, weight_decay,
              residual=False, limiter=False, mask=mask)


def _fira(lr, spec):
  """Fira: GaLore's low-rank Adam plus the norm-scaled full-rank residual and the norm-growth limiter."""
  return fira(lr, rank=spec["rank"], update_proj_gap=spec["update_proj_gap"],
              alpha=spec["alpha"], b1=spec["b1"], b2=spec["b2"], eps=spec["eps"],
              weight_decay=spec["weight_decay"], limiter=spec["limiter"], gamma=spec["gamma"],
              alpha_in_residual=spec["alpha_in_residual"], mask=core.decay_mask(spec))


def _galore(lr, spec):
  """GaLore: Adam on gradients projected onto a periodically refreshed rank-r SVD subspace."""
  return galore(lr, rank=spec["rank"], update_proj_gap=spec["update_proj_gap"],
                alpha=spec["alpha"], b1=spec["b1"], b2=spec["b2"], eps=spec["eps"],
                weight_decay=spec["weight_decay"], mask=core.decay_mask(spec))


_LOWRANK = {"rank": 64, "update_proj_gap": 200, "alpha": 0.25, "b1": 0.9, "b2": 0.999,
            "eps": 1e-8, "decay_mask": "matrices"}
REGISTRY = {
    "fira": (_fira, {**_LOWRANK, "limiter": True, "gamma": 1.01, "alpha_in_residual": False}),
    "galore": (_galore, dict(_LOWRANK)),
}
