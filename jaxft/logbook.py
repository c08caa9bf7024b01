"""Run output: `metrics.jsonl` (one JSON object per logged step), a progress bar, log lines.

The file is flushed every line, so a crash loses nothing that was logged. On
resume, lines past the restored step are dropped first, so the file always reads
as one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from typing import Any, Mapping

import tqdm


def _clean(value: Any) -> Any:
  """JSON-safe scalars: numpy -> python, NaN/Inf -> None (strict JSON has no NaN)."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def read_metrics(path: str) -> list[dict]:
  """All records of a metrics.jsonl file."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Logbook:
  """Writes metric records (process 0 only) and drives the progress bar."""

  def __init__(self, workdir: str, *, total_steps: int, start_step: int, enabled: bool = True,
               progress: bool | None = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = None
    self._bar = None
    if not enabled:
      return
    self._truncate_after(start_step)
    self._file = open(self.path, "a")
    interactive = sys.stderr.isatty() if progress is None else progress
    if interactive:
      sized = shutil.get_terminal_size((0, 0)).columns > 0  # a pty may report width 0
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=sized, ncols=None if sized else 100, file=sys.stderr)

  def _truncate_after(self, step: int) -> None:
    """Drops records of steps beyond `step` (written before a crash, redone after resume)."""
    records = read_metrics(self.path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(tmp, self.path)

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: _clean(v) for k, v in record.items()}
    self._file.write(json.dumps(clean) + "\n")
    self._file.flush()

  def message(self, text: str) -> None:
    """A human-readable line (above the bar when there is one)."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
      self._bar.refresh()

  @property
  def interactive(self) -> bool:
    return self._bar is not None

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._file is not None:
      self._file.close()
