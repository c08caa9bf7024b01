"""Structured linears as `linear` hooks: Monarch layers and HALO Hadamard-rotated low precision.

Both plug into any model through the hook `linear(p, x, name, rng)` (see
`jaxft.models.layers.dense`), so the decoder runs them without knowing:

  logits = decoder.apply(monarchize(params, nblocks=4, targets='mlp/'), tokens, cfg,
                         linear=monarch_hook())
  logits = decoder.apply(params, tokens, cfg, linear=halo_hook(quant='int8'))

Monarch — "Monarch: Expressive Structured Matrices for Efficient and Accurate Training":
y = x·Mᵀ, M = P2·blockdiag(w2)·P1·blockdiag(w1) (`jaxft_kernels.monarch`); a linear whose
params hold `w1`, `w2` instead of `kernel` runs as Monarch. `monarchize` replaces dense
kernels by their closed-form projection (per block pair, the rank-t truncated SVD).

HALO — "HALO: Hadamard-Assisted Lossless Optimization for Efficient Low-Precision LLM
Training and Fine-Tuning": each of the three GEMMs of a linear, Y = XW (inner d_in),
dX = dY·Wᵀ (inner d_out), dW = Xᵀ·dY (inner tokens), has both operands rotated by an
orthonormal block-Hadamard H along its inner dimension ((XH)(HᵀW) = XW), quantised
(INT8 or FP8 E4M3; per-row scales for activations / gradients, per-output-channel for
weights) and multiplied with 32-bit accumulation. INT8 GEMMs are real integer dots
everywhere; FP8 operands are real float8 values, multiplied natively where XLA has an
FP8 dot and after an exact upcast otherwise (simulated on CPU).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models.layers import dense, lead

Params = dict[str, Any]
QUANTS = ('none', 'int8', 'fp8')
GEMMS = ('fwd', 'dgrad', 'wgrad')
_QMAX = {'int8': 127.0, 'fp8': 448.0}


# ---------------------------------------------------------------------------
# Monarch.


def monarch_init(key: jax.Array, n_in: int, n_out: int, nblocks: int, dtype=jnp.float32) -> Params:
  """{'w1', 'w2'} with fan-in-scaled normal entries (unit gain per factor)."""
  from jaxft_kernels import monarch  # pylint: disable=g-import-not-at-top
  s1, s2 = monarch.default_shapes(n_in, n_out, nblocks)
  k1, k2 = jax.random.split(key)
  return {'w1': (jax.random.normal(k1, s1) / np.sqrt(s1[2])).astype(dtype),
          'w2': (jax.random.normal(k2, s2) / np.sqrt(s2[2])).astype(dtype)}


def monarchize(params: Params, *, nblocks: int, targets: str) -> Params:
  """Replaces the `kernel` (…, n_in, n_out) of every linear whose path matches the regex
  `targets` by its closed-form Monarch projection {'w1', 'w2'} (leading stacked axes kept)."""
  from jaxft_kernels import monarch  # pylint: disable=g-import-not-at-top
  hits = []

  def walk(tree, path):
    if isinstance(tree, dict) and 'kernel' in tree and re.search(targets, path):
      w = np.asarray(tree['kernel'], np.float64)
      s1, s2 = monarch.default_shapes(w.shape[-2], w.shape[-1], nblocks)
      flat = w.reshape((-1,) + w.shape[-2:])
      pairs = [monarch.project(m, s1, s2) for m in flat]
      out = {k: v for k, v in tree.items() if k != 'kernel'}
      for i, name in enumerate(('w1', 'w2')):
        stacked = np.stack([p[i] for p in pairs]).reshape(w.shape[:-2] + pairs[0][i].shape)
        out[name] = jnp.asarray(stacked, tree['kernel'].dtype)
      hits.append(path)
      return out
    if isinstance(tree, dict):
      return {k: walk(v, f'{path}/{k}' if path else k) for k, v in tree.items()}
    return tree

  out = walk(params, '')
  if not hits:
    raise ValueError(f"monarchize: targets={targets!r} matched no linear kernel")
  return out


def monarch_hook(base=dense, *, use_kernel: bool = True, interpret: Optional[bool] = None):
  """A linear hook running linears that hold `w1`/`w2` as Monarch products, others via `base`."""
  from jaxft_kernels import monarch  # pylint: disable=g-import-not-at-top

  def linear(p, x, name, rng):
    if 'w1' not in p:
      return base(p, x, name, rng)
    w1, w2 = p['w1'].astype(x.dtype), p['w2'].astype(x.dtype)
    y = (monarch.monarch_matmul(x, w1, w2, interpret=interpret) if use_kernel
         else monarch.monarch_matmul_reference(x, w1, w2))
    return y + lead(p['bias'], y.ndim) if 'bias' in p else y

  return linear


# ---------------------------------------------------------------------------
# HALO.


def auto_block(n: int, cap: int = 512) -> int:
  """Largest power of two dividing n, at most `cap` (576 -> 64, 1536 -> 512)."""
  return min(n & -n, cap)


def quantize(x: jax.Array, axis: int, quant: str):
  """(values, scale) with x ≈ values · scale; scales reduce over `axis` (kept as size 1)."""
  if quant == 'none':
    return x, None
  amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
  scale = jnp.where(amax > 0, amax / _QMAX[quant], 1.0)
  if quant == 'int8':
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale
  return (x / scale).astype(jnp.float8_e4m3fn), scale


def qmatmul(a: jax.Array, b: jax.Array, quant: str) -> jax.Array:
  """a (M, K) @ b (K, N) in float32 with per-row (a) and per-column (b) quantisation."""
  qa, sa = quantize(a, 1, quant)
  qb, sb = quantize(b, 0, quant)
  if quant == 'none':
    return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)
  if quant == 'int8':
    acc = jnp.dot(qa, qb, preferred_element_type=jnp.int32).astype(jnp.float32)
  elif quant == 'fp8' and jax.default_backend() == 'gpu':
    acc = jnp.dot(qa, qb, preferred_element_type=jnp.float32)
  else:  # exact upcast: products of FP8 values are exact in float32
    acc = jnp.dot(qa.astype(jnp.float32), qb.astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
  return acc * sa * sb


def _rotate(x: jax.Array, axis: int, block: int, use_kernel: bool) -> jax.Array:
  from jaxft_kernels import hadamard  # pylint: disable=g-import-not-at-top
  fn = hadamard.hadamard_transform if use_kernel else hadamard.hadamard_transform_reference
  return jnp.moveaxis(fn(jnp.moveaxis(x, axis, -1), block), -1, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def halo_matmul(x2: jax.Array, w: jax.Array, quant: str = 'int8',
                rotate: Sequence[str] = GEMMS, token_block: int = 256,
                use_kernel: bool = True) -> jax.Array:
  """x2 (M, d_in) @ w (d_in, d_out) with HALO's rotated low-precision forward GEMM."""
  return _halo_fwd(x2, w, quant, rotate, token_block, use_kernel)[0]


