"""HF transformers checkpoints (config.json + safetensors) <-> DecoderConfig + params.

  cfg, params, meta = load_hf("path/to/hf_dir")
  save_hf("out_dir", cfg, params, architecture="LlamaForCausalLM", tokenizer=tok)

Layouts: LlamaForCausalLM, Qwen2ForCausalLM, Gemma3ForCausalLM (text only,
model_type gemma3_text) and GPT2LMHeadModel. Safetensors are read and written
here with numpy (no torch / safetensors package needed); a sharded checkpoint
(`model.safetensors.index.json`) is read too.

Conventions bridged:
- HF linear weights are (out, in); jaxft kernels are (in, out). GPT-2's Conv1D
  weights are already (in, out), and its q/k/v are fused in `c_attn`.
- HF RoPE is rotate-half. Params with rope_layout='interleaved' (GGUF Llama
  imports) get their q/k output columns (and q/k norm scales) permuted on export.
- Gemma stores norm weights w used as (1 + w): imported with norm_offset=1.0;
  on export every norm is written as (norm_offset + w) - 1 (resp. - 0 elsewhere).
- transformers' Gemma 3 ignores `attn_logit_softcapping` (only Gemma 2 used it):
  imported as attn_softcap=0, and a config with attn_softcap cannot be exported.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Optional

import ml_dtypes
import numpy as np

from jaxft.models.decoder import DecoderConfig
from jaxft.models.gguf import END_OF_TURN, interleave_to_half

ARCHITECTURES = {'LlamaForCausalLM': 'llama', 'Qwen2ForCausalLM': 'qwen2',
                 'Gemma3ForCausalLM': 'gemma3', 'GPT2LMHeadModel': 'gpt2'}
_MODEL_TYPES = {'llama': 'llama', 'qwen2': 'qwen2', 'gemma3': 'gemma3_text', 'gpt2': 'gpt2'}
_ST_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
              'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
              'BOOL': np.bool_}

# ---------------------------------------------------------------------------
# safetensors


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{name: array} of a .safetensors file (memory-mapped; arrays are read-only views)."""
  with open(path, 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(n))
  raw = np.memmap(path, dtype=np.uint8, mode='r', offset=8 + n)
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    begin, end = info['data_offsets']
    out[name] = raw[begin:end].view(_ST_DTYPES[info['dtype']]).reshape(info['shape'])
  return out


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
  """Writes {name: array} as a .safetensors file (header padded to 8 bytes)."""
  names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
  header, offset, blobs = {'__metadata__': {'format': 'pt'}}, 0, []
  for name, arr in tensors.items():
    arr = np.ascontiguousarray(arr)
    blob = arr.tobytes()
    header[name] = {'dtype': names[arr.dtype], 'shape': list(arr.shape),
                    'data_offsets': [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  text = json.dumps(header).encode()
  text += b' ' * (-len(text) % 8)
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(text)) + text)
    for blob in blobs:
      f.write(blob)


def read_weights(directory: Path) -> dict[str, np.ndarray]:
  """All tensors of `model.safetensors` or of the shards named by its index.json."""
  index = directory / 'model.safetensors.index.json'
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
  elif (directory / 'model.safetensors').is_file():
    files = ['model.safetensors']
  else:
    raise FileNotFoundError(f"{directory} has no model.safetensors or model.safetensors.index.json"
                            " (only safetensors checkpoints are supported)")
  out = {}
  for name in files:
    out.update(read_safetensors(directory / name))
  return out


# ---------------------------------------------------------------------------
# config.json <-> DecoderConfig


def architecture_of(config: dict) -> str:
  """'llama' | 'qwen2' | 'gemma3' | 'gpt2' from config.json, else ValueError listing them."""
  for arch in config.get('architectures') or []:
    if arch in ARCHITECTURES:
      return ARCHITECTURES[arch]
  by_type = {v: k for k, v in _MODEL_TYPES.items()}
  if not config.get('architectures') and config.get('model_type') in by_type:
    return by_type[config['model_type']]
  raise ValueError(f"unsupported HF architecture {config.get('architectures')} (model_type "
                   f"{config.get('model_type')!r}); supported: {', '.join(ARCHITECTURES)}")


