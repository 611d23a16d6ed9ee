"""Long Range Arena report: the attention kinds side by side, from finished sweeps and the --kinds benchmark.

  python -m launch.sweep --gin_file=ablations/lra_listops.gin --workdir=sweeps/lra_listops
  python -m launch.sweep --gin_file=ablations/lra_text.gin --workdir=sweeps/lra_text
  python benchmarks/attention.py --kinds=softmax,performer,rfa,bigbird,lsh,aft --out=K.json
  python benchmarks/lra_report.py --sweeps=sweeps/lra_listops,sweeps/lra_text --kinds_json=K.json --out=DIR

Per task and kind: the sweep's accuracy (its metric) and eval loss, steps and wall time, the median training tokens/s
of the run's metrics.jsonl, and the peak memory of the compiled training step on this host (XLA's memory
analysis of the run's own config.gin: arguments + outputs - donated + temporaries). Per kind and length:
one forward's time and temporary memory from the --kinds JSON. Writes DIR/lra.md, DIR/lra.json and
DIR/lra.png (accuracy against training speed; forward time and memory against length).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import config  # noqa: E402
from t_jax.training import aot  # noqa: E402

KIND = "ModelConfig.attention_kind"


def kind_of(bindings: str) -> str:
  """'softmax' from the sweep's bindings column, e.g. "ModelConfig.attention_kind='softmax'"."""
  for b in bindings.split(";"):
    key, _, value = b.strip().partition("=")
    if key.strip() == KIND:
      return value.strip().strip("'\"")
  raise ValueError(f"no {KIND} binding in {bindings!r}")


def variant_row(sweep: str, rec: dict, metric: str) -> dict:
  """One finished variant: accuracy, steps, wall time, training tokens/s and the train step's peak memory."""
  vdir = os.path.join(sweep, rec["name"])
  with open(os.path.join(vdir, "metrics.jsonl")) as f:
    speeds = [m["tokens_per_sec"] for m in map(json.loads, f) if "tokens_per_sec" in m]
  config.parse([os.path.join(vdir, "config.gin")])
  memory = aot.step_memory(config.experiment(), jax.devices()[:1])
  num = lambda k: float(rec[k]) if rec.get(k) not in (None, "") else None
  return dict(task=os.path.basename(os.path.normpath(sweep)), kind=kind_of(rec["bindings"]),
              status=rec["status"], accuracy=num(metric), eval_loss=num("eval_loss"), steps=num("steps"), wall_s=num("wall_s"),
              params=num("params"), train_tokens_per_s=statistics.median(speeds) if speeds else None,
              train_step_peak_bytes=memory["peak"])


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def markdown(rows: list[dict], forwards: list[dict]) -> str:
  lines = ["| task | kind | accuracy | eval loss | train tokens/s | train step peak MiB | steps | wall min |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['task']} | {r['kind']} | {_fmt(r['accuracy'], '.3f')} | {_fmt(r['eval_loss'], '.4f')} | "
                 f"{_fmt(r['train_tokens_per_s'], ',.0f')} | {r['train_step_peak_bytes'] / 2**20:,.0f} | "
                 f"{_fmt(r['steps'], '.0f')} | {_fmt(r['wall_s'] and r['wall_s'] / 60, '.1f')} |")
  seqs = sorted({f["seq"] for f in forwards})
  kinds = list(dict.fromkeys(f["kind"] for f in forwards))
  if forwards:
    lines += ["", "One forward (batch 1, 4 heads of 32, float32, XLA): ms / temporary MiB", "",
              "| kind | " + " | ".join(f"{s:,}" for s in seqs) + " |", "| --- |" + " --- |" * len(seqs)]
    cell = {(f["kind"], f["seq"]): f for f in forwards}
    for k in kinds:
      cells = []
      for s in seqs:
        f = cell.get((k, s), {})
        cells.append(f"{f['fwd_ms']:,.1f} / {f['temp_bytes'] / 2**20:,.0f}" if f.get("status") == "ok"
                     else f.get("status", "-"))
      lines.append(f"| {k} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], forwards: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for task in dict.fromkeys(r["task"] for r in rows):
    pts = [r for r in rows if r["task"] == task and r["accuracy"] is not None]
    axes[0].scatter([r["train_tokens_per_s"] for r in pts], [r["accuracy"] for r in pts], label=task)
    for r in pts:
      axes[0].annotate(r["kind"], (r["train_tokens_per_s"], r["accuracy"]), fontsize=8)
  axes[0].set(xlabel="training tokens/s", ylabel="accuracy", title="accuracy vs training speed")
  axes[0].legend()
  for k in dict.fromkeys(f["kind"] for f in forwards):
    ok = sorted((f for f in forwards if f["kind"] == k and f.get("status") == "ok"), key=lambda f: f["seq"])
    axes[1].plot([f["seq"] for f in ok], [f["fwd_ms"] for f in ok], "o-", label=k)
    axes[2].plot([f["seq"] for f in ok], [f["temp_bytes"] / 2**20 for f in ok], "o-", label=k)
  for ax, what in ((axes[1], "forward ms"), (axes[2], "forward temporary MiB")):
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=what, title=f"{what} vs length")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sweeps", required=True, help="comma-separated finished sweep directories")
  p.add_argument("--kinds_json", default=None, help="benchmarks/attention.py --kinds output")
  p.add_argument("--metric", default="eval_accuracy")
  p.add_argument("--out", required=True, help="directory for lra.md, lra.json, lra.png")
  args = p.parse_args(argv)
  rows = []
  for sweep in args.sweeps.split(","):
    path = os.path.join(sweep, "results.csv")
    if not os.path.isfile(path):
      print(f"error: {path}: no such file (run the sweep first)", file=sys.stderr)
      return 2
    with open(path) as f:
      rows += [variant_row(sweep, rec, args.metric) for rec in csv.DictReader(f) if rec["status"] == "finished"]
  forwards = []
  if args.kinds_json:
    with open(args.kinds_json) as f:
      forwards = json.load(f)["results"]
  os.makedirs(args.out, exist_ok=True)
  table = markdown(rows, forwards)
  print(table)
  with open(os.path.join(args.out, "lra.md"), "w") as f:
    f.write(table)
  with open(os.path.join(args.out, "lra.json"), "w") as f:
    json.dump(dict(device=jax.devices()[0].device_kind, cpu_count=os.cpu_count(), sweeps=args.sweeps,
                   kinds_json=args.kinds_json, tasks=rows, forward=forwards), f, indent=1)
  plot(rows, forwards, os.path.join(args.out, "lra.png"))
  print(f"wrote {args.out}/lra.md, lra.json, lra.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
