"""FFT convolution (K4): the public op, its custom_vjp and a shard_map wrapper.

"FlashFFTConv: Efficient Convolutions for Long Sequences with Tensor Cores":

    y = post ⊙ iFFT_N(FFT_N(pad(pre ⊙ u)) ⊙ FFT_N(pad k))[:L],   N = 2L (causal, exact)

with the FFT done as Monarch matmuls inside one Pallas kernel (`kernel.py`).

Argument layout: u (B, H, L) real; k (H, Lk), Lk <= L (Lk < L is a partial
convolution: the kernel skips F_N1's columns beyond ceil(Lk / N2)); pre, post
(B, H, L) or None. The result is (B, H, L) in u's dtype; the arithmetic is float32
(float64 for float64 inputs). A ragged L is zero-padded to a multiple of N2 (exact:
the convolution is causal).

Backward (the same kernel, `custom_vjp`): with z = pre ⊙ u and c = conv(z, k),
  dpost = dy ⊙ c,  dz = iFFT(conj(K) ⊙ FFT(post ⊙ dy)) (correlation with k),
  du = pre ⊙ dz,  dpre = u ⊙ dz,  dk = Σ_b iFFT(conj(FFT z_b) ⊙ FFT((post ⊙ dy)_b))[:Lk].
Frequency-sparse plans apply the same column mask to every product, so the
gradients are those of the masked convolution.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxft_kernels import common
from jaxft_kernels.fft_conv import kernel
from jaxft_kernels.fft_conv import reference as ref
from jaxft_kernels.fft_conv.reference import (direct_conv_reference, fft_conv_monarch,
                                              fft_conv_reference)

__all__ = ["fft_conv", "fft_conv_sharded", "fft_conv_reference", "fft_conv_monarch",
           "direct_conv_reference", "default_block_h"]


class _Static(NamedTuple):
  plan: ref.Plan
  block_h: int
  interpret: bool


def default_block_h(h: int, n_fft: int, budget: int = 1 << 16) -> int:
  """Channels per program: about `budget` spectrum elements on chip (VMEM / shared memory)."""
  return max(1, min(h, budget // max(n_fft, 1)))


def _conv(x4, kr, ki, pre4, post4, st: _Static, out_dtype):
  return kernel.spectral_call(x4, (kr, ki), st.plan, mode="conv", pre=pre4, post=post4,
                              block_h=st.block_h, out_dtype=out_dtype, interpret=st.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _core(x4, k, pre4, post4, st: _Static):
  mats = ref.matrices(st.plan, ref.compute_dtype(x4.dtype))
  kr, ki = ref.filter_spectrum(k, st.plan, mats)
  return _conv(x4, kr, ki, pre4, post4, st, x4.dtype)


def _core_fwd(x4, k, pre4, post4, st):
  mats = ref.matrices(st.plan, ref.compute_dtype(x4.dtype))
  kr, ki = ref.filter_spectrum(k, st.plan, mats)
  y = _conv(x4, kr, ki, pre4, post4, st, x4.dtype)
  return y, (x4, k, pre4, post4, kr, ki)


def _core_bwd(st, res, dy):
  x4, k, pre4, post4, kr, ki = res
  cdt = ref.compute_dtype(x4.dtype)
  dy = dy.astype(cdt)
  z = x4.astype(cdt) if pre4 is None else x4.astype(cdt) * pre4.astype(cdt)
  dpost = None
  if post4 is not None:
    c = _conv(z, kr, ki, None, None, st, cdt)   # recomputed, not stored
    dpost = (dy * c).astype(post4.dtype)
    dc = dy * post4.astype(cdt)
  else:
    dc = dy
  dz = _conv(dc, kr, -ki, None, None, st, cdt)
  dx = dz if pre4 is None else dz * pre4.astype(cdt)
  dpre = None if pre4 is None else (dz * x4.astype(cdt)).astype(pre4.dtype)
  rows = -(-k.shape[1] // st.plan.n2)
  corr = kernel.spectral_call(z, dc, st.plan, mode="corr", rows=rows, block_h=st.block_h,
                              out_dtype=cdt, interpret=st.interpret)
  dk = jnp.sum(corr, axis=0).reshape(k.shape[0], rows * st.plan.n2)[:, :k.shape[1]]
  return dx.astype(x4.dtype), dk.astype(k.dtype), dpre, dpost


_core.defvjp(_core_fwd, _core_bwd)


def fft_conv(u: jax.Array, k: jax.Array, pre: Optional[jax.Array] = None,
             post: Optional[jax.Array] = None, *, freq_keep: float = 1.0,
             n2: Optional[int] = None, block_h: Optional[int] = None,
             interpret: Optional[bool] = None) -> jax.Array:
  """Causal depthwise long convolution through the Monarch-FFT Pallas kernel.

  Args:
    u: (B, H, L) input.
    k: (H, Lk) filter, Lk <= L.
    pre, post: optional (B, H, L) gates: y = post ⊙ (k ∗ (pre ⊙ u)).
    freq_keep: fraction of the (permuted) spectrum's k2 blocks kept, lowest
      frequencies first (1.0 = the exact convolution; < 1: frequency-sparse).
    n2: the inner FFT factor (a power of two near sqrt(2L) by default).
    block_h: channels per kernel program (default `default_block_h`).
    interpret: None = interpret on CPU only (see `jaxft_kernels.common`).

  Returns:
    (B, H, L) in u's dtype; equals `fft_conv_reference` with the same arguments.
  """
  ref._check(u, k, pre, post)
  plan = ref.make_plan(u.shape[-1], n2, freq_keep)
  st = _Static(plan, block_h or default_block_h(u.shape[1], 2 * plan.lp),
               common.resolve_interpret(interpret))
  rows = lambda a: None if a is None else ref.to_rows(a, plan, plan.l1)
  y4 = _core(rows(u), k, rows(pre), rows(post), st)
  return y4.reshape(u.shape[:-1] + (plan.lp,))[..., :u.shape[-1]]


def fft_conv_sharded(u, k, pre=None, post=None, *, mesh, batch_axes=("data", "fsdp"),
                     channel_axis: Optional[str] = "tensor", **kw):
  """`fft_conv` on a mesh: batch split over `batch_axes`, channels over `channel_axis`.

  Axes missing from the mesh are ignored. The sequence axis stays whole (an FFT needs it).
  """
  names = set(mesh.axis_names)
  batch = tuple(a for a in batch_axes if a in names) or None
  chan = channel_axis if channel_axis in names else None
  row = P(batch, chan, None)
  has = (pre is not None, post is not None)

  def fn(u, k, *gates):
    it = iter(gates)
    g = [next(it) if present else None for present in has]
    return fft_conv(u, k, *g, **kw)

  gates = [g for g in (pre, post) if g is not None]
  specs = (row, P(chan, None)) + (row,) * len(gates)
  return common.shard_mapped(fn, mesh, specs, row)(u, k, *gates)
