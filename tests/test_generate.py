"""KV cache and generation: cached == uncached logits, greedy == argmax of the full
forward under left padding, row independence, logprobs / stop / budgets, sampling
filters and frequencies, context errors, no recompilation, LoRA hook == merged."""
import dataclasses
import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import adapters
from jaxft.models import decoder, generate
from jaxft.models.decoder import DecoderConfig

TINY = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=4, head_dim=4, d_ff=24)
CONFIGS = {
    'llama': DecoderConfig(**TINY, n_kv_heads=2, norm='rms', mlp='swiglu', pos='rope'),
    'gemma3': DecoderConfig(**TINY, n_kv_heads=1, norm_offset=1.0, post_norms=True,
                            qk_norm=True, mlp='geglu', embed_scale=True, sliding_window=3,
                            global_every=2, rope_base=100.0, rope_base_local=10.0,
                            attn_softcap=2.0, final_softcap=3.0, query_scale=0.3),
    'gpt2': DecoderConfig(**TINY, n_kv_heads=4, norm='layer', pos='learned', max_len=32,
                          mlp='gelu', attn_bias=True, out_bias=True, mlp_bias=True,
                          tie_embeddings=False),
}
# Untied heads: a tied random model mostly repeats its last token, which hides padding bugs.
GEN = {k: dataclasses.replace(c, tie_embeddings=False) for k, c in CONFIGS.items()}
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [3], [7, 7, 1, 0, 5]]  # different lengths


@functools.partial(jax.jit, static_argnames=('cfg',))
def forward(params, tokens, cfg, positions=None, segment_ids=None, cache=None):
  return decoder.apply(params, tokens, cfg, positions=positions, segment_ids=segment_ids,
                       cache=cache)


def random_params(cfg, seed=0):
  """init's tree with every leaf random, so norm scales / biases matter."""
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = path[-1].key
    if name == 'scale':
      v = 1.0 - cfg.norm_offset + 0.3 * rng.standard_normal(x.shape)
    elif name == 'bias':
      v = 0.2 * rng.standard_normal(x.shape)
    elif name == 'embedding':
      v = rng.standard_normal(x.shape)
    else:
      v = rng.standard_normal(x.shape) / math.sqrt(x.shape[-2])
    return jnp.asarray(v, x.dtype)

  shapes = jax.eval_shape(functools.partial(decoder.init, cfg=cfg), jax.random.key(seed))
  return jax.tree_util.tree_map_with_path(fill, shapes)


def full_logits(params, cfg, seqs, width=16):
  """(B, width, V) no-cache logits of right-padded rows (causal: prefixes are exact)."""
  tokens = np.zeros((len(seqs), width), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)] = s
  return np.asarray(forward(params, jnp.asarray(tokens), cfg))


def greedy_reference(params, cfg, prompts, steps):
  seqs = [list(p) for p in prompts]
  for _ in range(steps):
    logits = full_logits(params, cfg, seqs)
    for i, s in enumerate(seqs):
      s.append(int(np.argmax(logits[i, len(s) - 1])))
  return np.asarray([s[len(p):] for s, p in zip(seqs, prompts)])


# ---------------------------------------------------------------------------
# The cache in `apply`.


