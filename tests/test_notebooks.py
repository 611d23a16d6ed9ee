"""notebooks/*.ipynb run top to bottom against the current code, in their small mode, in the fast tier (CI)."""

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.conftest import REPO


def run_notebook(monkeypatch, name: str, fresh: str = "") -> dict:
  """Executes every code cell of notebooks/NAME.ipynb in order, unchanged, in small mode (T_JAX_NOTEBOOK_SMALL=1,
  matplotlib's Agg backend), after removing workdirs/FRESH; returns the notebook's namespace."""
  import matplotlib.pyplot as plt
  nb = json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())
  monkeypatch.setenv("T_JAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.chdir(REPO / "notebooks")
  if fresh:
    shutil.rmtree(REPO / "workdirs" / fresh, ignore_errors=True)  # a fresh run, not a finished one
  ns: dict = {}
  try:
    for i, cell in enumerate(nb["cells"]):
      if cell["cell_type"] == "code":
        exec(compile("".join(cell["source"]), f"{name}.ipynb cell {i}", "exec"), ns)
  finally:
    plt.close("all")
  assert ns["ROOT"] == str(REPO) and ns["SMALL"]
  return ns


def test_quickstart_notebook_runs(monkeypatch):
  """01_quickstart: every code cell runs in order, unchanged; small mode makes its training cell the tiny run."""
  ns = run_notebook(monkeypatch, "01_quickstart", fresh="quickstart_tiny")
  assert ns["logits"].shape == (1, 8, 512)
  assert ns["summary"]["step"] == 8 and os.path.isdir(os.path.join(ns["WORKDIR"], "checkpoints", "8"))
  assert isinstance(ns["text"], str)
  assert isinstance(ns["q"], jax.Array)


def test_anatomy_notebook_runs(monkeypatch):
  """02_anatomy: the masks it draws, per-head attention maps that are the trained model's own, and samples."""
  ns = run_notebook(monkeypatch, "02_anatomy", fresh="anatomy_tiny")
  dense, n = ns["dense"], 16
  assert (dense["causal"] == np.tril(np.ones((n, n), bool))).all()
  assert dense["prefix-LM (prefix 6)"][0, :6].all() and not dense["prefix-LM (prefix 6)"][0, 6:].any()
  packed = dense["packed (3 segments)"]
  assert packed[7, 6] and not packed[7, 5] and not packed[15, 12]  # segments 1 | 2 | 3 start at 0, 6, 13
  assert dense["sliding window 4"].sum(1).max() == 4
  maps = np.asarray(ns["maps"])
  assert maps.shape[:2] == (2, 4) and maps.shape[2] == maps.shape[3] == ns["ids"].shape[1]
  np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)  # every row a distribution
  assert np.abs(np.triu(maps, k=1)).max() == 0  # causal: no weight on future tokens
  assert ns["recon_err"] < 1e-4  # the maps rebuild the layers' outputs: they are the model's attention
  assert os.path.isdir(os.path.join(ns["WORKDIR"], "checkpoints", "8"))
  assert len(ns["samples"]) == len(ns["settings"]) and all(len(s) == 2 and all(isinstance(t, str) for t in s)
                                         for s in ns["samples"].values())


def test_kernels_notebook_runs(monkeypatch, capsys):
  """03_kernels: the Pallas kernel matches the XLA reference under every mask, its compiled memory grows linearly
  where the reference's grows quadratically, and a timing row per length; on CPU it says it ran interpreted."""
  ns = run_notebook(monkeypatch, "03_kernels")
  if jax.default_backend() == "cpu":
    assert ns["INTERPRET"] and "interpret mode" in capsys.readouterr().out
  errors = ns["errors"]
  assert set(errors) == {"no mask", "causal", "prefix-LM", "packed segments", "sliding window", "GQA (H/4 kv heads)"}
  assert all(out_err < 1e-5 for out_err, _ in errors.values()), errors
  assert errors["causal"][1] < 1e-4, errors  # gradients of q, k and v
  ref, ker, lengths = ns["memory"]["reference"], ns["memory"]["kernel"], ns["lengths"]
  growth = lengths[-1] / lengths[0]
  assert ker[-1] < ref[-1] and ref[-1] / ref[0] > 0.7 * growth ** 2 and ker[-1] / ker[0] < 1.5 * growth
  assert [t[0] for t in ns["timings"]] == lengths and all(ms > 0 for t in ns["timings"] for ms in t[1:])


def test_ablations_notebook_runs(monkeypatch):
  """04_ablations: a real two-variant sweep (4 vs 1 key-value heads) whose results table the notebook reads."""
  ns = run_notebook(monkeypatch, "04_ablations", fresh="sweep_kv_heads_tiny")
  rows = {row["name"]: row for row in ns["results"]}
  assert list(rows) == ["num_kv_heads=4", "num_kv_heads=1"]
  assert all(row["status"] == "finished" and row["steps"] == "2" for row in rows.values())
  assert int(rows["num_kv_heads=1"]["params"]) < int(rows["num_kv_heads=4"]["params"])  # smaller K/V projections
  assert all(float(row["eval_perplexity"]) > 1 for row in rows.values())
  assert (Path(ns["SWEEP_DIR"]) / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_translate_notebook_runs(monkeypatch, shared_dir):
  """05_translate: trains the tiny Multi30k run, translates the typed sentences with beam search and draws the
  cross-attention of the first translation (rows: distributions over the source)."""
  if not (shared_dir / "data" / "multi30k" / "train.en.gz").is_file():
    pytest.skip(f"{shared_dir / 'data' / 'multi30k'} has no Multi30k (train.en.gz)")
  ns = run_notebook(monkeypatch, "05_translate", fresh="translate_tiny")
  assert ns["READY"] and os.path.isdir(os.path.join(ns["WORKDIR"], "checkpoints"))
  translations = ns["translations"]
  assert len(translations) == len(ns["SENTENCES"]) and all(isinstance(t, str) for t in translations)
  alignment = np.asarray(ns["alignment"])
  assert alignment.shape == (len(ns["tgt"]) + 1, len(ns["src"]))
  np.testing.assert_allclose(alignment.sum(-1), 1.0, atol=1e-5)
