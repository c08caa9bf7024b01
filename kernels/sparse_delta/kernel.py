"""Pallas kernels of the block-sparse delta: scatter-add of tiles into W, and the SDDMM.

Both visit only the nb listed tiles. On TPU ('grid_k') the block coordinates are
scalar-prefetched into SMEM and drive the BlockSpec index maps, so each grid step DMAs
exactly one (br, bc) tile; on GPU ('loop_k', Triton) the kernel reads the coordinates
and addresses the tile with dynamic slices.

  scatter: out = W with out[tile_i] = W[tile_i] + φ_i     (W aliased to out: no copy of
           the untouched tiles when W is donated)
  sddmm:   dφ_i = x[:, rows_i]ᵀ · dy[:, cols_i]           (2·M·nnz FLOPs, not 2·M·d_in·d_out)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxft_kernels import common


def _scatter_grid_kernel(blk_ref, w_ref, phi_ref, o_ref):
  del blk_ref
  o_ref[...] = (w_ref[...].astype(jnp.float32) + phi_ref[0].astype(jnp.float32)).astype(o_ref.dtype)


def _scatter_loop_kernel(blk_ref, w_ref, phi_ref, o_ref, *, br, bc):
  i = pl.program_id(0)
  rs = pl.ds(pl.multiple_of(blk_ref[i, 0] * br, br), br)
  cs = pl.ds(pl.multiple_of(blk_ref[i, 1] * bc, bc), bc)
  tile = w_ref[rs, cs].astype(jnp.float32) + phi_ref[0].astype(jnp.float32)
  o_ref[rs, cs] = tile.astype(o_ref.dtype)


def scatter(w, blocks, phi, *, variant: str, interpret: bool):
  """W + φ scattered at the tiles `blocks` (nb, 2) int32; φ (nb, br, bc)."""
  nb, br, bc = phi.shape
  out_shape = jax.ShapeDtypeStruct(w.shape, w.dtype)
  if variant == "grid_k":
    from jax.experimental.pallas import tpu as pltpu
    tile = pl.BlockSpec((br, bc), lambda i, blk: (blk[i, 0], blk[i, 1]))
    return pl.pallas_call(
        _scatter_grid_kernel, out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(nb,),
            in_specs=[tile, pl.BlockSpec((1, br, bc), lambda i, blk: (i, 0, 0))], out_specs=tile),
        input_output_aliases={1: 0},
        compiler_params=common.compiler_params(variant, ("arbitrary",)),
        interpret=interpret, name="sparse_delta_scatter_grid",
    )(blocks, w, phi)
  full = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
  return pl.pallas_call(
      functools.partial(_scatter_loop_kernel, br=br, bc=bc), out_shape=out_shape, grid=(nb,),
      in_specs=[full(blocks.shape), full(w.shape), pl.BlockSpec((1, br, bc), lambda i: (i, 0, 0))],
      out_specs=full(w.shape), input_output_aliases={1: 0},
      compiler_params=common.compiler_params(variant, ("arbitrary",)),
      interpret=interpret, name="sparse_delta_scatter_loop",
  )(blocks, w, phi)


def _sddmm_grid_kernel(blk_ref, xt_ref, dy_ref, o_ref, acc_ref, *, nm):
  del blk_ref
  k = pl.program_id(1)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += jnp.dot(xt_ref[...], dy_ref[...], preferred_element_type=jnp.float32)

  @pl.when(k == nm - 1)
  def _():
    o_ref[0] = acc_ref[...].astype(o_ref.dtype)


def _sddmm_loop_kernel(blk_ref, xt_ref, dy_ref, o_ref, *, br, bc, bm, nm):
  i = pl.program_id(0)
  rs = pl.ds(pl.multiple_of(blk_ref[i, 0] * br, br), br)
  cs = pl.ds(pl.multiple_of(blk_ref[i, 1] * bc, bc), bc)

  def body(k, acc):
    ms = pl.ds(pl.multiple_of(k * bm, bm), bm)
    return acc + jnp.dot(xt_ref[rs, ms], dy_ref[ms, cs], preferred_element_type=jnp.float32)

  o_ref[0] = jax.lax.fori_loop(0, nm, body, jnp.zeros((br, bc), jnp.float32)).astype(o_ref.dtype)


def sddmm(xt, dy, blocks, *, block_shape, bm: int, out_dtype, variant: str, interpret: bool):
  """dφ (nb, br, bc) with dφ_i = xt[tile rows_i] @ dy[:, tile cols_i]; xt (d_in, M), dy (M, d_out)."""
  br, bc = block_shape
  nb = blocks.shape[0]
  nm = xt.shape[1] // bm
  out_shape = jax.ShapeDtypeStruct((nb, br, bc), out_dtype)
  if variant == "grid_k":
    from jax.experimental.pallas import tpu as pltpu
    return pl.pallas_call(
        functools.partial(_sddmm_grid_kernel, nm=nm), out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(nb, nm),
            in_specs=[pl.BlockSpec((br, bm), lambda i, k, blk: (blk[i, 0], k)),
                      pl.BlockSpec((bm, bc), lambda i, k, blk: (k, blk[i, 1]))],
            out_specs=pl.BlockSpec((1, br, bc), lambda i, k, blk: (i, 0, 0)),
            scratch_shapes=[common.vmem_scratch((br, bc))]),
        compiler_params=common.compiler_params(variant, ("parallel", "arbitrary")),
        interpret=interpret, name="sparse_delta_sddmm_grid",
    )(blocks, xt, dy)
  full = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
  return pl.pallas_call(
      functools.partial(_sddmm_loop_kernel, br=br, bc=bc, bm=bm, nm=nm), out_shape=out_shape,
      grid=(nb,), in_specs=[full(blocks.shape), full(xt.shape), full(dy.shape)],
      out_specs=pl.BlockSpec((1, br, bc), lambda i: (i, 0, 0)),
      compiler_params=common.compiler_params(variant, ("parallel",)),
      interpret=interpret, name="sparse_delta_sddmm_loop",
  )(blocks, xt, dy)
