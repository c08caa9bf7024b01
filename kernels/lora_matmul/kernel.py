"""Pallas kernel of the fused low-rank matmul: one accumulator, two contractions.

    out = x1 @ op(w1) + x2 @ op(w2) (+ bias),   op = identity, or transpose (`trans_w`)

Forward of LoRA: x1 = x, w1 = W (d_in, d_out), x2 = s·(x A) (M, r), w2 = B (r, d_out),
i.e. y = [x | s·S]·[W; B] as one GEMM over an extended contraction (METHODS.md K1).
Backward input gradient: x1 = dy, w1 = W, x2 = dS, w2 = A with `trans_w`, i.e.
dx = dy Wᵀ + dS Aᵀ in the same kernel. The rank-r pass runs once per output tile
(at k == 0 on TPU), so the tiny second GEMM never round-trips through HBM.

Inputs arrive padded to whole blocks (ops.py): M to `bm`, the main contraction to
`bk`, the output dim to `bn`; r is one full block.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxft_kernels import common


def _dot(a, b, trans):
  dims = (((1,), (1,)), ((), ())) if trans else (((1,), (0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _grid_k_kernel(*refs, trans, has_bias, nk):
  """TPU/interpret body: grid (i, j, k), k the reduction; f32 VMEM accumulator."""
  if has_bias:
    x1_ref, w1_ref, x2_ref, w2_ref, b_ref, o_ref, acc_ref = refs
  else:
    (x1_ref, w1_ref, x2_ref, w2_ref, o_ref, acc_ref), b_ref = refs, None
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = _dot(x2_ref[...], w2_ref[...], trans)

  acc_ref[...] += _dot(x1_ref[...], w1_ref[...], trans)

  @pl.when(k == nk - 1)
  def _():
    out = acc_ref[...]
    if b_ref is not None:
      out = out + b_ref[...].astype(jnp.float32)
    o_ref[...] = out.astype(o_ref.dtype)


def _loop_k_kernel(*refs, trans, has_bias, nk, bk):
  """GPU (Triton) body: grid (i, j) all parallel; the reduction is a loop in the kernel."""
  if has_bias:
    x1_ref, w1_ref, x2_ref, w2_ref, b_ref, o_ref = refs
  else:
    (x1_ref, w1_ref, x2_ref, w2_ref, o_ref), b_ref = refs, None

  def body(k, acc):
    ks = pl.ds(pl.multiple_of(k * bk, bk), bk)
    w = w1_ref[:, ks] if trans else w1_ref[ks, :]
    return acc + _dot(x1_ref[:, ks], w, trans)

  acc = jax.lax.fori_loop(0, nk, body, _dot(x2_ref[...], w2_ref[...], trans))
  if b_ref is not None:
    acc = acc + b_ref[...].astype(jnp.float32)
  o_ref[...] = acc.astype(o_ref.dtype)


def fused_matmul2(x1, w1, x2, w2, bias, *, trans_w: bool, blocks: tuple[int, int, int],
                  out_dtype, variant: str, interpret: bool):
  """x1 @ op(w1) + x2 @ op(w2) (+ bias) on block-aligned operands.

  Args:
    x1: (M, K); w1: (K, N), or (N, K) with `trans_w`.
    x2: (M, R); w2: (R, N), or (N, R) with `trans_w`.
    bias: (1, N) or None.
    blocks: (bm, bn, bk) dividing M, N, K.
  Returns:
    (M, N) in `out_dtype`, accumulated in float32.
  """
  bm, bn, bk = blocks
  m, kdim = x1.shape
  r = x2.shape[1]
  n = w1.shape[0] if trans_w else w1.shape[1]
  nk = kdim // bk
  has_bias = bias is not None
  out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
  args = (x1, w1, x2, w2) + ((bias,) if has_bias else ())
  if variant == "grid_k":
    w1_spec = (pl.BlockSpec((bn, bk), lambda i, j, k: (j, k)) if trans_w
               else pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)))
    w2_spec = (pl.BlockSpec((bn, r), lambda i, j, k: (j, 0)) if trans_w
               else pl.BlockSpec((r, bn), lambda i, j, k: (0, j)))
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)), w1_spec,
                pl.BlockSpec((bm, r), lambda i, j, k: (i, 0)), w2_spec]
    if has_bias:
      in_specs.append(pl.BlockSpec((1, bn), lambda i, j, k: (0, j)))
    return pl.pallas_call(
        functools.partial(_grid_k_kernel, trans=trans_w, has_bias=has_bias, nk=nk),
        out_shape=out_shape, grid=(m // bm, n // bn, nk), in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[common.vmem_scratch((bm, bn))],
        compiler_params=common.compiler_params(variant, ("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="lora_matmul_grid_k",
    )(*args)
  w1_spec = (pl.BlockSpec((bn, kdim), lambda i, j: (j, 0)) if trans_w
             else pl.BlockSpec((kdim, bn), lambda i, j: (0, j)))
  w2_spec = (pl.BlockSpec((bn, r), lambda i, j: (j, 0)) if trans_w
             else pl.BlockSpec((r, bn), lambda i, j: (0, j)))
  in_specs = [pl.BlockSpec((bm, kdim), lambda i, j: (i, 0)), w1_spec,
              pl.BlockSpec((bm, r), lambda i, j: (i, 0)), w2_spec]
  if has_bias:
    in_specs.append(pl.BlockSpec((1, bn), lambda i, j: (0, j)))
  return pl.pallas_call(
      functools.partial(_loop_k_kernel, trans=trans_w, has_bias=has_bias, nk=nk, bk=bk),
      out_shape=out_shape, grid=(m // bm, n // bn), in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      compiler_params=common.compiler_params(variant, ("parallel", "parallel")),
      interpret=interpret, name="lora_matmul_loop_k",
  )(*args)
