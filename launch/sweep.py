"""Run an ablation: the variants an ablation gin file declares, each an ordinary `launch.train` run.

  python -m launch.sweep --gin_file=ablations/xiong_prenorm.gin --workdir=sweeps/xiong [--parallel=2]
  python -m launch.sweep ... --print_only   # the launch.train command of each variant, one per line
  python -m launch.sweep ... --slurm        # writes DIR/sweep.sbatch: a job array, one variant per task
  python -m launch.sweep ... --size=full    # use the file's `full/Sweep.*` bindings (one accelerator)

The ablation file binds `Sweep` (below). Variant NAME trains in DIR/NAME (its output in DIR/NAME/train.log,
its outcome in DIR/NAME/sweep.json); the same command again resumes unfinished variants and skips finished
ones. A listed variant may bring its own gin files ('base') and name DIR as '{sweep_dir}' in a binding, to
start from an earlier variant (variants run in order; see ablations/frozen_pretrained.gin).
A failed variant is recorded with its error line and the sweep goes on. At the end DIR/results.md,
DIR/results.csv, DIR/loss_curves.png and DIR/<metric>_vs_<knob>.png compare the variants.
Bad input: one `error:` line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import csv
import dataclasses
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import gin

from launch import config, error_line
from launch.decode import Parser, UsageError, read_lines

NAME = re.compile(r"^[\w.+=,-]+$")  # variant names are folder names: no '/', no spaces
COLUMNS = ("name", "bindings", "params", "steps", "wall_s", "train_loss", "eval_loss", "eval_perplexity")


@gin.configurable(module="launch")
@dataclasses.dataclass(frozen=True)
class Sweep:
  """An ablation: a run of `base` + `bindings` per variant (every point of `grid`, or each of `variants`)."""

  base: Sequence[str] = ()  # gin files of the experiment (searched in . and configs/)
  bindings: Sequence[str] = ()  # bindings shared by every variant (e.g. the CPU size)
  grid: dict = dataclasses.field(default_factory=dict)  # {'Class.knob': [values]}: every combination
  # [{'name': 'a', 'bindings': ['Class.knob = value', ...]}, ...]; a variant may add 'base': [its own gin files]
  variants: Sequence[dict] = ()
  metric: str = "eval_perplexity"  # 'bleu', or a key of the final eval row of metrics.jsonl
  test_source: Optional[str] = None  # 'bleu': the test split (plain or .gz), one sentence per line
  test_reference: Optional[str] = None
  test_lines: Optional[int] = None  # 'bleu': the first N test sentences only (CPU sizes)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One run of a sweep: its folder name, its own bindings, the knob values they set, its own gin files."""

  name: str
  bindings: tuple[str, ...]
  knobs: dict
  base: tuple[str, ...] = ()  # () = Sweep.base


def load(files: Sequence[str], bindings: Sequence[str] = (), size: str = "") -> Sweep:
  """The Sweep an ablation file binds (with --size, its `size/Sweep.*` bindings win); ConfigError if bad."""
  config.parse(files, bindings)
  if size and not gin.get_bindings(f"{size}/Sweep", inherit_scopes=False):
    raise config.ConfigError(f"--size={size}: the ablation file binds no {size}/Sweep.*")
  try:
    with gin.config_scope(size or None):
      sweep = Sweep()
  except (TypeError, ValueError) as e:
    raise config.ConfigError(f"bad Sweep: {e}") from e
  if not sweep.base or not all(isinstance(f, str) for f in sweep.base):
    raise config.ConfigError("Sweep.base must list the experiment's gin files: ['experiments/x.gin']")
  if not all(isinstance(b, str) for b in sweep.bindings):
    raise config.ConfigError("Sweep.bindings must be a list of binding strings")
  if sweep.metric == "bleu" and (sweep.test_source is None) != (sweep.test_reference is None):
    raise config.ConfigError("Sweep.test_source and Sweep.test_reference go together")
  return sweep


