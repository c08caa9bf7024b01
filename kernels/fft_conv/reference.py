"""FFT convolution references and the Monarch (matrix-multiply) FFT they share with the kernel.

"FlashFFTConv: Efficient Convolutions for Long Sequences with Tensor Cores" computes the
causal depthwise convolution

    y[b, h, t] = post[b, h, t] · Σ_{s ≤ t} k[h, t - s] · pre[b, h, s] · u[b, h, s]

as y = iFFT_N(FFT_N(pad z) ⊙ FFT_N(pad k))[:L] with N = 2L, and writes the FFT as matrix
multiplies (order 2, N = N1·N2): with X[n1, n2] = x[N2·n1 + n2],

    Z = ((F_N1 X) ⊙ T) F_N2,   T[k1, n2] = ω_N^(k1·n2),   Z[k1, k2] = FFT(x)[k1 + N1·k2],

and the inverse runs the conjugate stages in reverse order with 1/N folded into the
inverse twiddles. Real and imaginary parts are separate real matmuls (Pallas has no
complex dtype). The zero half of the padded input skips half of F_N1's columns and
only the first L outputs are formed (half of the last stage's rows).

Argument layout (shared by every function here and by `fft_conv`):
  u (B, H, L) real input; k (H, Lk) real filter with Lk <= L (Lk < L: a partial
  convolution); pre / post (B, H, L) optional gates (None = 1).

Frequency-sparse convolution: `keep` (in k2 blocks of the permuted spectrum, see
`Plan`) zeroes the spectrum columns k2 in [keep, N2 - keep); the kernel skips them.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST


class Plan(NamedTuple):
  """The order-2 factorisation of one convolution: N = 2·lp = n1·n2, lp = l1·n2 >= length.

  keep: number of k2 columns kept at each end of the permuted spectrum (n2 // 2 = all,
  the dense convolution); the kept columns are [0, keep) and [n2 - keep, n2).
  """
  length: int
  lp: int
  n1: int
  n2: int
  keep: int

  @property
  def l1(self) -> int:
    return self.lp // self.n2

  @property
  def cols(self) -> tuple[int, ...]:
    if 2 * self.keep >= self.n2:
      return tuple(range(self.n2))
    return tuple(range(self.keep)) + tuple(range(self.n2 - self.keep, self.n2))


def make_plan(length: int, n2: Optional[int] = None, freq_keep: float = 1.0) -> Plan:
  """Plan for sequences of `length`: n2 a power of two near sqrt(2·length) (or given).

  freq_keep in (0, 1]: fraction of the k2 spectrum columns kept (lowest |frequency|
  blocks); 1.0 = dense.
  """
  if length < 1:
    raise ValueError(f"fft_conv: sequence length must be >= 1, got {length}")
  if not 0.0 < freq_keep <= 1.0:
    raise ValueError(f"fft_conv: freq_keep must be in (0, 1], got {freq_keep}")
  if n2 is None:
    n2 = 1 << max(1, math.ceil(math.log2(math.sqrt(2 * length))))
  if n2 < 2 or n2 % 2:
    raise ValueError(f"fft_conv: n2 must be an even number >= 2, got {n2}")
  lp = -(-length // n2) * n2
  keep = n2 // 2 if freq_keep >= 1.0 else max(1, int(round(freq_keep * n2 / 2)))
  return Plan(length, lp, 2 * lp // n2, n2, keep)


@functools.lru_cache(maxsize=64)
def _matrices_np(plan: Plan) -> dict:
  n, n1, n2, l1 = 2 * plan.lp, plan.n1, plan.n2, plan.l1
  cols = np.asarray(plan.cols)
  f1 = np.exp(-2j * np.pi * np.outer(np.arange(n1), np.arange(n1)) / n1)
  f2 = np.exp(-2j * np.pi * np.outer(np.arange(n2), np.arange(n2)) / n2)
  tw = np.exp(-2j * np.pi * np.outer(np.arange(n1), np.arange(n2)) / n)
  mats = {
      "f1": f1[:, :l1],             # (N1, L1): the zero half of the input is skipped
      "tw": tw,                     # (N1, N2)
      "f2": f2[:, cols],            # (N2, nk): only the kept spectrum columns
      "g2": np.conj(f2)[cols, :],   # (nk, N2)
      "itw": np.conj(tw) / n,       # (N1, N2), 1/N folded in
      "g1": np.conj(f1)[:l1, :],    # (L1, N1): only the first L outputs
  }
  out = {}
  for name, m in mats.items():
    out[name + "_re"], out[name + "_im"] = m.real.copy(), m.imag.copy()
  return out


MATRIX_NAMES = tuple(f"{m}_{p}" for m in ("f1", "tw", "f2", "g2", "itw", "g1") for p in ("re", "im"))


def matrices(plan: Plan, dtype) -> dict:
  """The DFT, twiddle and inverse matrices of `plan` as real (re, im) arrays of `dtype`."""
  return {k: jnp.asarray(v, dtype) for k, v in _matrices_np(plan).items()}


def compute_dtype(dtype):
  """float64 stays float64 (x64 tests); everything else computes in float32."""
  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _lead(v, ndim):
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def _left(m, x):
  """m @ x over the second-to-last axis of x (any leading axes)."""
  return jnp.einsum("kn,...nm->...km", m, x, precision=_HI)


def _right(x, m):
  return jnp.einsum("...kn,nm->...km", x, m, precision=_HI)


def forward_stages(x, mats):
  """(..., m, N2) real rows x[N2·n1 + n2] (m <= L1, zero beyond) -> permuted spectrum (re, im) (..., N1, nk)."""
  m = x.shape[-2]
  ar, ai = _left(mats["f1_re"][:, :m], x), _left(mats["f1_im"][:, :m], x)
  twr, twi = _lead(mats["tw_re"], x.ndim), _lead(mats["tw_im"], x.ndim)
  br, bi = ar * twr - ai * twi, ar * twi + ai * twr
  f2r, f2i = mats["f2_re"], mats["f2_im"]
  return _right(br, f2r) - _right(bi, f2i), _right(br, f2i) + _right(bi, f2r)


def inverse_stages(zr, zi, mats, rows: Optional[int] = None):
  """Permuted spectrum (..., N1, nk) -> real part of its inverse DFT, first `rows` of (L1, N2)."""
  g2r, g2i = mats["g2_re"], mats["g2_im"]
  cr, ci = _right(zr, g2r) - _right(zi, g2i), _right(zr, g2i) + _right(zi, g2r)
  itr, iti = _lead(mats["itw_re"], zr.ndim), _lead(mats["itw_im"], zr.ndim)
  dr, di = cr * itr - ci * iti, cr * iti + ci * itr
  g1r, g1i = mats["g1_re"], mats["g1_im"]
  if rows is not None:
    g1r, g1i = g1r[:rows], g1i[:rows]
  return _left(g1r, dr) - _left(g1i, di)


def cmul(ar, ai, br, bi, conj_a: bool = False):
  """(a or conj(a)) · b on split real / imaginary parts."""
  if conj_a:
    return ar * br + ai * bi, ar * bi - ai * br
  return ar * br - ai * bi, ar * bi + ai * br


def to_rows(x, plan: Plan, rows: Optional[int] = None):
  """(..., T) -> zero-padded (..., rows, N2) with rows = ceil(T / N2) (or given)."""
  rows = rows or -(-x.shape[-1] // plan.n2)
  pad = rows * plan.n2 - x.shape[-1]
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(x.shape[:-1] + (rows, plan.n2))


def filter_spectrum(k, plan: Plan, mats):
  """k (H, Lk) -> permuted spectrum (H, N1, nk); a partial filter uses ceil(Lk / N2) of F_N1's columns."""
  return forward_stages(to_rows(k.astype(mats["f1_re"].dtype), plan), mats)


