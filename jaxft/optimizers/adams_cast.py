"""CAST's AdamS: Adam with adaptive L1 decay on the weights an N:M mask would prune.

From "CAST: Continuous and Differentiable Semi-Structured Sparsity-Aware Training
for Large Language Models". Registered as `adams_cast`: it is unrelated to the
other optimizers called "AdamS" (Adam with stable weight decay, momentum-normalised
AdamS). With M_t the N:M mask of the current weights (top-N |W| per group of M
inputs, recomputed every `mask_every` steps, see `nm_mask`):

    d  = lam_t (1 - M_t) * sign(W)                     (decay_kind="l1"; "l2": W)
    m <- b1 m + (1 - b1) g
    u  = m / (1 - b1^t) + d
    v <- b2 v + (1 - b2) (g + d)^2                      (decay_in_second_moment; else g^2)
    W <- W - lr (u / (sqrt(v / (1 - b2^t)) + eps) + wd W)
    lam_t = lam * min(1, t / ramp_steps)

The second moment sees the decayed gradient g + d, so the decay is normalised
like a gradient ("adaptive") and lam = 0 is exactly AdamW (METHODS.md writes
v from u^2, which would not reduce to AdamW; its own test requires that it does).

Decay acts only on mask-0 weights, so the pattern can still move. Switches for
what the sources leave open: `decay_kind`, `decay_in_second_moment`, the lam ramp,
and `prox_clip` (a mask-0 weight whose decay step alone would cross 0 is set to
exactly 0). With `final_projection` the last step (`total_steps`) lands the
weights exactly on their N:M mask, so the final checkpoint is N:M sparse
(`nm_mask.assert_nm` verifies it). Weight Scaling and the dense self-teacher are
in `jaxft.optimizers.weight_scale` and `jaxft.objectives.kd`; a run turns them on
with `optimizer.weight_scaling` and `objective.name='kd'` (`jaxft.extras.with_extras`,
configs `tiny_cast`, `smollm2_cast`, docs/cast.md).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxft import names
from jaxft.optimizers import core, nm_mask

DECAY_KINDS = ("l1", "l2")


class ScaleByAdamSCastState(NamedTuple):
  count: jax.Array   # int32 scalar: updates done
  mu: Any            # first moment, params-shaped
  nu: Any            # second moment, params-shaped
  mask: Any          # bool N:M mask for targeted leaves; a broadcastable all-True for the rest


def lambda_at(count, lam: float, ramp_steps: int):
  """lam_t = lam * min(1, t / ramp_steps) (t = count, ramp_steps <= 0: no ramp)."""
  if ramp_steps <= 0:
    return jnp.asarray(lam, jnp.float32)
  return lam * jnp.minimum(1.0, count.astype(jnp.float32) / ramp_steps)


def _decay(w, keep, lam_t, decay_kind):
  """lam_t (1 - M) sign(W) (l1) or lam_t (1 - M) W (l2)."""
  pull = jnp.sign(w) if decay_kind == "l1" else w
  return lam_t * jnp.logical_not(keep) * pull


def _leaf_masks(params, n, m, axis, targets):
  chosen = nm_mask.target_tree(params, targets, m, axis)
  return jax.tree.map(
      lambda p, t: nm_mask.nm_mask(p, n, m, axis) if t else jnp.ones((1,) * p.ndim, bool),
      params, chosen)


def scale_by_adams_cast(b1=0.9, b2=0.95, eps=1e-8, lam=1e-4, ramp_steps=0, n=2, m=4, axis=-2,
                        targets=nm_mask.DEFAULT_TARGETS, mask_every=10, decay_kind="l1",
                        decay_in_second_moment=True) -> optax.GradientTransformation:
  """The AdamS direction u / (sqrt(v_hat) + eps) with the masked adaptive decay inside u."""
  if decay_kind not in DECAY_KINDS:
    raise ValueError(names.unknown_message("optimizer.decay_kind", decay_kind, DECAY_KINDS))
  if mask_every < 1:
    raise ValueError(f"optimizer.mask_every must be >= 1, got {mask_every}")
  masks_of = functools.partial(_leaf_masks, n=n, m=m, axis=axis, targets=targets)

  def init_fn(params):
    return ScaleByAdamSCastState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params),
                                 optax.tree.zeros_like(params), masks_of(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("adams_cast needs params in update() (the decay acts on the weights)")
    refresh = state.count % mask_every == 0
    mask = jax.lax.cond(refresh, lambda: masks_of(params), lambda: state.mask)
    count = optax.safe_increment(state.count)
    lam_t = lambda_at(count, lam, ramp_steps)
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    decay = jax.tree.map(lambda w, k: _decay(w, k, lam_t, decay_kind).astype(w.dtype),
                         params, mask)
    u = jax.tree.map(lambda a, d: a + d.astype(a.dtype), mu_hat, decay)
    seen = jax.tree.map(jnp.add, updates, decay) if decay_in_second_moment else updates
    nu = optax.tree.update_moment_per_elem_norm(seen, state.nu, b2, 2)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    out = jax.tree.map(lambda a, v: a / (jnp.sqrt(v) + eps), u, nu_hat)
    cast = lambda new, old: jax.tree.map(lambda a, b: a.astype(b.dtype), new, old)
    return cast(out, updates), ScaleByAdamSCastState(count, cast(mu, state.mu),
                                                     cast(nu, state.nu), mask)

  return optax.GradientTransformation(init_fn, update_fn)


def adams_cast(learning_rate, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, lam=1e-4,
               ramp_steps=0, n=2, m=4, axis=-2, targets=nm_mask.DEFAULT_TARGETS, mask_every=10,
               decay_kind="l1", decay_in_second_moment=True, prox_clip=True, total_steps=0,
               final_projection=True, mask=None) -> optax.GradientTransformation:
  """CAST AdamS + decoupled weight decay + lr, with the prox clip and the final N:M projection.

  `total_steps` > 0 with `final_projection` makes update number `total_steps` project
  the weights exactly onto their N:M mask.
  """
  inner = optax.chain(
      scale_by_adams_cast(b1, b2, eps, lam, ramp_steps, n, m, axis, targets, mask_every,
                          decay_kind, decay_in_second_moment),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate))
  sched = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
  chosen = functools.partial(nm_mask.target_tree, targets=targets, m=m, axis=axis)

  def update_fn(updates, state, params=None):
    new, state = inner.update(updates, state, params)
    cast_state = state[0]
    if prox_clip:
      lr_t = sched(cast_state.count - 1)
      lam_t = lambda_at(cast_state.count, lam, ramp_steps)
      nu_hat = optax.tree.bias_correction(cast_state.nu, b2, cast_state.count)
      def clip(u, w, k, v):
        decay_step = lr_t * _decay(w, k, lam_t, decay_kind) / (jnp.sqrt(v) + eps)
        crossed = jnp.logical_not(k) & (w != 0) & (jnp.abs(decay_step) >= jnp.abs(w))
        return jnp.where(crossed, -w, u).astype(u.dtype)
      new = jax.tree.map(clip, new, params, cast_state.mask, nu_hat)
    if final_projection and total_steps > 0:
      last = cast_state.count >= total_steps
      def project(u, w, t):
        if not t:
          return u
        snap = lambda: jnp.where(nm_mask.nm_mask(w + u, n, m, axis), u, -w).astype(u.dtype)
        return jax.lax.cond(last, snap, lambda: u)
      new = jax.tree.map(project, new, params, chosen(params))
    return new, state

  return optax.GradientTransformation(inner.init, update_fn)


WEIGHT_SCALING = ("none", "learned", "norm_ratio")


def _adams_cast(lr, spec):
  """CAST's sparsity-aware AdamS: Adam + adaptive L1 decay on the weights an N:M mask prunes."""
  # Weight Scaling changes the forward, not the update: the train step reads these two
  # fields (jaxft.extras.with_extras); they are checked here so a typo fails at build time.
  if spec.get("weight_scaling", "none") not in WEIGHT_SCALING:
    raise ValueError(names.unknown_message("optimizer.weight_scaling", spec["weight_scaling"],
                                           WEIGHT_SCALING))
  if spec.get("weight_scaling_forward", "dense") not in ("dense", "masked"):
    raise ValueError(names.unknown_message("optimizer.weight_scaling_forward",
                                           spec["weight_scaling_forward"], ("dense", "masked")))
  total = int(spec.get("total_steps", 0))
  return adams_cast(
      lr, b1=spec["b1"], b2=spec["b2"], eps=spec["eps"], weight_decay=spec["weight_decay"],
      lam=spec["lam"], ramp_steps=int(spec["ramp_fraction"] * total), n=spec["n"], m=spec["m"],
      targets=spec["targets"], mask_every=spec["mask_every"], decay_kind=spec["decay_kind"],
      decay_in_second_moment=spec["decay_in_second_moment"], prox_clip=spec["prox_clip"],
      total_steps=total, final_projection=spec["final_projection"], mask=core.decay_mask(spec))


REGISTRY = {
    "adams_cast": (_adams_cast, {
        "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "lam": 1e-4,
        "ramp_fraction": 0.25, "n": 2, "m": 4,
        "targets": nm_mask.DEFAULT_TARGETS, "mask_every": 10, "decay_kind": "l1",
        "decay_in_second_moment": True, "prox_clip": True, "final_projection": True,
        "decay_mask": "matrices",
        # CAST Weight Scaling (jaxft.optimizers.weight_scale): none | learned | norm_ratio,
        # and the training forward s*W (dense) or s*(M*W) (masked).
        "weight_scaling": "none", "weight_scaling_forward": "dense"}),
}