def _rope_theta(c: dict, layer_type: Optional[str], default: float) -> float:
  """RoPE base from v5 `rope_parameters` (flat or per layer type) or v4 keys; default RoPE only."""
  params = c.get('rope_parameters') or {}
  params = params.get(layer_type, params) if layer_type else params
  scaling = c.get('rope_scaling') or {}
  for kind in (params.get('rope_type'), scaling.get('rope_type', scaling.get('type'))):
    if kind not in (None, 'default'):
      raise ValueError(f"RoPE scaling {kind!r} is not supported by jaxft's decoder")
  legacy = {'full_attention': 'rope_theta', 'sliding_attention': 'rope_local_base_freq'}
  return float(params.get('rope_theta') or c.get(legacy.get(layer_type, 'rope_theta')) or default)


def _gemma3_schedule(c: dict) -> dict[str, int]:
  """sliding_window / global_every from layer_types (or sliding_window_pattern)."""
  n = c['num_hidden_layers']
  every = c.get('sliding_window_pattern') or c.get('_sliding_window_pattern') or 6
  types = c.get('layer_types') or ['full_attention' if (i + 1) % every == 0
                                   else 'sliding_attention' for i in range(n)]
  if all(t == 'full_attention' for t in types):
    return {'sliding_window': 0, 'global_every': 0}
  for k in range(1, n + 2):
    if types == ['full_attention' if (i + 1) % k == 0 else 'sliding_attention' for i in range(n)]:
      return {'sliding_window': c['sliding_window'], 'global_every': k if k <= n else 0}
  raise ValueError(f"Gemma 3 layer_types {types} do not follow an every-k-th-global pattern")


def config_from_hf(c: dict, dtype: str) -> DecoderConfig:
  """DecoderConfig of a config.json dict."""
  arch = architecture_of(c)
  if arch == 'gpt2':
    d, heads = c['n_embd'], c['n_head']
    return DecoderConfig(
        vocab_size=c['vocab_size'], d_model=d, n_layers=c['n_layer'], n_heads=heads,
        n_kv_heads=heads, head_dim=d // heads, d_ff=c.get('n_inner') or 4 * d, norm='layer',
        norm_eps=c.get('layer_norm_epsilon', 1e-5), pos='learned', max_len=c['n_positions'],
        mlp='gelu', gelu_approximate=c.get('activation_function', 'gelu_new') != 'gelu',
        attn_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True, param_dtype=dtype)
  d, heads = c['hidden_size'], c['num_attention_heads']
  head_dim = c.get('head_dim') or d // heads
  if arch == 'qwen2' and c.get('use_sliding_window'):
    raise ValueError("Qwen2 with use_sliding_window=True is not supported")
  common = dict(
      vocab_size=c['vocab_size'], d_model=d, n_layers=c['num_hidden_layers'], n_heads=heads,
      n_kv_heads=c.get('num_key_value_heads') or heads, head_dim=head_dim,
      d_ff=c['intermediate_size'], norm='rms', norm_eps=c.get('rms_norm_eps', 1e-6),
      max_len=c.get('max_position_embeddings', 2048), param_dtype=dtype,
      tie_embeddings=c.get('tie_word_embeddings', arch == 'gemma3'))
  if arch == 'gemma3':
    if c.get('use_bidirectional_attention'):
      raise ValueError("Gemma 3 with use_bidirectional_attention=True is not supported")
    return DecoderConfig(
        **common, **_gemma3_schedule(c), mlp='geglu', gelu_approximate=True, norm_offset=1.0,
        post_norms=True, qk_norm=True, embed_scale=True,
        rope_base=_rope_theta(c, 'full_attention', 1e6),
        rope_base_local=_rope_theta(c, 'sliding_attention', 1e4),
        query_scale=c.get('query_pre_attn_scalar', head_dim) ** -0.5,
        final_softcap=c.get('final_logit_softcapping') or 0.0)
  bias = c.get('attention_bias', False)
  return DecoderConfig(**common, mlp='swiglu', rope_base=_rope_theta(c, None, 10000.0),
                       attn_bias=arch == 'qwen2' or bias, out_bias=arch == 'llama' and bias,
                       mlp_bias=arch == 'llama' and c.get('mlp_bias', False))


