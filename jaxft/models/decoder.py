"""Decoder-only transformer LM family (Llama, Qwen2/3, Gemma 3, GPT-2 layouts).

Pure functions over a nested dict of params:

  params = init(key, cfg)
  logits_BxLxV = apply(params, tokens_BxL, cfg, positions=..., segment_ids=...)
  logits_BxLxV, cache = apply(..., cache=init_cache(cfg, B, S))   # KV-cached decoding
  axes = logical_axes(cfg)           # same tree, leaves are tuples of axis names

Per-layer params are stacked on a leading `layers` axis and run under
`lax.scan`; per-layer differences (sliding window, RoPE base, rng key) travel as
scanned arrays. Every linear inside a layer, and an untied lm_head, goes through
the `linear` hook so an adapter can run unmerged without the model knowing it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxft import names
from jaxft.models import layers
from jaxft.models.layers import dense

Params = dict[str, Any]

CHOICES = {
    'norm': ('rms', 'layer'),
    'pos': ('rope', 'learned', 'none'),
    'rope_layout': ('half', 'interleaved'),
    'mlp': ('swiglu', 'geglu', 'gelu'),
    # What a layer keeps for the backward pass (the rest is recomputed): see `remat_policy`.
    'remat': ('none', 'full', 'dots', 'dots_all', 'offload_dots'),
}
_GLOBAL_WINDOW = jnp.iinfo(jnp.int32).max


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a decoder LM; the defaults are a tiny Llama-like model."""
  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 4          # < n_heads = grouped-query attention
  head_dim: int = 16
  d_ff: int = 256
  norm: str = 'rms'            # 'rms' | 'layer'
  norm_eps: float = 1e-5
  norm_offset: float = 0.0     # scale used as (norm_offset + w): HF Gemma stores w with offset 1.0
  post_norms: bool = False     # Gemma 3: norm on the attention / MLP output before each residual add
  qk_norm: bool = False        # RMSNorm over head_dim on q and k (Gemma 3, Qwen3)
  pos: str = 'rope'            # 'rope' | 'learned' | 'none'
  rope_layout: str = 'half'    # 'half' (HF rotate-half) | 'interleaved' (pairs (2i, 2i+1))
  rope_base: float = 10000.0
  rope_base_local: float = 0.0  # RoPE base of sliding-window layers (Gemma 3: 1e4); 0 = rope_base
  max_len: int = 2048          # table size for learned positions
  mlp: str = 'swiglu'          # 'swiglu' | 'geglu' | 'gelu'
  gelu_approximate: bool = True  # tanh GELU (Gemma, GPT-2 'gelu_new')
  attn_bias: bool = False      # q/k/v biases (Qwen2, GPT-2)
  out_bias: bool = False       # attention output-projection bias (GPT-2)
  mlp_bias: bool = False       # MLP biases (GPT-2)
  tie_embeddings: bool = True
  embed_scale: bool = False    # multiply token embeddings by sqrt(d_model) (Gemma)
  sliding_window: int = 0      # 0 = every layer global
  global_every: int = 0        # layer i is global iff global_every > 0 and (i+1) % global_every == 0
  attn_softcap: float = 0.0    # 0 = off; else logits = cap * tanh(logits / cap)
  final_softcap: float = 0.0
  query_scale: float = 0.0     # 0 = 1/sqrt(head_dim); Gemma 3: query_pre_attn_scalar**-0.5
  remat: str = 'none'          # 'none' | 'full' | 'dots' | 'dots_all' | 'offload_dots' (remat_policy)
  scan_unroll: int = 1         # layers per scan iteration (lax.scan unroll; >= n_layers = no loop)
  param_dtype: str = 'float32'
  init_std: float = 0.02

  def __post_init__(self):
    for field, choices in CHOICES.items():
      value = getattr(self, field)
      if value not in choices:
        raise ValueError(f"DecoderConfig.{field}={value!r} is invalid; valid choices: "
                         f"{', '.join(repr(c) for c in choices)}")
    if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
      raise ValueError(f"DecoderConfig: n_heads={self.n_heads} must be a positive multiple "
                       f"of n_kv_heads={self.n_kv_heads}")
    if self.pos == 'rope' and self.head_dim % 2:
      raise ValueError(f"DecoderConfig: RoPE needs an even head_dim, got {self.head_dim}")
    if self.sliding_window < 0 or self.global_every < 0:
      raise ValueError("DecoderConfig: sliding_window and global_every must be >= 0")
    try:
      jnp.dtype(self.param_dtype)
    except TypeError:
      raise ValueError(f"DecoderConfig.param_dtype={self.param_dtype!r} is not a dtype") from None

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'DecoderConfig':
    """Builds a config from a dict or ml_collections ConfigDict.

    Unknown keys raise ValueError naming the key, its close matches and every
    valid key; invalid choice values raise ValueError naming the valid choices.
    """
    d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in d:
      if key not in valid:
        raise ValueError(names.unknown_message('DecoderConfig field', key, valid))
    return cls(**d)

  def num_params(self) -> int:
    """Parameter count in closed form (equals the size of `init`'s tree)."""
    d, f, h = self.d_model, self.d_ff, self.head_dim
    qd, kvd = self.n_heads * h, self.n_kv_heads * h
    norm = d * (2 if self.norm == 'layer' else 1)
    attn = d * qd + 2 * d * kvd + qd * d
    attn += (qd + 2 * kvd) * self.attn_bias + d * self.out_bias + 2 * h * self.qk_norm
    n_in = 1 if self.mlp == 'gelu' else 2
    mlp = n_in * d * f + f * d + (n_in * f + d) * self.mlp_bias
    layer = attn + mlp + norm * (4 if self.post_norms else 2)
    total = self.vocab_size * d + self.n_layers * layer + norm
    total += self.max_len * d * (self.pos == 'learned')
    total += d * self.vocab_size * (not self.tie_embeddings)
    return int(total)


