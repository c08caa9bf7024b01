"""N:M structured sparsity in pure jnp: mask, compressed storage, and the reference matmul.

W is stored (d_in, d_out) as in jaxft; groups are m consecutive weights along the
reduction axis d_in, one column at a time. In each group the n largest |w| are kept,
ties broken by the lower index (METHODS.md K2; default 2:4).

Compressed layout (what `nm_sparse_matmul` reads), with G = ceil(d_in / m) groups:

  values: (n, G, d_out), values[t, g, j] = the t-th kept weight (in index order) of
          group g in column j;
  meta:   (G, d_out) uint8, meta[g, j] = Σ_t idx_t · 2^(b·t), idx_t ∈ [0, m) the in-group
          position of values[t, g, j], b = ceil(log2 m) bits (2:4: 4 bits of each byte used).

Storage at 2:4 in bf16 is n/m of the values plus one byte per group: 0.625x the dense bytes.
"""
from __future__ import annotations

import math

import jax.numpy as jnp


def index_bits(m: int) -> int:
  return max(1, math.ceil(math.log2(m)))


def check_nm(n: int, m: int) -> tuple[int, int]:
  n, m = int(n), int(m)
  if not 0 < n <= m:
    raise ValueError(f"N:M sparsity needs 0 < n <= m, got n={n}, m={m}")
  if n * index_bits(m) > 8:
    raise ValueError(f"N:M sparsity {n}:{m} needs {n * index_bits(m)} index bits per group; "
                     f"the uint8 metadata holds 8 (e.g. 1:2, 2:4, 1:8, 2:8)")
  return n, m


def _groups(w, m):
  """(d_in, d_out) -> (G, m, d_out), zero-padding d_in up to a multiple of m."""
  d_in, d_out = w.shape
  g = -(-d_in // m)
  w = jnp.pad(w, ((0, g * m - d_in), (0, 0)))
  return w.reshape(g, m, d_out)


def nm_mask(w, n: int = 2, m: int = 4):
  """Boolean mask of w's shape keeping the n largest |w| of every m consecutive inputs
  (ties: the earlier entry wins, so exactly n per group). The one N:M mask of jaxft:
  `jaxft.optimizers.nm_mask` (CAST) calls it for any axis."""
  n, m = int(n), int(m)
  if not 0 < n <= m:
    raise ValueError(f"N:M sparsity needs 0 < n <= m, got n={n}, m={m}")
  wg = jnp.abs(_groups(w, m).astype(jnp.float32))            # (G, m, N)
  pos = jnp.arange(m)
  bigger = wg[:, None, :, :] > wg[:, :, None, :]              # [g, i, j, col]: |w_j| > |w_i|
  tie_first = (wg[:, None, :, :] == wg[:, :, None, :]) & (pos[None, :] < pos[:, None])[None, :, :, None]
  rank = jnp.sum(bigger | tie_first, axis=2)                 # how many beat element i
  keep = (rank < n).reshape(-1, w.shape[1])
  return keep[:w.shape[0]]


def nm_compress(w, n: int = 2, m: int = 4):
  """Dense (d_in, d_out) -> (values (n, G, d_out), meta (G, d_out) uint8); keeps the N:M mask."""
  n, m = check_nm(n, m)
  keep = _groups(nm_mask(w, n, m), m)                         # (G, m, N)
  wg = _groups(w, m)
  # Slot of each kept element = number of kept elements before it in its group.
  slot = jnp.cumsum(keep, axis=1) - 1
  onehot = keep[None] & (slot[None] == jnp.arange(n)[:, None, None, None])   # (n, G, m, N)
  values = jnp.sum(jnp.where(onehot, wg[None], 0), axis=2).astype(w.dtype)
  idx = jnp.sum(jnp.where(onehot, jnp.arange(m)[None, None, :, None], 0), axis=2)  # (n, G, N)
  shifts = index_bits(m) * jnp.arange(n)[:, None, None]
  meta = jnp.sum(idx << shifts, axis=0).astype(jnp.uint8)
  return values, meta


def unpack_indices(meta, n: int, m: int):
  """meta (G, d_out) uint8 -> in-group positions (n, G, d_out) int32."""
  b = index_bits(m)
  meta = meta.astype(jnp.int32)
  return jnp.stack([(meta >> (b * t)) & ((1 << b) - 1) for t in range(n)])


def nm_decompress(values, meta, n: int = 2, m: int = 4, d_in: int | None = None):
  """Compressed -> dense (d_in, d_out) (d_in defaults to G·m)."""
  n, m = check_nm(n, m)
  idx = unpack_indices(meta, n, m)                            # (n, G, N)
  hit = idx[:, :, None, :] == jnp.arange(m)[None, None, :, None]   # (n, G, m, N)
  dense = jnp.sum(jnp.where(hit, values[:, :, None, :], 0), axis=0).astype(values.dtype)
  dense = dense.reshape(-1, values.shape[-1])
  return dense if d_in is None else dense[:d_in]


def nm_sparse_matmul_reference(x, values, meta, *, n: int = 2, m: int = 4):
  """y = x · decompress(values, meta) in x's dtype with float32 accumulation; x (..., d_in)."""
  w = nm_decompress(values, meta, n, m, d_in=x.shape[-1])
  return jnp.matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
