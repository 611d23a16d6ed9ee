"""notebooks/quickstart.ipynb runs against the current code (its shell lines adapted to a test machine)."""

import json
import shlex
import subprocess
import sys

import jax

from tests.conftest import REPO


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  """Every code cell runs in order; the training cell runs the tiny variant of the same job."""
  nb = json.loads((REPO / "notebooks" / "quickstart.ipynb").read_text())
  workdir = str(tmp_path / "quickstart")
  monkeypatch.chdir(REPO)
  ns: dict = {}
  trained = False
  for cell in (c for c in nb["cells"] if c["cell_type"] == "code"):
    code = []
    for line in "".join(cell["source"]).replace("/content/quickstart", workdir).splitlines():
      if line.startswith(("%cd", "!pip")):  # Colab set-up; the test runs from the installed checkout
        continue
      if line.startswith("!python "):
        args = [a.replace("experiments/quickstart.gin", "experiments/quickstart_tiny.gin")
                for a in shlex.split(line[len("!python "):])]
        args.append("--gin_bindings=ModelConfig.max_len = 64")  # room for the notebook's 40 new tokens
        proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        trained = True
        continue
      code.append(line)
    exec(compile("\n".join(code), f"quickstart.ipynb cell {nb['cells'].index(cell)}", "exec"), ns)
  assert trained, "the notebook no longer runs launch.train"
  assert ns["logits"].shape == (1, 8, 512)
  assert ns["out"].shape[0] == 1 and isinstance(ns["tokenizer"].decode(list(ns["out"][0])), str)
  assert isinstance(ns["q"], jax.Array)
