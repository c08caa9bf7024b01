"""N:M structured-sparse matmul (K2) from a compressed weight: public op, custom_vjp, shard_map.

Used by 2:4 sparsity-aware training ("CAST: Continuous and Differentiable Semi-Structured
Sparsity-Aware Training for Large Language Models", owned by the optimizer part) and N:M
export. The op
computes y = x · W with W = decompress(values, meta) (d_in, d_out) = the dense weight
masked to N:M (W ⊙ mask), see `reference.py` for the storage layout. Gradients:

    dx = dy Wᵀ,   d values[t, g, j] = (xᵀ dy)[g·m + idx_t[g, j], j]   (the masked dense gradient),

each computed only when differentiated; the integer metadata gets none. JAX exposes no
sparse tensor-core path, so the kernel's gain is in weight bytes (small M, decode).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxft_kernels import common
from jaxft_kernels.nm_sparse import kernel
from jaxft_kernels.nm_sparse.reference import check_nm, index_bits, nm_decompress, unpack_indices

__all__ = ["nm_sparse_matmul", "nm_sparse_matmul_sharded"]


def _blocks(mrows, ncols, groups, dtype, variant):
  if variant == "grid_k":
    return (common.block_size(mrows, 256, common.sublane(dtype)), common.block_size(ncols, 256, 128),
            common.block_size(groups, 256, 128))
  return (common.block_size(mrows, 64, 16, pow2=True), common.block_size(ncols, 64, 16, pow2=True),
          common.block_size(groups, 32, 16, pow2=True))


def _forward(x, values, meta, n, m, interpret, variant):
  """x (M, d_in) -> (M, d_out) through the kernel (pads every axis to whole blocks)."""
  mrows, d_in = x.shape
  _, groups, ncols = values.shape

  def build(var):
    def run(x, values, meta):
      bm, bn, bg = _blocks(mrows, ncols, groups, x.dtype, var)
      mp, np_, gp = common.round_up(mrows, bm), common.round_up(ncols, bn), common.round_up(groups, bg)
      x3 = common.pad_to(x, (mp, gp * m)).reshape(mp, gp, m)
      x_planes = [x3[:, :, p] for p in range(m)]
      vals = [common.pad_to(values[t], (gp, np_)) for t in range(n)]
      out = kernel.nm_matmul(x_planes, vals, common.pad_to(meta, (gp, np_)), n=n, m=m,
                             bits=index_bits(m), blocks=(bm, bn, bg), out_dtype=x.dtype,
                             variant=var, interpret=interpret)
      return out[:mrows, :ncols]
    return run

  return common.on_platform(interpret, build, x, values, meta, variant=variant)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _nm(x, values, meta, n, m, interpret, variant):
  return _forward(x, values, meta, n, m, interpret, variant)


def _nm_fwd(x, values, meta, n, m, interpret, variant):
  y = _forward(x.value, values.value, meta.value, n, m, interpret, variant)
  return y, (x.value, values.value, meta.value, x.perturbed, values.perturbed)


def _nm_bwd(n, m, interpret, variant, res, dy):
  x, values, meta, need_x, need_values = res
  del interpret, variant
  dy = dy.astype(x.dtype)
  dx = dvalues = None
  if need_x:
    w = nm_decompress(values, meta, n, m, d_in=x.shape[1]).astype(x.dtype)
    dx = jnp.matmul(dy, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
  if need_values:
    groups = values.shape[1]
    xp = common.pad_to(x, (x.shape[0], groups * m))
    full = jnp.matmul(xp.T, dy, preferred_element_type=jnp.float32).reshape(groups, m, -1)
    idx = unpack_indices(meta, n, m)                                    # (n, G, N)
    dvalues = jnp.stack([jnp.take_along_axis(full, idx[t][:, None, :], axis=1)[:, 0, :]
                         for t in range(n)]).astype(values.dtype)
  return dx, dvalues, None


_nm.defvjp(_nm_fwd, _nm_bwd, symbolic_zeros=True)


def nm_sparse_matmul(x, values, meta, *, n: int = 2, m: int = 4, interpret: Optional[bool] = None,
                     variant: Optional[str] = None):
  """y = x · decompress(values, meta) with the Pallas kernel.

  Args:
    x: (..., d_in) activations, d_in <= G·m.
    values: (n, G, d_out) kept weights; meta: (G, d_out) uint8 packed in-group indices
      (both from `nm_compress(w, n, m)`).
    n, m: the N:M pattern (static).
    interpret: None = interpret on CPU only. variant: None = by platform.
  Returns:
    (..., d_out) in x's dtype (values are cast to it), float32 accumulation.
  """
  n, m = check_nm(n, m)
  if values.ndim != 3 or values.shape[0] != n or meta.shape != values.shape[1:]:
    raise ValueError(f"nm_sparse_matmul expects values (n={n}, G, d_out) and meta (G, d_out); "
                     f"got values {values.shape}, meta {meta.shape}")
  if x.shape[-1] > values.shape[1] * m:
    raise ValueError(f"nm_sparse_matmul: x has d_in={x.shape[-1]} > G*m={values.shape[1] * m}")
  if meta.dtype != jnp.uint8:
    raise ValueError(f"nm_sparse_matmul meta must be uint8, got {meta.dtype}")
  x2d, lead = common.flatten_leading(x)
  y = _nm(x2d, values.astype(x.dtype), meta, n, m, common.resolve_interpret(interpret), variant)
  return y.reshape(*lead, values.shape[-1])


def nm_sparse_matmul_sharded(x, values, meta, *, mesh, n: int = 2, m: int = 4, batch_axis="data",
                             out_axis: Optional[str] = None, interpret=None, variant=None):
  """`nm_sparse_matmul` inside `jax.shard_map`: rows of x over `batch_axis`; with `out_axis`
  the compressed weight is split by output column."""
  P = jax.P
  in_specs = (P(batch_axis), P(None, None, out_axis), P(None, out_axis))
  out_spec = P(*([batch_axis] + [None] * (x.ndim - 2) + [out_axis]))
  local = lambda x, v, mt: nm_sparse_matmul(x, v, mt, n=n, m=m, interpret=interpret, variant=variant)
  return common.shard_mapped(local, mesh, in_specs, out_spec)(x, values, meta)
