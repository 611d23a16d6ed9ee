"""Pre-train, then fine-tune, offline on a CPU (#20): does masked-LM pre-training on the CPython documentation
help a tiny BERT learn Multi30K word-order acceptability?

Runs `launch.train` one after another (each a fresh process, timed):
  pretrain           experiments/bert_pretrain_cpu.gin: masked LM on PydocSource
  scratch            experiments/acceptability_cpu.gin: the same encoder, random init, its own tokenizer
  finetune           experiments/acceptability_finetune_cpu.gin: init_from the pre-training run (its tokenizer)
  frozen_pretrained  finetune with TrainConfig.trainable=('^classifier/',): only the head on the frozen encoder
  frozen_random      scratch likewise: the head on a frozen random encoder (what the frozen one starts from)
  scratch_same_tok   scratch with the pre-training run's tokenizer (separates the weights from the vocabulary)
with --nsp also pretrain_nsp (bert_pretrain_nsp_cpu.gin: MLM + next-sentence prediction) and finetune_nsp, and
with --t5 the text-to-text runs t5_pretrain (span corruption on the captions), t5_finetune and t5_scratch.
Every fine-tuning run has the same steps, batch, schedule and seed. Next to them: the majority class and a
bag-of-words logistic regression (scikit-learn) on the same training and validation examples.

  python benchmarks/finetune_cpu.py                     # -> benchmarks/results/finetune_cpu.json
  python benchmarks/finetune_cpu.py --steps=100 --out=/tmp/x.json --runs=pretrain,finetune   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._results import write_json  # noqa: E402

FINETUNE_GIN = "experiments/acceptability_finetune_cpu.gin"
SCRATCH_GIN = "experiments/acceptability_cpu.gin"
RUNS = {  # name: (gin file, bindings (ROOT: the workdir root), the pre-training run it starts from)
    "pretrain": ("experiments/bert_pretrain_cpu.gin", [], None),
    "scratch": (SCRATCH_GIN, [], None),
    "finetune": (FINETUNE_GIN, ["TrainConfig.init_from='ROOT/pretrain'"], "pretrain"),
    "frozen_pretrained": (FINETUNE_GIN, ["TrainConfig.init_from='ROOT/pretrain'",
                                         "TrainConfig.trainable=('^classifier/',)"], "pretrain"),
    "frozen_random": (SCRATCH_GIN, ["TrainConfig.trainable=('^classifier/',)"], None),
    "scratch_same_tok": (SCRATCH_GIN, ["TaskConfig.tokenizer='ROOT/pretrain/tokenizer.model'"], "pretrain"),
    "pretrain_nsp": ("experiments/bert_pretrain_nsp_cpu.gin", [], None),
    "finetune_nsp": (FINETUNE_GIN, ["TrainConfig.init_from='ROOT/pretrain_nsp'"], "pretrain_nsp"),
    "t5_pretrain": ("experiments/t5_span_corruption_cpu.gin", [], None),
    "t5_finetune": ("experiments/t5_finetune_acceptability_cpu.gin", ["TrainConfig.init_from='ROOT/t5_pretrain'"],
                    "t5_pretrain"),
    "t5_scratch": ("experiments/t5_finetune_acceptability_cpu.gin", ["TrainConfig.init_from=None"], None),
}
DEFAULT_RUNS = ["pretrain", "scratch", "finetune", "frozen_pretrained", "frozen_random", "scratch_same_tok"]
KEEP = ("step", "eval_loss", "eval_accuracy", "eval_f1", "eval_mcc", "eval_nsp_accuracy", "eval_nsp_loss",
        "eval_exact_match", "eval_token_accuracy")


def run(name: str, root: Path, steps: int | None, pretrain_steps: int | None) -> dict:
  """One launch.train process; its wall time, final eval metrics and trainable-parameter line."""
  gin_file, bindings, _ = RUNS[name]
  bindings = [b.replace("ROOT", str(root)) for b in bindings]
  n = pretrain_steps if "pretrain" in name else steps
  if n:
    bindings += [f"TrainConfig.num_steps={n}", f"TrainConfig.eval_every={n}", f"TrainConfig.checkpoint_every={n}"]
  workdir = root / name
  cmd = [sys.executable, "-m", "launch.train", f"--gin_file={gin_file}", f"--workdir={workdir}",
         *[f"--gin_bindings={b}" for b in bindings]]
  print("$", " ".join(cmd), flush=True)
  start, load = time.time(), os.getloadavg()[0]
  p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  wall = time.time() - start
  if p.returncode:
    raise RuntimeError(f"{name} failed:\n{p.stderr[-3000:]}")
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  final = [r for r in rows if "eval_loss" in r][-1]
  trainable = [line for line in p.stdout.splitlines() + p.stderr.splitlines() if "trainable parameters" in line]
  out = {"gin_file": gin_file, "bindings": bindings, "wall_s": round(wall, 1), "load_average_at_start": round(load, 1),
         **{k: final[k] for k in KEEP if k in final}}
  if trainable:
    out["trainable"] = trainable[0].split("trainable parameters: ", 1)[1]
  print(f"{name}: {json.dumps(out)}", flush=True)
  return out


def baselines(steps_note: str) -> dict:
  """Majority class and bag-of-words logistic regression on the task's training and validation examples."""
  import numpy as np
  from sklearn.feature_extraction.text import CountVectorizer
  from sklearn.linear_model import LogisticRegression

  from launch import config

  config.parse([SCRATCH_GIN])
  task = config.experiment().task
  texts = lambda s: [s[i]["text"] for i in range(len(s))]
  labels = lambda s: np.asarray([int(s[i]["label"]) for i in range(len(s))])
  train_x, train_y, val_x, val_y = (texts(task.train_source), labels(task.train_source), texts(task.eval_source),
                                    labels(task.eval_source))
  out = {"majority_class": float(max(val_y.mean(), 1 - val_y.mean())), "note": steps_note}
  for name, ngrams in (("bag_of_words", (1, 1)), ("bag_of_words_bigrams", (1, 2))):
    vectorizer = CountVectorizer(ngram_range=ngrams)
    clf = LogisticRegression(max_iter=2000).fit(vectorizer.fit_transform(train_x), train_y)
    out[name] = float(clf.score(vectorizer.transform(val_x), val_y))
  return out


