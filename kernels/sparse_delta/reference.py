"""Sparse-delta ops in pure jnp, element-indexed (the references of the block kernels).

A SpIEL-style delta is a set of weight positions (rows, cols) of W (d_in, d_out) with
trainable values φ. The block kernels take the positions as whole tiles: block
coordinates `blocks` (nb, 2) on the W grid of tile `block_shape` (br, bc) and values
φ (nb, br, bc); `expand_blocks` turns that into element indices for these references.
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp


def make_blocks(coords, w_shape, block_shape=(8, 128)):
  """Validated block coordinates (nb, 2) int32: in range, no duplicates (concrete input only)."""
  coords = np.asarray(coords, np.int64).reshape(-1, 2)
  (d_in, d_out), (br, bc) = w_shape, block_shape
  if d_in % br or d_out % bc:
    raise ValueError(f"W shape {tuple(w_shape)} must be a multiple of block_shape {tuple(block_shape)}")
  grid = (d_in // br, d_out // bc)
  if coords.size and (coords.min() < 0 or (coords >= np.array(grid)).any()):
    raise ValueError(f"block coordinates must lie in [0, {grid[0]}) x [0, {grid[1]}), got {coords.tolist()}")
  flat = coords[:, 0] * grid[1] + coords[:, 1]
  uniq, counts = np.unique(flat, return_counts=True)
  if (counts > 1).any():
    dup = [divmod(int(f), grid[1]) for f in uniq[counts > 1]]
    raise ValueError(f"duplicate block coordinates are not allowed: {dup}")
  return jnp.asarray(coords, jnp.int32)


def expand_blocks(blocks, block_shape):
  """(nb, 2) block coordinates -> element (rows, cols), each (nb·br·bc,), row-major per block."""
  br, bc = block_shape
  r = blocks[:, 0, None, None] * br + jnp.arange(br)[None, :, None]
  c = blocks[:, 1, None, None] * bc + jnp.arange(bc)[None, None, :]
  shape = (blocks.shape[0], br, bc)
  return jnp.broadcast_to(r, shape).reshape(-1), jnp.broadcast_to(c, shape).reshape(-1)


def sparse_delta_scatter_reference(w, rows, cols, phi):
  """W + scatter((rows, cols), φ): φ (nnz,) added at W[rows[i], cols[i]]."""
  return w.at[rows, cols].add(phi.astype(w.dtype))


def sparse_delta_sddmm_reference(x, dy, rows, cols):
  """dφ_i = Σ_m x[m, rows_i] dy[m, cols_i] = (xᵀ dy)[rows_i, cols_i], float32 accumulation."""
  xs = jnp.take(x, rows, axis=1).astype(jnp.float32)
  ds = jnp.take(dy, cols, axis=1).astype(jnp.float32)
  return jnp.sum(xs * ds, axis=0)


def sparse_delta_matmul_reference(x, w, rows, cols, phi, *, bias=None):
  """y = x (W + scatter((rows, cols), φ)) (+ bias); x (..., d_in)."""
  weff = sparse_delta_scatter_reference(w, rows, cols, phi).astype(x.dtype)
  y = jnp.matmul(x, weff, preferred_element_type=jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32).reshape((1,) * (y.ndim - 1) + bias.shape)
  return y.astype(x.dtype)
