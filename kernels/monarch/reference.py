"""Monarch matrices: the product, its dense form and the closed-form dense→Monarch projection.

"Monarch: Expressive Structured Matrices for Efficient and Accurate Training". A Monarch
map of x (..., n_in), n_in = k·p, to (..., n_out), n_out = s·l, is

    out1[b, κ, j]  = Σ_π w1[κ, j, π] · x[b, κ·p + π]            (block-diagonal, k blocks)
    z[b, λ, ρ]     = out1[b].reshape(k·q)[ρ·l + λ]               (reshape-transpose P1)
    y[b, σ·l + λ]  = Σ_ρ w2[λ, σ, ρ] · z[b, λ, ρ]                (block-diagonal, l blocks; P2)

with w1 (k, q, p), w2 (l, s, r), k·q = l·r. Parameters and FLOPs: k·q·p + l·s·r (2n²/k
for the square case k = l, p = q = r = s = n/k, against n² dense).

Projection (`project`): parameters split by block pair (λ, κ): the dense block
M[σ·l + λ, κ·p + π] = Σ_m w2[λ, σ, κ·t + m] · w1[κ, λ + m·l, π] has rank t = q / l,
so the best Frobenius approximation is each block's rank-t truncated SVD — the
"analytical optimal solution" (t = 1 in the paper's square case k = l = sqrt(n)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST


def check_shapes(n_in: int, w1_shape, w2_shape):
  k, q, p = w1_shape
  l, s, r = w2_shape
  if k * p != n_in or k * q != l * r:
    raise ValueError(f"monarch: need w1 (k, q, p), w2 (l, s, r) with k·p = n_in = {n_in} and "
                     f"k·q = l·r, got w1 {tuple(w1_shape)}, w2 {tuple(w2_shape)}")
  return k, q, p, l, s, r


def monarch_matmul_reference(x: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
  """(..., n_in) -> (..., s·l) with two batched matmuls and the reshape-transpose between."""
  k, q, p, l, s, r = check_shapes(x.shape[-1], w1.shape, w2.shape)
  lead = x.shape[:-1]
  xb = x.reshape(lead + (k, p))
  out1 = jnp.einsum("...kp,kqp->...kq", xb, w1, precision=_HI)
  z = jnp.swapaxes(out1.reshape(lead + (r, l)), -1, -2)              # (..., l, r)
  out2 = jnp.einsum("...lr,lsr->...sl", z, w2, precision=_HI)
  return out2.reshape(lead + (s * l,))


def monarch_dense(w1, w2) -> jax.Array:
  """The (n_in, n_out) matrix W with monarch_matmul_reference(x) = x @ W (jaxft layout)."""
  n_in = w1.shape[0] * w1.shape[2]
  return monarch_matmul_reference(jnp.eye(n_in, dtype=w1.dtype), w1, w2)


def default_shapes(n_in: int, n_out: int, nblocks: int):
  """(w1 shape, w2 shape) for `nblocks` blocks on both sides (q = r = n_in / nblocks)."""
  if n_in % nblocks or n_out % nblocks:
    raise ValueError(f"monarch: nblocks={nblocks} must divide n_in={n_in} and n_out={n_out}")
  p, s = n_in // nblocks, n_out // nblocks
  return (nblocks, p, p), (nblocks, s, p)


def project(w: np.ndarray, w1_shape, w2_shape):
  """Closed-form best Monarch approximation of a dense (n_in, n_out) matrix (jaxft layout).

  Returns (w1, w2) as float64 (complex128 for a complex w) numpy arrays; needs l | q
  (block-pair rank t = q / l).
  """
  w = np.asarray(w)
  w = w.astype(np.result_type(w.dtype, np.float64))
  k, q, p, l, s, r = check_shapes(w.shape[0], w1_shape, w2_shape)
  if s * l != w.shape[1] or q % l:
    raise ValueError(f"monarch.project: need s·l = n_out = {w.shape[1]} and l | q, "
                     f"got w1 {tuple(w1_shape)}, w2 {tuple(w2_shape)}")
  t = q // l
  # blocks[λ, κ, σ, π] = M[σ·l + λ, κ·p + π], M = wᵀ (out, in).
  blocks = w.T.reshape(s, l, k, p).transpose(1, 2, 0, 3)
  u, sv, vt = np.linalg.svd(blocks, full_matrices=False)
  root = np.sqrt(sv[..., :t])                                        # (l, k, t)
  left = u[..., :t] * root[:, :, None, :]                            # (l, k, s, t)
  right = vt[..., :t, :] * root[..., None]                           # (l, k, t, p)
  w1 = np.zeros((k, q, p), w.dtype)
  w2 = np.zeros((l, s, r), w.dtype)
  m = np.arange(t)
  for lam in range(l):
    for kap in range(k):
      w2[lam, :, kap * t + m] = left[lam, kap].T
      w1[kap, lam + m * l, :] = right[lam, kap]
  return w1, w2
