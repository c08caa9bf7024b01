"""Sharpness-aware minimisation: SAM and TRAM.

Paper: "TRAM: Bridging Trust Regions and Sharpness Aware Minimization" (SAM is
its baseline). Two gradients per step, both on the same batch:

    g = grad L(theta),   e = rho * g / ||g||,   theta <- theta + base(grad L(theta + e))

The step is taken from theta, not from theta + e. SAM uses a fixed rho. TRAM sets
the neighbourhood from a function-space trust region, rho = clip(KL, 0, rho_max),
with the KL (`rho_source`) [uncertain: the map from KL to rho]:

* `kl_noise` (default): KL(f(x) || f(x~)), x~ = inputs with N(0, noise_std^2) added
  to the token-embedding table (R3F-style; with tied embeddings the output
  projection sees the same noise);
* `kl_prev`: KL(f(x; theta_{t-1}) || f(x; theta_t)) (keeps a copy of the params);
* `kl_init`: KL(f(x; theta_0) || f(x; theta_t)) (keeps a copy of the params);
* `fixed`: rho = rho_max (plain SAM).

The transformation needs the loss, not only a gradient: its `update` takes the
keyword `grad_fn(params) -> gradient` (and `kl_fn(p, q, noise_std)` for TRAM),
which `jaxft.train.make_train_step` passes. `sam(...)` with `base='sgd'` equals
`optax.contrib.sam(sgd, chain(normalize(), sgd(rho)), sync_period=2,
opaque_mode=True)`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxft import names

RHO_SOURCES = ("fixed", "kl_noise", "kl_prev", "kl_init")
BASES = ("adamw", "sgd")


class SharpnessAwareState(NamedTuple):
  inner: Any          # the base optimizer's state
  ref: Any            # kl_prev / kl_init: reference params; else ()
  rho: jax.Array      # the radius used at the last step (float32)
  cache: Any = ()     # transparent mode: theta while the params sit at theta + e
  phase: Any = ()     # transparent mode: int32, 0 = ascent call, 1 = descent call


def sharpness_aware(inner: optax.GradientTransformation, rho_max: float = 0.05,
                    rho_source: str = "fixed", noise_std: float = 0.01, opaque: bool = True
                    ) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so it sees grad L(theta + rho g/||g||) instead of g.

  opaque=True: one `update` call per step, which calls `grad_fn` for the second
  gradient. opaque=False (like optax.contrib.sam's default): calls alternate, the
  first moves the params to theta + e, the second (given the gradient there)
  returns them to theta and applies the base update; only gradients are needed,
  at the cost of a params copy in the state. Needs rho_source='fixed'.
  """
  if not opaque and rho_source != "fixed":
    raise ValueError(f"rho_source={rho_source!r} needs opaque=True (it evaluates the KL)")
  if rho_source not in RHO_SOURCES:
    raise ValueError(names.unknown_message("optimizer.rho_source", rho_source, RHO_SOURCES))
  if rho_max < 0:
    raise ValueError(f"optimizer.rho must be >= 0, got {rho_max}")
  inner = optax.with_extra_args_support(inner)
  keep_ref = rho_source in ("kl_prev", "kl_init")

  def init_fn(params):
    ref = jax.tree.map(jnp.array, params) if keep_ref else ()
    if opaque:
      return SharpnessAwareState(inner.init(params), ref, jnp.zeros((), jnp.float32))
    return SharpnessAwareState(inner.init(params), ref, jnp.zeros((), jnp.float32),
                               jax.tree.map(jnp.array, params), jnp.zeros((), jnp.int32))

  def radius(state, params, kl_fn):
    if rho_source == "fixed":
      return jnp.asarray(rho_max, jnp.float32)
    if kl_fn is None:
      raise ValueError(f"rho_source={rho_source!r} needs kl_fn (jaxft.train.make_train_step "
                       "passes it)")
    if rho_source == "kl_noise":
      kl = kl_fn(params, params, noise_std)
    else:
      kl = kl_fn(state.ref, params, 0.0)
    return jnp.clip(jnp.asarray(kl, jnp.float32), 0.0, rho_max)

  def perturbation(updates, rho):
    g_norm = optax.tree.norm(updates)
    scale = jnp.where(g_norm > 0, rho / jnp.where(g_norm > 0, g_norm, 1.0), 0.0)
    return jax.tree.map(lambda g: scale * g.astype(jnp.float32), updates)

  def transparent_update(updates, state, params, extra):
    rho = jnp.asarray(rho_max, jnp.float32)
    ascend = state.phase == 0
    out, inner_state = inner.update(updates, state.inner, state.cache, **extra)
    descent = jax.tree.map(lambda c, p, u: (c - p + u).astype(u.dtype), state.cache, params, out)
    ascent = jax.tree.map(lambda e, u: e.astype(u.dtype), perturbation(updates, rho), out)
    pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ascend, x, y), a, b)
    return pick(ascent, descent), SharpnessAwareState(
        pick(state.inner, inner_state), state.ref, rho, pick(params, state.cache), 1 - state.phase)

  def update_fn(updates, state, params, *, grad_fn=None, kl_fn=None, **extra):
    if not opaque:
      return transparent_update(updates, state, params, extra)
    if grad_fn is None:
      raise ValueError("sharpness-aware optimizers need update(..., grad_fn=...): the gradient "
                       "at the perturbed point (jaxft.train.make_train_step passes it)")
    rho = radius(state, params, kl_fn)
    adv = jax.tree.map(lambda p, e: (p + e.astype(p.dtype)), params, perturbation(updates, rho))
    adv_grads = grad_fn(adv)
    out, inner_state = inner.update(adv_grads, state.inner, params, **extra)
    ref = jax.tree.map(jnp.array, params) if rho_source == "kl_prev" else state.ref
    return out, SharpnessAwareState(inner_state, ref, rho)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _base(learning_rate, base: str, b1: float, b2: float, eps: float, momentum: float,
          weight_decay: float):
  if base not in BASES:
    raise ValueError(names.unknown_message("optimizer.base", base, BASES))
  if base == "adamw":
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  tx = optax.sgd(learning_rate, momentum=momentum or None)
  return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx


def sam(learning_rate, rho: float = 0.05, base: str = "adamw", b1: float = 0.9,
        b2: float = 0.999, eps: float = 1e-8, momentum: float = 0.0, weight_decay: float = 0.0,
        clip_norm: float = 0.0, opaque: bool = True) -> optax.GradientTransformationExtraArgs:
  """SAM: the base optimizer (adamw | sgd) on grad L(theta + rho g/||g||)."""
  inner = _base(learning_rate, base, b1, b2, eps, momentum, weight_decay)
  if clip_norm > 0:  # clip the gradient the base optimizer sees (the perturbed one)
    inner = optax.chain(optax.clip_by_global_norm(clip_norm), inner)
  return sharpness_aware(inner, rho, "fixed", opaque=opaque)


def tram(learning_rate, rho_max: float = 0.05, rho_source: str = "kl_noise",
         noise_std: float = 0.01, base: str = "adamw", b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-8, momentum: float = 0.0, weight_decay: float = 0.0,
         clip_norm: float = 0.0, opaque: bool = True) -> optax.GradientTransformationExtraArgs:
  """TRAM: SAM with rho = clip(KL trust-region distance, 0, rho_max)."""
  inner = _base(learning_rate, base, b1, b2, eps, momentum, weight_decay)
  if clip_norm > 0:
    inner = optax.chain(optax.clip_by_global_norm(clip_norm), inner)
  return sharpness_aware(inner, rho_max, rho_source, noise_std, opaque)


def _common(spec):
  return dict(base=spec["base"], b1=spec["b1"], b2=spec["b2"], eps=spec["eps"],
              momentum=spec["momentum"], weight_decay=spec["weight_decay"],
              clip_norm=float(spec["clip_norm"] or 0.0))


def _sam(lr, spec):
  """SAM (sharpness-aware minimisation): two gradients per step, fixed radius rho."""
  return sam(lr, rho=spec["rho"], **_common(spec))


def _tram(lr, spec):
  """TRAM: SAM whose radius is a function-space trust region (output KL)."""
  return tram(lr, rho_max=spec["rho_max"], rho_source=spec["rho_source"],
              noise_std=spec["noise_std"], **_common(spec))


_BASE = {"base": "adamw", "b1": 0.9, "b2": 0.999, "eps": 1e-8, "momentum": 0.0}
REGISTRY = {
    "sam": (_sam, {**_BASE, "rho": 0.05}),
    "tram": (_tram, {**_BASE, "rho_max": 0.05, "rho_source": "kl_noise", "noise_std": 0.01}),
}
