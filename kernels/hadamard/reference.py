"""Walsh–Hadamard transform reference: block-diagonal Sylvester Hadamard matrices.

Background: "SPRIGHT: A Fast and Robust Framework for Sparse Walsh-Hadamard Transform"
(only the dense batched transform is built); used by HALO ("HALO: Hadamard-Assisted
Lossless Optimization for Efficient Low-Precision LLM Training and Fine-Tuning") and
Fastfood projections. The orthonormal transform of the last axis, per block of `block`
entries (block = n: the full transform):

    y[..., j·h : (j+1)·h] = x[..., j·h : (j+1)·h] · H_h / sqrt(h),
    H_1 = [1],  H_2m = [[H_m, H_m], [H_m, -H_m]]  (Sylvester order).

H_h / sqrt(h) is symmetric and orthogonal, so the transform is its own inverse and
its own vector-Jacobian product.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=32)
def sylvester(n: int) -> np.ndarray:
  """The (n, n) ±1 Sylvester Hadamard matrix, n a power of two."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"Hadamard size must be a power of two, got {n}")
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


def check_block(n: int, block: Optional[int]) -> int:
  """The block size for a last axis of `n` (None = n); a power of two dividing n."""
  h = n if block is None else int(block)
  if h < 1 or h & (h - 1) or n % h:
    raise ValueError(f"hadamard_transform: block={block} must be a power of two dividing the "
                     f"last axis {n} (non-power-of-two widths need a block, e.g. 64 for 576)")
  return h


def hadamard_transform_reference(x: jax.Array, block: Optional[int] = None) -> jax.Array:
  """Orthonormal (block-diagonal) Hadamard transform of the last axis, as a dense matmul."""
  n = x.shape[-1]
  h = check_block(n, block)
  cdt = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
  hm = jnp.asarray(sylvester(h), cdt) / np.sqrt(h)
  xb = x.astype(cdt).reshape(x.shape[:-1] + (n // h, h))
  y = jnp.einsum("...jh,hk->...jk", xb, hm, precision=jax.lax.Precision.HIGHEST)
  return y.reshape(x.shape).astype(x.dtype)
