"""Sparse-delta update (K3) for SpIEL-style adapters: scatter, SDDMM, and the linear they make.

"Scaling Sparse Fine-Tuning to Large Language Models" (SpIEL) trains values φ at a
sparse index set of W (d_in, d_out):

    y = x (W0 + scatter(idx, φ)) (+ bias),   dφ = (xᵀ dy)[idx]   (an SDDMM: 2·M·nnz FLOPs),

so the backward never forms the d_in × d_out gradient unless W0 itself trains. Here
idx is block-structured (tiles of `block_shape`, default (8, 128) = one TPU vreg tile;
(16, 16) suits GPU tensor cores): `blocks` (nb, 2) int32 tile coordinates from
`make_blocks` (which rejects duplicates and out-of-range tiles) and φ (nb, br, bc). The
element-indexed references apply to `expand_blocks(blocks, block_shape)`.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxft_kernels import common
from jaxft_kernels.sparse_delta import kernel

__all__ = ["sparse_delta_scatter", "sparse_delta_sddmm", "sparse_delta_matmul", "sparse_delta_matmul_sharded"]


def _check(w_shape, blocks, block_shape):
  (d_in, d_out), (br, bc) = w_shape, block_shape
  if d_in % br or d_out % bc:
    raise ValueError(f"W shape {tuple(w_shape)} must be a multiple of block_shape {tuple(block_shape)}")
  if blocks.ndim != 2 or blocks.shape[1] != 2 or not jnp.issubdtype(blocks.dtype, jnp.integer):
    raise ValueError(f"blocks must be (nb, 2) integer tile coordinates, got {blocks.shape} {blocks.dtype}")


def gather_blocks(a, blocks, block_shape):
  """Tiles (nb, br, bc) of a (d_in, d_out) at `blocks`."""
  br, bc = block_shape
  tiles = a.reshape(a.shape[0] // br, br, a.shape[1] // bc, bc)
  return tiles[blocks[:, 0], :, blocks[:, 1], :]


def _scatter(w, blocks, phi, interpret, variant):
  def build(var):
    return functools.partial(kernel.scatter, variant=var, interpret=interpret)
  return common.on_platform(interpret, build, w, blocks, phi, variant=variant)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _scatter_vjp(w, blocks, phi, interpret, variant):
  return _scatter(w, blocks, phi, interpret, variant)


def _scatter_fwd(w, blocks, phi, interpret, variant):
  out = _scatter(w.value, blocks.value, phi.value, interpret, variant)
  return out, (blocks.value, phi.value, (w.perturbed, phi.perturbed))


def _scatter_bwd(interpret, variant, res, dout):
  blocks, phi, (need_w, need_phi) = res
  del interpret, variant
  dphi = gather_blocks(dout, blocks, phi.shape[1:]).astype(phi.dtype) if need_phi else None
  return (dout if need_w else None), None, dphi


_scatter_vjp.defvjp(_scatter_fwd, _scatter_bwd, symbolic_zeros=True)


def sparse_delta_scatter(w, blocks, phi, *, interpret: Optional[bool] = None, variant: Optional[str] = None):
  """W + φ scattered into the tiles `blocks`: w (d_in, d_out), blocks (nb, 2) int32, φ (nb, br, bc).

  Returns W's shape and dtype. Duplicate tiles are undefined here: build `blocks` with
  `make_blocks`. Gradients: dW = dout, dφ = dout's tiles at `blocks`.
  """
  _check(w.shape, blocks, phi.shape[1:])
  return _scatter_vjp(w, blocks.astype(jnp.int32), phi, common.resolve_interpret(interpret), variant)


def sparse_delta_sddmm(x, dy, blocks, block_shape, *, out_dtype=jnp.float32,
                       interpret: Optional[bool] = None, variant: Optional[str] = None):
  """dφ (nb, br, bc): the tiles `blocks` of xᵀ dy without forming it; x (..., d_in), dy (..., d_out)."""
  x2d, dy2d = common.flatten_leading(x)[0], common.flatten_leading(dy)[0]
  if x2d.shape[0] != dy2d.shape[0]:
    raise ValueError(f"sparse_delta_sddmm: x {x.shape} and dy {dy.shape} need the same leading dims")
  _check((x2d.shape[1], dy2d.shape[1]), blocks, block_shape)
  interpret = common.resolve_interpret(interpret)
  mrows = x2d.shape[0]
  dtype = jnp.result_type(x2d, dy2d)

  def build(var):
    def run(x2d, dy2d, blocks):
      bm = (common.block_size(mrows, 512, 128) if var == "grid_k"
            else common.block_size(mrows, 64, 16, pow2=True))
      xt = common.pad_dim(x2d.astype(dtype), 0, bm).T
      dyp = common.pad_dim(dy2d.astype(dtype), 0, bm)
      return kernel.sddmm(xt, dyp, blocks, block_shape=tuple(block_shape), bm=bm,
                          out_dtype=out_dtype, variant=var, interpret=interpret)
    return run

  return common.on_platform(interpret, build, x2d, dy2d, blocks.astype(jnp.int32), variant=variant)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _matmul(x, w, blocks, phi, bias, interpret, variant):
  return _matmul_value(x, w, blocks, phi, bias, interpret, variant)[0]


def _matmul_value(x, w, blocks, phi, bias, interpret, variant):
  weff = _scatter(w, blocks, phi, interpret, variant).astype(x.dtype)
  y = jnp.matmul(x, weff, preferred_element_type=jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)[None, :]
  return y.astype(x.dtype), weff


def _matmul_fwd(x, w, blocks, phi, bias, interpret, variant):
  val = lambda p: None if p is None else p.value
  y, weff = _matmul_value(val(x), val(w), val(blocks), val(phi), val(bias), interpret, variant)
  need = tuple(p is not None and p.perturbed for p in (x, w, phi, bias))
  return y, (val(x), val(w), weff, val(blocks), val(phi), need)


def _matmul_bwd(interpret, variant, res, dy):
  x, w, weff, blocks, phi, (need_x, need_w, need_phi, need_bias) = res
  dy = dy.astype(x.dtype)
  f32 = dict(preferred_element_type=jnp.float32)
  dx = jnp.matmul(dy, weff.T, **f32).astype(x.dtype) if need_x else None
  dw = jnp.matmul(x.T, dy, **f32).astype(w.dtype) if need_w else None
  dphi = None
  if need_phi:
    dphi = sparse_delta_sddmm(x, dy, blocks, phi.shape[1:], out_dtype=phi.dtype,
                              interpret=interpret, variant=variant)
  dbias = jnp.sum(dy.astype(jnp.float32), axis=0).astype(dy.dtype) if need_bias else None
  return dx, dw, None, dphi, dbias


_matmul.defvjp(_matmul_fwd, _matmul_bwd, symbolic_zeros=True)


def sparse_delta_matmul(x, w, blocks, phi, *, bias=None, interpret: Optional[bool] = None,
                        variant: Optional[str] = None):
  """y = x (W + scatter(blocks, φ)) (+ bias); dφ by the block SDDMM, dW only if W is differentiated.

  Args:
    x: (..., d_in). w: (d_in, d_out). blocks: (nb, 2) int32 tile coordinates. φ: (nb, br, bc).
    bias: optional (d_out,). interpret / variant: as for every kernel op.
  Returns:
    (..., d_out) in x's dtype.
  """
  _check(w.shape, blocks, phi.shape[1:])
  if x.shape[-1] != w.shape[0]:
    raise ValueError(f"sparse_delta_matmul: x {x.shape} does not match w {w.shape}")
  x2d, lead = common.flatten_leading(x)
  y = _matmul(x2d, w, blocks.astype(jnp.int32), phi, bias, common.resolve_interpret(interpret), variant)
  return y.reshape(*lead, w.shape[1])


def sparse_delta_matmul_sharded(x, w, blocks, phi, *, mesh, bias=None, batch_axis="data",
                                interpret=None, variant=None):
  """`sparse_delta_matmul` inside `jax.shard_map`, rows of x over `batch_axis` (W, φ replicated)."""
  P = jax.P
  in_specs = (P(batch_axis), P(), P(), P()) + (() if bias is None else (P(),))
  out_spec = P(*([batch_axis] + [None] * (x.ndim - 1)))

  def local(x, w, blocks, phi, *bias):
    return sparse_delta_matmul(x, w, blocks, phi, bias=bias[0] if bias else None,
                               interpret=interpret, variant=variant)

  args = (x, w, blocks, phi) + (() if bias is None else (bias,))
  return common.shard_mapped(local, mesh, in_specs, out_spec)(*args)
