"""Decoder LM: NumPy float64 reference forward, packing, causality, GQA, RoPE
layouts, sliding window, remat, logical axes, the linear hook, bf16, config errors."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxft import models
from jaxft.models import decoder
from jaxft.models.decoder import DecoderConfig

TINY = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=4, head_dim=4, d_ff=24)
CONFIGS = {
    'llama': DecoderConfig(**TINY, n_kv_heads=2, norm='rms', mlp='swiglu', pos='rope'),
    'gpt2': DecoderConfig(**TINY, n_kv_heads=4, norm='layer', pos='learned', max_len=16,
                          mlp='gelu', attn_bias=True, out_bias=True, mlp_bias=True,
                          tie_embeddings=False),
    'gemma3': DecoderConfig(**TINY, n_kv_heads=1, norm_offset=1.0, post_norms=True,
                            qk_norm=True, mlp='geglu', embed_scale=True, sliding_window=3,
                            global_every=2, rope_base=100.0, rope_base_local=10.0,
                            attn_softcap=2.0, final_softcap=3.0, query_scale=0.3),
    # Coverage of the remaining switches: interleaved RoPE, exact GELU, q/k bias + norm.
    'mixed': DecoderConfig(**TINY, n_kv_heads=2, rope_layout='interleaved', mlp='gelu',
                           gelu_approximate=False, attn_bias=True, qk_norm=True,
                           tie_embeddings=False, norm_offset=0.5, rope_base=50.0),
    'nopos': DecoderConfig(**TINY, n_kv_heads=4, pos='none', norm='layer', mlp='swiglu'),
}
LINEARS = {'attn/q', 'attn/k', 'attn/v', 'attn/o', 'mlp/gate', 'mlp/up', 'mlp/down'}


@functools.partial(jax.jit, static_argnames=('cfg', 'linear'))
def run(params, tokens, cfg, positions=None, segment_ids=None, linear=decoder.dense, rng=None):
  return decoder.apply(params, tokens, cfg, positions=positions, segment_ids=segment_ids,
                       linear=linear, rng=rng)


def random_params(cfg, seed=0):
  """init's tree with every leaf random, so norm scales / biases matter."""
  params = decoder.init(jax.random.key(seed), cfg)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = path[-1].key
    if name == 'scale':
      v = 1.0 - cfg.norm_offset + 0.3 * rng.standard_normal(x.shape)
    elif name == 'bias':
      v = 0.2 * rng.standard_normal(x.shape)
    elif name == 'embedding':
      v = 0.5 * rng.standard_normal(x.shape)
    else:
      v = rng.standard_normal(x.shape) / math.sqrt(x.shape[-2])
    return jnp.asarray(v, x.dtype)

  return jax.tree_util.tree_map_with_path(fill, params)


def random_tokens(cfg, b, l, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, l)), jnp.int32)


# ---------------------------------------------------------------------------
# Independent NumPy float64 reference: loops over layers / rows / heads.


def np_norm(p, x, cfg, rms=False):
  scale = cfg.norm_offset + p['scale']
  if cfg.norm == 'rms' or rms:
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + cfg.norm_eps) * scale + p['bias']


