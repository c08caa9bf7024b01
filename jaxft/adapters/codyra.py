"""CoDyRA: "Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning
Vision-Language Models with Dynamic Rank-Selective LoRA" (Lu et al., 2024).

LoRA with a learned per-rank importance under an ℓ1 penalty applied proximally
(x W convention; METHODS.md's form B diag(w) A):

    W_eff = W0 + s A diag(w) B,
    after each optimizer step  w ← sign(w) · max(|w| − λ η, 0)   (soft threshold),

A kaiming, B = 0, w = 1 [uncertain]; A, w, B train. Ranks whose w hits 0 are
pruned (`active_ranks`); after a task the update is merged exactly (`merge`).
The proximal step is an optax transform, `proximal(lam, learning_rate)`: it turns
the optimizer's update u of each `lora_d` into prox(w + u) − w, so after the step
w = soft_threshold(w + u, λ η_t) with η_t the learning rate of that update
(`adapter.l1` is λ). `optimizer_transform(spec, schedule)` is the adapter contract
(`jaxft.optimizers.compose.adapter_transform`): the train step applies it after the
optimizer on every update, giving it the update number so η_t = schedule(t).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxft.adapters import base, lora, lowrank

DEFAULTS = {**lowrank.COMMON, "l1": 1e-3}


def init_matrix(key, w, spec, stats=None):
  out = lora.init_matrix(key, w, spec, stats)
  out["lora_d"] = jnp.ones((*w.shape[:-2], int(spec["rank"])), jnp.float32)
  return out


def soft_threshold(w, tau):
  return jnp.sign(w) * jnp.maximum(jnp.abs(w) - tau, 0.0)


class ProxState(NamedTuple):
  count: Any


def proximal(lam: float, learning_rate) -> optax.GradientTransformation:
  """Turns an update u of `lora_d` into prox(p + u) − p with threshold lam · lr(step)."""

  def init_fn(params):
    del params
    return ProxState(jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, step=None, **extra):
    """`step` (optional): the number of updates already applied; default: own count."""
    del extra
    if params is None:
      raise ValueError("codyra's proximal step needs params (prox acts on w + u)")
    count = state.count if step is None else step
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    tau = lam * lr
    flat_u, flat_p = base.flatten(updates), base.flatten(params)
    out = {k: (soft_threshold(flat_p[k] + u, tau).astype(u.dtype) - flat_p[k]
               if k.endswith("/lora_d") else u) for k, u in flat_u.items()}
    return base.unflatten(out), ProxState(state.count + 1)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def optimizer_transform(spec, schedule) -> optax.GradientTransformation:
  """The ℓ1 prox on w with threshold `adapter.l1` · η_t (the adapter's optimizer contract)."""
  lam = float(spec["l1"])
  if lam < 0:
    raise ValueError(f"adapter.l1 must be >= 0, got {lam}")
  return proximal(lam, schedule)


def active_ranks(trainable) -> int:
  """Number of ranks still alive (w ≠ 0) over all adapted matrices."""
  return int(sum(jnp.sum(d != 0) for d in lowrank.factor_groups(trainable, "lora_d")))


MEMBER = lowrank.Member("codyra", __doc__, DEFAULTS, init_matrix,
                        leaves=("lora_a", "lora_b", "lora_d"),
                        trains=("lora_a", "lora_b", "lora_d"))
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
