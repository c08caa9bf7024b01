"""Batched generation with a KV cache: left-padded prefill, then a jitted decode loop.

  out = generate(params, cfg, [[1, 5, 9], [1, 7]], max_new_tokens=32, temperature=0.8,
                 top_p=0.9, stop_ids=(2,), rng=jax.random.key(0))
  out['tokens'], out['mask'], out['logprobs'], out['lengths']

Prompts of different lengths are left-padded into one (B, P) batch: pads get
segment 0 (real tokens segment 1, so no real token attends to a pad) and
positions restart at 0 on each row's first real token, so padding shifts neither
RoPE nor learned positions. One cached `apply` prefills all P tokens, then a
`lax.while_loop` samples one token per row, feeds it back through the cache and
stops when every row has hit a stop id or its budget.

The whole thing is one `jax.jit` keyed by (cfg, linear, max_new_tokens, greedy,
filtered) and the shapes; temperature, top-k, top-p, stop ids and budgets are
traced, so repeated calls with the same shapes never recompile. P is rounded up
to a multiple of `PROMPT_BUCKET` and stop ids padded to a multiple of 4 (with
-1) so varying prompt lengths and stop sets share compilations.
Pass the same `linear` hook object across calls (a new closure recompiles).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models import decoder

PROMPT_BUCKET = 8


def filter_logits(logits_BxV: jax.Array, *, top_k: Any = 0, top_p: Any = 1.0) -> jax.Array:
  """Sets to -inf every logit outside the top-k, then outside the top-p nucleus.

  Args:
    logits_BxV: float logits (already divided by the temperature).
    top_k: keep the k largest logits (may be traced); 0 = off.
    top_p: keep the nucleus, the fewest most-likely tokens whose probability
      (renormalised after top-k) reaches top_p (may be traced); 1.0 = off.

  Returns:
    Logits of the same shape. The argmax is always kept; tokens tied with the
    smallest kept logit are kept too.
  """
  v = logits_BxV.shape[-1]
  rank_1xV = jnp.arange(v)[None]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  sorted_BxV = jnp.where(rank_1xV < k, jnp.sort(logits_BxV, axis=-1, descending=True), -jnp.inf)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the more likely tokens
  keep_BxV = (rank_1xV < k) & ((before_BxV < top_p) | (rank_1xV == 0) | (top_p >= 1.0))
  n_keep_Bx1 = jnp.sum(keep_BxV, axis=-1, keepdims=True)
  threshold_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_Bx1 - 1, axis=-1)
  return jnp.where(logits_BxV >= threshold_Bx1, logits_BxV, -jnp.inf)


def sample(rng: Optional[jax.Array], logits_BxV: jax.Array, *, temperature: Any = 1.0,
           top_k: Any = 0, top_p: Any = 1.0, greedy: bool = False,
           filtered: bool = True) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row.

  Args:
    rng: key (unused when greedy).
    logits_BxV: float32 model logits.
    temperature: > 0 (may be traced); logits are divided by it before filtering.
    top_k, top_p: see `filter_logits` (may be traced).
    greedy: argmax instead of sampling (static).
    filtered: apply `filter_logits` (static; False skips the sort).

  Returns:
    (tokens_B int32, log-prob of each token under the distribution actually
    sampled from: tempered and filtered; 0 when greedy, a point mass).
  """
  if greedy:
    tokens_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return tokens_B, jnp.zeros(tokens_B.shape, jnp.float32)
  scaled_BxV = logits_BxV.astype(jnp.float32) / temperature
  if filtered:
    scaled_BxV = filter_logits(scaled_BxV, top_k=top_k, top_p=top_p)
  tokens_B = jax.random.categorical(rng, scaled_BxV, axis=-1).astype(jnp.int32)
  return tokens_B, _pick(jax.nn.log_softmax(scaled_BxV, axis=-1), tokens_B)