# Every config field with its default: completes a config's `model` section.
DEFAULTS: dict[str, Any] = dataclasses.asdict(DecoderConfig())


# ---------------------------------------------------------------------------
# Param specs: one table drives init, logical_axes (and the tests' counts).


class _Spec(NamedTuple):
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  init: str  # 'normal' | 'normal_out' (residual-branch output) | 'scale' | 'zeros'


def _linear(din, dout, in_ax, out_ax, bias, bias_ax, l, out=False) -> Params:
  p = {'kernel': _Spec((l, din, dout), ('layers', in_ax, out_ax), 'normal_out' if out else 'normal')}
  if bias:
    p['bias'] = _Spec((l, dout), ('layers', bias_ax), 'zeros')
  return p


def _norm(cfg: DecoderConfig, lead: tuple[int, ...], dim: int, rms_only=False) -> Params:
  ax = ('layers', 'norm') if lead else ('norm',)
  p = {'scale': _Spec(lead + (dim,), ax, 'scale')}
  if cfg.norm == 'layer' and not rms_only:
    p['bias'] = _Spec(lead + (dim,), ax, 'zeros')
  return p


def _specs(cfg: DecoderConfig) -> Params:
  """The params tree with a `_Spec` (shape, logical axes, initialiser) per leaf."""
  l, d, f, h = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.head_dim
  qd, kvd = cfg.n_heads * h, cfg.n_kv_heads * h
  attn = {
      'q': _linear(d, qd, 'embed', 'heads', cfg.attn_bias, 'heads', l),
      'k': _linear(d, kvd, 'embed', 'kv_heads', cfg.attn_bias, 'kv_heads', l),
      'v': _linear(d, kvd, 'embed', 'kv_heads', cfg.attn_bias, 'kv_heads', l),
      'o': _linear(qd, d, 'heads', 'embed', cfg.out_bias, 'norm', l, out=True),
  }
  if cfg.qk_norm:
    attn['q_norm'] = _norm(cfg, (l,), h, rms_only=True)
    attn['k_norm'] = _norm(cfg, (l,), h, rms_only=True)
  mlp = {
      'up': _linear(d, f, 'embed', 'mlp', cfg.mlp_bias, 'mlp', l),
      'down': _linear(f, d, 'mlp', 'embed', cfg.mlp_bias, 'norm', l, out=True),
  }
  if cfg.mlp != 'gelu':
    mlp['gate'] = _linear(d, f, 'embed', 'mlp', cfg.mlp_bias, 'mlp', l)
  layer = {'attn_norm': _norm(cfg, (l,), d), 'attn': attn,
           'mlp_norm': _norm(cfg, (l,), d), 'mlp': mlp}
  if cfg.post_norms:
    layer['attn_post_norm'] = _norm(cfg, (l,), d)
    layer['mlp_post_norm'] = _norm(cfg, (l,), d)
  tree = {'embed': {'embedding': _Spec((cfg.vocab_size, d), ('vocab', 'embed'), 'normal')},
          'layers': layer, 'final_norm': _norm(cfg, (), d)}
  if cfg.pos == 'learned':
    tree['pos_embed'] = {'embedding': _Spec((cfg.max_len, d), ('pos', 'embed'), 'normal')}
  if not cfg.tie_embeddings:
    tree['lm_head'] = {'kernel': _Spec((d, cfg.vocab_size), ('embed', 'vocab'), 'normal')}
  return tree


