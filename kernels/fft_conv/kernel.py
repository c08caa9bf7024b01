"""Pallas kernel of the FlashFFTConv convolution: the whole FFT → product → iFFT in one call.

"FlashFFTConv: Efficient Convolutions for Long Sequences with Tensor Cores". One program
holds `bh` channels of one batch row, laid out (bh, L1, N2) (the free reshape of
(bh, L) with t = N2·n1 + n2), and runs the order-2 Monarch FFT of `reference.py` on
them as real matmuls: 2 (first stage, real input, zero half skipped) + 4 + 4 + 2 (last
stage, real part of the first L outputs only) matmuls per channel, with the twiddles
and the spectrum product in between. Nothing but the input, the gates and the output
touches HBM (the filter spectrum block stays resident while the batch axis, the inner
grid axis, advances).

Two modes share the body:
  'conv':  y = post ⊙ iFFT(FFT(pre ⊙ x) ⊙ K)[:L]            (forward; du with K conjugated)
  'corr':  y = iFFT(conj(FFT(a)) ⊙ FFT(b))[:rows·N2]        (per-row filter gradient)
A frequency-sparse plan simply has fewer spectrum columns (nk < N2): the skipped
blocks of F_N2 and of its inverse never enter the kernel.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
from jax.experimental import pallas as pl

from jaxft_kernels.fft_conv import reference as ref


def _body(*refs, mode: str, has_pre: bool, has_post: bool, rows: int, cdt):
  refs = list(refs)
  o_ref = refs.pop()
  x_ref = refs.pop(0)
  if mode == "conv":
    g_ref = refs.pop(0) if has_pre else None
    p_ref = refs.pop(0) if has_post else None
    kr_ref, ki_ref = refs.pop(0), refs.pop(0)
  else:
    b_ref = refs.pop(0)
  mats = {name: r[...] for name, r in zip(ref.MATRIX_NAMES, refs)}

  x = x_ref[...].astype(cdt)
  if mode == "conv":
    if has_pre:
      x = x * g_ref[...].astype(cdt)
    zr, zi = ref.forward_stages(x, mats)
    yr, yi = ref.cmul(zr, zi, kr_ref[...], ki_ref[...])
    y = ref.inverse_stages(yr, yi, mats)
    if has_post:
      y = y * p_ref[...].astype(cdt)
  else:
    ar, ai = ref.forward_stages(x, mats)
    br, bi = ref.forward_stages(b_ref[...].astype(cdt), mats)
    yr, yi = ref.cmul(ar, ai, br, bi, conj_a=True)
    y = ref.inverse_stages(yr, yi, mats, rows=rows)
  o_ref[...] = y.astype(o_ref.dtype)


def spectral_call(x, spec_or_b, plan: ref.Plan, *, mode: str, pre=None, post=None,
                  rows: Optional[int] = None, block_h: int, out_dtype, interpret: bool):
  """Runs the kernel over (B, H) rows.

  Args:
    x: (B, H, L1, N2) input rows (`reference.to_rows` layout).
    spec_or_b: 'conv': the filter spectrum (re, im), each (H, N1, nk) in the compute
      dtype; 'corr': the second signal b, (B, H, L1, N2).
    plan: the factorisation (`reference.make_plan`).
    mode: 'conv' or 'corr'.
    pre, post: optional (B, H, L1, N2) gates ('conv' only).
    rows: 'corr': output rows (the filter length in N2 rows); default L1.
    block_h: channels per program.
    out_dtype: output dtype.
    interpret: run the kernel in interpret mode.

  Returns:
    (B, H, L1, N2) for 'conv', (B, H, rows, N2) for 'corr'.
  """
  b, h, l1, n2 = x.shape
  rows = rows or l1
  cdt = ref.compute_dtype(x.dtype)
  mats = ref.matrices(plan, cdt)
  bh = min(block_h, h)
  grid = (pl.cdiv(h, bh), b)
  row_spec = pl.BlockSpec((None, bh, l1, n2), lambda i, j: (j, i, 0, 0))
  full = lambda a: pl.BlockSpec(a.shape, lambda i, j, _n=a.ndim: (0,) * _n)
  if mode == "conv":
    kr, ki = spec_or_b
    spec_spec = pl.BlockSpec((bh,) + kr.shape[1:], lambda i, j: (i, 0, 0))
    gates = [g for g in (pre, post) if g is not None]
    args = [x, *gates, kr, ki]
    in_specs = [row_spec] * (1 + len(gates)) + [spec_spec, spec_spec]
    out_rows = l1
  elif mode == "corr":
    args, in_specs, out_rows = [x, spec_or_b], [row_spec, row_spec], rows
  else:
    raise ValueError(f"spectral_call: mode must be 'conv' or 'corr', got {mode!r}")
  mat_list = [mats[name] for name in ref.MATRIX_NAMES]
  kern = functools.partial(_body, mode=mode, has_pre=pre is not None, has_post=post is not None,
                           rows=rows, cdt=cdt)
  return pl.pallas_call(
      kern,
      grid=grid,
      in_specs=in_specs + [full(m) for m in mat_list],
      out_specs=pl.BlockSpec((None, bh, out_rows, n2), lambda i, j: (j, i, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((b, h, out_rows, n2), out_dtype),
      interpret=interpret,
  )(*args, *mat_list)
