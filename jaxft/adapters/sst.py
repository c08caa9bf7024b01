"""SST: "Sparse Spectral Training and Inference on Euclidean and Hyperbolic Neural Networks".

Each targeted weight (stored (d_in, d_out), stacked over layers) is replaced by its
SVD, W0 = U diag(Σ) Vᵀ (m = min(d_in, d_out) triplets, exact `lowrank.svd`, one
matrix at a time), and trained in that form:

    W = U' diag(Σ) V'ᵀ,   U' = U with columns η replaced by U_η,  V'ᵀ likewise (rows η).

All of Σ trains every step. Per round, r indices η are drawn multinomially ∝ Σ
without replacement (Gumbel top-r of log Σ, i.e. successive draws ∝ the remaining
Σ); only U_η (d_in, r) and V_ηᵀ (r, d_out) train, so every other singular vector
stays bit-identical within the round. At the end of a round (`update`, every
`round_steps` steps, via `jaxft.runner.periodic_update`) U_η, V_ηᵀ are written back,
W is re-decomposed (U, Σ, Vᵀ ← SVD(U' diag(Σ) V'ᵀ), restoring orthonormality while
leaving W unchanged), a new η is drawn and the optimizer moments are zeroed (the
new triplets are new coordinates; step counts, hence schedules, are kept).

`enhanced_grad` (default True; [uncertain] how the paper scales it): the paper's
rescaled singular-vector gradient, ∂L/∂u_i = (∂L/∂W) v_i instead of σ_i (∂L/∂W) v_i
(and likewise for v_i), i.e. the plain gradient divided by |σ_i| (floored at 1e-6),
so vectors of small singular values still learn. False = the plain gradient.

Frozen leaves per linear: `sst_u` (…, d_in, m), `sst_vh` (…, m, d_out), `sst_idx`
(…, r) int32 (the kernel is dropped); trainable: `sst_s` (…, m), `sst_u_sel`
(…, d_in, r), `sst_vh_sel` (…, r, d_out). U, Vᵀ and η change at round ends: they
are `MUTABLE` (saved in checkpoints). The merge U' diag(Σ) V'ᵀ is exact.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.adapters import base, featurewise, lowrank
from jaxft.models.layers import lead

DEFAULTS = {"targets": featurewise.LINEARS, "rank": 8, "round_steps": 50, "enhanced_grad": True}
U, VH, IDX, S, U_SEL, VH_SEL = "sst_u", "sst_vh", "sst_idx", "sst_s", "sst_u_sel", "sst_vh_sel"
MERGEABLE = True
MUTABLE = (U, VH, IDX)
EPS = 1e-6


def check_rank(spec, m: int) -> int:
  r = int(spec["rank"])
  if not 1 <= r <= m:
    raise ValueError(f"adapter.rank={r!r} is invalid for a matrix of rank {m}; valid: 1..{m}")
  return r


def sample(key, s, r: int):
  """r distinct indices per row of Σ (…, m), drawn ∝ |Σ| without replacement (Gumbel top-r)."""
  logits = jnp.log(jnp.maximum(jnp.abs(s.astype(jnp.float32)), 1e-30))
  _, idx = jax.lax.top_k(logits + jax.random.gumbel(key, s.shape), r)
  return idx.astype(jnp.int32)


def _lead_map(fn, n: int):
  for _ in range(n):
    fn = jax.vmap(fn)
  return fn


def _put(u, vh, idx, u_sel, vh_sel):
  """U' and V'ᵀ of one matrix: columns / rows η replaced by the trained ones."""
  return u.at[:, idx].set(u_sel.astype(u.dtype)), vh.at[idx, :].set(vh_sel.astype(vh.dtype))


def _triplets(key, w, r: int):
  """(U, Σ, Vᵀ, η) of W (…, d_in, d_out): exact SVD one matrix at a time, η ∝ Σ."""
  u, s, vh = lowrank.svd(w.astype(jnp.float32), rank=0)
  return u, s, vh, sample(key, s, r)


def _split(frozen_flat, train_flat, path, u, s, vh, idx, dtype):
  n = u.ndim - 2
  take = _lead_map(lambda u, vh, i: (u[:, i], vh[i, :]), n)
  u_sel, vh_sel = take(u, vh, idx)
  frozen_flat.update({f"{path}/{U}": u.astype(dtype), f"{path}/{VH}": vh.astype(dtype),
                      f"{path}/{IDX}": idx})
  train_flat.update({f"{path}/{S}": s.astype(dtype), f"{path}/{U_SEL}": u_sel.astype(dtype),
                     f"{path}/{VH_SEL}": vh_sel.astype(dtype)})


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """SVD of every targeted W0 (kernel dropped), η drawn ∝ Σ; the model is unchanged."""
  del calib
  flat = dict(base.flatten(frozen))
  train = {}
  for i, path in enumerate(featurewise.linear_targets(frozen, spec)):
    w = flat.pop(path + "/kernel")
    r = check_rank(spec, min(w.shape[-2:]))
    u, s, vh, idx = _triplets(jax.random.fold_in(key, i), w, r)
    _split(flat, train, path, u, s, vh, idx, w.dtype)
  return base.unflatten(flat), base.unflatten(train)


def logical_axes(model_axes, trainable, spec):
  """U and U_η shard like the kernel's input axis, Vᵀ and V_ηᵀ like its output axis."""
  del spec
  flat_axes = dict(base.flatten(model_axes))
  table = {S: featurewise.replicated(1), U_SEL: lambda l, ai, ao: (*l, ai, None),
           VH_SEL: lambda l, ai, ao: (*l, None, ao)}
  tr_axes = featurewise.axes_for(model_axes, trainable, table)
  for path in {p.rsplit("/", 1)[0] for p in base.flatten(trainable)}:
    *l, ai, ao = flat_axes.pop(path + "/kernel")
    flat_axes.update({f"{path}/{U}": (*l, ai, None), f"{path}/{VH}": (*l, None, ao),
                      f"{path}/{IDX}": (*l, None)})
  return base.unflatten(flat_axes), tr_axes