def _is_spec(x) -> bool:
  return isinstance(x, _Spec)


def init(key: jax.Array, cfg: DecoderConfig) -> Params:
  """Random params for `cfg`, in `cfg.param_dtype`.

  Kernels and embeddings ~ normal(init_std) (the o and down projections use
  init_std / sqrt(2 * n_layers)); norm scales 1 - norm_offset (effective scale 1);
  biases 0.
  """
  specs = _specs(cfg)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
  keys = jax.random.split(key, len(leaves))
  dtype = jnp.dtype(cfg.param_dtype)
  out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)

  def make(k, s: _Spec):
    if s.init == 'zeros':
      return jnp.zeros(s.shape, dtype)
    if s.init == 'scale':
      return jnp.full(s.shape, 1.0 - cfg.norm_offset, dtype)
    std = out_std if s.init == 'normal_out' else cfg.init_std
    return (std * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype)

  return jax.tree.unflatten(treedef, [make(k, s) for k, s in zip(keys, leaves)])


def logical_axes(cfg: DecoderConfig) -> Params:
  """Same tree as `init(key, cfg)`; each leaf is a tuple of logical axis names."""
  return jax.tree.map(lambda s: s.axes, _specs(cfg), is_leaf=_is_spec)


# ---------------------------------------------------------------------------
# Forward pass.


def layer_schedule(cfg: DecoderConfig) -> tuple[jax.Array, jax.Array]:
  """Per-layer (window (L,) int32, rope base (L,) float32); global windows are int32 max."""
  windows, bases = [], []
  for i in range(cfg.n_layers):
    is_global = (not cfg.sliding_window
                 or (cfg.global_every > 0 and (i + 1) % cfg.global_every == 0))
    windows.append(_GLOBAL_WINDOW if is_global else cfg.sliding_window)
    local_base = cfg.rope_base_local or cfg.rope_base
    bases.append(cfg.rope_base if is_global else local_base)
  return jnp.asarray(windows, jnp.int32), jnp.asarray(bases, jnp.float32)


