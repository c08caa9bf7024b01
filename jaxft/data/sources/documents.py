"""Document sources: each returns the documents (strings) of a split.

Every loader has the form `loader(split, **options) -> Documents`, where `split`
is 'train' or 'eval' and `Documents` is a plain list of strings that also
carries a `stats` record (files read, rows kept, rows skipped and where).

  shakespeare       the complete works (downloaded once: `corpus.py`)
  tiny_shakespeare  a ~190 KB excerpt shipped in the package (no download)
  text              user plain-text files (a path or a glob)
  jsonl             user jsonl files, one document per row

Plain text is cut into documents at blank-line paragraph boundaries, merging
consecutive paragraphs greedily until a document reaches `doc_chars` characters
(`split_documents`). The pipeline later chunks long documents to the model's
sequence length, so `doc_chars` only sets the granularity of shuffling and of
the held-out split.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import re
from pathlib import Path
from typing import Sequence

from jaxft.data import corpus

SPLITS = ("train", "eval")
ON_MALFORMED = ("raise", "skip")
MAX_REPORTED = 5  # how many skipped-row locations a stats record keeps

ASSETS = Path(__file__).resolve().parents[1] / "assets"
SAMPLE_FILE = ASSETS / "shakespeare_sample.txt"
# The sample's works (in this order), all from the train split of `shakespeare`.
SAMPLE_WORKS = ("comedy_of_errors", "macbeth")
SAMPLE_EVAL_FRACTION = 0.1

_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")


class MalformedRowError(ValueError):
  """A jsonl row that is not an object with a string field; names file:line."""


@dataclasses.dataclass
class SourceStats:
  """What a loader read: for the run log, and so no row is dropped silently."""
  files: list[str] = dataclasses.field(default_factory=list)
  rows: int = 0  # rows / paragraphs-documents kept, before the split
  skipped: int = 0  # malformed rows skipped (on_malformed='skip')
  skipped_at: list[str] = dataclasses.field(default_factory=list)  # 'file:line: why'
  overlap: int = 0  # train items dropped because the same item is in eval

  def record_skip(self, where: str) -> None:
    self.skipped += 1
    if len(self.skipped_at) < MAX_REPORTED:
      self.skipped_at.append(where)


class Documents(list):
  """A list of document strings with the `stats` of the read that made it."""

  def __init__(self, docs: Sequence[str] = (), stats: SourceStats | None = None):
    super().__init__(docs)
    self.stats = stats if stats is not None else SourceStats()


# ----------------------------------------------------------------- splitting


def split_documents(text: str, doc_chars: int = 2000) -> list[str]:
  """Splits text at blank lines and merges paragraphs up to `doc_chars` chars.

  Paragraphs are joined with one blank line ("\\n\\n"); a document is closed as
  soon as it holds at least `doc_chars` characters, so only a single paragraph
  longer than that makes a longer-than-usual document. Line indentation is kept.
  """
  if doc_chars <= 0:
    raise ValueError(f"doc_chars must be positive, got {doc_chars}")
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  docs, current, size = [], [], 0
  for para in _BLANK_LINES.split(text):
    para = para.rstrip()
    if not para.strip():
      continue
    size += len(para) + (2 if current else 0)
    current.append(para)
    if size >= doc_chars:
      docs.append("\n\n".join(current))
      current, size = [], 0
  if current:
    docs.append("\n\n".join(current))
  return docs


def hold_out(docs: Sequence[str], split: str, fraction: float) -> list[str]:
  """The last `fraction` of `docs` (at least one) for 'eval', the rest for 'train'."""
  check_split(split)
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"eval_fraction must be in (0, 1), got {fraction}")
  if len(docs) < 2:
    raise ValueError(
        f"cannot hold out an eval split from {len(docs)} document(s); "
        "add data or pass a separate eval_path")
  n_eval = min(len(docs) - 1, max(1, round(len(docs) * fraction)))
  cut = len(docs) - n_eval
  return list(docs[cut:] if split == "eval" else docs[:cut])


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r} (valid: {', '.join(SPLITS)})")


def expand_paths(path: str) -> list[str]:
  """The files a path or glob names, sorted; FileNotFoundError if none."""
  if not path:
    raise ValueError("this source needs data.path (a file or a glob)")
  pattern = str(Path(path).expanduser())
  if glob.has_magic(pattern):
    files = sorted(f for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
  else:
    files = [pattern] if Path(pattern).is_file() else []
  if not files:
    raise FileNotFoundError(f"no files match {path!r}")
  return files


def split_files(split: str, path: str, eval_path: str | None) -> list[str]:
  """The files of a split: eval_path's for eval if given, else path's.

  Files that `eval_path` names are never train files, even if `path` matches
  them too (e.g. a glob over a folder holding the eval file).
  """
  if not eval_path:
    return expand_paths(path)
  eval_files = expand_paths(eval_path)
  if split == "eval":
    return eval_files
  held = {Path(f).resolve() for f in eval_files}
  files = [f for f in expand_paths(path) if Path(f).resolve() not in held]
  if not files:
    raise ValueError(f"every file of path {path!r} is an eval_path file")
  return files


# ----------------------------------------------------------------- loaders


def shakespeare(split: str, *, doc_chars: int = 2000) -> Documents:
  """The complete works of Shakespeare (modern Gutenberg edition, 42 works).

  eval = 'Julius Caesar' and 'The Tempest' (`corpus.EVAL_WORKS`); train = the
  other 35 plays and 5 poems, in file-name order. Downloads the corpus on first
  use (see `corpus.shakespeare_dir` for where it goes and which files count).
  """
  check_split(split)
  works = corpus.load_works()
  stats = SourceStats()
  docs = []
  for name, text in works.items():
    if (name in corpus.EVAL_WORKS) == (split == "eval"):
      docs.extend(split_documents(text, doc_chars))
      stats.files.append(name)
  stats.rows = len(docs)
  return Documents(docs, stats)


def tiny_shakespeare(split: str, *, doc_chars: int = 2000) -> Documents:
  """A shipped excerpt: 'The Comedy of Errors' then 'Macbeth' (~190 KB).

  Both works are in the train split of `shakespeare`. eval = the last 10% of
  the documents (the end of Macbeth); train = the rest. No download.
  """
  text = SAMPLE_FILE.read_text(encoding="utf-8")
  docs = split_documents(text, doc_chars)
  stats = SourceStats(files=[str(SAMPLE_FILE)], rows=len(docs))
  return Documents(hold_out(docs, split, SAMPLE_EVAL_FRACTION), stats)


def text(split: str, *, path: str = "", eval_path: str | None = None,
         doc_chars: int = 2000, eval_fraction: float = 0.05) -> Documents:
  """Plain-text (UTF-8) files matching `path`, split into paragraph documents.

  eval reads `eval_path` when given (train then keeps all of `path` except the
  eval files), otherwise holds out the last `eval_fraction` of the documents.
  """
  check_split(split)
  stats = SourceStats()
  files = split_files(split, path, eval_path)
  docs = []
  for name in files:
    docs.extend(split_documents(_read_text(name), doc_chars))
    stats.files.append(name)
  stats.rows = len(docs)
  if not eval_path:
    docs = hold_out(docs, split, eval_fraction)
  return Documents(docs, stats)


def jsonl(split: str, *, path: str = "", eval_path: str | None = None,
          text_field: str = "text", on_malformed: str = "raise",
          eval_fraction: float = 0.05) -> Documents:
  """One document per row of jsonl files: the string in `text_field`.

  A malformed row (invalid JSON or UTF-8, not an object, missing field, field
  not a string) raises `MalformedRowError` naming file, line and problem; with
  `on_malformed='skip'` it is skipped, counted in `stats.skipped` (first few
  locations in `stats.skipped_at`) and reported by a logging warning. Blank
  lines are not rows. The eval split works as in `text`.
  """
  check_split(split)
  if on_malformed not in ON_MALFORMED:
    raise ValueError(
        f"on_malformed must be one of {ON_MALFORMED}, got {on_malformed!r}")
  stats = SourceStats()
  files = split_files(split, path, eval_path)
  docs = []
  for name in files:
    docs.extend(read_jsonl(name, text_field, on_malformed, stats))
    stats.files.append(name)
  stats.rows = len(docs)
  if stats.skipped:
    logging.warning(
        "skipped %d malformed jsonl row(s) in %s (first: %s)", stats.skipped,
        ", ".join(files), "; ".join(stats.skipped_at))
  if not eval_path:
    docs = hold_out(docs, split, eval_fraction)
  return Documents(docs, stats)


# ----------------------------------------------------------------- file readers


def _read_text(name: str) -> str:
  try:
    return Path(name).read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{name}: not UTF-8 text ({e})") from None


def row_problem(line: bytes, text_field: str) -> tuple[str | None, str | None]:
  """(document, None) for a good jsonl line, (None, what is wrong) otherwise."""
  try:
    row = json.loads(line.decode("utf-8"))
  except UnicodeDecodeError as e:
    return None, f"invalid UTF-8 ({e.reason} at byte {e.start})"
  except json.JSONDecodeError as e:
    return None, f"invalid JSON ({e.msg} at column {e.colno})"
  if not isinstance(row, dict):
    return None, f"row is a JSON {type(row).__name__}, not an object"
  if text_field not in row:
    keys = ", ".join(sorted(row)) or "none"
    return None, f"missing field {text_field!r} (fields: {keys})"
  value = row[text_field]
  if not isinstance(value, str):
    return None, (f"field {text_field!r} is a JSON {type(value).__name__}, "
                  "not a string")
  return value, None


def read_jsonl(name: str, text_field: str, on_malformed: str,
               stats: SourceStats) -> list[str]:
  """The documents of one jsonl file; malformed rows raise or are recorded."""
  docs = []
  with open(name, "rb") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      doc, problem = row_problem(line, text_field)
      if problem is None:
        docs.append(doc)
        continue
      where = f"{name}:{lineno}: {problem}"
      if on_malformed == "raise":
        raise MalformedRowError(
            f"malformed jsonl row at {where} (file {name}, line {lineno}); "
            "fix it or set on_malformed='skip' to skip and count such rows")
      stats.record_skip(where)
  return docs
