"""launch.sweep: grid expansion, --print_only, --slurm, bad input, and a real tiny sweep (slow)."""

import csv
import json
import subprocess
import sys

import pytest

from launch import sweep as sweep_lib
from tests.conftest import REPO

TINY = ["TrainConfig.num_steps = 2", "TrainConfig.num_samples = 0",
        "TrainConfig.unigram_baseline_batches = 0", "TrainConfig.eval_batches = 1"]


def ablation(tmp_path, grid="{'ModelConfig.num_heads': [2, 3]}"):
  """A two-variant ablation of quickstart_tiny: 2 heads train, 3 heads do not divide d_model=32."""
  path = tmp_path / "abl.gin"
  path.write_text(f"Sweep.base = ['experiments/quickstart_tiny.gin']\nSweep.bindings = {TINY!r}\n"
                  f"Sweep.grid = {grid}\n")
  return str(path)


def test_expand_grid():
  grid = {"ModelConfig.pre_norm": [True, False], "OptimizerConfig.warmup_steps": [0, 100]}
  sweep = sweep_lib.Sweep(base=["experiments/translation_tiny.gin"], grid=grid)
  variants = sweep_lib.expand(sweep)
  assert [v.name for v in variants] == ["pre_norm=True,warmup_steps=0", "pre_norm=True,warmup_steps=100",
                                        "pre_norm=False,warmup_steps=0", "pre_norm=False,warmup_steps=100"]
  assert variants[1].bindings == ("ModelConfig.pre_norm=True", "OptimizerConfig.warmup_steps=100")
  assert sweep_lib.knobs_of(variants) == ["ModelConfig.pre_norm", "OptimizerConfig.warmup_steps"]
  strings = sweep_lib.expand(sweep_lib.Sweep(base=["x.gin"], grid={"ModelConfig.position": ["rope", "none"]}))
  assert [(v.name, v.bindings) for v in strings] == [("position=rope", ("ModelConfig.position='rope'",)),
                                                     ("position=none", ("ModelConfig.position='none'",))]


def test_expand_variants_and_bad_sweeps():
  listed = sweep_lib.Sweep(base=["x.gin"], variants=[
      {"name": "base", "bindings": []}, {"name": "A_h1", "bindings": ["ModelConfig.num_heads = 1"]}])
  variants = sweep_lib.expand(listed)
  assert [(v.name, v.knobs) for v in variants] == [("base", {}), ("A_h1", {"ModelConfig.num_heads": 1})]
  assert sweep_lib.knobs_of(variants) == ["ModelConfig.num_heads"]
  for bad in (dict(), dict(grid={"ModelConfig.d_model": [1]}, variants=[{"name": "a", "bindings": []}]),
              dict(grid={"d_model": [1, 2]}), dict(grid={"ModelConfig.d_model": []}),
              dict(variants=[{"name": "a/b", "bindings": []}]), dict(variants=[{"name": "a"}]),
              dict(variants=[{"name": "a", "bindings": []}, {"name": "a", "bindings": []}]),
              dict(variants=[{"name": "a", "bindings": [], "base": "x.gin"}]),
              dict(variants=[{"name": "a", "bindings": [], "files": ["x.gin"]}])):
    with pytest.raises(ValueError):
      sweep_lib.expand(sweep_lib.Sweep(base=["x.gin"], **bad))


def test_ablation_files_expand():
  """Every committed ablation parses and expands at both sizes, and every variant's gin config parses."""
  for name in ("xiong_prenorm", "length_extrapolation", "mha_gqa_mqa", "vaswani_table3", "lra_listops", "lra_text"):
    for size in ("", "full"):
      sweep = sweep_lib.load([f"ablations/{name}.gin"], size=size)
      variants = sweep_lib.expand(sweep)
      sweep_lib.check(sweep, variants)
      assert len(variants) >= 4 and sweep_lib.knobs_of(variants)


def test_variant_gin_files_and_the_sweep_dir():
  """The frozen-pretrained ablation: the text LM trains with its own gin file, the others with Sweep.base, and
  '{sweep_dir}' makes the frozen variant start from the text LM's workdir."""
  sweep = sweep_lib.load(["ablations/frozen_pretrained.gin"])
  variants = sweep_lib.expand(sweep)
  sweep_lib.check(sweep, variants)
  commands = {v.name: sweep_lib.train_command(sweep, v, "D") for v in variants}
  assert list(commands) == ["text_lm", "scratch", "frozen_pretrained", "frozen_random"]
  assert commands["text_lm"] == ["-m", "launch.train", "--gin_file=experiments/quickstart.gin", "--workdir=D/text_lm"]
  assert commands["scratch"][2] == "--gin_file=experiments/fpt_digits.gin"
  assert "--gin_bindings=TrainConfig.init_from='D/text_lm'" in commands["frozen_pretrained"]