def np_rope(x_LxH, pos_L, base, layout):
  h = x_LxH.shape[-1]
  out = x_LxH.copy()
  for i in range(h // 2):
    theta = pos_L * base ** (-2.0 * i / h)
    a, b = (i, i + h // 2) if layout == 'half' else (2 * i, 2 * i + 1)
    out[:, a] = x_LxH[:, a] * np.cos(theta) - x_LxH[:, b] * np.sin(theta)
    out[:, b] = x_LxH[:, b] * np.cos(theta) + x_LxH[:, a] * np.sin(theta)
  return out


def np_gelu(x, approximate):
  if approximate:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def np_lin(p, x):
  return x @ p['kernel'] + (p['bias'] if 'bias' in p else 0.0)


def np_attention(p, x_LxD, pos_L, seg_L, window, base, cfg):
  l = x_LxD.shape[0]
  n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  q = np_lin(p['q'], x_LxD).reshape(l, n, h)
  kk = np.repeat(np_lin(p['k'], x_LxD).reshape(l, k, h), n // k, axis=1)  # head i uses kv i // G
  v = np.repeat(np_lin(p['v'], x_LxD).reshape(l, k, h), n // k, axis=1)
  mask = np.zeros((l, l), bool)
  for t in range(l):
    for s in range(t + 1):
      mask[t, s] = seg_L[t] == seg_L[s] and (window is None or t - s < window)
  scale = cfg.query_scale or 1 / math.sqrt(h)
  heads = []
  for i in range(n):
    qi, ki = q[:, i], kk[:, i]
    if cfg.qk_norm:
      qi, ki = np_norm(p['q_norm'], qi, cfg, rms=True), np_norm(p['k_norm'], ki, cfg, rms=True)
    if cfg.pos == 'rope':
      qi, ki = np_rope(qi, pos_L, base, cfg.rope_layout), np_rope(ki, pos_L, base, cfg.rope_layout)
    scores = qi @ ki.T * scale
    if cfg.attn_softcap:
      scores = cfg.attn_softcap * np.tanh(scores / cfg.attn_softcap)
    scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    heads.append((probs / probs.sum(-1, keepdims=True)) @ v[:, i])
  return np_lin(p['o'], np.concatenate(heads, axis=-1))


def np_mlp(p, x, cfg):
  up = np_lin(p['up'], x)
  if cfg.mlp == 'gelu':
    hidden = np_gelu(up, cfg.gelu_approximate)
  elif cfg.mlp == 'swiglu':
    g = np_lin(p['gate'], x)
    hidden = g / (1 + np.exp(-g)) * up
  else:
    hidden = np_gelu(np_lin(p['gate'], x), cfg.gelu_approximate) * up
  return np_lin(p['down'], hidden)


def np_forward(params, tokens, cfg, positions=None, segment_ids=None):
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  tokens = np.asarray(tokens)
  b, l = tokens.shape
  positions = np.tile(np.arange(l), (b, 1)) if positions is None else np.asarray(positions)
  segment_ids = np.zeros((b, l), int) if segment_ids is None else np.asarray(segment_ids)
  out = []
  for r in range(b):
    x = params['embed']['embedding'][tokens[r]]
    if cfg.embed_scale:
      x = x * math.sqrt(cfg.d_model)
    if cfg.pos == 'learned':
      x = x + params['pos_embed']['embedding'][positions[r]]
    for i in range(cfg.n_layers):
      p = jax.tree.map(lambda a: a[i], params['layers'])
      is_global = cfg.sliding_window == 0 or (cfg.global_every and (i + 1) % cfg.global_every == 0)
      window = None if is_global else cfg.sliding_window
      base = cfg.rope_base if is_global else (cfg.rope_base_local or cfg.rope_base)
      a = np_attention(p['attn'], np_norm(p['attn_norm'], x, cfg), positions[r], segment_ids[r],
                       window, base, cfg)
      x = x + (np_norm(p['attn_post_norm'], a, cfg) if cfg.post_norms else a)
      m = np_mlp(p['mlp'], np_norm(p['mlp_norm'], x, cfg), cfg)
      x = x + (np_norm(p['mlp_post_norm'], m, cfg) if cfg.post_norms else m)
    x = np_norm(params['final_norm'], x, cfg)
    head = params['embed']['embedding'].T if cfg.tie_embeddings else params['lm_head']['kernel']
    logits = x @ head
    if cfg.final_softcap:
      logits = cfg.final_softcap * np.tanh(logits / cfg.final_softcap)
    out.append(logits)
  return np.stack(out)


@pytest.mark.parametrize('name', list(CONFIGS))
def test_matches_numpy_reference(name):
  cfg = CONFIGS[name]
  params, tokens = random_params(cfg), random_tokens(cfg, 2, 8)
  logits = run(params, tokens, cfg)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 8, cfg.vocab_size)
  assert np.std(np.asarray(logits)) > 0.1  # not a degenerate comparison
  np.testing.assert_allclose(logits, np_forward(params, tokens, cfg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['gemma3', 'gpt2'])  # RoPE and learned positions
def test_reference_with_segments_and_positions(name):
  cfg = CONFIGS[name]
  params, tokens = random_params(cfg), random_tokens(cfg, 2, 8)
  seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0], [3, 3, 3, 3, 3, 3, 3, 3]], jnp.int32)
  pos = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0], [4, 5, 6, 7, 8, 9, 10, 11]], jnp.int32)
  logits = run(params, tokens, cfg, positions=pos, segment_ids=seg)
  np.testing.assert_allclose(logits, np_forward(params, tokens, cfg, pos, seg),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Properties.


@pytest.mark.parametrize('cfg', [
    CONFIGS['llama'],
    dataclasses.replace(CONFIGS['llama'], sliding_window=3),
    CONFIGS['gemma3'],
], ids=['llama', 'llama_window', 'gemma3'])
def test_packed_equals_unpacked(cfg):
  params = random_params(cfg)
  doc_a, doc_b = random_tokens(cfg, 1, 5, seed=1), random_tokens(cfg, 1, 6, seed=2)
  # Row 0: two documents and one padding token; row 1: all padding (segment 0).
  packed = jnp.concatenate([jnp.concatenate([doc_a, doc_b, doc_a[:, :1]], axis=1),
                            jnp.zeros((1, 12), jnp.int32)], axis=0)
  seg = jnp.asarray([[1] * 5 + [2] * 6 + [0], [0] * 12], jnp.int32)
  pos = jnp.asarray([list(range(5)) + list(range(6)) + [0], list(range(12))], jnp.int32)
  logits = run(params, packed, cfg, positions=pos, segment_ids=seg)
  assert np.all(np.isfinite(logits))
  np.testing.assert_allclose(logits[:1, :5], run(params, doc_a, cfg), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[:1, 5:11], run(params, doc_b, cfg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['llama', 'gemma3'])
def test_causal(name):
  cfg, t = CONFIGS[name], 5
  params, tokens = random_params(cfg), np.asarray(random_tokens(cfg, 2, 8))
  changed = tokens.copy()
  changed[:, t] = (tokens[:, t] + 1) % cfg.vocab_size
  a, b = np.asarray(run(params, tokens, cfg)), np.asarray(run(params, changed, cfg))
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert np.all(np.abs(a[:, t:] - b[:, t:]).max(-1) > 1e-4)


def test_gqa_equals_mha_with_repeated_kv():
  gqa = dataclasses.replace(CONFIGS['llama'], attn_bias=True)
  mha = dataclasses.replace(gqa, n_kv_heads=gqa.n_heads)
  group, h = gqa.n_heads // gqa.n_kv_heads, gqa.head_dim
  params, tokens = random_params(gqa), random_tokens(gqa, 2, 8)

  def repeat(x):  # (..., K*H) -> (..., K*G*H): head i uses kv head i // G
    x = x.reshape(x.shape[:-1] + (gqa.n_kv_heads, h))
    return jnp.repeat(x, group, axis=-2).reshape(x.shape[:-2] + (mha.n_kv_heads * h,))

  mha_params = jax.tree.map(lambda x: x, params)
  for name in ('k', 'v'):
    mha_params['layers']['attn'][name] = jax.tree.map(repeat, params['layers']['attn'][name])
  np.testing.assert_allclose(run(params, tokens, gqa), run(mha_params, tokens, mha),
                             rtol=1e-6, atol=1e-6)


def to_interleaved(x, h):
  """llama.cpp's permutation of each head's output columns: half -> (2i, 2i+1) pairs."""
  perm = np.stack([np.arange(h // 2), np.arange(h // 2) + h // 2], axis=-1).reshape(-1)
  heads = x.reshape(x.shape[:-1] + (x.shape[-1] // h, h))
  return heads[..., perm].reshape(x.shape)


def test_rope_layouts_agree_after_permutation():
  half = dataclasses.replace(CONFIGS['llama'], attn_bias=True, qk_norm=True)
  inter = dataclasses.replace(half, rope_layout='interleaved')
  params, tokens = random_params(half), random_tokens(half, 2, 8)
  permuted = jax.tree.map(lambda x: x, params)
  attn = permuted['layers']['attn']
  for name in ('q', 'k', 'q_norm', 'k_norm'):
    attn[name] = jax.tree.map(lambda x: to_interleaved(x, half.head_dim), attn[name])
  ref = run(params, tokens, half)
  np.testing.assert_allclose(run(permuted, tokens, inter), ref, rtol=1e-5, atol=1e-5)
  assert np.abs(run(params, tokens, inter) - ref).max() > 1e-3  # layouts do differ


def test_sliding_window_receptive_field():
  w, t = 3, 8
  cfg = dataclasses.replace(CONFIGS['llama'], n_layers=1, sliding_window=w)
  params, tokens = random_params(cfg), np.asarray(random_tokens(cfg, 1, 10))
  base = np.asarray(run(params, tokens, cfg))[:, t]
  for s in range(t - w + 2):  # each token up to and including the window's first
    changed = tokens.copy()
    changed[:, s] = (tokens[:, s] + 1) % cfg.vocab_size
    out = np.asarray(run(params, changed, cfg))[:, t]
    if s < t - w + 1:  # before the window: bit-identical logits at t
      np.testing.assert_array_equal(out, base)
    else:
      assert np.abs(out - base).max() > 1e-4


def test_remat_modes_agree():
  cfgs = [dataclasses.replace(CONFIGS['llama'], remat=r) for r in ('none', 'full', 'dots')]
  params, tokens = random_params(cfgs[0]), random_tokens(cfgs[0], 2, 8)
  weights = jax.random.normal(jax.random.key(3), (2, 8, cfgs[0].vocab_size))
  results = []
  for cfg in cfgs:
    loss = lambda p, cfg=cfg: jnp.sum(decoder.apply(p, tokens, cfg) * weights)
    results.append(jax.jit(jax.value_and_grad(loss))(params))
    jaxpr = str(jax.make_jaxpr(loss)(params))
    assert ('remat' in jaxpr) == (cfg.remat != 'none')
    assert ('policy=None' in jaxpr) == (cfg.remat == 'full')
  for other in results[1:]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 results[0], other)


# ---------------------------------------------------------------------------
# Structure: logical axes, param count, exact paths.


@pytest.mark.parametrize('name', list(CONFIGS))
def test_logical_axes_and_num_params(name):
  cfg = CONFIGS[name]
  params, axes = decoder.init(jax.random.key(0), cfg), decoder.logical_axes(cfg)
  is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, str) for a in x)
  assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(params)
  for x, ax in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=is_axes)):
    assert len(ax) == x.ndim, (ax, x.shape)
  assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(params))


def test_param_paths_shapes_axes_and_init():
  cfg = dataclasses.replace(CONFIGS['gpt2'], post_norms=True, qk_norm=True, norm_offset=1.0)
  l, d, f, v = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
  nh, kh, hd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.head_dim
  expected = {
      'embed/embedding': ((v, d), ('vocab', 'embed')),
      'pos_embed/embedding': ((16, d), ('pos', 'embed')),
      'layers/attn/q/kernel': ((l, d, nh), ('layers', 'embed', 'heads')),
      'layers/attn/q/bias': ((l, nh), ('layers', 'heads')),
      'layers/attn/k/kernel': ((l, d, kh), ('layers', 'embed', 'kv_heads')),
      'layers/attn/k/bias': ((l, kh), ('layers', 'kv_heads')),
      'layers/attn/v/kernel': ((l, d, kh), ('layers', 'embed', 'kv_heads')),
      'layers/attn/v/bias': ((l, kh), ('layers', 'kv_heads')),
      'layers/attn/o/kernel': ((l, nh, d), ('layers', 'heads', 'embed')),
      'layers/attn/o/bias': ((l, d), ('layers', 'norm')),
      'layers/attn/q_norm/scale': ((l, hd), ('layers', 'norm')),
      'layers/attn/k_norm/scale': ((l, hd), ('layers', 'norm')),
      'layers/mlp/up/kernel': ((l, d, f), ('layers', 'embed', 'mlp')),
      'layers/mlp/up/bias': ((l, f), ('layers', 'mlp')),
      'layers/mlp/down/kernel': ((l, f, d), ('layers', 'mlp', 'embed')),
      'layers/mlp/down/bias': ((l, d), ('layers', 'norm')),
      'final_norm/scale': ((d,), ('norm',)),
      'final_norm/bias': ((d,), ('norm',)),
      'lm_head/kernel': ((d, v), ('embed', 'vocab')),
  }
  for norm in ('attn_norm', 'attn_post_norm', 'mlp_norm', 'mlp_post_norm'):
    for leaf in ('scale', 'bias'):
      expected[f'layers/{norm}/{leaf}'] = ((l, d), ('layers', 'norm'))
  flat = lambda tree: {'/'.join(k.key for k in path): x for path, x in
                       jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))}
  params = flat(decoder.init(jax.random.key(0), cfg))
  axes = flat(decoder.logical_axes(cfg))
  assert {p: (x.shape, axes[p]) for p, x in params.items()} == expected
  for path, x in params.items():
    if path.endswith('scale'):
      np.testing.assert_array_equal(x, 0.0)  # 1 - norm_offset: effective scale 1
    elif path.endswith('bias'):
      np.testing.assert_array_equal(x, 0.0)
    else:
      assert 0.005 < np.std(x) < 0.03 and x.dtype == jnp.float32
  gated = flat(decoder.init(jax.random.key(0), CONFIGS['llama']))
  assert gated['layers/mlp/gate/kernel'].shape == (l, d, f) and 'lm_head/kernel' not in gated
  assert 'pos_embed/embedding' not in gated