def _int_if_close(x: float):
  return round(x) if abs(x - round(x)) < 1e-6 * max(1.0, abs(x)) else x


def config_to_hf(cfg: DecoderConfig, arch: str) -> dict[str, Any]:
  """config.json dict of `cfg` in layout `arch` (v4-style keys that v5 also reads)."""
  if arch == 'gpt2':
    return dict(n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
                n_positions=cfg.max_len, n_ctx=cfg.max_len, vocab_size=cfg.vocab_size,
                layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=True,
                activation_function='gelu_new' if cfg.gelu_approximate else 'gelu')
  out = dict(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
             num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
             head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base,
             max_position_embeddings=cfg.max_len, vocab_size=cfg.vocab_size,
             tie_word_embeddings=cfg.tie_embeddings)
  if arch == 'gemma3':
    windows = [cfg.sliding_window and not (cfg.global_every and (i + 1) % cfg.global_every == 0)
               for i in range(cfg.n_layers)]
    out.update(hidden_activation='gelu_pytorch_tanh', sliding_window=cfg.sliding_window or 4096,
               layer_types=['sliding_attention' if w else 'full_attention' for w in windows],
               sliding_window_pattern=cfg.global_every or cfg.n_layers + 1,
               rope_local_base_freq=cfg.rope_base_local or cfg.rope_base,
               query_pre_attn_scalar=_int_if_close((cfg.query_scale or cfg.head_dim ** -0.5) ** -2),
               final_logit_softcapping=cfg.final_softcap or None)
  else:
    out.update(hidden_act='silu', attention_bias=cfg.attn_bias, mlp_bias=cfg.mlp_bias)
  if arch == 'qwen2':
    out.update(use_sliding_window=False, attention_bias=True)
  return out


_REQUIRED = {
    'llama': dict(norm='rms', pos='rope', mlp='swiglu', post_norms=False, qk_norm=False,
                  embed_scale=False, sliding_window=0, attn_softcap=0.0, final_softcap=0.0),
    'qwen2': dict(norm='rms', pos='rope', mlp='swiglu', post_norms=False, qk_norm=False,
                  embed_scale=False, sliding_window=0, attn_softcap=0.0, final_softcap=0.0,
                  out_bias=False, mlp_bias=False),
    'gemma3': dict(norm='rms', pos='rope', mlp='geglu', gelu_approximate=True, post_norms=True,
                   qk_norm=True, embed_scale=True, attn_bias=False, out_bias=False,
                   mlp_bias=False, attn_softcap=0.0),
    'gpt2': dict(norm='layer', pos='learned', mlp='gelu', attn_bias=True, out_bias=True,
                 mlp_bias=True, tie_embeddings=True, post_norms=False, qk_norm=False,
                 embed_scale=False, norm_offset=0.0),
}


# Which jaxft bias leaves one HF config flag switches on, per layout (None: no flag).
_BIAS_FLAGS = {'llama': {('attn', n): ('attn_bias', 'out_bias') for n in 'qkvo'}
               | {('mlp', n): ('mlp_bias',) for n in ('gate', 'up', 'down')},
               'qwen2': {('attn', n): ('attn_bias',) for n in 'qkv'}}


