"""Data: document sources, tokenizers and the grain pipeline.

    docs = load_documents(cfg.data, "train")          # list of str (+ .stats)
    tok = load_tokenizer("shakespeare_bpe")           # pad=0, bos=1, eos=2
    it = make_pipeline(docs, tok, batch_size=8, seq_len=128, seed=0,
                       vocab_size=2048)               # grain DatasetIterator
    check_batch(next(it), 2048)

Importing this package does no I/O; the complete-works corpus is downloaded on
the first `load_documents` of source 'shakespeare' (see `corpus.py`).
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

from jaxft.data import sources
from jaxft.data.packing import PackedRows, data_stats, pack_documents
from jaxft.data.pipeline import check_batch, check_vocab, make_pipeline
from jaxft.data.sources import Documents, MalformedRowError, SourceStats
from jaxft.data.tokenizer import load_tokenizer, special_ids, vocab_size
from jaxft.names import lookup

SOURCES = {
    "shakespeare": sources.shakespeare,
    "tiny_shakespeare": sources.tiny_shakespeare,
    "text": sources.text,
    "jsonl": sources.jsonl,
}

# Data config fields a loader may take (each loader takes only those it uses).
CONFIG_FIELDS = ("path", "eval_path", "text_field", "on_malformed", "doc_chars",
                 "eval_fraction")


def _field(cfg: Any, key: str) -> Any:
  """cfg[key] for a Mapping or ConfigDict; None when absent."""
  try:
    return cfg[key]
  except (KeyError, AttributeError, TypeError):
    return getattr(cfg, key, None)


def load_documents(data_cfg: Mapping[str, Any], split: str) -> Documents:
  """The documents of `split` ('train' | 'eval') for a data config.

  `data_cfg` (a mapping or ConfigDict) names the source in `name` and may set
  `path, eval_path, text_field, on_malformed, doc_chars, eval_fraction`; unset,
  None or '' fields take the loader's default. Setting `path` for a source that
  reads no files is an error, not silently ignored.
  """
  name = _field(data_cfg, "name")
  loader = lookup(SOURCES, name, "data source")
  accepted = inspect.signature(loader).parameters
  kwargs = {}
  for key in CONFIG_FIELDS:
    value = _field(data_cfg, key)
    if value is None or value == "":
      continue
    if key in accepted:
      kwargs[key] = value
    elif key in ("path", "eval_path"):
      raise ValueError(
          f"data.{key}={value!r} is set but source {name!r} reads no files; "
          "use name='text' or name='jsonl' for your own files")
  return loader(split, **kwargs)


__all__ = [
    "SOURCES", "load_documents", "load_tokenizer", "make_pipeline", "check_batch",
    "check_vocab", "MalformedRowError", "Documents", "SourceStats", "PackedRows",
    "pack_documents", "data_stats", "special_ids", "vocab_size",
]
