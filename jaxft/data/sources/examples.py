"""Supervised examples: the `Example` record and user jsonl / parquet files.

Every task loader returns `Examples`: a plain list of `Example(prompt,
response, meta)` that also carries `source` (a short description of where the
list came from, for error messages such as "no examples from ...") and `stats`
(a `SourceStats`: files read, rows kept, rows skipped and where).

  jsonl_examples    user jsonl files, one example per row
  parquet_examples  user parquet files (needs `pyarrow`), one example per row

Both read `prompt_field` and `response_field` (strings) from each record. A
record without them raises `MalformedRowError` naming file and line (jsonl) or
row (parquet); with `on_malformed='skip'` it is skipped and counted instead.
"""
from __future__ import annotations

import json
import logging
import types
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

from jaxft.data.sources import documents
from jaxft.data.sources.documents import MalformedRowError, SourceStats

PYARROW_INSTALL = "pip install pyarrow"


class Example(NamedTuple):
  """One supervised example: the model sees `prompt` and learns `response`.

  `meta` holds what evaluation needs (reference answer, tests, verifier entry,
  the rejected response of a preference pair, ...); loaders document its keys.
  """
  prompt: str
  response: str
  meta: Mapping[str, Any] = types.MappingProxyType({})


class Examples(list):
  """A list of `Example`s with the `source` and `stats` of the read that made it."""

  def __init__(self, examples: Sequence[Example] = (), source: str = "",
               stats: SourceStats | None = None):
    super().__init__(examples)
    self.source = source
    self.stats = stats if stats is not None else SourceStats(rows=len(self))


def first(examples: Examples, n: int | None, what: str) -> Examples:
  """The first `n` examples (all if n is None), keeping source and stats."""
  if n is None:
    return examples
  if n < 0:
    raise ValueError(f"{what} must be >= 0, got {n}")
  return Examples(examples[:n], f"{examples.source}[:{n}]", examples.stats)


def require(module: str, install: str):
  """Imports `module`, or ImportError that says exactly what to install."""
  import importlib
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(
        f"this data source needs the Python package {module!r} ({e}); install "
        f"it with:\n  {install}") from None


# ----------------------------------------------------------------- records


def record_problem(row: Any, fields: Sequence[str]) -> str | None:
  """None if `row` is an object holding a string in every field, else why not."""
  if not isinstance(row, dict):
    return f"row is a JSON {type(row).__name__}, not an object"
  for field in fields:
    if field not in row:
      keys = ", ".join(sorted(map(str, row))) or "none"
      return f"missing field {field!r} (fields: {keys})"
    if not isinstance(row[field], str):
      return f"field {field!r} is a {type(row[field]).__name__}, not a string"
  return None


def jsonl_records(name: str) -> Iterator[tuple[int, Any, str | None]]:
  """(line number, parsed row or None, parse problem or None) per non-blank line."""
  with open(name, "rb") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line.decode("utf-8")), None
      except UnicodeDecodeError as e:
        yield lineno, None, f"invalid UTF-8 ({e.reason} at byte {e.start})"
      except json.JSONDecodeError as e:
        yield lineno, None, f"invalid JSON ({e.msg} at column {e.colno})"


def parquet_records(name: str) -> Iterator[tuple[int, Any, str | None]]:
  """(row number from 1, row dict, None) per parquet row (needs pyarrow)."""
  pq = require("pyarrow.parquet", PYARROW_INSTALL)
  table = pq.read_table(name)
  for i, row in enumerate(table.to_pylist(), start=1):
    yield i, row, None


def read_examples(name: str, records, where: str, prompt_field: str,
                  response_field: str, on_malformed: str,
                  stats: SourceStats) -> list[Example]:
  """The examples of one file; malformed records raise or are recorded.

  `where` is 'line' or 'row': how the error names a record's position.
  """
  out = []
  fields = (prompt_field, response_field)
  for pos, row, problem in records(name):
    problem = problem or record_problem(row, fields)
    if problem is None:
      meta = {k: v for k, v in row.items() if k not in fields}
      meta.update(file=name, **{where: pos})
      out.append(Example(row[prompt_field], row[response_field], meta))
      continue
    at = f"{name}:{pos}: {problem}"
    if on_malformed == "raise":
      raise MalformedRowError(
          f"malformed record at {at} (file {name}, {where} {pos}); fix it or "
          "set on_malformed='skip' to skip and count such records")
    stats.record_skip(at)
  return out


def _user_files(split: str, kind: str, records, where: str, *, path: str,
                eval_path: str | None, prompt_field: str, response_field: str,
                on_malformed: str, eval_fraction: float) -> Examples:
  """Shared body of `jsonl_examples` and `parquet_examples`."""
  documents.check_split(split)
  if on_malformed not in documents.ON_MALFORMED:
    raise ValueError(f"on_malformed must be one of {documents.ON_MALFORMED}, "
                     f"got {on_malformed!r}")
  stats = SourceStats()
  files = documents.split_files(split, path, eval_path)
  examples = []
  for name in files:
    examples.extend(read_examples(name, records, where, prompt_field,
                                  response_field, on_malformed, stats))
    stats.files.append(name)
  stats.rows = len(examples)
  if stats.skipped:
    logging.warning("skipped %d malformed %s record(s) in %s (first: %s)",
                    stats.skipped, kind, ", ".join(files),
                    "; ".join(stats.skipped_at))
  if not eval_path:
    examples = documents.hold_out(examples, split, eval_fraction)
  source = f"{kind} {path if not eval_path or split == 'train' else eval_path}"
  return Examples(examples, f"{source} ({split})", stats)


def jsonl_examples(split: str, *, path: str = "", eval_path: str | None = None,
                   prompt_field: str = "prompt", response_field: str = "response",
                   on_malformed: str = "raise",
                   eval_fraction: float = 0.05) -> Examples:
  """User jsonl files (a path or glob): one example per row.

  Each row must be an object with string fields `prompt_field` and
  `response_field`; its other fields go to `meta` (plus `file` and `line`).
  Invalid JSON / UTF-8, a non-object row, a missing or non-string field raise
  `MalformedRowError` naming file:line, or with `on_malformed='skip'` are
  skipped, counted in `stats.skipped` and logged. The eval split reads
  `eval_path` when given, else holds out the last `eval_fraction` of the rows.
  Data and license: the user's own.
  """
  return _user_files(split, "jsonl", jsonl_records, "line", path=path,
                     eval_path=eval_path, prompt_field=prompt_field,
                     response_field=response_field, on_malformed=on_malformed,
                     eval_fraction=eval_fraction)


def parquet_examples(split: str, *, path: str = "", eval_path: str | None = None,
                     prompt_field: str = "prompt",
                     response_field: str = "response", on_malformed: str = "raise",
                     eval_fraction: float = 0.05) -> Examples:
  """User parquet files (a path or glob): one example per row, as `jsonl_examples`.

  Needs `pyarrow` (`pip install pyarrow`; an ImportError says so). Problems
  name file and row number (1-based, in file order). Data and license: the
  user's own.
  """
  return _user_files(split, "parquet", parquet_records, "row", path=path,
                     eval_path=eval_path, prompt_field=prompt_field,
                     response_field=response_field, on_malformed=on_malformed,
                     eval_fraction=eval_fraction)