def _block(cfg, linear, positions_BxL, mask_BxLxS, cache_slots=None):
  """The scan body: one pre-norm transformer layer. xs = (layer params, window,
  rope base, rng[, k slab, v slab]); with `cache_slots` = (index, positions_BxS),
  ys = the updated (k, v) slabs, else None."""

  def body(x_BxLxD, xs):
    p, window, base, rng, *slabs = xs
    kv_cache = None if cache_slots is None else layers.KVCache(*slabs, *cache_slots)
    out = layers.attention(p['attn'], layers.norm(p['attn_norm'], x_BxLxD, cfg), cfg,
                           positions_BxL=positions_BxL, mask_BxLxS=mask_BxLxS, window=window,
                           rope_base=base, rng=rng, linear=linear, kv_cache=kv_cache)
    a_BxLxD, ys = (out, None) if kv_cache is None else out
    if cfg.post_norms:
      a_BxLxD = layers.norm(p['attn_post_norm'], a_BxLxD, cfg)
    x_BxLxD = x_BxLxD + a_BxLxD
    h_BxLxD = layers.norm(p['mlp_norm'], x_BxLxD, cfg)
    # A hook may replace the whole FFN (`linear.mlp`, e.g. MixLoRA's experts) and report
    # scalar auxiliary values (e.g. a load-balance loss) that `apply(..., return_aux=True)`
    # sums over layers.
    mlp_fn = getattr(linear, 'mlp', None)
    if mlp_fn is None:
      m_BxLxD, aux = layers.mlp(p['mlp'], h_BxLxD, cfg, rng=rng, linear=linear), {}
    else:
      m_BxLxD, aux = mlp_fn(p['mlp'], h_BxLxD, cfg, rng=rng, linear=linear)
    if cfg.post_norms:
      m_BxLxD = layers.norm(p['mlp_post_norm'], m_BxLxD, cfg)
    return x_BxLxD + m_BxLxD, (ys, aux)

  if cfg.remat == 'none':
    return body
  return jax.checkpoint(body, prevent_cse=False, policy=remat_policy(cfg.remat))


def remat_policy(name: str):
  """The `jax.checkpoint` policy of a `DecoderConfig.remat` choice ('none' = no checkpoint).

  'full': save nothing, recompute the whole layer (least memory, ~1/3 more FLOPs);
  'dots': save matmul outputs without batch dims (projections, MLP), recompute the rest;
  'dots_all': save every matmul output, attention scores included (more memory);
  'offload_dots': as 'dots' but the saved values live in host memory (TPU/GPU only).
  """
  policies = jax.checkpoint_policies
  if name == 'full':
    return None
  if name == 'dots':
    return policies.dots_with_no_batch_dims_saveable
  if name == 'dots_all':
    return policies.dots_saveable
  if name == 'offload_dots':
    return policies.offload_dot_with_no_batch_dims('device', 'pinned_host')
  raise ValueError(f"remat={name!r} has no checkpoint policy; valid: {', '.join(CHOICES['remat'])}")


def init_cache(cfg: DecoderConfig, batch: int, max_len: int,
               dtype: Any = None) -> Params:
  """An empty KV cache of `max_len` slots per row, for `apply(..., cache=...)`.

  Layout (k and v stacked over layers like the params, so they scan with them):
    k, v: (L, B, S, K, H) in `dtype` (default cfg.param_dtype): keys after q/k
      norm and RoPE, and values.
    positions: (B, S) int32, the position of the token in each slot; -1 = empty.
    segment_ids: (B, S) int32, its segment (left padding uses 0, tokens 1).
    index: () int32, the number of slots written (where the next write goes).
  A slot is visible to a query iff it is written, at or before the query's slot,
  in the same segment, and (sliding-window layers) within the window by position.
  """
  dtype = jnp.dtype(dtype or cfg.param_dtype)
  kv = jnp.zeros((cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim), dtype)
  return {'k': kv, 'v': kv, 'positions': jnp.full((batch, max_len), -1, jnp.int32),
          'segment_ids': jnp.zeros((batch, max_len), jnp.int32),
          'index': jnp.zeros((), jnp.int32)}


def _cache_mask(cache: Params, index: jax.Array, positions_BxL: jax.Array,
                segment_ids_BxL: jax.Array):
  """Writes the new tokens' bookkeeping; -> (bookkeeping, mask_BxLxS over cache slots)."""
  write = lambda old, new: jax.lax.dynamic_update_slice(
      old, new.astype(jnp.int32), (jnp.zeros((), jnp.int32), index))
  pos_BxS = write(cache['positions'], positions_BxL)
  seg_BxS = write(cache['segment_ids'], segment_ids_BxL)
  mask_BxLxS = layers.cache_mask(segment_ids_BxL, seg_BxS, pos_BxS, index)
  return {'positions': pos_BxS, 'segment_ids': seg_BxS,
          'index': index + positions_BxL.shape[1]}, mask_BxLxS


_PREFIX_POSITION = 1 << 30  # prefix slots' position: always inside any sliding window


