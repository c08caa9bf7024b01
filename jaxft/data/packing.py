"""Tokenise documents and pack them into fixed rows (host-side numpy).

A document becomes `t = [bos] + ids + [eos]`; its next-token pairs are
`inputs = t[:-1]`, `targets = t[1:]`. Pair sequences longer than `seq_len` are
cut into chunks of at most `seq_len` pairs. With packing, chunks are placed by
best-fit decreasing (longest first; each into the fullest row that still has
room, the earliest such row on ties; else a new row): deterministic and dense.
Without packing, each chunk gets its own row, in document order.

Row fields, all shape (rows, seq_len):
  tokens, targets   int32, pad id where no chunk is
  segment_ids       int32, 1, 2, ... per chunk in the row, 0 for padding
  positions         int32, restarting at 0 at each chunk, 0 for padding
  loss_mask         float32, 1 on every real pair (or the pair's target mask,
                    see `pack`), 0 on padding

Every next-token pair of every document is in exactly one row cell, and no
target ever crosses a document boundary (each chunk's targets come from its own
document).
"""
from __future__ import annotations

import bisect
from typing import NamedTuple, Sequence

import numpy as np

from jaxft.data import tokenizer as tok_lib

FIELDS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


class PackedRows(NamedTuple):
  """Pre-packed rows plus the counts the run log wants."""
  arrays: dict  # field name -> np.ndarray (rows, seq_len)
  num_docs: int
  num_tokens: int  # tokens including bos/eos
  num_chunks: int
  pad_id: int
  report: dict | None = None  # source-specific counts (e.g. SFT truncations)

  @property
  def num_rows(self) -> int:
    return len(self.arrays["tokens"])


ENCODE_BATCH = 4096  # documents per parallel encode call (bounds memory)


def tokenize(docs: Sequence[str], tokenizer) -> list[np.ndarray]:
  """`[bos] + ids + [eos]` per document (int32), batch-encoded in parallel."""
  ids = tok_lib.special_ids(tokenizer)
  encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
  bos, eos = np.array([ids["bos"]], np.int32), np.array([ids["eos"]], np.int32)
  out = []
  for i in range(0, len(docs), ENCODE_BATCH):
    encodings = encode(list(docs[i:i + ENCODE_BATCH]), add_special_tokens=False)
    out.extend(np.concatenate([bos, np.asarray(e.ids, np.int32), eos])
               for e in encodings)
  return out


def chunk_spans(lengths: np.ndarray, seq_len: int):
  """(doc index, first pair, pair count) of each chunk, in document order.

  A document of n tokens has n - 1 next-token pairs.
  """
  pairs = lengths - 1
  per_doc = -(-pairs // seq_len)
  doc = np.repeat(np.arange(len(lengths)), per_doc)
  first_chunk = np.cumsum(per_doc) - per_doc
  k = np.arange(len(doc)) - np.repeat(first_chunk, per_doc)
  start = k * seq_len
  return doc, start, np.minimum(seq_len, pairs[doc] - start)


def best_fit(sizes: np.ndarray, seq_len: int):
  """(row, column, segment id) per chunk under best-fit decreasing; + row count."""
  order = sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i))
  row, col, seg = (np.zeros(len(sizes), np.int64) for _ in range(3))
  free = []  # sorted (room left, row id) of rows with room
  used = []  # per row: (columns used, chunks placed)
  for i in order:
    size = int(sizes[i])
    j = bisect.bisect_left(free, (size, -1))
    if j < len(free):
      _, r = free.pop(j)
    else:
      r = len(used)
      used.append((0, 0))
    filled, count = used[r]
    row[i], col[i], seg[i] = r, filled, count + 1
    used[r] = (filled + size, count + 1)
    if filled + size < seq_len:
      bisect.insort(free, (seq_len - filled - size, r))
  return row, col, seg, len(used)