def expand(sweep: Sweep) -> list[Variant]:
  """The variants of a sweep, in order: the grid's combinations (last knob fastest) or the listed variants."""
  if bool(sweep.grid) == bool(sweep.variants):
    raise config.ConfigError("bind exactly one of Sweep.grid and Sweep.variants")
  if sweep.grid:
    for knob, values in sweep.grid.items():
      if not isinstance(knob, str) or "." not in knob or not isinstance(values, (list, tuple)) or not values:
        raise config.ConfigError(f"Sweep.grid: {knob!r}: want 'Class.knob': [value, ...]")
    short = _short_names(list(sweep.grid))
    variants = []
    for values in itertools.product(*sweep.grid.values()):
      knobs = dict(zip(sweep.grid, values))
      name = re.sub(r"[^\w.+=,-]", "_", ",".join(f"{short[k]}={_text(v)}" for k, v in knobs.items()))
      variants.append(Variant(name, tuple(f"{k}={v!r}" for k, v in knobs.items()), knobs))
  else:
    variants = []
    for v in sweep.variants:
      if (not isinstance(v, dict) or not {"name", "bindings"} <= set(v) <= {"name", "bindings", "base"}
          or not isinstance(v["bindings"], list) or not isinstance(v.get("base", []), list)):
        raise config.ConfigError(f"Sweep.variants: {v!r}: want {{'name': 'a', 'bindings': ['A.b = 1']}} "
                                 "(and optionally 'base': ['experiments/x.gin'])")
      if not isinstance(v["name"], str) or not NAME.match(v["name"]):
        raise config.ConfigError(f"Sweep.variants: name {v['name']!r} must be letters, digits and _.+=,-")
      variants.append(Variant(v["name"], tuple(v["bindings"]), dict(_knob(b) for b in v["bindings"]),
                              tuple(v.get("base", ()))))
  names = [v.name for v in variants]
  if len(set(names)) < len(names):
    twice = sorted(n for n in set(names) if names.count(n) > 1)
    raise config.ConfigError(f"Sweep: variant names repeat: {twice}")
  return variants


def knobs_of(variants: list[Variant]) -> list[str]:
  """The knobs whose value differs between variants (a knob a variant does not bind counts as 'default')."""
  keys = list(dict.fromkeys(k for v in variants for k in v.knobs))
  return [k for k in keys if len({_text(v.knobs.get(k, "default")) for v in variants}) > 1]


def check(sweep: Sweep, variants: list[Variant]) -> None:
  """Parses each variant's gin config, so a mistyped knob fails at once (values are the runs' to judge)."""
  for v in variants:
    try:
      config.parse(v.base or sweep.base, [*sweep.bindings, *v.bindings])
    except config.ConfigError as e:
      raise config.ConfigError(f"variant {v.name}: {e}") from e


def train_command(sweep: Sweep, v: Variant, workdir: str) -> list[str]:
  """The `python -m launch.train` command of one variant (argv without the interpreter); '{sweep_dir}' in a
  binding is DIR (e.g. TrainConfig.init_from = '{sweep_dir}/pretrain', a variant listed earlier)."""
  return ["-m", "launch.train", *[f"--gin_file={f}" for f in v.base or sweep.base],
          *[f"--gin_bindings={_tight(b).replace('{sweep_dir}', str(workdir))}" for b in (*sweep.bindings, *v.bindings)],
          f"--workdir={Path(workdir, v.name)}"]