def prefix_kv(params: Params, cfg: DecoderConfig, linear: layers.Linear = dense):
  """Per-layer keys and values (n_layers, P, K, H) every token attends to, or None.

  Prefix tuning puts `params['prefix'] = {'k', 'v'}` of shape (n_layers, P, K*H)
  (used as given: no RoPE). Prompt tuning puts `params['prompt'] = {'embedding':
  (P, D)}`: soft tokens run through the layers first at positions 0..P-1 (they see
  only each other), and their cached keys / values become the prefix; `apply` then
  shifts the row's positions by P.
  """
  if 'prefix' in params:
    heads = lambda a: a.reshape(*a.shape[:2], cfg.n_kv_heads, cfg.head_dim)
    return heads(params['prefix']['k']), heads(params['prefix']['v'])
  if 'prompt' not in params:
    return None
  soft_PxD = params['prompt']['embedding']
  table = params['embed']['embedding']
  rest = {k: v for k, v in params.items() if k != 'prompt'}
  rest['embed'] = {**params['embed'],
                   'embedding': jnp.concatenate([table, soft_PxD.astype(table.dtype)])}
  ids_1xP = (table.shape[0] + jnp.arange(soft_PxD.shape[0], dtype=jnp.int32))[None]
  _, c = apply(rest, ids_1xP, cfg, cache=init_cache(cfg, 1, soft_PxD.shape[0], table.dtype),
               linear=linear)
  return c['k'][:, 0], c['v'][:, 0]


def _prepend(prefix, k, v, positions_BxS, mask_BxLxS):
  """The prefix's slots in front of the cache slabs, visible to every query."""
  (pk, pv), (n_layers, b) = prefix, k.shape[:2]
  put = lambda pre, slab: jnp.concatenate(
      [jnp.broadcast_to(pre[:, None].astype(slab.dtype), (n_layers, b, *pre.shape[1:])), slab], 2)
  p = pk.shape[1]
  positions_BxS = jnp.concatenate([jnp.full((b, p), _PREFIX_POSITION, jnp.int32), positions_BxS], 1)
  mask_BxLxS = jnp.concatenate([jnp.ones((b, mask_BxLxS.shape[1], p), bool), mask_BxLxS], 2)
  return put(pk, k), put(pv, v), positions_BxS, mask_BxLxS


