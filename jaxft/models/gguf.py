"""GGUF checkpoints (llama.cpp's format) -> DecoderConfig + params + meta.

  cfg, params, meta = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
  logits = decoder.apply(params, tokens, cfg)

Supported architectures: `llama` (SmolLM2, Llama 2/3 without RoPE scaling) and
`gemma3` (text). Quantized tensors are dequantized with `gguf.quants.dequantize`
and cast to `dtype`; params are host numpy arrays in `decoder.init`'s tree.

GGUF facts this relies on:
- dims are stored reversed: a 2-D weight reshaped to `reversed(shape)` is
  (out_features, in_features); jaxft kernels are (in, out).
- llama.cpp permutes the Q and K rows of `llama` models so that RoPE rotates
  adjacent pairs (2i, 2i+1): loaded as-is with rope_layout='interleaved', or
  un-permuted to HF's rotate-half layout with rope_layout='half'.
- Gemma's norm weights already include the +1 (norm_offset=0 here).
- llama.cpp hard-codes Gemma 3's local RoPE base (1e4) and every-6th-layer-global
  pattern; they are not in the file.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from jaxft.models.decoder import DecoderConfig

SUPPORTED = ('llama', 'gemma3')
GGUF_INSTALL = 'pip install gguf==0.19.0'
# Token spellings that end a turn (stop generation) besides the file's eos.
END_OF_TURN = ('<|im_end|>', '<end_of_turn>', '<|eot_id|>', '<|end|>', '<|endoftext|>')
_GEMMA3_LOCAL_BASE = 10000.0
_GEMMA3_GLOBAL_EVERY = 6

# jaxft layer param path -> GGUF tensor name inside block i.
_LAYER_TENSORS = {
    ('attn_norm', 'scale'): 'attn_norm.weight',
    ('attn', 'q', 'kernel'): 'attn_q.weight',
    ('attn', 'k', 'kernel'): 'attn_k.weight',
    ('attn', 'v', 'kernel'): 'attn_v.weight',
    ('attn', 'o', 'kernel'): 'attn_output.weight',
    ('mlp_norm', 'scale'): 'ffn_norm.weight',
    ('mlp', 'gate', 'kernel'): 'ffn_gate.weight',
    ('mlp', 'up', 'kernel'): 'ffn_up.weight',
    ('mlp', 'down', 'kernel'): 'ffn_down.weight',
}
_GEMMA3_TENSORS = {
    ('attn', 'q_norm', 'scale'): 'attn_q_norm.weight',
    ('attn', 'k_norm', 'scale'): 'attn_k_norm.weight',
    ('attn_post_norm', 'scale'): 'post_attention_norm.weight',
    ('mlp_post_norm', 'scale'): 'post_ffw_norm.weight',
}


def gguf_module():
  """The `gguf` package, or ImportError saying how to install it."""
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading GGUF files needs the `gguf` package: {GGUF_INSTALL}") from e
  return gguf


def open_reader(path: str | os.PathLike):
  """A `gguf.GGUFReader` over `path` (memory-mapped, read-only)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  return gguf_module().GGUFReader(path)


def read_metadata(reader, skip: tuple[str, ...] = ()) -> dict[str, Any]:
  """{key: python value} of every metadata field except those in `skip`."""
  return {k: f.contents() for k, f in reader.fields.items()
          if k not in skip and not k.startswith('GGUF.')}


