"""notebooks/*.ipynb run top to bottom against the current code, in their small mode."""

import json
import os
import shutil

import jax
import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_quickstart_notebook_runs(monkeypatch):
  """Every code cell runs in order, unchanged; T_JAX_NOTEBOOK_SMALL=1 makes its training cell the tiny run."""
  nb = json.loads((REPO / "notebooks" / "quickstart.ipynb").read_text())
  monkeypatch.setenv("T_JAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.chdir(REPO / "notebooks")
  shutil.rmtree(REPO / "workdirs" / "quickstart_tiny", ignore_errors=True)  # a fresh run, not a finished one
  ns: dict = {}
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] == "code":
      exec(compile("".join(cell["source"]), f"quickstart.ipynb cell {i}", "exec"), ns)
  assert ns["ROOT"] == str(REPO) and ns["SMALL"]
  assert ns["logits"].shape == (1, 8, 512)
  assert ns["summary"]["step"] == 8 and os.path.isdir(os.path.join(ns["WORKDIR"], "checkpoints", "8"))
  assert isinstance(ns["text"], str)
  assert isinstance(ns["q"], jax.Array)