def combine(frozen, trainable, spec):
  del spec
  return base.merge_trees(frozen, trainable)


@jax.custom_vjp
def _scale_grad(x, c):
  return x


_scale_grad.defvjp(lambda x, c: (x, c), lambda c, g: (g * c.astype(g.dtype), jnp.zeros_like(c)))


def linear_hook(spec):
  enhanced = bool(spec.get("enhanced_grad", True))

  def linear(p, x, name, rng):
    del name, rng
    if U not in p:
      y = x @ p["kernel"].astype(x.dtype)
    else:
      idx, u_sel, vh_sel = p[IDX], p[U_SEL], p[VH_SEL]
      if enhanced:  # ∂L/∂u_i = G v_i: the σ_i factor of the plain gradient divided out
        inv = 1.0 / jnp.maximum(jnp.abs(jax.lax.stop_gradient(p[S][idx])), EPS)
        u_sel, vh_sel = _scale_grad(u_sel, inv[None, :]), _scale_grad(vh_sel, inv[:, None])
      u, vh = _put(p[U], p[VH], idx, u_sel, vh_sel)
      h = x @ u.astype(x.dtype)
      y = (h * lead(p[S].astype(x.dtype), h.ndim)) @ vh.astype(x.dtype)
    return y + lead(p["bias"], y.ndim) if "bias" in p else y

  return linear


def _parts(flat, tr, path):
  """(U', Σ, V'ᵀ) of a linear (lead axes kept)."""
  u, vh, idx = flat[f"{path}/{U}"], flat[f"{path}/{VH}"], flat[f"{path}/{IDX}"]
  u2, vh2 = _lead_map(_put, u.ndim - 2)(u, vh, idx, tr[f"{path}/{U_SEL}"], tr[f"{path}/{VH_SEL}"])
  return u2, tr[f"{path}/{S}"], vh2


def materialize(frozen, trainable, spec):
  """Plain params: kernel = U' diag(Σ) V'ᵀ; the SST leaves dropped."""
  del spec
  flat, tr = dict(base.flatten(frozen)), base.flatten(trainable)
  for path in sorted({p.rsplit("/", 1)[0] for p in tr}):
    u, s, vh = _parts(flat, tr, path)
    w = jnp.einsum("...ik,...k,...ko->...io", u.astype(jnp.float32), s.astype(jnp.float32),
                   vh.astype(jnp.float32))
    for leaf in (U, VH, IDX):
      del flat[f"{path}/{leaf}"]
    flat[f"{path}/kernel"] = w.astype(u.dtype)
  return base.unflatten(flat)


merge = materialize


def periodic(spec) -> int:
  """Steps per round (0 = one round: η never changes, no re-SVD)."""
  k = int(spec.get("round_steps", 0))
  if k < 0:
    raise ValueError(f"adapter.round_steps={k!r} is invalid; valid: 0 (one round) or >= 1")
  return k


def new_round(key, frozen, trainable, opt_state, spec):
  """Round end: write U_η, V_ηᵀ back, re-SVD W, draw a new η ∝ Σ, zero the moments."""
  flat, tr = dict(base.flatten(frozen)), base.flatten(trainable)
  out = {}
  for i, path in enumerate(sorted({p.rsplit("/", 1)[0] for p in tr})):
    u, s, vh = _parts(flat, tr, path)
    w = jnp.einsum("...ik,...k,...ko->...io", u.astype(jnp.float32), s.astype(jnp.float32),
                   vh.astype(jnp.float32))
    r = flat[f"{path}/{IDX}"].shape[-1]
    u, s2, vh, idx = _triplets(jax.random.fold_in(key, i), w, r)
    _split(flat, out, path, u, s2, vh, idx, s.dtype)
  shapes = {tuple(x.shape) for x in jax.tree.leaves(trainable)}
  zero = lambda x: jnp.zeros_like(x) if tuple(getattr(x, "shape", ())) in shapes else x
  return base.unflatten(flat), base.unflatten(out), jax.tree.map(zero, opt_state)


def update(key, state, step: int, task, batch):
  """Runner hook: `new_round` (batch unused; key = the runner's per-step key)."""
  del step, batch
  frozen, trainable, opt_state = new_round(key, state.frozen, state.trainable, state.opt_state,
                                           task.adapter_spec)
  return state._replace(frozen=frozen, trainable=trainable, opt_state=opt_state)
