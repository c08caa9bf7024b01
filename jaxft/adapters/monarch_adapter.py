"""Dense→Monarch fine-tuning: "Monarch: Expressive Structured Matrices for Efficient and Accurate Training" (Dao et al., 2022).

A Monarch matrix (x W convention, W (d_in, d_out)) with k input blocks of size p
= d_in/k, k output blocks of size t = d_out/k and r = min(p, t)/k channels per
(input block, output block) pair is two block-diagonal factors around a
reshape-transpose permutation:

    u[i, j, ρ] = Σ_c x[i, c] L[i, c, j·r+ρ]          (BlockDiag(L): k blocks p → k·r)
    y[j, b]    = Σ_{i,ρ} u[i, j, ρ] R[j, i·r+ρ, b]    (permute, BlockDiag(R): k blocks k·r → t)

i.e. the 4-D view W[i, c, j, b] = Σ_ρ L[i, c, j, ρ] R[j, i, ρ, b]: every (i, j)
block-pair slice (p × t) has rank ≤ r. Hence the closed-form projection of a
dense W onto the nearest Monarch matrix (Frobenius): the rank-r truncated SVD of
each slice, U S Vᵀ → L = U √S, R = √S Vᵀ (square n with k = √n blocks: r = 1 and
the familiar rank-1 construction). Parameters d_in·min(p, t) + min(p, t)·d_out
(= 2n²/k for square n).

The adapter projects each targeted kernel and trains the factors in its place;
the function changes by the projection error unless `keep_residual` keeps the
frozen W0 − M beside them (then the model is exact at init). Merge densifies M
(+ residual). `monarch_matmul` is pure jnp; kernels/monarch could replace it.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.adapters import base, featurewise
from jaxft.models.layers import lead

DEFAULTS = {"targets": (r"mlp/(gate|up|down)$",), "blocks": 4, "keep_residual": False}
MERGEABLE = True


def dims(d_in: int, d_out: int, k: int) -> tuple[int, int, int]:
  """(p, t, r) for k blocks; ValueError when the shape does not split."""
  if k < 1 or d_in % k or d_out % k or min(d_in // k, d_out // k) % k:
    raise ValueError(f"adapter.blocks={k} does not split a {d_in}x{d_out} kernel into Monarch "
                     f"blocks: need k | d_in, k | d_out and k | min(d_in, d_out)/k")
  p, t = d_in // k, d_out // k
  return p, t, min(p, t) // k


def densify(l_KxPxM, r_KxMxT) -> jax.Array:
  """The dense (…, d_in, d_out) matrix of factors L (…, k, p, k·r), R (…, k, k·r, t)."""
  *lead_, k, p, m = l_KxPxM.shape
  r, t = m // k, r_KxMxT.shape[-1]
  l5 = l_KxPxM.reshape(*lead_, k, p, k, r)
  r5 = r_KxMxT.reshape(*lead_, k, k, r, t)
  w = jnp.einsum("...icjr,...jirb->...icjb", l5, r5)
  return w.reshape(*lead_, k * p, k * t)


def project(w, k: int) -> tuple[jax.Array, jax.Array]:
  """Nearest Monarch factors (L, R) of W (…, d_in, d_out): per-slice rank-r SVD."""
  *lead_, d_in, d_out = w.shape
  p, t, r = dims(d_in, d_out, k)
  slices = jnp.swapaxes(w.astype(jnp.float32).reshape(*lead_, k, p, k, t), -3, -2)  # (…,i,j,p,t)
  u, s, vt = jnp.linalg.svd(slices, full_matrices=False)
  root = jnp.sqrt(s[..., :r])
  lf = u[..., :, :r] * root[..., None, :]            # (…, i, j, p, r)
  rf = root[..., :, None] * vt[..., :r, :]           # (…, i, j, r, t)
  l_ = jnp.moveaxis(lf, -3, -2).reshape(*lead_, k, p, k * r)        # (…, i, p, (j, ρ))
  r_ = jnp.swapaxes(rf, -4, -3).reshape(*lead_, k, k * r, t)        # (…, j, (i, ρ), t)
  return l_.astype(w.dtype), r_.astype(w.dtype)


def monarch_matmul(x, l_KxPxM, r_KxMxT) -> jax.Array:
  """x M for x (…, d_in): two batched matmuls around the block transpose."""
  k, p, m = l_KxPxM.shape
  r = m // k
  u = jnp.einsum("...ic,icm->...im", x.reshape(*x.shape[:-1], k, p), l_KxPxM.astype(x.dtype))
  u = jnp.swapaxes(u.reshape(*x.shape[:-1], k, k, r), -3, -2)   # (…, j, i, ρ)
  y = jnp.einsum("...jm,jmb->...jb", u.reshape(*u.shape[:-2], k * r), r_KxMxT.astype(x.dtype))
  return y.reshape(*x.shape[:-1], -1)


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """-> (frozen without the targeted kernels (or with W0 − M), {'monarch_l', 'monarch_r'})."""
  del key, calib
  k = int(spec["blocks"])
  flat = base.flatten(frozen)
  trainable = {}
  for path in featurewise.linear_targets(frozen, spec):
    w = flat.pop(path + "/kernel")
    l_, r_ = project(w, k)
    trainable[path + "/monarch_l"], trainable[path + "/monarch_r"] = l_, r_
    if spec["keep_residual"]:
      flat[path + "/kernel"] = (w - densify(l_, r_)).astype(w.dtype)
  return base.unflatten(flat), base.unflatten(trainable)


def logical_axes(model_axes, trainable, spec):
  table = {"monarch_l": featurewise.replicated(3), "monarch_r": featurewise.replicated(3)}
  t_axes = featurewise.axes_for(model_axes, trainable, table)
  flat = base.flatten(model_axes)
  if not spec["keep_residual"]:
    for path in base.flatten(trainable):
      if path.endswith("/monarch_l"):
        flat.pop(path.rsplit("/", 1)[0] + "/kernel")
  return base.unflatten(flat), t_axes


def combine(frozen, trainable, spec):
  del spec
  return base.merge_trees(frozen, trainable)


def linear_hook(spec):
  del spec

  def linear(p, x, name, rng):
    del name, rng
    if "monarch_l" not in p:
      y = jnp.einsum("...i,io->...o", x, p["kernel"])
    else:
      y = monarch_matmul(x, p["monarch_l"], p["monarch_r"])
      if "kernel" in p:  # keep_residual
        y = y + jnp.einsum("...i,io->...o", x, p["kernel"])
    if "bias" in p:
      y = y + lead(p["bias"], y.ndim)
    return y

  return linear


def materialize(frozen, trainable, spec):
  """Kernel = densified Monarch factors (+ the frozen residual)."""
  del spec
  flat = base.flatten(frozen)
  leaves = base.flatten(trainable)
  for path in [p.rsplit("/", 1)[0] for p in leaves if p.endswith("/monarch_l")]:
    m = densify(leaves[path + "/monarch_l"], leaves[path + "/monarch_r"])
    res = flat.get(path + "/kernel")
    flat[path + "/kernel"] = m if res is None else (res + m).astype(res.dtype)
  return base.unflatten(flat)


merge = materialize