def promote_biases(cfg: DecoderConfig, params: dict, arch: str) -> tuple[DecoderConfig, dict]:
  """Merged adapters can add biases the base had none of (SSF's shift, a merged bias
  adapter): switch on the layout's bias flag for them and give the other linears under
  that flag zero biases, so nothing is dropped on export. ValueError if the layout has no
  flag for a bias that is there."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  layers = params.get('layers', {})
  have = {(g, n) for g, group in layers.items() if isinstance(group, dict)
          for n, lin in group.items() if isinstance(lin, dict) and 'bias' in lin}
  flags = _BIAS_FLAGS.get(arch, {})
  missing = [] if arch == 'gpt2' else sorted(f'{g}/{n}' for g, n in have - flags.keys())
  if missing:
    raise ValueError(f"cannot export as {arch}: the merged model has biases on {', '.join(missing)} "
                     "and the layout has no bias for them")
  on = {f for key in have if key in flags for f in flags[key]}
  on = {f for f in on if not getattr(cfg, f)}
  if not on:
    return cfg, params
  layers = {g: dict(group) if isinstance(group, dict) else group for g, group in layers.items()}
  for (g, n), fs in flags.items():
    lin = layers.get(g, {}).get(n)
    if set(fs) & on and isinstance(lin, dict) and 'bias' not in lin:
      k = lin['kernel']
      layers[g][n] = {**lin, 'bias': np.zeros((*k.shape[:-2], k.shape[-1]), k.dtype)}
  return dataclasses.replace(cfg, **{f: True for f in on}), {**params, 'layers': layers}


def check_exportable(cfg: DecoderConfig, arch: str) -> None:
  """ValueError listing every field of `cfg` the layout `arch` cannot express."""
  bad = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in _REQUIRED[arch].items()
         if getattr(cfg, k) != v]
  if arch == 'llama' and cfg.attn_bias != cfg.out_bias:
    bad.append(f"attn_bias={cfg.attn_bias} != out_bias={cfg.out_bias} (one attention_bias flag)")
  if arch in ('llama', 'qwen2') and cfg.query_scale not in (0.0, cfg.head_dim ** -0.5):
    bad.append(f"query_scale={cfg.query_scale} (needs 1/sqrt(head_dim))")
  if arch == 'gpt2' and cfg.n_kv_heads != cfg.n_heads:
    bad.append(f"n_kv_heads={cfg.n_kv_heads} (needs n_heads)")
  if bad:
    raise ValueError(f"cannot export as {arch}: " + '; '.join(bad))


# ---------------------------------------------------------------------------
# Tensor names: (HF name inside layer i or at top, jaxft path, kind)
# kinds: 'linear' (out,in) <-> (in,out); 'conv' (in,out) as is; 'vec'; 'norm' (offset-aware).


def _tensor_table(arch: str, cfg: DecoderConfig) -> tuple[list, list]:
  """(per-layer entries, top-level entries) of `arch`."""
  if arch == 'gpt2':
    layer = [(f'ln_{n}.{w}', (norm, key), kind)
             for n, norm in (('1', 'attn_norm'), ('2', 'mlp_norm'))
             for w, key, kind in (('weight', 'scale', 'norm'), ('bias', 'bias', 'vec'))]
    layer += [(f'{hf}.{w}', path + (key,), kind)
              for hf, path in (('attn.c_proj', ('attn', 'o')), ('mlp.c_fc', ('mlp', 'up')),
                               ('mlp.c_proj', ('mlp', 'down')))
              for w, key, kind in (('weight', 'kernel', 'conv'), ('bias', 'bias', 'vec'))]
    top = [('transformer.wte.weight', ('embed', 'embedding'), 'vec'),
           ('transformer.wpe.weight', ('pos_embed', 'embedding'), 'vec'),
           ('transformer.ln_f.weight', ('final_norm', 'scale'), 'norm'),
           ('transformer.ln_f.bias', ('final_norm', 'bias'), 'vec')]
    return layer, top
  lin = lambda hf, *path: (f'{hf}.weight', path + ('kernel',), 'linear')
  layer = [lin('self_attn.q_proj', 'attn', 'q'), lin('self_attn.k_proj', 'attn', 'k'),
           lin('self_attn.v_proj', 'attn', 'v'), lin('self_attn.o_proj', 'attn', 'o'),
           lin('mlp.gate_proj', 'mlp', 'gate'), lin('mlp.up_proj', 'mlp', 'up'),
           lin('mlp.down_proj', 'mlp', 'down'),
           ('input_layernorm.weight', ('attn_norm', 'scale'), 'norm')]
  if arch == 'gemma3':
    layer += [('post_attention_layernorm.weight', ('attn_post_norm', 'scale'), 'norm'),
              ('pre_feedforward_layernorm.weight', ('mlp_norm', 'scale'), 'norm'),
              ('post_feedforward_layernorm.weight', ('mlp_post_norm', 'scale'), 'norm'),
              ('self_attn.q_norm.weight', ('attn', 'q_norm', 'scale'), 'norm'),
              ('self_attn.k_norm.weight', ('attn', 'k_norm', 'scale'), 'norm')]
  else:
    layer.append(('post_attention_layernorm.weight', ('mlp_norm', 'scale'), 'norm'))
  biases = [('q', cfg.attn_bias), ('k', cfg.attn_bias), ('v', cfg.attn_bias), ('o', cfg.out_bias)]
  layer += [(f'self_attn.{n}_proj.bias', ('attn', n, 'bias'), 'vec') for n, on in biases if on]
  if cfg.mlp_bias:
    layer += [(f'mlp.{n}_proj.bias', ('mlp', n, 'bias'), 'vec') for n in ('gate', 'up', 'down')]
  top = [('model.embed_tokens.weight', ('embed', 'embedding'), 'vec'),
         ('model.norm.weight', ('final_norm', 'scale'), 'norm')]
  if not cfg.tie_embeddings:
    top.append(('lm_head.weight', ('lm_head', 'kernel'), 'linear'))
  return layer, top


def _layer_prefix(arch: str) -> str:
  return 'transformer.h.{i}.' if arch == 'gpt2' else 'model.layers.{i}.'


def _get(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _lookup(weights: dict, name: str, directory) -> np.ndarray:
  """weights[name], also without the base-model prefix (old GPT-2 files); else ValueError."""
  short = name.split('.', 1)[1] if name.startswith(('transformer.', 'model.')) else name
  for key in (name, short):
    if key in weights:
      return weights[key]
  raise ValueError(f"HF checkpoint {directory} lacks tensor {name!r}")


def _to_jaxft(x: np.ndarray, kind: str, dtype) -> np.ndarray:
  x = np.asarray(x)
  return (x.T if kind == 'linear' else x).astype(dtype)


def import_params(weights: dict, cfg: DecoderConfig, arch: str, directory='<weights>') -> dict:
  """The decoder param tree from {HF name: array}."""
  layer, top = _tensor_table(arch, cfg)
  prefix, dtype = _layer_prefix(arch), np.dtype(cfg.param_dtype)
  get = lambda name, kind: _to_jaxft(_lookup(weights, name, directory), kind, dtype)
  params: dict = {}
  for name, path, kind in layer:
    _set(params, ('layers',) + path,
         np.stack([get(prefix.format(i=i) + name, kind) for i in range(cfg.n_layers)]))
  for name, path, kind in top:
    _set(params, path, get(name, kind))
  if arch == 'gpt2':  # fused c_attn (d, 3d) -> q, k, v
    fused = lambda w: np.stack([get(prefix.format(i=i) + f'attn.c_attn.{w}', 'conv')
                                for i in range(cfg.n_layers)])
    w, b = np.split(fused('weight'), 3, axis=-1), np.split(fused('bias'), 3, axis=-1)
    for j, n in enumerate('qkv'):
      params['layers']['attn'][n] = {'kernel': w[j], 'bias': b[j]}
  return params


def _to_hf(x, kind: str, norm_shift: float) -> np.ndarray:
  x = np.asarray(x)
  if kind == 'linear':
    return x.T
  return x + np.asarray(norm_shift, x.dtype) if kind == 'norm' and norm_shift else x


def _rotate_half_layout(params: dict, cfg: DecoderConfig) -> dict:
  """A copy of `params` with q/k (kernels, biases, norm scales) in HF's rotate-half layout."""
  attn = dict(params['layers']['attn'])
  for name, heads in (('q', cfg.n_heads), ('k', cfg.n_kv_heads)):
    lin = dict(attn[name])
    lin['kernel'] = np.stack([interleave_to_half(np.asarray(k).T, heads).T for k in lin['kernel']])
    if 'bias' in lin:
      lin['bias'] = np.stack([interleave_to_half(np.asarray(b), heads) for b in lin['bias']])
    attn[name] = lin
    if f'{name}_norm' in attn:
      attn[f'{name}_norm'] = {'scale': np.stack(
          [interleave_to_half(np.asarray(s), 1) for s in attn[f'{name}_norm']['scale']])}
  return {**params, 'layers': {**params['layers'], 'attn': attn}}


