"""The notebooks in colab/ run top to bottom (code cells executed in order, one namespace)."""
import glob
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  cells = json.load(open(path))["cells"]
  namespace = {"__name__": "__notebook__"}
  for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
    source = "".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%")))
    exec(compile(source, f"{os.path.basename(path)}[cell {i}]", "exec"), namespace)


def test_there_is_a_notebook():
  assert NOTEBOOKS
