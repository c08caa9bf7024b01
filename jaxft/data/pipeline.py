"""grain pipeline: pre-packed rows -> shuffle -> repeat -> process shard -> batch.

    it = make_pipeline(docs, tokenizer, batch_size=8, seq_len=128, seed=0,
                       vocab_size=2048)
    batch = next(it)              # dict of numpy arrays, (local_batch, seq_len)
    state = it.get_state()        # {'next_index': steps taken}: JSON-serialisable
    it2 = make_pipeline(...same args...); it2.set_state(state)   # exact resume

The rows (`jaxft.data.packing`) form an indexable `grain.MapDataset`, shuffled
with `seed` (grain reseeds each epoch, so every epoch has its own order) and,
with `repeat`, repeated forever. Row index `g` of the global stream belongs to
step `g // batch_size`; process `p` of `P` reads, at step `t`, exactly rows
`t * B + p * b ... t * B + p * b + b - 1` (b = B / P) through an index transform,
so its local batch is slice `[p*b:(p+1)*b]` of the global batch one process
would have made. The iterator state counts steps, so it resumes exactly, even
under a different process count.

Without `repeat`, the rows are padded with all-padding rows (loss_mask 0) up to a
multiple of `batch_size`: one pass yields every row once, in fixed-shape batches.
"""
from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from jaxft.data import packing as packing_lib
from jaxft.data import tokenizer as tok_lib


class _Rows:
  """Random-access source of row dicts over the packed arrays."""

  def __init__(self, arrays: dict):
    self._arrays = arrays
    self._len = len(arrays["tokens"])

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    return {k: a[index] for k, a in self._arrays.items()}


class ProcessShardMapDataset(grain.MapDataset):
  """Local index k -> global index (k // b) * B + p * b + k % b.

  With b = B / P rows per process, the local rows of step t are the p-th block
  of b rows of global step t. Lengths count whole global steps only.
  """

  def __init__(self, parent: grain.MapDataset, *, process_index: int,
               process_count: int, local_batch: int):
    super().__init__(parent)
    self._p, self._b = process_index, local_batch
    self._global = local_batch * process_count
    self._len = len(parent) // self._global * local_batch

  def __len__(self) -> int:
    return self._len

  def global_index(self, index: int) -> int:
    step, i = divmod(index, self._b)
    return step * self._global + self._p * self._b + i

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.global_index(index)]

  def __str__(self) -> str:
    return f"ProcessShardMapDataset(p={self._p}, b={self._b}, B={self._global})"


def _check_args(batch_size: int, seed: int, process_index: int,
                process_count: int) -> int:
  """Validates sharding arguments; returns the per-process batch."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index must be in [0, process_count); got {process_index} "
        f"of {process_count}")
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
        f"batch_size {batch_size} must be a positive multiple of the process "
        f"count {process_count}")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  return batch_size // process_count


def check_vocab(tokenizer, model_vocab_size: int) -> None:
  """ValueError if the tokenizer can emit ids the model has no embedding for."""
  n = tok_lib.vocab_size(tokenizer)
  if n > model_vocab_size:
    raise ValueError(
        f"tokenizer vocab size {n} is larger than the model's vocab_size "
        f"{model_vocab_size}: ids >= {model_vocab_size} would index past the "
        "embedding table; use a matching tokenizer or a larger vocab_size")


def make_dataset(arrays: dict, *, batch_size: int, seed: int, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1,
                 repeat: bool = True, pad_id: int = 0) -> grain.IterDataset:
  """The batched grain dataset over pre-packed row arrays."""
  local_batch = _check_args(batch_size, seed, process_index, process_count)
  if not repeat:
    arrays = packing_lib.pad_rows(arrays, batch_size, pad_id)
  ds = grain.MapDataset.source(_Rows(arrays))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  ds = ProcessShardMapDataset(ds, process_index=process_index,
                              process_count=process_count, local_batch=local_batch)
  ds = ds.batch(local_batch, drop_remainder=True)
  # Rows live in memory: read synchronously (threads only contend for the GIL).
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def make_pipeline(docs: Sequence[str] | packing_lib.PackedRows, tokenizer, *,
                  batch_size: int, seq_len: int, seed: int, vocab_size: int,
                  shuffle: bool = True, packing: bool = True,
                  process_index: int = 0, process_count: int = 1,
                  repeat: bool = True) -> grain.DatasetIterator:
  """A checkpointable iterator of batches (see module docstring).

  Args:
    docs: document strings, or rows already made by `packing.pack_documents`
      (to pack once and also log `data_stats`).
    tokenizer: a `tokenizers.Tokenizer`, a built-in name or a tokenizer.json path.
    batch_size: global batch; each process yields batch_size // process_count.
    seq_len: row length.
    seed: shuffle seed, in [0, 2**32).
    vocab_size: the model's vocabulary; a larger tokenizer is a ValueError.
    shuffle: shuffle rows (a new order each epoch).
    packing: pack several chunks per row; else one chunk per (padded) row.
    process_index, process_count: this process and how many share the batch.
    repeat: cycle forever; else one pass (last batch padded with empty rows).

  Yields dicts with `tokens`, `targets`, `segment_ids`, `positions` (int32) and
  `loss_mask` (float32), each of shape (batch_size // process_count, seq_len).
  """
  tokenizer = tok_lib.load_tokenizer(tokenizer)
  check_vocab(tokenizer, vocab_size)
  _check_args(batch_size, seed, process_index, process_count)
  if isinstance(docs, packing_lib.PackedRows):
    rows = docs
    if rows.arrays["tokens"].shape[1] != seq_len:
      raise ValueError(
          f"rows were packed for seq_len {rows.arrays['tokens'].shape[1]}, "
          f"not {seq_len}")
  else:
    rows = packing_lib.pack_documents(docs, tokenizer, seq_len=seq_len,
                                      packing=packing)
  ds = make_dataset(rows.arrays, batch_size=batch_size, seed=seed, shuffle=shuffle,
                    process_index=process_index, process_count=process_count,
                    repeat=repeat, pad_id=rows.pad_id)
  return iter(ds)


def check_batch(batch: dict, vocab_size: int) -> None:
  """ValueError naming the first id outside [0, vocab_size) in tokens/targets."""
  for key in ("tokens", "targets"):
    if key not in batch:
      continue
    ids = np.asarray(batch[key])
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
      where = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), ids.shape))
      at = (f"row {where[0]}, column {where[1]}" if len(where) == 2
            else f"index {where}")
      raise ValueError(
          f"out-of-vocabulary id {int(ids[where])} in batch[{key!r}] at {at}: "
          f"ids must be in [0, {vocab_size}) (vocab_size={vocab_size})")


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
  """Global steps to see every row once (the last batch padded if needed)."""
  return -(-num_rows // batch_size)

