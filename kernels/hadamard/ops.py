"""Fast Walsh–Hadamard transform (K6): the public op, its custom_vjp, a shard_map wrapper.

"SPRIGHT: A Fast and Robust Framework for Sparse Walsh-Hadamard Transform" (background);
used by "HALO: Hadamard-Assisted Lossless Optimization for Efficient Low-Precision LLM
Training and Fine-Tuning". y = x · blockdiag(H_h, ..., H_h) / sqrt(h) over the last axis.

Argument layout: x (..., n); block h (a power of two dividing n; None = n, which must
then be a power of two); the result has x's shape and dtype (float32 arithmetic).
The transform is symmetric and orthogonal, so its VJP is the same transform.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxft_kernels import common
from jaxft_kernels.hadamard import kernel
from jaxft_kernels.hadamard.reference import check_block, hadamard_transform_reference, sylvester

__all__ = ["hadamard_transform", "hadamard_transform_sharded", "hadamard_transform_reference"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _core(x2, block, base, block_rows, interpret):
  hb = jnp.asarray(sylvester(min(block, base)))
  m = x2.shape[0]
  xp = common.pad_dim(x2, 0, block_rows)
  y = kernel.hadamard_call(xp, hb, block=block, block_rows=block_rows, interpret=interpret)
  return y[:m]


def _fwd(x2, block, base, block_rows, interpret):
  return _core(x2, block, base, block_rows, interpret), None


def _bwd(block, base, block_rows, interpret, _, dy):
  return (_core(dy, block, base, block_rows, interpret),)


_core.defvjp(_fwd, _bwd)


def hadamard_transform(x: jax.Array, block: Optional[int] = None, *, base: int = 128,
                       block_rows: Optional[int] = None,
                       interpret: Optional[bool] = None) -> jax.Array:
  """Orthonormal blockwise Walsh–Hadamard transform of the last axis.

  Args:
    x: (..., n) array.
    block: Hadamard block size h (power of two dividing n); None = n.
    base: the lane-side factor b = min(h, base) of H_h = H_{h/b} ⊗ H_b.
    block_rows: rows per kernel program (default: up to 256, sublane-aligned).
    interpret: None = interpret on CPU only.

  Returns:
    Same shape and dtype as x; equals `hadamard_transform_reference(x, block)`.
  """
  n = x.shape[-1]
  h = check_block(n, block)
  if base < 1 or base & (base - 1):
    raise ValueError(f"hadamard_transform: base must be a power of two, got {base}")
  x2, lead = common.flatten_leading(x)
  rows = block_rows or common.block_size(max(x2.shape[0], 1), max(8, (1 << 18) // (4 * n)) // 8 * 8,
                                         common.sublane(x.dtype))
  y = _core(x2, h, base, rows, common.resolve_interpret(interpret))
  return y.reshape(lead + (n,))


def hadamard_transform_sharded(x, block=None, *, mesh, batch_axes=("data", "fsdp"), **kw):
  """`hadamard_transform` on a mesh: the leading axis split over `batch_axes`."""
  batch = tuple(a for a in batch_axes if a in mesh.axis_names) or None
  spec = P(batch, *([None] * (x.ndim - 1)))
  fn = lambda x: hadamard_transform(x, block, **kw)
  return common.shard_mapped(fn, mesh, (spec,), spec)(x)
