"""Pallas kernel of the N:M sparse matmul: decompress weight tiles on chip, dense MMA.

Operands (block-aligned, see ops.py):
  x planes: m arrays (M, G), plane p holding x[:, g·m + p] (inputs regrouped by in-group position),
  values:   n arrays (G, N), the kept weights of slot t,
  meta:     (G, N) uint8 packed in-group indices.

Per (bg, bn) weight tile the kernel rebuilds the m dense planes
plane_p = Σ_t [idx_t == p]·value_t with selects (no gathers, no row interleaving) and
accumulates Σ_p x_p @ plane_p in float32. HBM traffic for the weight is n/m of the
dense bytes plus the metadata, which is the whole gain when M is small (decode).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxft_kernels import common


def _planes(vals, meta, n, m, bits, dtype):
  """Dense weight planes (m of (bg, bn)) from slot values and packed indices."""
  meta = meta.astype(jnp.int32)
  idx = [(meta >> (bits * t)) & ((1 << bits) - 1) for t in range(n)]
  zero = jnp.zeros(vals[0].shape, dtype)
  planes = []
  for p in range(m):
    plane = zero
    for t in range(n):
      plane = jnp.where(idx[t] == p, vals[t].astype(dtype), plane)
    planes.append(plane)
  return planes


def _tile(xs, vals, meta, n, m, bits):
  planes = _planes(vals, meta, n, m, bits, xs[0].dtype)
  acc = None
  for x, plane in zip(xs, planes):
    d = jnp.dot(x, plane, preferred_element_type=jnp.float32)
    acc = d if acc is None else acc + d
  return acc


def _grid_k_kernel(*refs, n, m, bits, nk):
  x_refs, v_refs = refs[:m], refs[m:m + n]
  meta_ref, o_ref, acc_ref = refs[m + n:]
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += _tile([r[...] for r in x_refs], [r[...] for r in v_refs], meta_ref[...],
                        n, m, bits)

  @pl.when(k == nk - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _loop_k_kernel(*refs, n, m, bits, nk, bg):
  x_refs, v_refs = refs[:m], refs[m:m + n]
  meta_ref, o_ref = refs[m + n:]

  def body(k, acc):
    ks = pl.ds(pl.multiple_of(k * bg, bg), bg)
    return acc + _tile([r[:, ks] for r in x_refs], [r[ks, :] for r in v_refs], meta_ref[ks, :],
                       n, m, bits)

  o_ref[...] = jax.lax.fori_loop(0, nk, body, jnp.zeros(o_ref.shape, jnp.float32)).astype(o_ref.dtype)


def nm_matmul(x_planes, vals, meta, *, n: int, m: int, bits: int, blocks: tuple[int, int, int],
              out_dtype, variant: str, interpret: bool):
  """Σ_p x_planes[p] @ plane_p, (M, N) in `out_dtype`; blocks (bm, bn, bg) divide (M, N, G)."""
  bm, bn, bg = blocks
  mrows, g = x_planes[0].shape
  ncols = vals[0].shape[1]
  nk = g // bg
  out_shape = jax.ShapeDtypeStruct((mrows, ncols), out_dtype)
  args = (*x_planes, *vals, meta)
  if variant == "grid_k":
    in_specs = ([pl.BlockSpec((bm, bg), lambda i, j, k: (i, k))] * m
                + [pl.BlockSpec((bg, bn), lambda i, j, k: (k, j))] * (n + 1))
    return pl.pallas_call(
        functools.partial(_grid_k_kernel, n=n, m=m, bits=bits, nk=nk),
        out_shape=out_shape, grid=(mrows // bm, ncols // bn, nk), in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[common.vmem_scratch((bm, bn))],
        compiler_params=common.compiler_params(variant, ("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="nm_sparse_matmul_grid_k",
    )(*args)
  in_specs = ([pl.BlockSpec((bm, g), lambda i, j: (i, 0))] * m
              + [pl.BlockSpec((g, bn), lambda i, j: (0, j))] * (n + 1))
  return pl.pallas_call(
      functools.partial(_loop_k_kernel, n=n, m=m, bits=bits, nk=nk, bg=bg),
      out_shape=out_shape, grid=(mrows // bm, ncols // bn), in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      compiler_params=common.compiler_params(variant, ("parallel", "parallel")),
      interpret=interpret, name="nm_sparse_matmul_loop_k",
  )(*args)