def export_params(params: dict, cfg: DecoderConfig, arch: str) -> dict[str, np.ndarray]:
  """{HF name: array} of `params` in layout `arch` (the params' dtype is kept)."""
  if cfg.pos == 'rope' and cfg.rope_layout == 'interleaved':
    params = _rotate_half_layout(params, cfg)
  shift = cfg.norm_offset - (1.0 if arch == 'gemma3' else 0.0)
  layer, top = _tensor_table(arch, cfg)
  prefix, out = _layer_prefix(arch), {}
  for name, path, kind in top:
    out[name] = _to_hf(_get(params, path), kind, shift)
  for i in range(cfg.n_layers):
    for name, path, kind in layer:
      out[prefix.format(i=i) + name] = _to_hf(_get(params['layers'], path)[i], kind, shift)
    if arch == 'gpt2':
      attn = params['layers']['attn']
      out[prefix.format(i=i) + 'attn.c_attn.weight'] = np.concatenate(
          [np.asarray(attn[n]['kernel'][i]) for n in 'qkv'], axis=1)
      out[prefix.format(i=i) + 'attn.c_attn.bias'] = np.concatenate(
          [np.asarray(attn[n]['bias'][i]) for n in 'qkv'])
  if arch == 'qwen2' and not cfg.attn_bias:  # Qwen2 always has q/k/v biases
    for i in range(cfg.n_layers):
      for n, width in (('q', cfg.n_heads), ('k', cfg.n_kv_heads), ('v', cfg.n_kv_heads)):
        out[prefix.format(i=i) + f'self_attn.{n}_proj.bias'] = np.zeros(
            width * cfg.head_dim, np.asarray(params['embed']['embedding']).dtype)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------