def _pick(values_BxV: jax.Array, tokens_B: jax.Array) -> jax.Array:
  return jnp.take_along_axis(values_BxV, tokens_B[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=('cfg', 'linear', 'max_new_tokens', 'greedy',
                                             'filtered'))
def _generate(params, tokens_BxP, positions_BxP, segment_ids_BxP, budgets_B, stop_ids_N, rng,
              temperature, top_k, top_p, pad_id, *, cfg, linear, max_new_tokens, greedy,
              filtered):
  """Prefill + decode loop; see `generate` (all inputs are already validated)."""
  b, p = tokens_BxP.shape
  t_max = max_new_tokens
  cache = decoder.init_cache(cfg, b, p + t_max, params['embed']['embedding'].dtype)
  logits_BxPxV, cache = decoder.apply(params, tokens_BxP, cfg, positions=positions_BxP,
                                      segment_ids=segment_ids_BxP, cache=cache, linear=linear)
  next_pos_B = positions_BxP[:, -1] + 1
  ones_Bx1 = jnp.ones((b, 1), jnp.int32)

  def cond(state):
    t, done_B = state[0], state[-1]
    return (t < t_max) & ~jnp.all(done_B)

  def body(state):
    t, cache, logits_BxV, out, done_B = state
    tok_B, slp_B = sample(jax.random.fold_in(rng, t), logits_BxV, temperature=temperature,
                          top_k=top_k, top_p=top_p, greedy=greedy, filtered=filtered)
    active_B = ~done_B
    tok_B = jnp.where(active_B, tok_B, pad_id)
    lp_B = _pick(jax.nn.log_softmax(logits_BxV, axis=-1), tok_B)
    zero = jnp.zeros((), jnp.float32)
    out = {'tokens': out['tokens'].at[:, t].set(tok_B),
           'logprobs': out['logprobs'].at[:, t].set(jnp.where(active_B, lp_B, zero)),
           'sampling_logprobs': out['sampling_logprobs'].at[:, t].set(
               jnp.where(active_B, slp_B, zero)),
           'mask': out['mask'].at[:, t].set(active_B)}
    stopped_B = jnp.any(tok_B[:, None] == stop_ids_N[None, :], axis=-1)
    done_B = done_B | (active_B & stopped_B) | (t + 1 >= budgets_B)
    # Finished rows still run (pad at position 0) but nothing reads their outputs.
    pos_Bx1 = jnp.where(done_B, 0, next_pos_B + t)[:, None]
    logits_Bx1xV, cache = decoder.apply(params, tok_B[:, None], cfg, positions=pos_Bx1,
                                        segment_ids=ones_Bx1, cache=cache, linear=linear)
    return t + 1, cache, logits_Bx1xV[:, 0], out, done_B

  out = {'tokens': jnp.full((b, t_max), pad_id, jnp.int32),
         'logprobs': jnp.zeros((b, t_max), jnp.float32),
         'sampling_logprobs': jnp.zeros((b, t_max), jnp.float32),
         'mask': jnp.zeros((b, t_max), bool)}
  state = (jnp.zeros((), jnp.int32), cache, logits_BxPxV[:, -1], out, budgets_B <= 0)
  out = jax.lax.while_loop(cond, body, state)[3]
  out['lengths'] = jnp.sum(out['mask'], axis=-1, dtype=jnp.int32)
  return out


def context_limit(cfg: decoder.DecoderConfig, max_len: Optional[int] = None) -> Optional[int]:
  """Most tokens (prompt + generated) a row may hold: `max_len`, capped by the
  learned-position table; None = unbounded (RoPE / no positions, no max_len)."""
  limits = [m for m in (max_len, cfg.max_len if cfg.pos == 'learned' else None) if m is not None]
  return min(limits) if limits else None


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = PROMPT_BUCKET):
  """-> (tokens_BxP, positions_BxP, segment_ids_BxP) int32 numpy, P = longest prompt
  rounded up to `bucket`; pads have position 0 and segment 0."""
  p = -(-max(len(x) for x in prompts) // bucket) * bucket
  tokens = np.full((len(prompts), p), pad_id, np.int32)
  positions = np.zeros((len(prompts), p), np.int32)
  segments = np.zeros((len(prompts), p), np.int32)
  for i, x in enumerate(prompts):
    n = len(x)
    tokens[i, p - n:] = x
    positions[i, p - n:] = np.arange(n)
    segments[i, p - n:] = 1
  return tokens, positions, segments


def generate(params, cfg: decoder.DecoderConfig, prompts: list[list[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] = (), max_lengths: Optional[Sequence[int]] = None,
             rng: Optional[jax.Array] = None, linear=decoder.dense, pad_id: int = 0,
             max_len: Optional[int] = None) -> dict:
  """Continues every prompt, batched, with a KV cache.

  Args:
    params: decoder params (adapter leaves allowed when `linear` reads them).
    cfg: DecoderConfig.
    prompts: token ids per row (non-empty, any lengths).
    max_new_tokens: tokens generated per row at most (the output width T).
    temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / T).
    top_k: with temperature > 0, sample only among the k most likely (0 = off).
    top_p: with temperature > 0, sample only from the nucleus (1.0 = off).
    stop_ids: a row stops after emitting any of these (the stop token is kept).
    max_lengths: optional per-row cap on new tokens (each <= max_new_tokens).
    rng: key for sampling; required when temperature > 0. The model's linear
      hook always gets rng=None (eval mode: no adapter dropout).
    linear: the model's linear hook (e.g. an unmerged adapter's).
    pad_id: token written after a row stops, and used for left padding.
    max_len: the model context (prompt + generated tokens); default cfg.max_len
      for learned positions, unbounded otherwise. A longer prompt raises
      ValueError; rows that reach the context stop there.

  Returns:
    A dict of jax arrays:
      tokens (B, T) int32: generated ids, pad_id after a row stops.
      mask (B, T) bool: True for generated tokens (stop token included).
      logprobs (B, T) float32: log-prob of each token under the model's own
        distribution, log_softmax(logits) at temperature 1 and unfiltered
        (what RL objectives need); 0 where mask is False.
      sampling_logprobs (B, T) float32: log-prob under the distribution sampled
        from (tempered, top-k/top-p filtered); 0 when greedy or masked.
      lengths (B,) int32: number of generated tokens (= mask.sum(-1)).
  """
  if not prompts:
    raise ValueError("generate got no prompts")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
    raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                     f"temperature={temperature}, top_p={top_p}, top_k={top_k}")
  greedy = temperature == 0.0
  if not greedy and rng is None:
    raise ValueError("sampling (temperature > 0) needs an rng key")
  limit = context_limit(cfg, max_len)
  lengths = [len(x) for x in prompts]
  for i, n in enumerate(lengths):
    if n == 0:
      raise ValueError(f"prompt {i} is empty")
    if limit is not None and n > limit:
      raise ValueError(f"prompt {i} has {n} tokens, longer than the model context of "
                       f"{limit} tokens")
  budgets = np.full(len(prompts), max_new_tokens, np.int64)
  if max_lengths is not None:
    if len(max_lengths) != len(prompts):
      raise ValueError(f"max_lengths has {len(max_lengths)} entries for {len(prompts)} prompts")
    budgets = np.minimum(budgets, np.asarray(max_lengths, np.int64))
  if limit is not None:
    budgets = np.minimum(budgets, limit - np.asarray(lengths))
  tokens, positions, segments = left_pad(prompts, pad_id)
  return _generate(
      params, tokens, positions, segments, budgets.astype(np.int32),
      _stop_array(stop_ids),
      jax.random.key(0) if rng is None else rng,
      np.float32(temperature if not greedy else 1.0), np.int32(top_k), np.float32(top_p),
      np.int32(pad_id), cfg=cfg, linear=linear, max_new_tokens=int(max_new_tokens),
      greedy=greedy, filtered=not greedy and (top_k > 0 or top_p < 1.0))


def _stop_array(stop_ids: Sequence[int]) -> np.ndarray:
  """Stop ids padded with -1 (never sampled) to a multiple of 4: fewer shapes to compile."""
  ids = [int(i) for i in stop_ids]
  width = max(4, -(-len(ids) // 4) * 4)
  return np.asarray(ids + [-1] * (width - len(ids)), np.int32)


def _ids(encoding) -> list[int]:
  """Token ids from a `tokenizers.Encoding` or a plain list."""
  return list(encoding.ids if hasattr(encoding, 'ids') else encoding)


def generate_text(params, cfg: decoder.DecoderConfig, tokenizer, prompts: list[str], *,
                  max_new_tokens: int, stop_ids: Sequence[int] = (),
                  add_special_tokens: bool = False, **kwargs) -> list[str]:
  """Completions of text prompts (the stop token and everything after dropped).

  Args:
    tokenizer: a `tokenizers.Tokenizer` (or anything with encode(text,
      add_special_tokens=...) -> Encoding | ids and decode(ids, skip_special_tokens=...)).
    prompts: strings.
    max_new_tokens, stop_ids, **kwargs: as `generate`.
    add_special_tokens: passed to the tokenizer's encode (e.g. to add BOS).
  """
  ids = [_ids(tokenizer.encode(p, add_special_tokens=add_special_tokens)) for p in prompts]
  out = generate(params, cfg, ids, max_new_tokens=max_new_tokens, stop_ids=stop_ids, **kwargs)
  tokens, mask = np.asarray(out['tokens']), np.asarray(out['mask'])
  stops = set(int(s) for s in stop_ids)
  return [tokenizer.decode([int(t) for t, m in zip(row, keep) if m and int(t) not in stops],
                           skip_special_tokens=True)
          for row, keep in zip(tokens, mask)]
