"""Bad input to the launchers: exit 2, exactly one `error: ...` line on stderr naming it, no traceback, and a
workdir that was already there left as it was."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
GIN = "--gin_file=experiments/quickstart_tiny.gin"
TEXT = "--gin_bindings=TaskConfig.train_source=@train/TextFileSource()"
PATTERNS = "--gin_bindings=train/TextFileSource.patterns="
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0

# (module, args, substring of the error line); {trained}: the shared trained workdir, {tmp}: a folder with
# file.txt, random.bin (random bytes), readonly/ (mode 0o500), {truncated}: a copy of {trained} whose
# checkpoint array files are cut in half.
TRAIN, DECODE = "launch.train", "launch.decode"
CASES = [
    pytest.param(TRAIN, [GIN, "--workdir={trained}", "--gin_bindings=ModelConfig.d_model='abc'"],
                 "ModelConfig.d_model='abc' must be int, not str", id="d_model_type"),
    pytest.param(TRAIN, [GIN, "--workdir={trained}", "--gin_bindings=OptimizerConfig.learning_rate='fast'"],
                 "OptimizerConfig.learning_rate='fast' must be float, not str", id="learning_rate_type"),
    pytest.param(TRAIN, [GIN, "--workdir={trained}", "--gin_bindings=ModelConfig.d_modle=64"],
                 "doesn't have a parameter named 'd_modle'", id="unknown_binding"),
    pytest.param(TRAIN, ["--gin_file=experiments/nope.gin", "--workdir={trained}"],
                 "gin file not found: 'experiments/nope.gin'", id="missing_gin_file"),
    pytest.param(TRAIN, [GIN], "--workdir is required", id="missing_workdir"),
    pytest.param(TRAIN, [GIN, "--workdir={tmp}/fresh", "--gin_bindings=ModelConfig.vocab_size=8"],
                 "ModelConfig.vocab_size=8 is too small: SentencePiece needs at least", id="vocab_too_small"),
    pytest.param(TRAIN, [GIN, "--workdir={trained}", TEXT, f"{PATTERNS}'{{tmp}}'"],
                 "{tmp} is a directory, not a file", id="source_is_directory"),
    pytest.param(TRAIN, [GIN, "--workdir={trained}", TEXT, f"{PATTERNS}'{{tmp}}/random.bin'"],
                 "above TaskConfig.max_bad_fraction=0.5", id="garbage_source"),
    pytest.param(TRAIN, [GIN, "--workdir={tmp}/file.txt"],
                 "--workdir={tmp}/file.txt is a file, not a directory", id="workdir_is_file"),
    pytest.param(TRAIN, [GIN, "--workdir={tmp}/file.txt/run"], ": {tmp}/file.txt is a file, not a directory",
                 id="workdir_under_file"),
    pytest.param(TRAIN, [GIN, "--workdir={tmp}/readonly/run"], "is not writable", id="workdir_not_writable",
                 marks=pytest.mark.skipif(ROOT_USER, reason="root writes into a mode-0o500 folder anyway")),
    pytest.param(DECODE, ["--workdir={truncated}", "--prompt=the"], "cannot be read", id="truncated_params"),
]


def _run(module, args):
  path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
  return subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=600)


def _snapshot(root):
  """{relative path: (size, mtime)} of every file under root."""
  files = [p for p in root.rglob("*") if p.is_file()]
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  """{trained, tmp, truncated}: one tiny trained run shared by every case, and the bad inputs."""
  tmp = tmp_path_factory.mktemp("bad")
  (tmp / "file.txt").write_text("not a folder\n")
  (tmp / "random.bin").write_bytes(np.random.default_rng(0).bytes(256 << 10))
  (tmp / "readonly").mkdir(mode=0o500)
  trained = tmp_path_factory.mktemp("run")
  res = _run("launch.train", [GIN, f"--workdir={trained}", "--gin_bindings=TrainConfig.num_samples=0"])
  assert res.returncode == 0, res.stderr[-3000:]
  truncated = tmp_path_factory.mktemp("truncated") / "run"
  shutil.copytree(trained, truncated)
  for f in (truncated / "checkpoints").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      os.truncate(f, f.stat().st_size // 2)
  return {"trained": str(trained), "tmp": str(tmp), "truncated": str(truncated)}


@pytest.mark.parametrize("module, args, expected", CASES)
def test_bad_input_is_one_error_line(paths, module, args, expected):
  before = _snapshot(Path(paths["trained"]))
  res = _run(module, [a.format(**paths) for a in args])
  errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
  assert res.returncode == 2 and len(errors) == 1, res.stderr[-3000:]
  assert expected.format(**paths) in errors[0], errors[0]
  assert res.stderr.rstrip().splitlines()[-1] == errors[0], res.stderr[-3000:]  # all of it, on one line
  assert "Traceback" not in res.stderr, res.stderr[-3000:]
  assert _snapshot(Path(paths["trained"])) == before  # nothing already written is lost (or touched)


def test_launchers_drop_orbax_closed_loop_tracebacks_and_keep_other_unraisable_errors():
  """After a failed restore Orbax leaves tensorstore reads running; at exit their callbacks find the asyncio loop
  closed, and Python printed that traceback under (or into) the launcher's error: line. It happened in about 1
  of 16 runs of launch.decode on a truncated checkpoint (the truncated_params case above)."""
  code = ("import launch\n"
          "class Stale:\n"
          "  def __init__(self, e): self.e = e\n"
          "  def __del__(self): raise self.e\n"
          "Stale(RuntimeError('Event loop is closed'))\n"
          "Stale(RuntimeError('a real bug'))\n")
  res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "Event loop is closed" not in res.stderr and "RuntimeError: a real bug" in res.stderr, res.stderr


def test_a_launcher_on_a_machine_without_a_tpu_prints_no_libtpu_set_up_errors():
  """libtpu (in the CPU lock) would print a screen of TPU set-up errors at the first device use."""
  import importlib.util

  from jax._src import hardware_utils
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (the tpu-aot extra)")
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] or hardware_utils.has_visible_nvidia_gpu():
    pytest.skip("this machine has an accelerator")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # as on a user's machine
  res = subprocess.run([sys.executable, "-m", "launch.train", GIN, "--dry_run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0 and "devices: 1" in res.stdout, res.stderr[-3000:]
  assert "TPU" not in res.stderr and "E0000" not in res.stderr, res.stderr[-3000:]