# ---------------------------------------------------------------------------
# The linear hook.


@pytest.mark.parametrize('name', ['llama', 'gpt2'])
def test_hook_names_and_rngs(name):
  cfg = CONFIGS[name]
  params, tokens = random_params(cfg), random_tokens(cfg, 2, 8)
  seen, keys = [], []

  def hook(p, x, lname, rng):
    seen.append((lname, rng is None))
    assert 'kernel' in p and x.shape[-1] == p['kernel'].shape[0]
    if rng is not None:
      jax.debug.callback(lambda k, n=lname: keys.append((n, tuple(np.asarray(k).ravel()))),
                         jax.random.key_data(rng))
    return decoder.dense(p, x, lname, rng)

  expected = set(LINEARS) if cfg.mlp != 'gelu' else LINEARS - {'mlp/gate'}
  expected |= set() if cfg.tie_embeddings else {'lm_head'}
  np.testing.assert_allclose(run(params, tokens, cfg, linear=hook),
                             run(params, tokens, cfg), rtol=1e-6, atol=1e-6)
  assert {n for n, _ in seen} == expected and all(is_none for _, is_none in seen)
  seen.clear()
  jax.block_until_ready(run(params, tokens, cfg, linear=hook, rng=jax.random.key(7)))
  jax.effects_barrier()
  assert {n for n, _ in seen} == expected and not any(is_none for _, is_none in seen)
  per_layer = len(expected - {'lm_head'})
  assert len(keys) == cfg.n_layers * per_layer + ('lm_head' in expected)
  assert len({k for _, k in keys}) == len(keys)  # distinct per layer and per linear


