"""Decoder building blocks: norms, RoPE, grouped-query attention, gated MLPs.

Every function is pure and works on one layer's params (a nested dict of arrays,
without the stacked `layers` axis). `cfg` is a `DecoderConfig`; it is only read.

Shape letters: B batch, L query length, S key length, D d_model, N query heads,
K kv heads, G = N // K query heads per kv head, H head_dim, F d_ff, V vocab.

Activations keep the params' dtype; norms, RoPE, attention logits and softmax run
in float32 and cast back.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

Params = dict[str, Any]
Linear = Callable[[Params, jax.Array, str, Optional[jax.Array]], jax.Array]

# Fixed per-name indices: rng = fold_in(layer_key, LINEAR_INDEX[name]).
LINEAR_INDEX = {
    'attn/q': 0, 'attn/k': 1, 'attn/v': 2, 'attn/o': 3,
    'mlp/gate': 4, 'mlp/up': 5, 'mlp/down': 6,
}
_NEG_INF = -1e30  # finite: a masked logit never meets inf - inf


def lead(v: jax.Array, ndim: int) -> jax.Array:
  """Prepends unit axes so `v` broadcasts against an `ndim`-rank array explicitly."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def dropout(x: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
  """Inverted dropout: each entry kept with probability 1 - r and scaled by 1 / (1 - r).

  r = round(rate * 2^16) / 2^16 (|r - rate| <= 7.7e-6): an entry is dropped when a 16-bit
  uniform integer falls below round(rate * 2^16), so one 32-bit random word decides two
  entries. `jax.random.bernoulli` draws a word per entry: twice the threefry work, which
  was 0.16 s of a 1.7 s SmolLM2 LoRA step on the 2-core CPU. No-op for rate 0 or no rng.
  """
  threshold = round(float(rate) * 65536)
  if threshold <= 0 or rng is None:
    return x
  if threshold >= 65536:
    return jnp.zeros_like(x)
  d = x.shape[-1]
  words = jax.random.bits(rng, (*x.shape[:-1], (d + 1) // 2), jnp.uint32)
  halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*x.shape[:-1], -1)[..., :d]
  scale = jnp.asarray(65536 / (65536 - threshold), x.dtype)
  return jnp.where(halves >= threshold, x * scale, jnp.zeros_like(x))


def dense(p: Params, x: jax.Array, name: str, rng: Optional[jax.Array]) -> jax.Array:
  """The default linear hook: `x @ p['kernel'] (+ p['bias'])`.

  Args:
    p: this linear's params, `kernel` (in, out) and optionally `bias` (out,).
      Extra leaves (an adapter's `lora_a`, ...) are ignored here.
    x: (..., in) activations.
    name: the linear's path relative to its layer, e.g. 'attn/q' (unused here).
    rng: a key distinct per layer and linear, or None (unused here).

  Returns:
    (..., out) activations.
  """
  del name, rng
  y = jnp.einsum('...i,io->...o', x, p['kernel'])
  if 'bias' in p:
    y = y + lead(p['bias'], y.ndim)
  return y


def linear_rng(layer_rng: Optional[jax.Array], name: str) -> Optional[jax.Array]:
  """The key handed to the hook for linear `name` of one layer (None stays None)."""
  if layer_rng is None:
    return None
  return jax.random.fold_in(layer_rng, LINEAR_INDEX[name])


def rms_norm(p: Params, x: jax.Array, eps: float, offset: float) -> jax.Array:
  """x * rsqrt(mean(x^2) + eps) * (offset + scale), in float32, cast back to x.dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (y * lead(offset + p['scale'].astype(jnp.float32), y.ndim)).astype(x.dtype)


def layer_norm(p: Params, x: jax.Array, eps: float, offset: float) -> jax.Array:
  """LayerNorm with scale (used as offset + scale) and bias, in float32."""
  x32 = x.astype(jnp.float32)
  centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
  y = centred * jax.lax.rsqrt(var + eps)
  y = y * lead(offset + p['scale'].astype(jnp.float32), y.ndim)
  return (y + lead(p['bias'].astype(jnp.float32), y.ndim)).astype(x.dtype)


def norm(p: Params, x: jax.Array, cfg) -> jax.Array:
  """The configured norm ('rms' or 'layer') over the last axis."""
  fn = rms_norm if cfg.norm == 'rms' else layer_norm
  return fn(p, x, cfg.norm_eps, cfg.norm_offset)


def rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, base: jax.Array,
         layout: str) -> jax.Array:
  """Rotary position embedding over head_dim.

  Args:
    x_BxLxNxH: queries or keys.
    positions_BxL: int positions.
    base: scalar RoPE base (may be traced: it is scanned per layer).
    layout: 'half' rotates (i, i + H/2) pairs (HF rotate_half); 'interleaved'
      rotates (2i, 2i+1) pairs (GGUF / llama.cpp, GPT-J).

  Returns:
    The rotated array, in x's dtype.
  """
  h = x_BxLxNxH.shape[-1]
  exponent = jnp.arange(0, h, 2, dtype=jnp.float32) / h
  inv_freq = jnp.power(jnp.asarray(base, jnp.float32), -exponent)
  angle_BxLxP = positions_BxL.astype(jnp.float32)[..., None] * lead(inv_freq, 3)
  cos_BxLx1xP = jnp.cos(angle_BxLxP)[:, :, None, :]
  sin_BxLx1xP = jnp.sin(angle_BxLxP)[:, :, None, :]
  x = x_BxLxNxH.astype(jnp.float32)
  if layout == 'half':
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    out = jnp.concatenate([x1 * cos_BxLx1xP - x2 * sin_BxLx1xP,
                           x2 * cos_BxLx1xP + x1 * sin_BxLx1xP], axis=-1)
  else:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * cos_BxLx1xP - x2 * sin_BxLx1xP,
                     x2 * cos_BxLx1xP + x1 * sin_BxLx1xP], axis=-1).reshape(x.shape)
  return out.astype(x_BxLxNxH.dtype)


def softcap(x: jax.Array, cap: float) -> jax.Array:
  """cap * tanh(x / cap); identity when cap is 0."""
  return x if not cap else cap * jnp.tanh(x / cap)


def attention_mask(segment_ids_BxL: Optional[jax.Array], b: int, l: int) -> jax.Array:
  """(B, L, S) bool: causal by index within the row and, if given, same segment."""
  idx = jnp.arange(l)
  causal_LxS = idx[:, None] >= idx[None, :]
  mask_BxLxS = jnp.broadcast_to(causal_LxS[None], (b, l, l))
  if segment_ids_BxL is not None:
    mask_BxLxS = mask_BxLxS & (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])
  return mask_BxLxS


def cache_mask(segment_ids_BxL: jax.Array, key_segment_ids_BxS: jax.Array,
               key_positions_BxS: jax.Array, index: jax.Array) -> jax.Array:
  """(B, L, S) bool over cache slots for L queries at slots [index, index + L).

  Slot s is visible iff it is written (position >= 0), not after the query's slot,
  and in the query's segment (so real tokens never see left padding).
  """
  l, s = segment_ids_BxL.shape[1], key_positions_BxS.shape[1]
  causal_LxS = jnp.arange(s)[None, :] <= (index + jnp.arange(l))[:, None]
  return (causal_LxS[None] & (key_positions_BxS >= 0)[:, None, :]
          & (segment_ids_BxL[:, :, None] == key_segment_ids_BxS[:, None, :]))


class KVCache(NamedTuple):
  """One layer's view of the KV cache, as `attention` reads and writes it.

  k_BxSxKxH, v_BxSxKxH: keys (after q/k norm and RoPE) and values of S slots.
  index: int32 scalar, the slot the first of the L new tokens is written at.
  positions_BxS: position of the token in every slot, the new ones included
    (unwritten slots hold -1 and must be masked by the caller's mask_BxLxS).
  """
  k_BxSxKxH: jax.Array
  v_BxSxKxH: jax.Array
  index: jax.Array
  positions_BxS: jax.Array


def _write(cache_BxSxKxH: jax.Array, new_BxLxKxH: jax.Array, index: jax.Array) -> jax.Array:
  """The cache slab with `new` written at slots [index, index + L)."""
  zero = jnp.zeros((), jnp.int32)
  start = (zero, jnp.asarray(index, jnp.int32), zero, zero)
  return jax.lax.dynamic_update_slice(cache_BxSxKxH, new_BxLxKxH.astype(cache_BxSxKxH.dtype), start)


def attention(p: Params, x_BxLxD: jax.Array, cfg, *, positions_BxL: jax.Array,
              mask_BxLxS: jax.Array, window: jax.Array, rope_base: jax.Array,
              rng: Optional[jax.Array], linear: Linear,
              kv_cache: Optional[KVCache] = None) -> Any:
  """Grouped-query self-attention of one layer.

  Args:
    p: the layer's `attn` params (q, k, v, o and optional q_norm / k_norm).
    x_BxLxD: normed input.
    cfg: DecoderConfig.
    positions_BxL: positions for RoPE.
    mask_BxLxS: causal & segment mask shared by all layers; with `kv_cache`,
      over the S cache slots (see `KVCache`).
    window: int scalar; key k is visible to query q only if q - k < window
      (distance in row index without a cache, in position with one).
    rope_base: float scalar RoPE base of this layer.
    rng: this layer's key (or None); each linear gets a fold_in of it.
    linear: the linear hook.
    kv_cache: optional `KVCache` of this layer: the L new keys / values are
      written at slots [index, index + L) and the queries attend over all S slots.

  Returns:
    (B, L, D) attention output (after the output projection); with `kv_cache`,
    `(output, (k_BxSxKxH, v_BxSxKxH))` with the updated cache slabs.
  """
  b, l, _ = x_BxLxD.shape
  n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  g = n // k
  call = lambda name, inp: linear(p[name.split('/')[1]], inp, name, linear_rng(rng, name))
  q_BxLxNxH = call('attn/q', x_BxLxD).reshape(b, l, n, h)
  k_BxSxKxH = call('attn/k', x_BxLxD).reshape(b, l, k, h)
  v_BxSxKxH = call('attn/v', x_BxLxD).reshape(b, l, k, h)
  if cfg.qk_norm:
    q_BxLxNxH = rms_norm(p['q_norm'], q_BxLxNxH, cfg.norm_eps, cfg.norm_offset)
    k_BxSxKxH = rms_norm(p['k_norm'], k_BxSxKxH, cfg.norm_eps, cfg.norm_offset)
  if cfg.pos == 'rope':
    q_BxLxNxH = rope(q_BxLxNxH, positions_BxL, rope_base, cfg.rope_layout)
    k_BxSxKxH = rope(k_BxSxKxH, positions_BxL, rope_base, cfg.rope_layout)
  if kv_cache is not None:
    k_BxSxKxH = _write(kv_cache.k_BxSxKxH, k_BxSxKxH, kv_cache.index)
    v_BxSxKxH = _write(kv_cache.v_BxSxKxH, v_BxSxKxH, kv_cache.index)
  q_BxLxKxGxH = q_BxLxNxH.reshape(b, l, k, g, h)
  logits_BxKxGxLxS = jnp.einsum('BLKGH,BSKH->BKGLS', q_BxLxKxGxH, k_BxSxKxH,
                                preferred_element_type=jnp.float32)
  scale = cfg.query_scale or h ** -0.5
  logits_BxKxGxLxS = softcap(logits_BxKxGxLxS * scale, cfg.attn_softcap)
  if kv_cache is None:
    idx = jnp.arange(l)
    in_window_LxS = (idx[:, None] - idx[None, :]) < window
    mask_BxLxS = mask_BxLxS & in_window_LxS[None]
  else:
    mask_BxLxS = mask_BxLxS & (
        (positions_BxL[:, :, None] - kv_cache.positions_BxS[:, None, :]) < window)
  logits_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxKxGxLxS, _NEG_INF)
  probs_BxKxGxLxS = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(v_BxSxKxH.dtype)
  out_BxLxKxGxH = jnp.einsum('BKGLS,BSKH->BLKGH', probs_BxKxGxLxS, v_BxSxKxH)
  out_BxLxD = call('attn/o', out_BxLxKxGxH.reshape(b, l, n * h))
  return out_BxLxD if kv_cache is None else (out_BxLxD, (k_BxSxKxH, v_BxSxKxH))


def mlp(p: Params, x_BxLxD: jax.Array, cfg, *, rng: Optional[jax.Array],
        linear: Linear) -> jax.Array:
  """Feed-forward block: 'swiglu' / 'geglu' (gated) or 'gelu' (plain).

  Args:
    p: the layer's `mlp` params (gate for gated kinds, up, down).
    x_BxLxD: normed input.
    cfg: DecoderConfig.
    rng: this layer's key (or None).
    linear: the linear hook.

  Returns:
    (B, L, D) output of the down projection.
  """
  call = lambda name, inp: linear(p[name.split('/')[1]], inp, name, linear_rng(rng, name))
  gelu = lambda z: jax.nn.gelu(z, approximate=cfg.gelu_approximate)
  up_BxLxF = call('mlp/up', x_BxLxD)
  if cfg.mlp == 'gelu':
    hidden_BxLxF = gelu(up_BxLxF)
  else:
    act = jax.nn.silu if cfg.mlp == 'swiglu' else gelu
    hidden_BxLxF = act(call('mlp/gate', x_BxLxD)) * up_BxLxF
  return call('mlp/down', hidden_BxLxF)