@pytest.mark.parametrize('name', list(CONFIGS))
def test_cache_matches_full_forward(name):
  """Prefill 5, a 3-token chunk, then single tokens == one no-cache forward; row 1 is
  left-padded by 3 (segment 0, positions from its first real token)."""
  cfg, n, pad = CONFIGS[name], 12, 3
  params = random_params(cfg)
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, n)).astype(np.int32)
  seg = np.ones((2, n), np.int32)
  seg[1, :pad] = 0
  pos = np.stack([np.arange(n), np.maximum(np.arange(n) - pad, 0)]).astype(np.int32)
  cache = decoder.init_cache(cfg, 2, n + 2, jnp.float32)
  chunks, start = [], 0
  for size in (4, 4, 1, 1, 1, 1):
    sl = slice(start, start + size)
    logits, cache = forward(params, tokens[:, sl], cfg, pos[:, sl], seg[:, sl], cache)
    chunks.append(np.asarray(logits))
    start += size
  cached = np.concatenate(chunks, axis=1)
  assert int(cache['index']) == n
  np.testing.assert_array_equal(cache['positions'][:, :n], pos)
  np.testing.assert_array_equal(cache['positions'][:, n:], -1)
  assert np.std(cached) > 0.1
  # Reference: row 0 as is, row 1 without its pads (right-filled: causal, so harmless).
  unpadded = np.concatenate([tokens[:, :], np.roll(tokens, -pad, axis=1)])[[0, 3]]
  full = np.asarray(forward(params, unpadded, cfg))
  np.testing.assert_allclose(cached[0], full[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cached[1, pad:], full[1, :n - pad], rtol=1e-5, atol=1e-5)


def test_apply_returns_a_cache_only_when_given_one():
  cfg = CONFIGS['llama']
  params, tokens = random_params(cfg), jnp.zeros((2, 4), jnp.int32)
  out = jax.eval_shape(functools.partial(decoder.apply, cfg=cfg), params, tokens)
  assert isinstance(out, jax.ShapeDtypeStruct) and out.shape == (2, 4, cfg.vocab_size)
  cache = decoder.init_cache(cfg, 2, 8, jnp.bfloat16)
  logits, new = jax.eval_shape(functools.partial(decoder.apply, cfg=cfg, cache=cache), params,
                               tokens)
  assert logits.dtype == jnp.float32
  assert jax.tree.map(lambda x: (x.shape, x.dtype), new) == \
      jax.tree.map(lambda x: (x.shape, x.dtype), cache)
  assert cache['k'].shape == (cfg.n_layers, 2, 8, cfg.n_kv_heads, cfg.head_dim)


# ---------------------------------------------------------------------------
# Greedy generation.


@pytest.mark.parametrize('name', list(GEN))
def test_greedy_equals_uncached_argmax(name):
  cfg = GEN[name]
  params = random_params(cfg)
  out = generate.generate(params, cfg, PROMPTS, max_new_tokens=6)
  expected = greedy_reference(params, cfg, PROMPTS, 6)
  assert len(np.unique(expected)) > 3  # not a degenerate repeat-one-token model
  np.testing.assert_array_equal(out['tokens'], expected)
  assert out['tokens'].dtype == jnp.int32 and out['tokens'].shape == (4, 6)
  np.testing.assert_array_equal(out['mask'], True)
  np.testing.assert_array_equal(out['lengths'], 6)
  np.testing.assert_array_equal(out['sampling_logprobs'], 0.0)


def test_batched_equals_single_rows():
  cfg = GEN['gemma3']
  params = random_params(cfg, seed=3)
  batched = generate.generate(params, cfg, PROMPTS, max_new_tokens=6)
  for i, prompt in enumerate(PROMPTS):
    single = generate.generate(params, cfg, [prompt], max_new_tokens=6)
    np.testing.assert_array_equal(batched['tokens'][i], single['tokens'][0])
    np.testing.assert_allclose(batched['logprobs'][i], single['logprobs'][0], atol=1e-5)


def test_stop_ids_max_lengths_and_logprobs():
  cfg, pad_id = GEN['llama'], 31
  params = random_params(cfg)
  free = greedy_reference(params, cfg, PROMPTS, 6)
  stop = int(free[0, 2])
  max_lengths = [6, 3, 6, 6]
  out = generate.generate(params, cfg, PROMPTS, max_new_tokens=6, stop_ids=(stop, 30),
                          max_lengths=max_lengths, pad_id=pad_id)
  expected_len = []
  for row, cap in zip(free, max_lengths):
    hits = np.flatnonzero(np.isin(row, (stop, 30)))
    expected_len.append(min(cap, hits[0] + 1 if hits.size else 6))
  assert expected_len[0] <= 3 and expected_len[1] == 3  # both rules are exercised
  np.testing.assert_array_equal(out['lengths'], expected_len)
  mask = np.arange(6)[None] < np.asarray(expected_len)[:, None]
  np.testing.assert_array_equal(out['mask'], mask)
  tokens = np.asarray(out['tokens'])
  np.testing.assert_array_equal(tokens[mask], free[mask])
  np.testing.assert_array_equal(tokens[~mask], pad_id)
  # logprobs: log_softmax of the full forward at each generated position, 0 after.
  seqs = [list(p) + list(r) for p, r in zip(PROMPTS, free)]
  logp = jax.nn.log_softmax(full_logits(params, cfg, seqs), axis=-1)
  for i, p in enumerate(PROMPTS):
    for j in range(6):
      want = logp[i, len(p) - 1 + j, free[i, j]] if mask[i, j] else 0.0
      np.testing.assert_allclose(out['logprobs'][i, j], want, atol=1e-5)


def test_sampled_logprobs_are_unfiltered_temperature_one():
  """Sampling with top-k and top-p: every token lies in the nucleus computed here from
  the full forward; logprobs are the temperature-1 unfiltered model's."""
  cfg, temperature, top_k, top_p = GEN['gpt2'], 0.8, 5, 0.8
  params = random_params(cfg)
  out = generate.generate(params, cfg, PROMPTS, max_new_tokens=6, temperature=temperature,
                          top_k=top_k, top_p=top_p, rng=jax.random.key(4))
  tokens = np.asarray(out['tokens'])
  seqs = [list(p) + list(r) for p, r in zip(PROMPTS, tokens)]
  logits = full_logits(params, cfg, seqs)
  steps, sizes = np.arange(6), []
  sampling_logp = jax.jit(lambda at: jax.nn.log_softmax(
      generate.filter_logits(at / temperature, top_k=top_k, top_p=top_p)))
  for i, p in enumerate(PROMPTS):
    at = logits[i, len(p) - 1:len(p) + 5]
    for j in steps:  # the nucleus: top-k renormalised, fewest tokens reaching top_p
      order = np.argsort(-at[j])[:top_k]
      probs = np.exp(at[j, order] / temperature)
      cum = np.cumsum(probs / probs.sum())
      nucleus = order[:np.searchsorted(cum, top_p) + 1]
      sizes.append(len(nucleus))
      assert tokens[i, j] in nucleus
    logp = at - np.log(np.sum(np.exp(at), axis=-1, keepdims=True))
    np.testing.assert_allclose(out['logprobs'][i], logp[steps, tokens[i]], atol=1e-5)
    np.testing.assert_allclose(out['sampling_logprobs'][i], sampling_logp(at)[steps, tokens[i]],
                               atol=1e-5)
  assert 1 < max(sizes) and min(sizes) < top_k  # both filters bind somewhere
  assert np.all(np.asarray(out['sampling_logprobs']) > np.asarray(out['logprobs']))


def test_top_k_one_equals_greedy_at_any_temperature():
  cfg = GEN['gpt2']
  params = random_params(cfg)
  greedy = generate.generate(params, cfg, PROMPTS, max_new_tokens=6)
  sampled = generate.generate(params, cfg, PROMPTS, max_new_tokens=6, temperature=3.0, top_k=1,
                              rng=jax.random.key(0))
  np.testing.assert_array_equal(sampled['tokens'], greedy['tokens'])
  np.testing.assert_allclose(sampled['logprobs'], greedy['logprobs'], atol=1e-6)


# ---------------------------------------------------------------------------
# Sampling filters and frequencies (unit tests on fixed distributions).

PROBS = np.asarray([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])


@functools.partial(jax.jit, static_argnames=('n', 'filtered'))
def draw(logits, n, temperature=1.0, top_p=1.0, filtered=True):
  logits_NxV = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  return generate.sample(jax.random.key(0), logits_NxV, temperature=temperature, top_p=top_p,
                         filtered=filtered)


def test_filter_logits_keeps_top_k_and_the_nucleus():
  logits = jnp.log(jnp.asarray(PROBS))[None]
  fn = jax.jit(lambda k, p: generate.filter_logits(logits, top_k=k, top_p=p))
  kept = lambda top_k=0, top_p=1.0: set(np.flatnonzero(np.isfinite(fn(top_k, top_p)[0])))
  assert kept(top_p=0.7) == {0, 1, 2}   # 0.65 < 0.7 <= 0.8
  assert kept(top_p=0.65) == {0, 1}
  assert kept(top_p=0.01) == {0}
  assert kept(top_k=4) == {0, 1, 2, 3}
  assert kept(top_k=4, top_p=0.7) == {0, 1}  # renormalised over the top 4: 0.44 + 0.28 >= 0.7
  assert kept(top_k=2, top_p=0.9) == {0, 1}
  assert kept(top_k=0, top_p=1.0) == set(range(7))


def test_top_p_samples_stay_in_nucleus_with_renormalised_frequencies():
  n = 20000
  tokens, _ = draw(np.log(PROBS), n, temperature=1.0, top_p=0.7)
  counts = np.bincount(np.asarray(tokens), minlength=7)
  assert counts[3:].sum() == 0
  p = PROBS[:3] / PROBS[:3].sum()
  assert np.all(np.abs(counts[:3] - n * p) < 4 * np.sqrt(n * p * (1 - p)))


def test_temperature_frequencies_match_softmax():
  n, temperature = 40000, 0.7
  logits = np.asarray([2.0, 1.0, 0.5, 0.0, -1.0])
  tokens, slp = draw(logits, n, temperature=temperature, filtered=False)
  p = np.asarray(jax.nn.softmax(logits / temperature))
  counts = np.bincount(np.asarray(tokens), minlength=5)
  assert np.all(np.abs(counts - n * p) < 4 * np.sqrt(n * p * (1 - p)))
  np.testing.assert_allclose(slp, np.log(p)[np.asarray(tokens)], rtol=1e-5)


# ---------------------------------------------------------------------------
# Errors, context limit, compilation, adapters.


def test_prompt_longer_than_context_raises():
  cfg = GEN['gpt2']  # learned positions: max_len 32
  params = random_params(cfg)
  with pytest.raises(ValueError, match=r'prompt 1 has 40 tokens.*context of 32'):
    generate.generate(params, cfg, [[1], [2] * 40], max_new_tokens=2)
  with pytest.raises(ValueError, match=r'prompt 0 has 9 tokens.*context of 8'):
    generate.generate(random_params(GEN['llama']), GEN['llama'], [[1] * 9], max_new_tokens=2,
                      max_len=8)
  # Rows that fit stop at the context (here max_len=10 < cfg.max_len) instead of running past it.
  out = generate.generate(params, cfg, PROMPTS, max_new_tokens=6, max_len=10)
  np.testing.assert_array_equal(out['lengths'], [6, 3, 6, 5])
  np.testing.assert_array_equal(out['tokens'][1, 3:], 0)


def test_no_recompilation_for_same_shapes():
  cfg = GEN['llama']
  params = random_params(cfg)
  traces = []

  def counting_dense(p, x, name, rng):  # runs only while tracing; a new static arg
    traces.append(name)
    return decoder.dense(p, x, name, rng)

  kw = dict(max_new_tokens=4, linear=counting_dense)
  generate.generate(params, cfg, [[1, 2], [3, 4, 5]], temperature=0.5, top_p=0.9,
                    stop_ids=(3,), rng=jax.random.key(0), **kw)
  first = len(traces)
  assert first > 0
  generate.generate(params, cfg, [[7, 8, 9, 1], [2]], temperature=1.3, top_k=4, top_p=0.5,
                    stop_ids=(5,), max_lengths=[2, 3], rng=jax.random.key(1), **kw)
  assert len(traces) == first


def test_lora_hook_generation_equals_merged():
  cfg = GEN['llama']
  params = random_params(cfg)
  spec = {**adapters.DEFAULTS['lora'], 'name': 'lora', 'rank': 4, 'dropout': 0.1}

  @jax.jit
  def build(params):  # one compile instead of many eager ops
    frozen, trainable = adapters.lora.init(jax.random.key(2), params, spec)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    moved = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape)
                                         for x, k in zip(leaves, keys)])
    return (adapters.lora.combine(frozen, moved, spec),
            adapters.lora.merge(frozen, moved, spec))

  combined, merged = build(params)
  unmerged = generate.generate(combined, cfg, PROMPTS, max_new_tokens=6,
                               linear=adapters.lora.linear_hook(spec))
  reference = generate.generate(merged, cfg, PROMPTS, max_new_tokens=6)
  base = generate.generate(params, cfg, PROMPTS, max_new_tokens=6)
  np.testing.assert_array_equal(unmerged['tokens'], reference['tokens'])
  np.testing.assert_allclose(unmerged['logprobs'], reference['logprobs'], atol=1e-4)
  assert np.abs(np.asarray(reference['logprobs']) - np.asarray(base['logprobs'])).max() > 1e-2


class LetterTokenizer:
  """a..z <-> 1..26, the `tokenizers.Tokenizer` encode / decode surface."""

  def encode(self, text, add_special_tokens=True):
    return types.SimpleNamespace(ids=[ord(c) - 96 for c in text])

  def decode(self, ids, skip_special_tokens=False):
    return ''.join(chr(96 + i) if 1 <= i <= 26 else '?' for i in ids)


def test_generate_text_decodes_until_the_stop_token():
  cfg, tok = GEN['llama'], LetterTokenizer()
  params = random_params(cfg)
  prompts = ['abc', 'defghij', 'c', 'ggkae']
  ids = [tok.encode(p).ids for p in prompts]
  out = generate.generate(params, cfg, ids, max_new_tokens=6)
  stop = int(out['tokens'][0, 1])  # row 0 stops at its second token at the latest
  texts = generate.generate_text(params, cfg, tok, prompts, max_new_tokens=6, stop_ids=(stop,))
  for text, row in zip(texts, np.asarray(out['tokens']).tolist()):
    assert text == tok.decode(row[:row.index(stop)] if stop in row else row)
  assert len(texts[0]) <= 1