def main() -> None:
  """Runs the chosen runs in order (a pre-training run before the runs that start from it) and writes JSON."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"comma-separated, of {list(RUNS)}")
  parser.add_argument("--nsp", action="store_true", help="also pretrain_nsp and finetune_nsp")
  parser.add_argument("--t5", action="store_true", help="also t5_pretrain, t5_finetune and t5_scratch")
  parser.add_argument("--root", default="workdirs/finetune_cpu", help="workdir root (existing runs resume/finish)")
  parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the gin files')")
  parser.add_argument("--pretrain_steps", type=int, default=None, help="pre-training steps (default: the gin's)")
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "finetune_cpu.json"))
  args = parser.parse_args()
  names = [n for n in args.runs.split(",") if n] + (["pretrain_nsp", "finetune_nsp"] if args.nsp else [])
  names += ["t5_pretrain", "t5_finetune", "t5_scratch"] if args.t5 else []
  unknown = sorted(set(names) - set(RUNS))
  if unknown:
    parser.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
  root = (REPO / args.root).resolve()
  import jax
  import numpy as np

  result = {"benchmark": "finetune_cpu", "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "jax": jax.__version__, "numpy": np.__version__, "runs": {}}
  t0 = time.time()
  for name in names:
    result["runs"][name] = run(name, root, args.steps, args.pretrain_steps)
  result["total_wall_s"] = round(time.time() - t0, 1)
  result["baselines"] = baselines("the same Multi30K training / validation examples as every run")
  write_json(result, args.out)


if __name__ == "__main__":
  main()