def _check(u, k, pre, post):
  if u.ndim != 3 or k.ndim != 2 or k.shape[0] != u.shape[1]:
    raise ValueError(f"fft_conv: want u (B, H, L) and k (H, Lk), got u {u.shape}, k {k.shape}")
  if k.shape[1] > u.shape[2]:
    raise ValueError(f"fft_conv: filter length {k.shape[1]} exceeds the sequence length {u.shape[2]}")
  for name, g in (("pre", pre), ("post", post)):
    if g is not None and g.shape != u.shape:
      raise ValueError(f"fft_conv: gate {name} has shape {g.shape}, want {u.shape}")


def fft_conv_monarch(u, k, pre=None, post=None, *, n2: Optional[int] = None, freq_keep: float = 1.0):
  """The kernel's algorithm as plain jnp einsums (autodiff works; the `monarch` conv_impl)."""
  _check(u, k, pre, post)
  plan = make_plan(u.shape[-1], n2, freq_keep)
  cdt = compute_dtype(u.dtype)
  mats = matrices(plan, cdt)
  z = u.astype(cdt) if pre is None else u.astype(cdt) * pre.astype(cdt)
  kr, ki = filter_spectrum(k, plan, mats)
  zr, zi = forward_stages(to_rows(z, plan, plan.l1), mats)
  yr, yi = cmul(zr, zi, kr[None], ki[None])
  y = inverse_stages(yr, yi, mats).reshape(u.shape[:-1] + (plan.lp,))[..., :u.shape[-1]]
  if post is not None:
    y = y * post.astype(cdt)
  return y.astype(u.dtype)


