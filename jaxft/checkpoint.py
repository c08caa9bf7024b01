"""Checkpointing of a training run: state, data-iterator state and config.

`Checkpointer` wraps an orbax `CheckpointManager` whose steps each hold three
items: `state` (a pytree of arrays, saved with `StandardSave`), `data_state` and
`config` (JSON). On top of orbax it adds a *manifest*, so that a damaged
checkpoint is detected before it is used rather than restored as garbage.

Manifest. Once orbax has finalised step `s` (its tmp-dir-then-rename
convention already hides unfinished saves), process 0 writes
`<dir>/<s>/jaxft_manifest.json`: `{"format", "step", "files": [{"path", "size",
"crc32"}]}` listing every file of the step directory (path relative to it). The
manifest is written to a temporary name and renamed, so it is present only if
complete. `restore_latest` verifies it first (every file present, same size,
same zlib.crc32); a step without a manifest (a crash between the orbax save and
the manifest) counts as incomplete.

Synchronous saving. Saves use `enable_async_checkpointing=False`: `save`
returns once the bytes are final, so the manifest can describe them at once and
a listed step always carries its manifest. With async saves the manifest could
only be written after a later `wait_until_finished`, leaving a window in which a
complete checkpoint looks incomplete; the cost of the simple choice is that the
train loop blocks while the checkpoint is written.

Several processes (`jax.process_count() > 1`, a shared file system). Every
process calls every method in the same order. Process 0 alone lists steps,
writes and verifies manifests (reading the whole checkpoint once); its decisions
reach the others through the `jax.distributed` key-value store, and the outcome
of each orbax restore is gathered from all processes the same way, so all
processes restore the same step or raise the same error. Every wait in this
module has a timeout (`_TIMEOUT_MS`), so a process that died raises an error in
the others instead of hanging them. (Orbax's own barriers inside one save or
restore are orbax's; they are reached symmetrically because the files were
verified first.)
"""
import collections
import json
import logging
import os
import zlib

import jax
import orbax.checkpoint as ocp
from etils import epath

MANIFEST = "jaxft_manifest.json"
_FORMAT = 1
_CHUNK = 1 << 22
_TIMEOUT_MS = 60 * 60 * 1000
_ITEMS = ("state", "data_state", "config")
_OPENED = collections.Counter()  # per directory: lets processes build matching store keys

log = logging.getLogger(__name__)


class CheckpointCorruptError(RuntimeError):
  """Checkpoints exist but none of them could be restored."""


def _crc32(path: epath.Path) -> int:
  """zlib.crc32 of a file, read in chunks."""
  crc = 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _walk(directory: epath.Path):
  """Every file below `directory` (epath has no recursive glob on all back-ends)."""
  for path in directory.iterdir():
    if path.is_dir():
      yield from _walk(path)
    else:
      yield path


def _data_files(step_dir: epath.Path) -> list[str]:
  """Relative paths of the files in a step directory, manifest excluded."""
  names = (p.relative_to(step_dir).as_posix() for p in _walk(step_dir))
  return sorted(n for n in names if not n.startswith(MANIFEST))


def build_manifest(step_dir, step: int) -> dict:
  """Describes every file of `step_dir`: relative path, size and crc32."""
  step_dir = epath.Path(step_dir)
  files = []
  for name in _data_files(step_dir):
    path = step_dir / name
    files.append({"path": name, "size": path.stat().length, "crc32": _crc32(path)})
  return {"format": _FORMAT, "step": step, "files": files}


def write_manifest(step_dir, step: int) -> None:
  """Writes the manifest of `step_dir` atomically (temporary file, then rename)."""
  step_dir = epath.Path(step_dir)
  tmp = step_dir / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps(build_manifest(step_dir, step), indent=1))
  tmp.replace(step_dir / MANIFEST)


def verify_manifest(step_dir, step: int) -> str | None:
  """Returns why `step_dir` is not a complete checkpoint of `step`, or None if it is."""
  step_dir = epath.Path(step_dir)
  path = step_dir / MANIFEST
  if not path.exists():
    return f"no {MANIFEST} (the save did not finish)"
  try:
    manifest = json.loads(path.read_text())
    files, saved_step = manifest["files"], manifest["step"]
  except (ValueError, KeyError, TypeError) as e:
    return f"unreadable {MANIFEST}: {e!r}"
  if saved_step != step:
    return f"{MANIFEST} is for step {saved_step}"
  for entry in files:
    file = step_dir / entry["path"]
    if not file.exists():
      return f"missing file {entry['path']}"
    size = file.stat().length
    if size != entry["size"]:
      return f"{entry['path']} has {size} bytes, expected {entry['size']} (truncated?)"
    if _crc32(file) != entry["crc32"]:
      return f"{entry['path']} fails its crc32 check (corrupt bytes)"
  return None