def _halo_fwd(x2, w, quant, rotate, token_block, use_kernel):
  x, wf = x2.astype(jnp.float32), w.astype(jnp.float32)
  if 'fwd' in rotate:
    blk = auto_block(x.shape[1])
    x, wf = _rotate(x, 1, blk, use_kernel), _rotate(wf, 0, blk, use_kernel)
  return qmatmul(x, wf, quant).astype(x2.dtype), (x2, w)


def _halo_bwd(quant, rotate, token_block, use_kernel, res, dy):
  x2, w = res
  g, x, wf = dy.astype(jnp.float32), x2.astype(jnp.float32), w.astype(jnp.float32)
  wt = wf.T                                                      # (d_out, d_in)
  if 'dgrad' in rotate:                                          # inner dim d_out
    blk = auto_block(g.shape[1])
    g_r, wt = _rotate(g, 1, blk, use_kernel), _rotate(wt, 0, blk, use_kernel)
  else:
    g_r = g
  dx = qmatmul(g_r, wt, quant)
  xt, gm = x.T, g                                                # inner dim: tokens
  if 'wgrad' in rotate:
    m = x.shape[0]
    blk = min(token_block, 1 << max(0, (m - 1).bit_length()))
    pad = -m % blk
    xp, gp = jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(g, ((0, pad), (0, 0)))
    xt, gm = _rotate(xp, 0, blk, use_kernel).T, _rotate(gp, 0, blk, use_kernel)
  dw = qmatmul(xt, gm, quant)
  return dx.astype(x2.dtype), dw.astype(w.dtype)


halo_matmul.defvjp(_halo_fwd, _halo_bwd)


def halo_hook(quant: str = 'int8', rotate: Sequence[str] = GEMMS, *, token_block: int = 256,
              use_kernel: bool = True):
  """A linear hook: every linear's `kernel` runs through `halo_matmul` (bias added in x's dtype)."""
  if quant not in QUANTS:
    raise ValueError(f"halo: quant={quant!r} is invalid; valid choices: {', '.join(QUANTS)}")
  bad = [r for r in rotate if r not in GEMMS]
  if bad:
    raise ValueError(f"halo: rotate={tuple(rotate)} has {bad}; valid entries: {', '.join(GEMMS)}")
  rotate = tuple(rotate)

  def linear(p, x, name, rng):
    del name, rng
    x2 = x.reshape(-1, x.shape[-1])
    y = halo_matmul(x2, p['kernel'].astype(x.dtype), quant, rotate, token_block, use_kernel)
    y = y.reshape(x.shape[:-1] + (y.shape[-1],))
    return y + lead(p['bias'].astype(y.dtype), y.ndim) if 'bias' in p else y

  return linear