def apply(params: Params, tokens_BxL: jax.Array, cfg: DecoderConfig, *,
          positions: Optional[jax.Array] = None, segment_ids: Optional[jax.Array] = None,
          cache: Optional[Params] = None, cache_index: Optional[jax.Array] = None,
          linear: layers.Linear = dense, rng: Optional[jax.Array] = None,
          return_aux: bool = False) -> Any:
  """Next-token logits; with a KV cache, also the updated cache.

  Args:
    params: a tree like `init`'s (possibly cast, e.g. to bfloat16, and possibly
      with extra adapter leaves inside linear dicts).
    tokens_BxL: int token ids.
    cfg: DecoderConfig.
    positions: int (B, L) positions for RoPE / learned embeddings; default
      arange(L) (with a cache: cache_index + arange(L)). Restart them per
      document in a packed row.
    segment_ids: int (B, L); tokens attend only within their segment (padding
      may use segment 0). None = one segment per row (with a cache: segment 1).
    cache: optional KV cache from `init_cache` (or a previous call). The tokens
      are written at slots [cache_index, cache_index + L) (prefill: many tokens;
      decode: one) and attend to every visible earlier slot. Keep
      cache_index + L <= S: a write past the end is clamped onto the last slots.
    cache_index: int32 scalar slot of the first token; None = cache['index'].
    linear: hook `linear(p, x, name, rng) -> y` for every linear in a layer
      ('attn/q', ..., 'mlp/down') and an untied 'lm_head'.
    rng: optional key; the hook gets a distinct fold-in per layer and linear.
    return_aux: also return the auxiliary scalars an FFN-replacing hook reports
      (`linear.mlp`, e.g. MixLoRA's load-balance loss), summed over layers.

  Returns:
    (B, L, V) float32 logits; with a cache, (logits, updated cache); with
    return_aux, (that, {name: scalar}).
  """
  b, l = tokens_BxL.shape
  index = 0 if cache is None else jnp.asarray(
      cache['index'] if cache_index is None else cache_index, jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to((index + jnp.arange(l, dtype=jnp.int32))[None], (b, l))
  prefix = prefix_kv(params, cfg, linear)  # prefix / prompt tuning (None otherwise)
  if 'prompt' in params:
    positions = positions + prefix[0].shape[1]
  x_BxLxD = params['embed']['embedding'][tokens_BxL]
  if cfg.embed_scale:
    x_BxLxD = x_BxLxD * jnp.asarray(math.sqrt(cfg.d_model), x_BxLxD.dtype)
  if 'input_delta' in params.get('prompt', {}):  # EPT: row i of (A B) joins input token i's embedding
    delta_SxD, i_BxL = params['prompt']['input_delta'], positions - prefix[0].shape[1]
    ok_BxLx1 = ((i_BxL >= 0) & (i_BxL < delta_SxD.shape[0]))[..., None]
    rows_BxLxD = delta_SxD[jnp.clip(i_BxL, 0, delta_SxD.shape[0] - 1)]
    x_BxLxD = x_BxLxD + jnp.where(ok_BxLx1, rows_BxLxD, 0).astype(x_BxLxD.dtype)
  if cfg.pos == 'learned':
    x_BxLxD = x_BxLxD + params['pos_embed']['embedding'][positions].astype(x_BxLxD.dtype)

  windows, bases = layer_schedule(cfg)
  layer_rngs, head_rng = None, None
  if rng is not None:
    keys = jax.random.split(rng, cfg.n_layers + 1)
    layer_rngs, head_rng = keys[:cfg.n_layers], keys[cfg.n_layers]
  xs = (params['layers'], windows, bases, layer_rngs)
  if cache is None and prefix is None:
    mask_BxLxS = layers.attention_mask(segment_ids, b, l)
    body = _block(cfg, linear, positions, mask_BxLxS)
    x_BxLxD, (_, aux) = jax.lax.scan(body, x_BxLxD, xs, unroll=cfg.scan_unroll)
  else:  # a prefix without a cache runs through a throwaway cache of this call's length
    if segment_ids is None:
      segment_ids = jnp.ones((b, l), jnp.int32)
    run = cache if cache is not None else init_cache(cfg, b, l, x_BxLxD.dtype)
    new_cache, mask_BxLxS = _cache_mask(run, index, positions, segment_ids)
    k, v, slots_BxS, n = run['k'], run['v'], new_cache['positions'], 0
    if prefix is not None:
      k, v, slots_BxS, mask_BxLxS = _prepend(prefix, k, v, slots_BxS, mask_BxLxS)
      n = prefix[0].shape[1]
    body = _block(cfg, linear, positions, mask_BxLxS, (index + n, slots_BxS))
    x_BxLxD, ((k, v), aux) = jax.lax.scan(body, x_BxLxD, xs + (k, v))
    new_cache['k'], new_cache['v'] = k[:, :, n:], v[:, :, n:]

  x_BxLxD = layers.norm(params['final_norm'], x_BxLxD, cfg)
  if cfg.tie_embeddings:
    logits_BxLxV = jnp.einsum('BLD,VD->BLV', x_BxLxD, params['embed']['embedding'],
                              preferred_element_type=jnp.float32)
  else:
    logits_BxLxV = linear(params['lm_head'], x_BxLxD.astype(jnp.float32), 'lm_head', head_rng)
  # A side network (LEVI) over the taps `linear.mlp` reported rides on it as `linear.mlp.side`.
  side = getattr(getattr(linear, 'mlp', None), 'side', None)
  if side is not None:
    logits_BxLxV, aux = side(params, tokens_BxL, logits_BxLxV, aux)
  logits_BxLxV = layers.softcap(logits_BxLxV.astype(jnp.float32), cfg.final_softcap)
  out = logits_BxLxV if cache is None else (logits_BxLxV, new_cache)
  return (out, {k: jnp.sum(v) for k, v in aux.items()}) if return_aux else out
