"""Pallas kernel of the Monarch product: both block-diagonal matmuls in one call.

"Monarch: Expressive Structured Matrices for Efficient and Accurate Training". One
program takes a (bm, k, p) tile of rows, runs the k block matmuls, applies the
reshape-transpose permutation on chip (whole lane chunks once w1's rows are stored
λ-major, `permute_w1`) and the l block matmuls of the second factor,
so the intermediate out1 never round-trips through HBM; both weights stay resident.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_HI = jax.lax.Precision.HIGHEST


def _body(x_ref, w1_ref, w2_ref, o_ref, *, precision):
  l = w2_ref.shape[0]
  cdt = jnp.float32
  # w1's rows arrive λ-major (`permute_w1`), so P1 moves whole (t = q / l)-wide lane chunks.
  out1 = jnp.einsum("bkp,kqp->bkq", x_ref[...], w1_ref[...], precision=precision,
                    preferred_element_type=cdt)
  z = pltpu.einshape("bk(lt)->bl(kt)", out1, l=l)                       # (bm, l, r)
  out2 = jnp.einsum("blr,lsr->bls", z.astype(w2_ref.dtype), w2_ref[...], precision=precision,
                    preferred_element_type=cdt)
  o_ref[...] = pltpu.einshape("bls->b(sl)", out2).astype(o_ref.dtype)


def permute_w1(w1, l: int):
  """Rows of w1 reordered λ-major: new row λ·t + m holds row λ + m·l (t = q / l)."""
  k, q, p = w1.shape
  return w1.reshape(k, q // l, l, p).transpose(0, 2, 1, 3).reshape(k, q, p)


def monarch_call(x3, w1, w2, *, block_rows: int, out_dtype, interpret: bool):
  """x3 (M, k, p) with M a multiple of block_rows, w1 from `permute_w1` -> (M, s·l)."""
  m, k, p = x3.shape
  l, s, _ = w2.shape
  precision = _HI if x3.dtype == jnp.float32 else None
  full = lambda a: pl.BlockSpec(a.shape, lambda i: (0, 0, 0))
  return pl.pallas_call(
      functools.partial(_body, precision=precision),
      grid=(m // block_rows,),
      in_specs=[pl.BlockSpec((block_rows, k, p), lambda i: (i, 0, 0)), full(w1), full(w2)],
      out_specs=pl.BlockSpec((block_rows, s * l), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((m, s * l), out_dtype),
      interpret=interpret,
  )(x3, w1, w2)
