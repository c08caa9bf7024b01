"""Data: document and task sources, tokenizers, SFT rows and the grain pipeline.

    docs = load_documents(cfg.data, "train")          # list of str (+ .stats)
    examples = load_examples(cfg.data, "train")       # list of Example (+ .stats)
    rows = pack_examples(examples, tok, seq_len=256)  # prompt masked from loss
    tok = load_tokenizer("shakespeare_bpe")           # pad=0, bos=1, eos=2
    it = make_pipeline(docs, tok, batch_size=8, seq_len=128, seed=0,
                       vocab_size=2048)               # grain DatasetIterator
    check_batch(next(it), 2048)

Importing this package does no I/O; the complete-works corpus is downloaded on
the first `load_documents` of source 'shakespeare' (see `corpus.py`), the
BIG-bench task files on the first load of a BIG-bench task (see `sdist.py`).
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping

from jaxft.data import sources
from jaxft.data.packing import PackedRows, data_stats, pack_documents
from jaxft.data.pipeline import check_batch, check_vocab, make_pipeline
from jaxft.data.sft import pack_examples
from jaxft.data.sources import (
    Documents, Example, Examples, MalformedRowError, SourceStats)
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

# Task sources: loader(split, **options) -> Examples (see `sources`).
TASKS = {
    "gsm8k": sources.gsm8k_task,
    "reasoning_gym": sources.reasoning_gym_task,
    "bigbench_hhh": sources.bigbench_hhh,
    "natural_instructions": sources.natural_instructions,
    "humaneval": sources.humaneval,
    "jsonl_examples": sources.jsonl_examples,
    "parquet_examples": sources.parquet_examples,
}
# Names are disjoint from SOURCES': a name alone picks documents or examples.

# Data config fields a task loader may take.
TASK_FIELDS = ("path", "eval_path", "prompt_field", "response_field",
               "on_malformed", "eval_fraction", "generator", "generator_kwargs",
               "train_size", "eval_size", "task_seed")
FILE_FIELDS = ("path", "eval_path")
SIZE_FIELDS = {"train": "train_size", "eval": "eval_size", "unseen": "eval_size"}


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


def _plain(value: Any) -> Any:
  """A ConfigDict (e.g. generator_kwargs) as a plain dict; other values as is."""
  to_dict = getattr(value, "to_dict", None)
  return to_dict() if callable(to_dict) else value


def load_examples(data_cfg: Mapping[str, Any], split: str) -> Examples:
  """The examples of `split` ('train' | 'eval'; natural_instructions also
  'unseen') for a data config naming a task in `name` (see `TASKS`).

  Fields of `TASK_FIELDS` that are set (not None / '') go to the loader when it
  takes them. `train_size` / `eval_size` given to a loader that does not take
  them keep the first n examples of the split. `path` / `eval_path` for a task
  that reads no user files is an error, as in `load_documents`.
  """
  name = _field(data_cfg, "name")
  loader = lookup(TASKS, name, "task")
  accepted = inspect.signature(loader).parameters
  kwargs, cap = {}, None
  for key in TASK_FIELDS:
    value = _plain(_field(data_cfg, key))
    if value is None or value == "":
      continue
    if key in accepted:
      kwargs[key] = value
    elif key in FILE_FIELDS:
      raise ValueError(
          f"data.{key}={value!r} is set but task {name!r} reads no files; "
          "use name='jsonl_examples' or 'parquet_examples' for your own files")
    elif key == SIZE_FIELDS.get(split):
      cap = value
  examples = loader(split, **kwargs)
  return sources.examples.first(examples, cap, SIZE_FIELDS.get(split, "size"))


__all__ = [
    "SOURCES", "load_documents", "TASKS", "load_examples", "Example",
    "Examples", "pack_examples", "load_tokenizer", "make_pipeline", "check_batch",
    "check_vocab", "MalformedRowError", "Documents", "SourceStats", "PackedRows",
    "pack_documents", "data_stats", "special_ids", "vocab_size",
]