def test_hook_delta_equals_kernel_update():
  cfg = CONFIGS['gemma3']
  params, tokens = random_params(cfg), random_tokens(cfg, 2, 8)
  delta = 0.3 * jax.random.normal(jax.random.key(5), params['layers']['mlp']['up']['kernel'].shape)
  with_delta = jax.tree.map(lambda x: x, params)
  with_delta['layers']['mlp']['up'] = {**params['layers']['mlp']['up'], 'delta': delta}
  merged = jax.tree.map(lambda x: x, params)
  merged['layers']['mlp']['up'] = {'kernel': params['layers']['mlp']['up']['kernel'] + delta}

  def hook(p, x, name, rng):  # an unmerged adapter: the extra leaf arrives per layer
    y = decoder.dense(p, x, name, rng)
    return y + jnp.einsum('BLD,DF->BLF', x, p['delta']) if name == 'mlp/up' else y

  out = run(with_delta, tokens, cfg, linear=hook)
  np.testing.assert_allclose(out, run(merged, tokens, cfg), rtol=1e-5, atol=1e-5)
  assert np.abs(out - run(params, tokens, cfg)).max() > 1e-3


# ---------------------------------------------------------------------------
# bf16 and config.


def test_bf16_params():
  cfg = CONFIGS['gemma3']
  params, tokens = random_params(cfg), random_tokens(cfg, 2, 8)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  dtypes = set()

  def hook(p, x, name, rng):
    dtypes.add(x.dtype)
    return decoder.dense(p, x, name, rng)

  out = run(bf16, tokens, cfg, linear=hook)
  assert out.dtype == jnp.float32 and dtypes == {jnp.dtype(jnp.bfloat16)}
  ref = run(params, tokens, cfg)
  assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()
  assert np.corrcoef(np.ravel(out), np.ravel(ref))[0, 1] > 0.99