def _config(md: dict[str, Any], arch: str, tensors: dict, dtype: str) -> DecoderConfig:
  """DecoderConfig from the `<arch>.*` metadata keys."""
  get = lambda key, default=None: md.get(f'{arch}.{key}', default)
  scaling = get('rope.scaling.type', 'none')
  if scaling not in ('none', None) and get('rope.scaling.factor', 1.0) != 1.0:
    raise ValueError(f"GGUF {arch}: RoPE scaling {scaling!r} is not supported by jaxft's decoder")
  if 'rope_freqs.weight' in tensors:  # Llama 3.1-style frequency factors
    raise ValueError(f"GGUF {arch}: RoPE frequency factors (rope_freqs) are not supported")
  d, n = get('embedding_length'), get('attention.head_count')
  head_dim = get('attention.key_length') or get('rope.dimension_count') or d // n
  common = dict(
      vocab_size=int(tensors['token_embd.weight'].shape[1]),  # GGML (d, vocab)
      d_model=d, n_layers=get('block_count'), n_heads=n,
      n_kv_heads=get('attention.head_count_kv', n), head_dim=head_dim,
      d_ff=get('feed_forward_length'), norm='rms',
      norm_eps=float(get('attention.layer_norm_rms_epsilon')),
      rope_base=float(get('rope.freq_base', 10000.0)),
      max_len=get('context_length', 2048),
      tie_embeddings='output.weight' not in tensors, param_dtype=dtype)
  if arch == 'llama':
    return DecoderConfig(**common, mlp='swiglu', rope_layout='interleaved')
  return DecoderConfig(
      **common, mlp='geglu', gelu_approximate=True, rope_layout='half',
      norm_offset=0.0, post_norms=True, qk_norm=True, embed_scale=True,
      sliding_window=get('attention.sliding_window', 0),
      global_every=get('attention.sliding_window_pattern', _GEMMA3_GLOBAL_EVERY),
      rope_base_local=_GEMMA3_LOCAL_BASE, query_scale=head_dim ** -0.5,
      final_softcap=float(get('final_logit_softcapping', 0.0)))


def dequantize(tensor, dtype: str = 'float32') -> np.ndarray:
  """One GGUF tensor as a numpy array in GGML-reversed (i.e. numpy/PyTorch) shape."""
  q = gguf_module().quants
  data = q.dequantize(tensor.data, tensor.tensor_type)
  shape = tuple(int(s) for s in reversed(tensor.shape))
  return np.asarray(data, np.float32).reshape(shape).astype(dtype)


