"""setup.cfg lists every package (it maps configs/ and kernels/ to collision-free names)."""
import configparser
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAPPED = {"jaxft": "jaxft", "configs": "jaxft_configs", "kernels": "jaxft_kernels"}


def test_every_package_is_listed():
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, "setup.cfg"))
  listed = set(cfg["options"]["packages"].split())
  found = set()
  for folder, name in MAPPED.items():
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
      if "__init__.py" in files:
        rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
        found.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
  assert found == listed, (found - listed, listed - found)


def test_console_script_and_import_names():
  import jaxft_configs  # noqa: F401  (top-level configs/ under its installed name)
  import jaxft_kernels  # noqa: F401
  from jaxft import cli
  assert callable(cli.main)