def pack(docs_tokens: Sequence[np.ndarray], seq_len: int, pad_id: int,
         packing: bool = True,
         target_masks: Sequence[np.ndarray] | None = None) -> dict:
  """The row arrays (see module docstring) for tokenised documents.

  `target_masks` (one per document, as long as its tokens) weights the pair
  predicting token i by `mask[i]`, e.g. 0 on prompt tokens for SFT; by default
  every pair has loss_mask 1. Padding is always 0.
  """
  if seq_len <= 0:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  lengths = np.array([len(t) for t in docs_tokens], np.int64)
  if len(lengths) == 0 or (lengths < 2).any():
    raise ValueError("need documents of at least 2 tokens ([bos] ... [eos])")
  flat = np.concatenate(docs_tokens).astype(np.int32)
  doc, start, size = chunk_spans(lengths, seq_len)
  if packing:
    row, col, seg, num_rows = best_fit(size, seq_len)
  else:
    num_rows = len(size)
    row, col, seg = np.arange(num_rows), np.zeros(num_rows, np.int64), np.ones(num_rows, np.int64)
  src = (np.cumsum(lengths) - lengths)[doc] + start  # flat index of first input
  rep = np.repeat(np.arange(len(size)), size)
  within = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
  dst = row[rep] * seq_len + col[rep] + within
  out = {k: np.zeros((num_rows, seq_len), np.int32) for k in FIELDS[:4]}
  out["tokens"].fill(pad_id)
  out["targets"].fill(pad_id)
  out["loss_mask"] = np.zeros((num_rows, seq_len), np.float32)
  out["tokens"].flat[dst] = flat[src[rep] + within]
  out["targets"].flat[dst] = flat[src[rep] + within + 1]
  out["segment_ids"].flat[dst] = seg[rep]
  out["positions"].flat[dst] = within
  if target_masks is None:
    out["loss_mask"].flat[dst] = 1.0
  else:
    masks = np.concatenate(target_masks).astype(np.float32)
    if len(masks) != len(flat):
      raise ValueError("target_masks must match the documents' token counts")
    out["loss_mask"].flat[dst] = masks[src[rep] + within + 1]
  return out


def pad_rows(arrays: dict, multiple: int, pad_id: int) -> dict:
  """Appends all-padding rows (loss_mask 0) up to a multiple of `multiple` rows."""
  extra = -len(arrays["tokens"]) % multiple
  if extra == 0:
    return arrays
  out = {}
  for k, a in arrays.items():
    fill = pad_id if k in ("tokens", "targets") else 0
    out[k] = np.concatenate([a, np.full((extra,) + a.shape[1:], fill, a.dtype)])
  return out


def pack_documents(docs: Sequence[str], tokenizer, *, seq_len: int,
                   packing: bool = True) -> PackedRows:
  """Tokenises and packs `docs` (see module docstring)."""
  tokenizer = tok_lib.load_tokenizer(tokenizer)
  if not len(docs):
    raise ValueError("no documents to pack")
  docs_tokens = tokenize(docs, tokenizer)
  pad_id = tok_lib.special_ids(tokenizer)["pad"]
  arrays = pack(docs_tokens, seq_len, pad_id, packing)
  lengths = [len(t) for t in docs_tokens]
  chunks = int(sum(-(-(n - 1) // seq_len) for n in lengths))
  return PackedRows(arrays, len(docs), int(sum(lengths)), chunks, pad_id)


def data_stats(rows: PackedRows | Sequence[str], tokenizer=None, *,
               seq_len: int | None = None, packing: bool = True) -> dict:
  """Counts for the run log: docs, tokens, target tokens, chunks, rows, fill.

  Takes packed rows, or documents plus `tokenizer` and `seq_len` (packs them).
  """
  if not isinstance(rows, PackedRows):
    if tokenizer is None or seq_len is None:
      raise ValueError("data_stats of documents needs tokenizer= and seq_len=")
    rows = pack_documents(rows, tokenizer, seq_len=seq_len, packing=packing)
  targets = int(rows.arrays["loss_mask"].sum())
  cells = rows.arrays["loss_mask"].size
  return {
      "docs": rows.num_docs,
      "tokens": rows.num_tokens,
      "target_tokens": targets,
      "chunks": rows.num_chunks,
      "rows": rows.num_rows,
      "fill": targets / cells if cells else 0.0,
  }
