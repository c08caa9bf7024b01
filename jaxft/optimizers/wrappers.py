"""Wrappers that compose with any optimizer: momentum reset, weight refactorisation, Reptile.

Each takes a `GradientTransformation` and returns one. Those that change the
parameters themselves (refactorisation, Reptile) return `new_params - params` as
the update, so they stay optax transforms and need the `params` argument.

* `momentum_reset` and `refactorize` — "Scalable Parameter and Memory Efficient
  Pretraining for LLM: Recent Algorithmic Advances and Benchmarking": every K
  steps zero Adam's first moment (`mu`; `nu` too with reset_second_moment), and
  rebalance each low-rank pair, BA = U S V^T -> B = U S^1/2, A = S^1/2 V^T (here
  the LoRA pair is lora_a (d_in, r), lora_b (r, d_out): A B = U S V^T ->
  lora_a = U S^1/2, lora_b = S^1/2 V^T, so the product is unchanged and
  ||lora_a||_F = ||lora_b||_F). Combine the two with the same period, as the paper does.
* `reptile` — "Revisiting Replay and Gradient Alignment for Continual Pre-Training
  of Large Language Models" (MER): every k steps theta <- theta_0 + eps (theta_k -
  theta_0), and theta_0 <- theta. eps = 1 is plain training (returned unchanged).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class PeriodicState(NamedTuple):
  count: jax.Array   # int32: updates so far
  inner: Any
  anchor: Any = ()   # reptile: theta_0 of the current k-step window


def _replace_fields(state, fields, fn):
  """Applies `fn` to every NamedTuple field named in `fields`, anywhere in `state`."""
  if isinstance(state, tuple) and hasattr(state, "_fields"):
    return type(state)(*[fn(v) if k in fields else _replace_fields(v, fields, fn)
                         for k, v in zip(state._fields, state)])
  if isinstance(state, (tuple, list)):
    return type(state)(_replace_fields(v, fields, fn) for v in state)
  if isinstance(state, dict):
    return {k: _replace_fields(v, fields, fn) for k, v in state.items()}
  return state


def momentum_reset(inner: optax.GradientTransformation, every: int = 500,
                   reset_second_moment: bool = False) -> optax.GradientTransformationExtraArgs:
  """Zeroes the first moment (`mu`) of `inner` after every `every`-th update."""
  if every < 1:
    raise ValueError(f"momentum_reset every must be >= 1, got {every}")
  inner = optax.with_extra_args_support(inner)
  fields = ("mu", "nu") if reset_second_moment else ("mu",)

  def init_fn(params):
    return PeriodicState(jnp.zeros((), jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None, **extra):
    out, inner_state = inner.update(updates, state.inner, params, **extra)
    count = state.count + 1
    reset = count % every == 0
    inner_state = _replace_fields(
        inner_state, fields,
        lambda t: jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), t))
    return out, PeriodicState(count, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rebalance(a, b):
  """(A, B) -> (U S^1/2, S^1/2 V^T) with A B = U S V^T (batched over leading axes)."""
  qa, ra = jnp.linalg.qr(a.astype(jnp.float32))
  qb, rb = jnp.linalg.qr(jnp.swapaxes(b.astype(jnp.float32), -1, -2))
  u, s, vt = jnp.linalg.svd(ra @ jnp.swapaxes(rb, -1, -2))
  root = jnp.sqrt(s)[..., None, :]
  new_a = (qa @ u) * root
  new_b = jnp.swapaxes((qb @ jnp.swapaxes(vt, -1, -2)) * root, -1, -2)
  return new_a.astype(a.dtype), new_b.astype(b.dtype)


def _refactor_tree(params, a_name: str, b_name: str):
  if isinstance(params, dict):
    out = {k: _refactor_tree(v, a_name, b_name) for k, v in params.items()}
    if a_name in params and b_name in params:
      out[a_name], out[b_name] = rebalance(params[a_name], params[b_name])
    return out
  return params


def refactorize(inner: optax.GradientTransformation, every: int = 500, a_name: str = "lora_a",
                b_name: str = "lora_b") -> optax.GradientTransformationExtraArgs:
  """After every `every`-th update, rebalances each (a_name, b_name) pair by SVD."""
  if every < 1:
    raise ValueError(f"refactorize every must be >= 1, got {every}")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return PeriodicState(jnp.zeros((), jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None, **extra):
    if params is None:
      raise ValueError("refactorize needs params in update()")
    out, inner_state = inner.update(updates, state.inner, params, **extra)
    count = state.count + 1
    new = optax.apply_updates(params, out)
    fixed = jax.lax.cond(count % every == 0, lambda t: _refactor_tree(t, a_name, b_name),
                         lambda t: t, new)
    out = jax.tree.map(lambda n, f, p, u: jnp.where(count % every == 0, (f - p).astype(u.dtype), u),
                       new, fixed, params, out)
    return out, PeriodicState(count, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def reptile(inner: optax.GradientTransformation, k: int = 4, eps: float = 0.5
            ) -> optax.GradientTransformationExtraArgs:
  """Every k updates: theta <- theta_0 + eps (theta_k - theta_0); theta_0 <- theta."""
  if k < 1 or not 0.0 < eps <= 1.0:
    raise ValueError(f"reptile needs k >= 1 and 0 < eps <= 1, got k={k}, eps={eps}")
  inner = optax.with_extra_args_support(inner)
  if eps == 1.0:
    return inner  # theta_0 + (theta_k - theta_0) = theta_k: plain training

  def init_fn(params):
    return PeriodicState(jnp.zeros((), jnp.int32), inner.init(params),
                         jax.tree.map(jnp.array, params))

  def update_fn(updates, state, params=None, **extra):
    if params is None:
      raise ValueError("reptile needs params in update()")
    out, inner_state = inner.update(updates, state.inner, params, **extra)
    count = state.count + 1
    sync = count % k == 0
    new = optax.apply_updates(params, out)
    meta = jax.tree.map(lambda a, n: (a + eps * (n - a)).astype(n.dtype), state.anchor, new)
    out = jax.tree.map(lambda m, p, u: jnp.where(sync, (m - p).astype(u.dtype), u), meta, params, out)
    anchor = jax.tree.map(lambda m, a: jnp.where(sync, m, a), meta, state.anchor)
    return out, PeriodicState(count, inner_state, anchor)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