def run_variant(sweep: Sweep, v: Variant, workdir: str, test: Optional[tuple[Path, Path]]) -> dict:
  """Trains one variant (unless finished with the same command) and evaluates it; returns its record."""
  vdir = Path(workdir, v.name)
  vdir.mkdir(parents=True, exist_ok=True)
  record, command = read_record(vdir), train_command(sweep, v, workdir)
  same = record.get("command", [])[:-1] == command[:-1]  # the same run, whatever the spelling of DIR
  if same and record.get("status") == "finished":
    return {**evaluate(sweep, vdir, record, test), "skipped": True}
  wall = record.get("wall_s", 0.0) if same else 0.0  # a resumed run: add up
  log = vdir / "train.log"
  with open(log, "ab") as f:
    start, t0 = f.tell(), time.time()
    rc = subprocess.run([sys.executable, *command], stdout=f, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
  text = log.read_bytes()[start:].decode(errors="replace")
  record = {"name": v.name, "bindings": list(v.bindings), "command": command,
            "wall_s": round(wall + time.time() - t0, 1), "params": record.get("params")}
  if rc:
    record.update(status="failed", error=_error(text, rc))
  elif "preempted:" in text:
    record.update(status="unfinished", error="preempted: the same command resumes it")
  else:
    record.update(status="finished", error="")
  found = re.findall(r"([\d,]+) parameters;", text)
  record["params"] = int(found[-1].replace(",", "")) if found else record["params"]
  write_record(vdir, record)
  return evaluate(sweep, vdir, record, test) if record["status"] == "finished" else record


def evaluate(sweep: Sweep, vdir: Path, record: dict, test: Optional[tuple[Path, Path]]) -> dict:
  """Adds steps, losses and the metric (BLEU from launch.decode, cached; else metrics.jsonl) to a record."""
  rows = read_metrics(vdir)
  train, evals = [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]
  out = dict(record, steps=max((r["step"] for r in rows), default=None),
             train_loss=train[-1]["loss"] if train else None,
             eval_loss=evals[-1]["eval_loss"] if evals else None,
             eval_perplexity=evals[-1].get("eval_perplexity") if evals else None)
  if out["params"] is None:
    out["params"] = count_params(vdir)
  if sweep.metric != "bleu":
    out[sweep.metric] = evals[-1].get(sweep.metric) if evals else None
  elif test is not None and record.get("bleu_on") != f"{sweep.test_source}[:{sweep.test_lines}]":
    cmd = [sys.executable, "-m", "launch.decode", f"--workdir={vdir}", f"--input_file={test[0]}",
           f"--reference_file={test[1]}", "--method=beam", "--num_beams=4",
           f"--output_file={vdir / 'test.hyp'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    found = re.findall(r"^BLEU\S* = ([\d.]+)", done.stdout, re.M)
    if done.returncode or not found:  # not cached: the next run tries again
      out.update(bleu=None, error="bleu: " + _error(done.stderr + done.stdout, done.returncode))
    else:
      out.update(bleu=float(found[0]), bleu_on=f"{sweep.test_source}[:{sweep.test_lines}]", error="")
  if out != record:
    write_record(vdir, {k: v for k, v in out.items() if k != "skipped"})
  return out


def count_params(vdir: Path) -> Optional[int]:
  """Parameter count of a run, built (abstractly) from its config.gin; None if there is none."""
  from t_jax.models import abstract_params, build_model
  from t_jax.models import count_params as count
  from t_jax.workdir import read_config
  try:
    return count(abstract_params(build_model(read_config(vdir)[0])))
  except ValueError:
    return None


def read_record(vdir: Path) -> dict:
  """DIR/NAME/sweep.json, or {} when the variant never ran."""
  path = vdir / "sweep.json"
  return json.loads(path.read_text()) if path.is_file() else {}


def write_record(vdir: Path, record: dict) -> None:
  """Writes DIR/NAME/sweep.json atomically."""
  tmp = vdir / "sweep.json.tmp"
  tmp.write_text(json.dumps(record, indent=1) + "\n")
  os.replace(tmp, vdir / "sweep.json")


def read_metrics(vdir: Path) -> list[dict]:
  """The rows of DIR/NAME/metrics.jsonl (a torn last line is skipped)."""
  path = vdir / "metrics.jsonl"
  rows = []
  for line in path.read_text().splitlines() if path.is_file() else []:
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


def test_split(sweep: Sweep, workdir: str) -> Optional[tuple[Path, Path]]:
  """For metric 'bleu': the test split copied to DIR/test.src and DIR/test.ref (unzipped, cut), or None."""
  if sweep.metric != "bleu":
    return None
  files = (sweep.test_source, sweep.test_reference)
  if None in files or not all(Path(f).is_file() for f in files):
    print(f"warning: no test split ({files[0]}, {files[1]}): the bleu column stays empty", file=sys.stderr)
    return None
  out = (Path(workdir, "test.src"), Path(workdir, "test.ref"))
  for src, dst in zip(files, out):
    lines = read_lines(src)[:sweep.test_lines]
    if not dst.is_file() or dst.read_text(encoding="utf-8") != "\n".join(lines) + "\n":
      tmp = dst.with_name(f"{dst.name}.{os.getpid()}")  # --slurm tasks may write it at the same time
      tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
      os.replace(tmp, dst)
  return out


def slurm_script(files: Sequence[str], bindings: Sequence[str], size: str, workdir: str,
                 variants: list[Variant]) -> str:
  """A job-array sbatch script: task i runs `launch.sweep --variant=NAMES[i]` (trains + evaluates one)."""
  sweep_args = [*[f"--gin_file={f}" for f in files], *[f"--gin_bindings={b}" for b in bindings],
                *([f"--size={size}"] if size else []), f"--workdir={Path(workdir).absolute()}"]
  names, args, out = " ".join(shlex.quote(v.name) for v in variants), " ".join(map(_quote, sweep_args)), \
      Path(workdir).absolute()
  return f"""#!/bin/bash
# Sweep {' '.join(files)}: {len(variants)} variants, one per array task (written by launch.sweep --slurm).
#   sbatch {out / 'sweep.sbatch'}        # from anywhere; runs in REPO
#   python -m launch.sweep {args}   # afterwards: results
# Adjust the #SBATCH lines to the cluster; workdirs must be on a filesystem the nodes share.
#SBATCH --job-name=sweep
#SBATCH --array=0-{len(variants) - 1}
#SBATCH --gpus=1
#SBATCH --time=24:00:00
#SBATCH --output={out}/slurm-%A_%a.out
set -euo pipefail

REPO="${{REPO:-{Path.cwd()}}}"
VENV="${{VENV:-$REPO/.venv}}"
NAMES=({names})
cd "$REPO"
exec "$VENV/bin/python" -m launch.sweep {args} --variant="${{NAMES[$SLURM_ARRAY_TASK_ID]}}"
"""


def write_results(sweep: Sweep, variants: list[Variant], records: dict, workdir: str, title: str) -> None:
  """DIR/results.csv, DIR/results.md and the plots: one row per variant (one never run is 'pending')."""
  extra = () if sweep.metric in COLUMNS else (sweep.metric,)
  columns = (*COLUMNS, *extra, "status", "error")
  rows = []
  for v in variants:
    r = records.get(v.name) or {"status": "pending"}
    rows.append({**{c: r.get(c) for c in columns}, "name": v.name, "bindings": "; ".join(v.bindings)})
  with open(Path(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows([{k: "" if x is None else x for k, x in row.items()} for row in rows])
  knobs = knobs_of(variants)
  plots = ["loss_curves.png", *[_plot_name(sweep.metric, k, knobs) for k in knobs]]
  done = [row for row in rows if row["status"] == "finished" and row[sweep.metric] is not None]
  best = (min if sweep.metric in ("eval_loss", "eval_perplexity") else max)(
      done, key=lambda row: row[sweep.metric], default=None)
  lines = [f"# {title}", "", f"{len(done)} of {len(rows)} variants finished; metric: {sweep.metric}"
           + (f"; best: {best['name']} ({_cell(best[sweep.metric])})" if best else ""), "",
           "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
  lines += ["| " + " | ".join(_cell(row[c]).replace("|", "\\|") for c in columns) + " |" for row in rows]
  lines += ["", *[f"![{p}]({p})" for p in plots]]
  Path(workdir, "results.md").write_text("\n".join(lines) + "\n")
  plot(sweep.metric, variants, rows, knobs, workdir, grid=bool(sweep.grid))


def plot(metric: str, variants: list[Variant], rows: list[dict], knobs: list[str], workdir: str,
         grid: bool = True) -> None:
  """DIR/loss_curves.png (eval loss against steps) and DIR/<metric>_vs_<knob>.png for every swept knob.

  A grid's knob plot draws one line per setting of the other knobs; a list's, one point per variant.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for v in variants:
    evals = [r for r in read_metrics(Path(workdir, v.name)) if "eval_loss" in r]
    if evals:
      ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], marker="o", label=v.name)
  ax.set(xlabel="step", ylabel="eval loss", title="eval loss")
  if ax.lines:
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(Path(workdir, "loss_curves.png"), dpi=100)
  plt.close(fig)
  by_name = {row["name"]: row for row in rows}
  for knob in knobs:  # x: the knob's values in order of appearance
    xs = list(dict.fromkeys(_text(v.knobs.get(knob, "default")) for v in variants))
    series: dict[str, list] = {}
    for v in variants:
      value = by_name[v.name][metric] if by_name[v.name]["status"] == "finished" else None
      others = ",".join(f"{k.rsplit('.', 1)[-1]}={_text(v.knobs.get(k, 'default'))}"
                        for k in knobs if k != knob)
      x = xs.index(_text(v.knobs.get(knob, "default")))
      if value is not None:
        series.setdefault(others if grid else "", []).append((x, value))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
      ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", linestyle="-" if grid else "none",
              label=label or None)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_xlim(-0.5, len(xs) - 0.5)
    ax.set(xlabel=knob, ylabel=metric, title=f"{metric} vs {knob}")
    if 1 < len(series) <= 8:
      ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(Path(workdir, _plot_name(metric, knob, knobs)), dpi=100)
    plt.close(fig)


def progress(i: int, n: int, metric: str, r: dict) -> str:
  """The one line printed per variant."""
  head = f"[{i}/{n}] {r['name']}: "
  if r["status"] != "finished":
    return head + f"{r['status']}: {r['error']}"
  value = "-" if r.get(metric) is None else _cell(r[metric])
  return (head + ("skipped (finished)" if r.get("skipped") else "finished") + f", {_cell(r['wall_s'], 's')}, "
          + f"{metric} {value}" + (f" ({r['error']})" if r.get("error") else ""))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """Command-line flags (UsageError on bad ones)."""
  p = Parser(prog="python -m launch.sweep", description=__doc__.splitlines()[0])
  p.add_argument("--gin_file", action="append", default=[], help="The ablation file (in . or configs/).")
  p.add_argument("--gin_bindings", action="append", default=[], help="Extra bindings, e.g. Sweep.metric='x'.")
  p.add_argument("--workdir", required=True, help="Sweep directory: DIR/<variant>, DIR/results.*.")
  p.add_argument("--size", default="", help="Use the ablation file's `SIZE/Sweep.*` bindings (e.g. full).")
  p.add_argument("--parallel", type=int, default=1, help="Variants trained at a time.")
  p.add_argument("--variant", help="Train and evaluate only this variant, no report (the --slurm tasks).")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--print_only", action="store_true", help="Print each variant's train command and exit.")
  mode.add_argument("--slurm", action="store_true", help="Write DIR/sweep.sbatch (a job array) and exit.")
  args = p.parse_args(argv)
  if not args.gin_file:
    raise UsageError("give the ablation file: --gin_file=ablations/NAME.gin")
  if args.parallel < 1:
    raise UsageError(f"--parallel must be >= 1, got {args.parallel}")
  return args


def run(args: argparse.Namespace) -> int:
  """Expands, then prints, writes the sbatch script, or trains + evaluates + reports."""
  sweep = load(args.gin_file, args.gin_bindings, args.size)
  variants = expand(sweep)
  if args.variant is not None:
    variants = [v for v in variants if v.name == args.variant]
    if not variants:
      raise UsageError(f"--variant={args.variant} is not a variant of {' '.join(args.gin_file)}")
  check(sweep, variants)
  if args.print_only:
    for v in variants:
      print(" ".join(_quote(a) for a in ["python", *train_command(sweep, v, args.workdir)]))
    return 0
  Path(args.workdir).mkdir(parents=True, exist_ok=True)
  if args.slurm:
    path = Path(args.workdir, "sweep.sbatch")
    path.write_text(slurm_script(args.gin_file, args.gin_bindings, args.size, args.workdir, variants))
    print(f"wrote {path} ({len(variants)} array tasks): sbatch {path}")
    return 0
  test = test_split(sweep, args.workdir)
  print(f"sweep {' '.join(args.gin_file)}: {len(variants)} variant(s) in {args.workdir} "
        "(logs: <variant>/train.log)", flush=True)
  records, lock, count = {}, threading.Lock(), itertools.count(1)

  def one(v: Variant) -> None:
    r = run_variant(sweep, v, args.workdir, test)
    with lock:
      records[v.name] = r
      print(progress(next(count), len(variants), sweep.metric, r), flush=True)

  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    for future in [pool.submit(one, v) for v in variants]:
      future.result()
  if args.variant is None:
    write_results(sweep, variants, records, args.workdir, f"Sweep {' '.join(args.gin_file)}")
    print(f"results: {Path(args.workdir, 'results.md')}, results.csv, loss_curves.png")
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point; bad flags or a bad ablation file: one `error:` line on stderr, exit 2."""
  try:
    return run(parse_args(argv))
  except (ValueError, OSError) as e:
    print(f"error: {error_line(e)}", file=sys.stderr)
    return 2


def _knob(binding: str) -> tuple[str, Any]:
  """('Class.knob', value) of a binding string 'Class.knob = value' (the value as text if not a literal)."""
  key, _, text = binding.partition("=")
  try:
    return key.strip(), ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    return key.strip(), text.strip()


def _short_names(knobs: list[str]) -> dict[str, str]:
  """'ModelConfig.pre_norm' -> 'pre_norm' unless two knobs share that last part."""
  last = [k.rsplit(".", 1)[-1] for k in knobs]
  return {k: s if last.count(s) == 1 else k for k, s in zip(knobs, last)}


def _plot_name(metric: str, knob: str, knobs: list[str]) -> str:
  return re.sub(r"[^\w.=-]", "_", f"{metric}_vs_{_short_names(knobs)[knob]}") + ".png"


def _tight(binding: str) -> str:
  """'Class.knob = 1' -> 'Class.knob=1' (a command line without quotes)."""
  return re.sub(r"^\s*([\w./]+)\s*=\s*", r"\1=", binding)


def _quote(arg: str) -> str:
  """Shell quoting that keeps gin strings readable: "K='v'" rather than shlex's 'K='"'"'v'"'"''."""
  if "'" in arg and not re.search(r'["$`\\!]', arg):
    return f'"{arg}"'
  return shlex.quote(arg)


def _text(value: Any) -> str:
  return value if isinstance(value, str) else repr(value)


def _cell(value: Any, unit: str = "") -> str:
  """A table cell: floats to 4 significant digits, counts with separators, None empty."""
  if value is None:
    return ""
  if isinstance(value, float):
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:#.4g}".rstrip(".")
    return f"{text} {unit}" if unit else text
  if isinstance(value, int) and not isinstance(value, bool):
    return f"{value:,}"
  return str(value)


def _error(text: str, rc: int) -> str:
  """The run's last `error:` line, else its last line and the exit status."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error:")]
  if errors:
    return errors[-1]
  status = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
  return f"{lines[-1][:300]} ({status})" if lines else status


if __name__ == "__main__":
  sys.exit(main())
