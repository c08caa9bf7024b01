"""Monarch matmul (K5): the public op, its custom_vjp and a shard_map wrapper.

"Monarch: Expressive Structured Matrices for Efficient and Accurate Training":
y = x · Mᵀ with M = P2 · blockdiag(w2) · P1 · blockdiag(w1) (see `reference.py`).

Argument layout: x (..., n_in) with n_in = k·p; w1 (k, q, p); w2 (l, s, r) with
k·q = l·r and l | q (the kernel; the reference takes any); the result is (..., s·l) in the promoted dtype of x and the weights
(float32 accumulation). Forward is one fused Pallas kernel; the backward is the
transposed batched matmuls (XLA einsums of the reference, via `jax.vjp`).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxft_kernels import common
from jaxft_kernels.monarch import kernel
from jaxft_kernels.monarch.reference import (check_shapes, default_shapes, monarch_dense,
                                             monarch_matmul_reference, project)

__all__ = ["monarch_matmul", "monarch_matmul_sharded", "monarch_matmul_reference",
           "monarch_dense", "project", "default_shapes"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _core(x2, w1, w2, block_rows, interpret):
  k, _, p = w1.shape
  m = x2.shape[0]
  xp = common.pad_dim(x2, 0, block_rows).reshape(-1, k, p)
  y = kernel.monarch_call(xp, kernel.permute_w1(w1, w2.shape[0]), w2, block_rows=block_rows, out_dtype=x2.dtype,
                          interpret=interpret)
  return y[:m]


def _fwd(x2, w1, w2, block_rows, interpret):
  return _core(x2, w1, w2, block_rows, interpret), (x2, w1, w2)


def _bwd(block_rows, interpret, res, dy):
  _, vjp = jax.vjp(monarch_matmul_reference, *res)
  return vjp(dy)


_core.defvjp(_fwd, _bwd)


def monarch_matmul(x: jax.Array, w1: jax.Array, w2: jax.Array, *,
                   block_rows: Optional[int] = None,
                   interpret: Optional[bool] = None) -> jax.Array:
  """Monarch product of the last axis of x (see the module docstring for the layout)."""
  k, q, p, l, s, r = check_shapes(x.shape[-1], w1.shape, w2.shape)
  if q % l:
    raise ValueError(f"monarch_matmul: the kernel needs l = {l} to divide q = {q} (w1 {w1.shape}, "
                     f"w2 {w2.shape}); use monarch_matmul_reference for other shapes")
  dtype = jnp.result_type(x.dtype, w1.dtype, w2.dtype)
  x2, lead = common.flatten_leading(x.astype(dtype))
  # ~32K f32 intermediate elements per tile: larger tiles overflow TPU VMEM (AOT-checked).
  rows = block_rows or common.block_size(max(x2.shape[0], 1), max(8, min(128, (1 << 15) // (k * q))),
                                         common.sublane(dtype))
  y = _core(x2, w1.astype(dtype), w2.astype(dtype), rows, common.resolve_interpret(interpret))
  return y.reshape(lead + (s * l,))


def monarch_matmul_sharded(x, w1, w2, *, mesh, batch_axes=("data", "fsdp"), **kw):
  """`monarch_matmul` on a mesh: rows split over `batch_axes`, weights replicated."""
  batch = tuple(a for a in batch_axes if a in mesh.axis_names) or None
  spec = P(batch, *([None] * (x.ndim - 1)))
  fn = lambda x, w1, w2: monarch_matmul(x, w1, w2, **kw)
  return common.shard_mapped(fn, mesh, (spec, P(), P()), spec)(x, w1, w2)