# Directories


def _read_json(path: Path) -> dict:
  return json.loads(path.read_text()) if path.is_file() else {}


def _ids(*values) -> list[int]:
  out = []
  for v in values:
    out += [v] if isinstance(v, int) else list(v or [])
  return list(dict.fromkeys(out))


def _token_id(tok, value) -> Optional[int]:
  content = value.get('content') if isinstance(value, dict) else value
  return tok.token_to_id(content) if tok is not None and content else None


def _chat_template(directory: Path, tc: dict) -> Optional[str]:
  template = tc.get('chat_template')
  if isinstance(template, list):  # [{'name': 'default', 'template': ...}, ...]
    template = {t['name']: t['template'] for t in template}.get('default')
  jinja = directory / 'chat_template.jinja'
  return template or (jinja.read_text() if jinja.is_file() else None)


def hf_meta(directory: Path, config: dict, arch: str) -> dict[str, Any]:
  """meta like load_gguf's, plus 'tokenizer_file' and 'tokenizer' (a Tokenizer or None)."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  tok_file = directory / 'tokenizer.json'
  tok = Tokenizer.from_file(str(tok_file)) if tok_file.is_file() else None
  tc, gen = (_read_json(directory / f) for f in ('tokenizer_config.json', 'generation_config.json'))
  found = lambda key: [config.get(f'{key}_token_id'), gen.get(f'{key}_token_id'),
                       _token_id(tok, tc.get(f'{key}_token'))]
  eos = _ids(*found('eos'))
  first = lambda values: next((v for v in values if v is not None), None)
  bos, pad = first(found('bos')), first(found('pad') + eos[:1])
  ends = [i for i in (tok.token_to_id(t) for t in END_OF_TURN) if i is not None] if tok else []
  return {'format': 'hf', 'path': str(directory), 'architecture': arch,
          'name': config.get('_name_or_path') or directory.name,
          'chat_template': _chat_template(directory, tc),
          'context_length': config.get('max_position_embeddings', config.get('n_positions')),
          'bos_id': bos, 'eos_id': first(eos[:1]), 'pad_id': pad, 'stop_ids': _ids(eos, ends),
          'special_ids': {'pad': pad, 'bos': bos, 'eos': first(eos[:1])},
          'add_bos': bool(tc.get('add_bos_token', False)),
          'tokenizer_file': str(tok_file) if tok else None, 'tokenizer': tok}


def load_hf(directory: str | os.PathLike,
            dtype: str = 'float32') -> tuple[DecoderConfig, dict, dict]:
  """(DecoderConfig, params, meta) of an HF directory (config.json + safetensors).

  meta: format, path, architecture, name, chat_template, context_length, bos_id,
  eos_id, pad_id, stop_ids, special_ids, add_bos, tokenizer_file, and tokenizer
  (the directory's tokenizer.json as a `tokenizers.Tokenizer`, or None).
  """
  directory = Path(directory).expanduser()
  if not (directory / 'config.json').is_file():
    raise FileNotFoundError(f"{directory} has no config.json (expected an HF model directory)")
  config = json.loads((directory / 'config.json').read_text())
  arch = architecture_of(config)
  cfg = config_from_hf(config, str(np.dtype(dtype)))
  params = import_params(read_weights(directory), cfg, arch, directory)
  return cfg, params, hf_meta(directory, config, arch)


def save_hf(directory: str | os.PathLike, cfg: DecoderConfig, params: dict, *, architecture: str,
            tokenizer=None, chat_template: Optional[str] = None,
            special_ids: Optional[dict[str, int]] = None) -> Path:
  """Writes config.json + model.safetensors (+ tokenizer files) that transformers loads.

  Args:
    directory: created if missing.
    cfg, params: the model (params in any float dtype; written in that dtype).
    architecture: 'LlamaForCausalLM' | 'Qwen2ForCausalLM' | 'Gemma3ForCausalLM' |
      'GPT2LMHeadModel' (or the short 'llama' | 'qwen2' | 'gemma3' | 'gpt2').
    tokenizer: a `tokenizers.Tokenizer` to save as tokenizer.json.
    chat_template: jinja string, written to tokenizer_config.json.
    special_ids: {'bos', 'eos', 'pad'} ids (e.g. meta['special_ids']) for the configs.
  """
  by_short = {v: k for k, v in ARCHITECTURES.items()}
  arch = ARCHITECTURES.get(architecture, architecture if architecture in by_short else None)
  if arch is None:
    raise ValueError(f"unsupported architecture {architecture!r}; "
                     f"supported: {', '.join(ARCHITECTURES)}")
  cfg, params = promote_biases(cfg, params, arch)
  check_exportable(cfg, arch)
  directory = Path(directory).expanduser()
  directory.mkdir(parents=True, exist_ok=True)
  tensors = export_params(params, cfg, arch)
  ids = {k: v for k, v in (special_ids or {}).items() if v is not None}
  config = {'architectures': [by_short[arch]], 'model_type': _MODEL_TYPES[arch],
            **config_to_hf(cfg, arch), 'torch_dtype': str(next(iter(tensors.values())).dtype),
            **{f'{k}_token_id': v for k, v in ids.items()}}
  (directory / 'config.json').write_text(json.dumps(config, indent=2))
  write_safetensors(directory / 'model.safetensors', tensors)
  if tokenizer is not None or chat_template:
    tc = {'tokenizer_class': 'PreTrainedTokenizerFast', 'chat_template': chat_template,
          'clean_up_tokenization_spaces': False}
    if tokenizer is not None:
      tokenizer.save(str(directory / 'tokenizer.json'))
      tc.update({f'{k}_token': tokenizer.id_to_token(v) for k, v in ids.items()})
    (directory / 'tokenizer_config.json').write_text(json.dumps(tc, indent=2))
  return directory
