"""Pallas kernel of the fast Walsh–Hadamard transform: two small matmuls per row tile.

"SPRIGHT: A Fast and Robust Framework for Sparse Walsh-Hadamard Transform" (background;
only the dense transform is built). With h = a·b (Sylvester order), H_h = H_a ⊗ H_b, so a
row block of width h viewed as (a, b) transforms as Y = H_a · X · H_b: one matmul with the
small (b, b) matrix per lane-aligned chunk of b columns (b <= 128, MXU / tensor-core
sized), then log2(a) butterfly passes (u + v, u - v) across the chunks (H_a, on whole
chunks: no relayout). Both matrices hold ±1, so the
products are exact; the 1/sqrt(h) scale is applied once at the end in float32. The row
tile makes one HBM round trip (the op is memory-bound).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_HI = jax.lax.Precision.HIGHEST


def _body(x_ref, hb_ref, o_ref, *, block: int, scale: float):
  n = x_ref.shape[1]
  b = hb_ref.shape[0]
  hb = hb_ref[...]
  chunks = [jnp.dot(x_ref[:, c * b:(c + 1) * b].astype(jnp.float32), hb, precision=_HI,
                    preferred_element_type=jnp.float32) for c in range(n // b)]
  a = block // b
  span = 1
  while span < a:                      # H_a = H_2 ⊗ ... ⊗ H_2 within each block of a chunks
    for c in range(len(chunks)):
      if (c % a) % (2 * span) < span:
        u, v = chunks[c], chunks[c + span]
        chunks[c], chunks[c + span] = u + v, u - v
    span *= 2
  y = chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks, axis=1)
  o_ref[...] = (y * scale).astype(o_ref.dtype)


def hadamard_call(x, hb, *, block: int, block_rows: int, interpret: bool):
  """(M, n) -> (M, n) blockwise orthonormal Hadamard; M a multiple of block_rows.

  hb (b, b): the ±1 Sylvester factor H_b, b dividing block (H_{block/b} runs as butterflies).
  """
  m, n = x.shape
  kern = functools.partial(_body, block=block, scale=float(block) ** -0.5)
  full = lambda arr: pl.BlockSpec(arr.shape, lambda i: (0, 0))
  return pl.pallas_call(
      kern,
      grid=(m // block_rows,),
      in_specs=[pl.BlockSpec((block_rows, n), lambda i: (i, 0)), full(hb)],
      out_specs=pl.BlockSpec((block_rows, n), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
      interpret=interpret,
  )(x, hb)