def test_print_only(tmp_path, capsys):
  assert sweep_lib.main([f"--gin_file={ablation(tmp_path)}", f"--workdir={tmp_path}/sw", "--print_only"]) == 0
  lines = capsys.readouterr().out.splitlines()
  common = " ".join(["python -m launch.train --gin_file=experiments/quickstart_tiny.gin",
                     *[f"--gin_bindings={b.replace(' = ', '=')}" for b in TINY]])
  assert lines == [f"{common} --gin_bindings=ModelConfig.num_heads={h} --workdir={tmp_path}/sw/num_heads={h}"
                   for h in (2, 3)]
  assert not (tmp_path / "sw").exists()


def test_slurm_script(tmp_path, capsys):
  assert sweep_lib.main([f"--gin_file={ablation(tmp_path)}", f"--workdir={tmp_path}/sw", "--slurm"]) == 0
  script = (tmp_path / "sw" / "sweep.sbatch").read_text()
  assert "#SBATCH --array=0-1" in script and "NAMES=(num_heads=2 num_heads=3)" in script
  assert '--variant="${NAMES[$SLURM_ARRAY_TASK_ID]}"' in script
  subprocess.run(["bash", "-n", str(tmp_path / "sw" / "sweep.sbatch")], check=True)


@pytest.mark.parametrize("args, message", [
    (["--print_only"], "give the ablation file"),
    (["--gin_file=missing.gin", "--print_only"], "gin file not found"),
    (["--gin_file=ABL", "--parallel=0"], "--parallel must be >= 1"),
    (["--gin_file=ABL", "--bogus"], "unrecognized arguments: --bogus"),
    (["--gin_file=ABL", "--size=huge", "--print_only"], "binds no huge/Sweep"),
    (["--gin_file=ABL", "--variant=nope", "--print_only"], "--variant=nope is not a variant"),
    (["--gin_file=ABL", "--gin_bindings=Sweep.gird = {}", "--print_only"], "Sweep"),
    (["--gin_file=ABL", "--gin_bindings=Sweep.grid = {'ModelConfig.num_hedas': [1]}", "--print_only"],
     "variant num_hedas=1: bad gin config"),
])
def test_bad_input_one_error_line(tmp_path, capsys, args, message):
  abl = ablation(tmp_path)
  argv = [a.replace("ABL", abl) for a in args] + [f"--workdir={tmp_path}/sw"]
  assert sweep_lib.main(argv) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.slow
def test_tiny_sweep_records_failure_resumes_and_plots(tmp_path):
  """Two variants of quickstart_tiny: one trains, one fails with its error line; a re-run skips the first."""
  cmd = [sys.executable, "-m", "launch.sweep", f"--gin_file={ablation(tmp_path)}", f"--workdir={tmp_path}/sw"]
  first = subprocess.run([*cmd, "--parallel=2"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr
  lines = [line for line in first.stdout.splitlines() if line.startswith("[")]
  assert len(lines) == 2 and "num_heads=2: finished" in first.stdout
  assert "num_heads=3: failed: error: ModelConfig.num_heads=3" in first.stdout
  with open(tmp_path / "sw" / "results.csv") as f:
    rows = {row["name"]: row for row in csv.DictReader(f)}
  ok, bad = rows["num_heads=2"], rows["num_heads=3"]
  assert ok["status"] == "finished" and ok["steps"] == "2" and int(ok["params"]) > 0 and not ok["error"]
  assert float(ok["eval_loss"]) > 0 and float(ok["eval_perplexity"]) > 1 and float(ok["train_loss"]) > 0
  assert bad["status"] == "failed" and bad["error"].startswith("error: ModelConfig.num_heads=3 does not")
  assert bad["bindings"] == "ModelConfig.num_heads=3"
  for png in ("loss_curves.png", "eval_perplexity_vs_num_heads.png"):
    assert (tmp_path / "sw" / png).read_bytes()[:4] == b"\x89PNG"
  assert "| num_heads=3 |" in (tmp_path / "sw" / "results.md").read_text()

  log = tmp_path / "sw" / "num_heads=2" / "train.log"
  size = log.stat().st_size
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr
  assert "num_heads=2: skipped (finished)" in again.stdout and "num_heads=3: failed" in again.stdout
  assert log.stat().st_size == size  # launch.train was not started again for the finished variant
  record = json.loads((tmp_path / "sw" / "num_heads=2" / "sweep.json").read_text())
  assert record["status"] == "finished" and record["params"] == int(ok["params"])
