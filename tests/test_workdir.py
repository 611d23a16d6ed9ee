"""The workdir contract: one live run (lock), finished runs, refused resumes, torn metrics, config reading."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from t_jax import workdir as wd
from t_jax.models import ModelConfig
from t_jax.training.metrics import MetricWriter
from tests.conftest import REPO


def _cli(workdir, *bindings, extra=()):
  args = [sys.executable, "-m", "launch.train", "--gin_file=experiments/quickstart_tiny.gin",
          f"--workdir={workdir}", "--gin_bindings=TrainConfig.num_samples = 0",
          *(f"--gin_bindings={b}" for b in bindings), *extra]
  p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
  return p.returncode, p.stdout + p.stderr


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


@pytest.mark.slow
def test_finished_run_refused_resume_and_plain_progress_lines(tmp_path):
  run = tmp_path / "run"
  rc, out = _cli(run)
  assert rc == 0, out[-2000:]
  assert "step 2/8: loss" in out and "eta" in out  # not a terminal: one line per log step
  assert "batch 8 rows (packed), 256 token slots" in out
  rows, config = (run / "metrics.jsonl").read_text(), (run / "config.gin").read_text()

  rc, out = _cli(run)  # a finished run says so, exits 0 and changes nothing
  assert rc == 0 and "already finished at step 8" in out
  assert (run / "metrics.jsonl").read_text() == rows

  rc, out = _cli(run, "ModelConfig.d_model = 48")  # refused: nothing in the workdir may change
  assert rc == 2 and out.count("error:") == 1 and "Traceback" not in out and "does not match" in out
  assert (run / "config.gin").read_text() == config and not list(run.glob("config.gin.*"))
  assert not (run / "run.lock").exists()


def test_a_live_lock_is_refused_and_a_stale_one_taken_over(tmp_path, capsys):
  lock = tmp_path / "run.lock"
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"}))
  with pytest.raises(ValueError, match=f"in use by pid {os.getpid()}"), wd.lock(tmp_path):
    pass
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": "then"}))
  with wd.lock(tmp_path):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert "taking over the stale lock" in capsys.readouterr().err and not lock.exists()


def test_a_lock_from_another_host_needs_force(tmp_path, capsys):
  lock = tmp_path / "run.lock"
  lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
  with pytest.raises(ValueError, match="--force_unlock"), wd.lock(tmp_path):
    pass
  with wd.lock(tmp_path, force=True):
    assert json.loads(lock.read_text())["host"] == socket.gethostname()
  assert "breaking the lock" in capsys.readouterr().err


def test_cli_refuses_a_live_workdir(tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
  rc, out = _cli(tmp_path / "run")
  assert rc == 2 and "in use by pid" in out and "Traceback" not in out
  assert sorted(os.listdir(tmp_path / "run")) == ["run.lock"]


def test_a_torn_last_metrics_line_is_dropped_and_a_torn_middle_line_named(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.9}\n{"step": 6, "lo')
  MetricWriter(str(tmp_path), start_step=6).close()
  assert path.read_text() == '{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.9}\n'
  assert "torn last line" in capsys.readouterr().out
  path.write_text('{"step": 2, "lo\n{"step": 4, "loss": 0.9}\n')
  with pytest.raises(ValueError, match="metrics.jsonl:1"):
    MetricWriter(str(tmp_path), start_step=6)


def test_config_reader_takes_literal_model_and_task_lines(tmp_path):
  cfg = ModelConfig(d_model=48, num_heads=3, num_kv_heads=1, dtype="bfloat16")
  (tmp_path / "config.gin").write_text(
      wd.config_to_gin(cfg) + "TaskConfig.objective = @CausalLM()  # not a literal: skipped\n"
      "TaskConfig.num_extra_ids = 7\n")
  read, task = wd.read_config(tmp_path)
  assert read == cfg and read.head_dim == 16 and task == {"num_extra_ids": 7}
  (tmp_path / "config.gin").write_text("ModelConfig.d_modle = 3\n")
  with pytest.raises(ValueError, match="unknown ModelConfig field 'd_modle'"):
    wd.read_config(tmp_path)


def test_model_config_resolves_head_dim_and_kv_heads_once():
  cfg = ModelConfig(d_model=64, num_heads=4)
  assert (cfg.head_dim, cfg.num_kv_heads) == (16, 4)
  assert cfg.replace(d_model=128).head_dim == 32  # derived values are derived again
  assert cfg.replace(num_heads=8).num_kv_heads == 8
  explicit = ModelConfig(d_model=64, num_heads=4, head_dim=8, num_kv_heads=2)
  assert explicit.replace(d_model=128).head_dim == 8 and explicit.replace(num_heads=8).num_kv_heads == 2


def _train(workdir, *bindings, **kwargs):
  from launch import config
  from t_jax.training import train
  config.parse(["experiments/quickstart_tiny.gin"], ["TrainConfig.num_samples = 0", *bindings])
  return train(str(workdir), config.experiment(), **kwargs)


def _corrupt(step_dir, how):
  if how == "truncated array":
    biggest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 3])
  elif how == "missing _METADATA":
    for p in step_dir.rglob("_METADATA"):
      p.unlink()
  else:  # empty step directory
    shutil.rmtree(step_dir)
    step_dir.mkdir()


@pytest.mark.slow
def test_an_unreadable_latest_checkpoint_is_moved_aside_and_the_previous_one_restored(tmp_path, capsys):
  import t_jax
  base = tmp_path / "base"
  _train(base)
  for how in ("truncated array", "missing _METADATA", "empty step directory"):
    run = tmp_path / how.replace(" ", "_")
    shutil.copytree(base, run)
    _corrupt(run / "checkpoints" / "8", how)
    assert t_jax.load(str(run)).cfg.d_model == 32  # load falls back to step 4 (and says so)
    assert "checkpoints/8 cannot be read" in capsys.readouterr().err
    out = _train(run)
    assert out["step"] == 8, how
    log = capsys.readouterr().out
    assert "resuming from step 4" in log and "moved the unreadable step 8" in log, (how, log)
    assert (run / "checkpoints_broken" / "8").is_dir()  # kept, never deleted
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [4, 8]


@pytest.mark.slow
def test_resume_refuses_a_change_of_meaning_but_allows_schedule_changes(tmp_path):
  run = tmp_path / "run"
  _train(run)
  with pytest.raises(ValueError, match=r"ModelConfig.activation: 'gelu' -> 'relu'"):
    _train(run, "TrainConfig.num_steps = 10", "ModelConfig.activation = 'relu'")
  assert _train(run, "TrainConfig.num_steps = 10", "OptimizerConfig.learning_rate = 1e-4")["step"] == 10
  out = _train(run, "TrainConfig.num_steps = 12", "ModelConfig.position = 'alibi'", allow_config_change=True)
  assert out["step"] == 12 and "position" in (run / "config_changes.log").read_text()
