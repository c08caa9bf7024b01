"""Causal kernelized attention with relative positional encoding through the FFT convolution.

"Stable, Fast and Accurate: Kernelized Attention with Relative Positional Encoding":

    out_i = φ(q_i)ᵀ Σ_{j≤i} c_{i−j} φ(k_j) v_jᵀ  /  φ(q_i)ᵀ Σ_{j≤i} c_{i−j} φ(k_j),

with positive random features φ(x) = exp(W x' − |x'|²/2) / sqrt(m), x' = x / d^(1/4),
W ~ N(0, I) (m, d) (so E[φ(q)ᵀφ(k)] = exp(q·k / sqrt(d))), and a multiplicative
relative positional encoding c_t = exp(b_t) per head. The RPE matrix is Toeplitz, so
each Σ_j c_{i−j} (·)_j is a causal convolution with filter c over the sequence: it
runs through `jaxft_kernels.fft_conv` (FFT size 2L, O(L log L)) over the m·d_v
numerator and m denominator channels of every head. The stabilisers (a per-query
max for φ(q), a per-head max for φ(k)) cancel in the ratio.

Layout: q, k (B, L, N, d); v (B, L, N, d_v); features (m, d); rpe_bias (N, L) for
lags 0 … L−1. Returns (B, L, N, d_v) in v's dtype (arithmetic in float32).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

CONV_IMPLS = ('pallas', 'jnp_fft', 'monarch', 'direct')


def random_features(key: jax.Array, m: int, d: int) -> jax.Array:
  """(m, d) Gaussian projection for positive random features."""
  return jax.random.normal(key, (m, d), jnp.float32)


def feature_map(x_BxLxNxD: jax.Array, w_MxD: jax.Array, stabilise_axes) -> jax.Array:
  """φ(x) = exp(W x' − |x'|²/2 − max) / sqrt(m), x' = x / d^(1/4); (B, L, N, m) float32."""
  d = x_BxLxNxD.shape[-1]
  x = x_BxLxNxD.astype(jnp.float32) * d ** -0.25
  proj = jnp.einsum('blnd,md->blnm', x, w_MxD.astype(jnp.float32))
  logits = proj - 0.5 * jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=stabilise_axes, keepdims=True))
  return jnp.exp(logits) * w_MxD.shape[0] ** -0.5


def _toeplitz_conv(u_BxCxL, c_CxL, impl):
  from jaxft_kernels import fft_conv as fc  # pylint: disable=g-import-not-at-top
  fn = {'pallas': fc.fft_conv, 'jnp_fft': fc.fft_conv_reference,
        'monarch': fc.fft_conv_monarch, 'direct': fc.direct_conv_reference}[impl]
  return fn(u_BxCxL, c_CxL)


def kernel_rpe_attention(q, k, v, features, rpe_bias, *, conv_impl: str = 'pallas') -> jax.Array:
  """Causal kernelized attention with multiplicative RPE exp(rpe_bias); see the module docstring."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"kernel_rpe_attention: conv_impl={conv_impl!r} is invalid; valid choices: "
                     f"{', '.join(CONV_IMPLS)}")
  b, l, n, _ = q.shape
  dv, m = v.shape[-1], features.shape[0]
  if rpe_bias.shape != (n, l):
    raise ValueError(f"kernel_rpe_attention: rpe_bias must be (heads, length) = {(n, l)}, "
                     f"got {rpe_bias.shape}")
  phi_q = feature_map(q, features, (-1,))
  phi_k = feature_map(k, features, (1, 3))
  vals = jnp.concatenate([v.astype(jnp.float32), jnp.ones((b, l, n, 1), jnp.float32)], -1)
  kv_BxLxNxMxE = phi_k[..., None] * vals[..., None, :]                # E = d_v + 1
  u_BxCxL = jnp.moveaxis(kv_BxLxNxMxE, 1, -1).reshape(b, n * m * (dv + 1), l)
  c_NxL = jnp.exp(rpe_bias.astype(jnp.float32))
  c_CxL = jnp.repeat(c_NxL, m * (dv + 1), axis=0)
  s_BxNxMxExL = _toeplitz_conv(u_BxCxL, c_CxL, conv_impl).reshape(b, n, m, dv + 1, l)
  out_BxLxNxE = jnp.einsum('blnm,bnmel->blne', phi_q, s_BxNxMxExL)
  return (out_BxLxNxE[..., :dv] / out_BxLxNxE[..., dv:]).astype(v.dtype)


def kernel_rpe_attention_reference(q, k, v, features, rpe_bias) -> jax.Array:
  """The explicit O(L²) form with the same features: A_ij = φ(q_i)·φ(k_j)·c_{i−j}, j <= i."""
  l = q.shape[1]
  phi_q = feature_map(q, features, (-1,))
  phi_k = feature_map(k, features, (1, 3))
  lag = jnp.arange(l)[:, None] - jnp.arange(l)[None, :]
  c_NxLxS = jnp.where(lag[None] >= 0, jnp.exp(rpe_bias.astype(jnp.float32))[:, jnp.clip(lag, 0)], 0)
  a_BxNxLxS = jnp.einsum('blnm,bsnm->bnls', phi_q, phi_k) * c_NxLxS[None]
  num = jnp.einsum('bnls,bsne->blne', a_BxNxLxS, v.astype(jnp.float32))
  den = jnp.einsum('bnls->bln', a_BxNxLxS)[..., None]
  return (num / den).astype(v.dtype)