def freq_mask(plan: Plan) -> np.ndarray:
  """(2·lp,) bool in natural frequency order: True where the permuted column k2 is kept."""
  k = np.arange(2 * plan.lp)
  return np.isin(k // plan.n1, np.asarray(plan.cols))


def fft_conv_reference(u, k, pre=None, post=None, *, n2: Optional[int] = None,
                       freq_keep: float = 1.0):
  """jnp.fft reference: rfft path when dense, complex fft with the spectrum masked when sparse."""
  _check(u, k, pre, post)
  length = u.shape[-1]
  cdt = compute_dtype(u.dtype)
  z = u.astype(cdt) if pre is None else u.astype(cdt) * pre.astype(cdt)
  kk = k.astype(cdt)
  if freq_keep >= 1.0:
    n = 2 * length
    y = jnp.fft.irfft(jnp.fft.rfft(z, n=n) * jnp.fft.rfft(kk, n=n)[None], n=n)[..., :length]
  else:
    plan = make_plan(length, n2, freq_keep)
    n = 2 * plan.lp
    spec = jnp.fft.fft(kk, n=n) * jnp.asarray(freq_mask(plan))[None]
    y = jnp.real(jnp.fft.ifft(jnp.fft.fft(z, n=n) * spec[None], n=n))[..., :length]
  y = y.astype(cdt)
  if post is not None:
    y = y * post.astype(cdt)
  return y.astype(u.dtype)


def direct_conv_reference(u, k, pre=None, post=None):
  """O(L²) causal convolution as one einsum with the Toeplitz filter matrix."""
  _check(u, k, pre, post)
  length = u.shape[-1]
  cdt = compute_dtype(u.dtype)
  z = u.astype(cdt) if pre is None else u.astype(cdt) * pre.astype(cdt)
  kk = jnp.pad(k.astype(cdt), ((0, 0), (0, length - k.shape[1])))
  lag = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
  toeplitz_HxTxS = jnp.where(lag[None] >= 0, kk[:, jnp.clip(lag, 0, length - 1)], 0)
  y = jnp.einsum("hts,bhs->bht", toeplitz_HxTxS, z, precision=_HI)
  if post is not None:
    y = y * post.astype(cdt)
  return y.astype(u.dtype)