def interleave_to_half(w_out_x: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation: interleaved-pair rows -> rotate-half rows.

  Works on the leading (output) axis of a (out, ...) array with out = n_heads * head_dim.
  """
  h = w_out_x.shape[0] // n_heads
  w = w_out_x.reshape(n_heads, h // 2, 2, *w_out_x.shape[1:])
  return w.swapaxes(1, 2).reshape(w_out_x.shape)


def half_to_interleave(w_out_x: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's permutation: rotate-half rows -> interleaved-pair rows (inverse of above)."""
  h = w_out_x.shape[0] // n_heads
  w = w_out_x.reshape(n_heads, 2, h // 2, *w_out_x.shape[1:])
  return w.swapaxes(1, 2).reshape(w_out_x.shape)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _params(tensors: dict, cfg: DecoderConfig, arch: str, path: str, unpermute: bool) -> dict:
  """The decoder param tree from {gguf name: tensor}."""
  dtype = cfg.param_dtype

  def get(name: str) -> np.ndarray:
    if name not in tensors:
      raise ValueError(f"GGUF file {path} lacks tensor {name!r} (architecture {arch!r})")
    return dequantize(tensors[name], dtype)

  def layer_value(sub: str, i: int) -> np.ndarray:
    w = get(f'blk.{i}.{sub}')
    if unpermute and sub in ('attn_q.weight', 'attn_k.weight'):
      w = interleave_to_half(w, cfg.n_heads if 'attn_q' in sub else cfg.n_kv_heads)
    return w.T if w.ndim == 2 else w  # (out, in) -> (in, out)

  table = {**_LAYER_TENSORS, **(_GEMMA3_TENSORS if arch == 'gemma3' else {})}
  params: dict = {}
  for jpath, sub in table.items():
    stacked = np.stack([layer_value(sub, i) for i in range(cfg.n_layers)])
    _set(params, ('layers',) + jpath, stacked)
  params['embed'] = {'embedding': get('token_embd.weight')}
  params['final_norm'] = {'scale': get('output_norm.weight')}
  if not cfg.tie_embeddings:
    params['lm_head'] = {'kernel': get('output.weight').T}
  return params


def _ids_of(tokens: list[str], spellings) -> list[int]:
  index = {t: i for i, t in enumerate(tokens)}
  return [index[s] for s in spellings if s in index]


def special_meta(md: dict[str, Any]) -> dict[str, Any]:
  """bos/eos/pad ids, stop ids (eos + end-of-turn tokens) and the add-bos flag."""
  tokens = md.get('tokenizer.ggml.tokens') or []
  bos = md.get('tokenizer.ggml.bos_token_id')
  eos = md.get('tokenizer.ggml.eos_token_id')
  pad = md.get('tokenizer.ggml.padding_token_id', eos)
  extra = [md.get(f'tokenizer.ggml.{k}_token_id') for k in ('eot', 'eom')]
  stops = [i for i in [eos, *extra, *_ids_of(tokens, END_OF_TURN)] if i is not None]
  return {'bos_id': bos, 'eos_id': eos, 'pad_id': pad,
          'stop_ids': list(dict.fromkeys(stops)),
          'special_ids': {'pad': pad, 'bos': bos, 'eos': eos},
          'add_bos': bool(md.get('tokenizer.ggml.add_bos_token', False))}


def _meta(md: dict[str, Any], arch: str, path: str) -> dict[str, Any]:
  return {'format': 'gguf', 'path': str(path), 'architecture': arch,
          'name': md.get('general.name') or os.path.basename(str(path)),
          'chat_template': md.get('tokenizer.chat_template'),
          'context_length': md.get(f'{arch}.context_length'),
          **special_meta(md)}


def check_architecture(arch: str, path) -> None:
  """ValueError naming the found and the supported architectures."""
  if arch not in SUPPORTED:
    raise ValueError(f"GGUF file {path} has architecture {arch!r}; jaxft supports "
                     f"{', '.join(repr(a) for a in SUPPORTED)}")


def load_gguf(path: str | os.PathLike, dtype: str = 'float32', *, rope_layout: str = 'interleaved',
              reader=None) -> tuple[DecoderConfig, dict, dict[str, Any]]:
  """(DecoderConfig, params, meta) of a GGUF checkpoint.

  Args:
    path: the .gguf file.
    dtype: param dtype ('float32', 'bfloat16', ...); also the config's param_dtype.
    rope_layout: for `llama` files, 'interleaved' keeps llama.cpp's Q/K layout;
      'half' un-permutes Q/K rows to HF's rotate-half layout (same logits).
    reader: an already open GGUFReader of `path` (opening one takes seconds).

  Returns:
    cfg, params (host numpy arrays), and meta with: format, path, architecture,
    name, chat_template (str or None), context_length, bos_id, eos_id, pad_id,
    stop_ids, special_ids {'pad','bos','eos'}, add_bos.
  """
  if rope_layout not in ('interleaved', 'half'):
    raise ValueError(f"rope_layout={rope_layout!r} is invalid; valid: 'interleaved', 'half'")
  reader = reader or open_reader(path)
  md = read_metadata(reader, skip=('tokenizer.ggml.merges', 'tokenizer.ggml.scores',
                                   'tokenizer.ggml.token_type'))
  arch = md.get('general.architecture')
  check_architecture(arch, path)
  tensors = {t.name: t for t in reader.tensors}
  if 'token_embd.weight' not in tensors:
    raise ValueError(f"GGUF file {path} lacks tensor 'token_embd.weight'")
  cfg = _config(md, arch, tensors, str(np.dtype(dtype)))
  unpermute = arch == 'llama' and rope_layout == 'half'
  if unpermute:
    cfg = dataclasses.replace(cfg, rope_layout='half')
  params = _params(tensors, cfg, arch, str(path), unpermute)
  return cfg, params, _meta(md, arch, path)
