"""launch/eval_lengths.py: perplexity at multiples of the training length (Press et al. 2022)."""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy.special import log_softmax

from launch import eval_lengths
from t_jax.models import ModelConfig, build_model, init_params
from tests.conftest import REPO


def test_perplexity_is_the_mean_loss_over_non_overlapping_windows():
  cfg = ModelConfig(architecture="decoder", vocab_size=50, d_model=16, num_heads=2, mlp_dim=32, num_layers=1,
                    position="alibi", max_len=8)
  model = build_model(cfg)
  params = init_params(model, jax.random.key(0))
  stream = np.random.RandomState(0).randint(0, 50, 40).astype(np.int32)  # 4 windows of 9, 4 tokens left over
  got = eval_lengths.perplexity(model, params, stream, 8, batch_size=3)  # batches of 3 and 1 windows
  losses = []
  for w in stream[:36].reshape(4, 9):  # each window alone, log-softmax in numpy
    logp = log_softmax(np.asarray(model.apply({"params": params}, w[None, :-1]), np.float64)[0], axis=-1)
    losses += list(-logp[np.arange(8), w[1:]])
  assert got == pytest.approx(math.exp(np.mean(losses)), rel=1e-5)
  with pytest.raises(eval_lengths.UsageError, match="shorter than one window"):
    eval_lengths.perplexity(model, params, stream[:5], 8, batch_size=1)


def test_bad_input_is_one_error_line(tmp_path, capsys):
  assert eval_lengths.main([f"--sweep_dir={tmp_path}"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith("error: give --workdir or --sweep_dir"), err
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.gin").write_text("ModelConfig.architecture = 'encoder'\n")
  assert eval_lengths.main([f"--workdir={tmp_path / 'run'}"]) == 2
  assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.slow
def test_a_sweep_dir_gets_a_table_and_a_plot(tmp_path):
  """Two tiny runs (ALiBi, learned positions) evaluated at 1x-4x: learned positions stop at max_len."""
  for position in ("alibi", "learned"):
    run = subprocess.run([sys.executable, "-m", "launch.train", "--gin_file=experiments/quickstart_tiny.gin",
                          f"--gin_bindings=ModelConfig.position='{position}'", "--gin_bindings=TrainConfig.num_steps=2",
                          f"--workdir={tmp_path / position}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
  out = subprocess.run([sys.executable, "-m", "launch.eval_lengths", f"--sweep_dir={tmp_path}", "--factors=1,2,4",
                        "--max_tokens=2048"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = {r["position"]: r for r in json.loads((tmp_path / "length_extrapolation.json").read_text())}
  alibi, learned = rows["alibi"]["perplexity"], rows["learned"]["perplexity"]
  assert list(alibi) == ["32", "64", "128"] and all(1 < v < 512 for v in alibi.values())  # vocab 512
  assert learned["32"] > 1 and learned["64"] is None and learned["128"] is None
  assert "| learned | learned |" in (tmp_path / "length_extrapolation.md").read_text()
  assert (tmp_path / "length_extrapolation.png").read_bytes()[:4] == b"\x89PNG"