def _describe(e: BaseException) -> str:
  """A one-line description of an exception."""
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class Checkpointer:
  """Saves and restores a training run in `directory` (orbax CheckpointManager).

  Keeps the last `keep` steps. See the module docstring for the manifest, the
  synchronous-save choice and the multi-process protocol.
  """

  def __init__(self, directory: str, *, keep: int = 3):
    local = "://" not in str(directory)  # orbax needs absolute local paths
    self.directory = epath.Path(os.path.abspath(directory) if local else directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
    key = str(directory)  # as given: every process passes the same string
    _OPENED[key] += 1
    self._key_prefix = f"jaxft_ckpt/{key}/{_OPENED[key]}"
    self._ops = 0

  # -- agreement between processes ------------------------------------------
  def _store_key(self) -> str:
    self._ops += 1
    return f"{self._key_prefix}/{self._ops}"

  def _share(self, value):
    """Process 0's `value` (JSON-able), on every process."""
    if jax.process_count() == 1:
      return value
    client, key = ocp.multihost.get_jax_distributed_client(), self._store_key()
    if jax.process_index() == 0:
      client.key_value_set(key, json.dumps(value))
    return json.loads(client.blocking_key_value_get(key, _TIMEOUT_MS))

  def _first_error(self, error: str | None) -> str | None:
    """The first process's error (with its index), on every process; None if none failed."""
    if jax.process_count() == 1:
      return error
    client, key = ocp.multihost.get_jax_distributed_client(), self._store_key()
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(error))
    for i in range(jax.process_count()):
      other = json.loads(client.blocking_key_value_get(f"{key}/{i}", _TIMEOUT_MS))
      if other is not None:
        return f"process {i}: {other}"
    return None

  # -- steps ----------------------------------------------------------------
  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def steps(self) -> list[int]:
    """Steps present on disk (finalised by orbax; not necessarily valid), ascending."""
    self._mngr.reload()
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    """The newest step present on disk, or None."""
    steps = self.steps()
    return steps[-1] if steps else None

  def _drop_from(self, step: int) -> None:
    """Deletes steps >= `step`: left by a run that was resumed from an earlier step."""
    stale = self._share([s for s in self.steps() if s >= step])
    if stale:
      log.warning("Checkpointer: deleting steps %s before saving step %d", stale, step)
    error = None
    if jax.process_index() == 0:
      try:
        for s in stale:
          self._step_dir(s).rmtree()
      except Exception as e:  # pylint: disable=broad-except
        error = _describe(e)
    if (error := self._share(error)) is not None:
      raise RuntimeError(f"could not delete stale checkpoints {stale}: {error}")
    self._mngr.reload()

  # -- save / restore -------------------------------------------------------
  def save(self, step: int, state, *, data_state: dict, config: dict) -> None:
    """Saves `state`, `data_state` and `config` as `step`, then its manifest.

    Every process calls this. Any existing step >= `step` is deleted first.
    """
    self._drop_from(step)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_state=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config),
    )
    self._mngr.save(step, args=args, force=True)
    self._mngr.wait_until_finished()
    error = None
    if jax.process_index() == 0:
      try:
        write_manifest(self._step_dir(step), step)
      except Exception as e:  # pylint: disable=broad-except
        error = _describe(e)
    if (error := self._share(error)) is not None:
      raise RuntimeError(f"checkpoint {step}: writing {MANIFEST} failed: {error}")

  def _restore_step(self, step: int, abstract_state):
    """Restores `step` (files already verified): (restored or None, error or None)."""
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_state=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore(),
    )
    try:
      restored, error = self._mngr.restore(step, args=args), None
    except Exception as e:  # pylint: disable=broad-except
      restored, error = None, f"orbax restore failed: {_describe(e)}"
    return restored, self._first_error(error)

  def restore_latest(self, abstract_state):
    """Restores the newest valid checkpoint onto `abstract_state`'s structure and shardings.

    Returns (step, state, data_state, config), or None if there is no checkpoint.
    A step that fails verification or restore is logged and skipped for the
    previous one; if every step fails, raises CheckpointCorruptError.
    """
    steps = self._share(sorted(self.steps(), reverse=True))
    tried = []
    for step in steps:
      reason = None
      if jax.process_index() == 0:
        reason = verify_manifest(self._step_dir(step), step)
      if (reason := self._share(reason)) is None:
        restored, reason = self._restore_step(step, abstract_state)
        if reason is None:
          return step, restored.state, restored.data_state, restored.config
      log.warning("Checkpointer: skipping checkpoint step %d in %s: %s", step, self.directory, reason)
      tried.append(f"step {step}: {reason}")
    if not tried:
      return None
    raise CheckpointCorruptError(
        f"no valid checkpoint in {self.directory}; tried:\n  " + "\n  ".join(tried))

  def wait(self) -> None:
    """Blocks until any pending save has finished (saves are synchronous: a no-op)."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    """Releases the orbax manager."""
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