def test_config_from_dict():
  cfg = DecoderConfig.from_dict(ml_collections.ConfigDict({'d_model': 32, 'norm': 'layer'}))
  assert cfg == DecoderConfig(d_model=32, norm='layer')
  assert DecoderConfig.from_dict({'mlp': 'gelu'}).mlp == 'gelu'
  with pytest.raises(ValueError, match=r"n_head.*n_heads"):
    DecoderConfig.from_dict({'n_head': 8})
  with pytest.raises(ValueError, match=r"rope_base_lokal.*rope_base_local"):
    DecoderConfig.from_dict({'rope_base_lokal': 1.0})
  for field, bad in [('norm', 'batch'), ('pos', 'alibi'), ('rope_layout', 'neox'),
                     ('mlp', 'relu'), ('remat', 'all')]:
    with pytest.raises(ValueError) as err:
      DecoderConfig.from_dict({field: bad})
    msg = str(err.value)
    assert field in msg and repr(bad) in msg
    assert all(repr(c) in msg for c in decoder.CHOICES[field])
  with pytest.raises(ValueError, match='n_kv_heads'):
    DecoderConfig.from_dict({'n_heads': 4, 'n_kv_heads': 3})
  with pytest.raises(ValueError, match='param_dtype'):
    DecoderConfig(param_dtype='float33')


def test_models_table():
  from jaxft.models import hyena  # pylint: disable=g-import-not-at-top
  assert models.MODELS == {'decoder': decoder, 'hyena': hyena} and models.DecoderConfig is DecoderConfig
  fields = {k: v for k, v in models.DEFAULTS['decoder'].items() if k != 'pretrained'}
  assert DecoderConfig.from_dict(fields) == DecoderConfig()
  assert models.DEFAULTS['decoder']['pretrained'] == ''  # the config field naming a checkpoint
