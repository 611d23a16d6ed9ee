"""Length extrapolation (Press et al. 2022): a causal LM's perplexity at 1x, 2x, 4x, 8x its training length.

  python -m launch.eval_lengths --workdir=sweeps/positions/position=alibi
  python -m launch.eval_lengths --sweep_dir=sweeps/positions --factors=1,2,4,8   # every variant of a sweep

The run's validation split (its TaskConfig.eval_source) is tokenized, joined with end-of-text ids into one
stream and cut into non-overlapping windows of factor x CausalLM.seq_len tokens; the perplexity is exp(mean
next-token loss) over every position of every window (the same tokens at every length, up to --max_tokens).
Learned positions have no embedding past ModelConfig.max_len: those cells are empty. With --sweep_dir the table
is also written to DIR/length_extrapolation.{md,csv,json} and plotted in DIR/length_extrapolation.png.
Bad input: one `error:` line on stderr, exit 2.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from launch import config, error_line
from launch.decode import Parser, UsageError


def token_stream(workdir: str, tok: Any, max_tokens: int) -> tuple[np.ndarray, int]:
  """(the validation split as one id stream, the training seq_len), from the run's own config."""
  config.parse([str(Path(workdir, "config.gin"))])
  task = config.build(config.TaskConfig)
  seq_len = task.objective.lengths().get("inputs")
  if seq_len is None or task.eval_source is None:
    raise UsageError(f"{workdir}: not a causal LM run with a validation split")
  ids: list[int] = []
  for i in range(len(task.eval_source)):
    if (doc := task.eval_source[i]) is not None:
      ids += [*tok.encode(doc["text"]), tok.eos_id]
    if len(ids) >= max_tokens:
      break
  return np.asarray(ids[:max_tokens], np.int32), seq_len


def perplexity(model: Any, params: Any, stream: np.ndarray, length: int, batch_size: int) -> float:
  """exp(mean next-token loss) over the non-overlapping windows of `length` + 1 tokens in `stream`."""
  import jax
  import jax.numpy as jnp

  windows = stream[:len(stream) // (length + 1) * (length + 1)].reshape(-1, length + 1)
  if not len(windows):
    raise UsageError(f"the validation stream ({len(stream)} tokens) is shorter than one window of {length}")

  @jax.jit
  def loss_sum(x: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(model.apply({"params": params}, x[:, :-1]).astype(jnp.float32))
    return -jnp.take_along_axis(logp, x[:, 1:, None], axis=-1).sum()

  total = sum(float(loss_sum(windows[i:i + batch_size])) for i in range(0, len(windows), batch_size))
  return math.exp(total / windows[:, 1:].size)


def evaluate(workdir: str, factors: Sequence[int], max_tokens: int, batch_size: int) -> dict:
  """{'position', 'seq_len', 'tokens', 'perplexity': {length: value or None}} of one run."""
  from t_jax.models import build_model
  from t_jax.workdir import load

  cfg, params, tok = load(workdir)
  if tok is None or cfg.architecture != "decoder":
    raise UsageError(f"{workdir}: needs a decoder-only LM with its tokenizer")
  stream, seq_len = token_stream(workdir, tok, max_tokens)
  out = {}
  for f in factors:
    n = f * seq_len
    if cfg.position == "learned" and n > cfg.max_len:
      out[n] = None  # no embedding for these positions
      continue
    model = build_model(cfg.replace(max_len=max(cfg.max_len, n)))
    out[n] = perplexity(model, params, stream, n, max(1, batch_size // f))
  return {"workdir": workdir, "position": cfg.position, "seq_len": seq_len, "tokens": len(stream),
          "perplexity": out}


def write_report(rows: list[dict], factors: Sequence[int], out_dir: Path) -> None:
  """length_extrapolation.{csv,md,json,png} in out_dir."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = [Path(r["workdir"]).name for r in rows]
  head = ["variant", "position", *[f"ppl@{f}x" for f in factors]]
  cells = [[name, r["position"], *[_fmt(v) for v in r["perplexity"].values()]] for name, r in zip(names, rows)]
  with open(out_dir / "length_extrapolation.csv", "w", newline="") as f:
    csv.writer(f).writerows([head, *cells])
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)] + ["| " + " | ".join(c) + " |" for c in cells]
  (out_dir / "length_extrapolation.md").write_text("\n".join(lines) + "\n")
  (out_dir / "length_extrapolation.json").write_text(json.dumps(rows, indent=1) + "\n")
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, r in zip(names, rows):
    points = [(n, v) for n, v in r["perplexity"].items() if v is not None]
    ax.plot(*zip(*points), marker="o", label=f"{name}")
  ax.set(xscale="log", yscale="log", xlabel="evaluation length (tokens)", ylabel="validation perplexity",
         title=f"trained at {rows[0]['seq_len']} tokens")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_dir / "length_extrapolation.png", dpi=120)


def _fmt(value: Optional[float]) -> str:
  return "" if value is None else f"{value:.2f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line (module docstring); bad input is one error line and exit 2."""
  p = Parser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", action="append", default=[], help="a causal LM training run (repeatable)")
  p.add_argument("--sweep_dir", default=None, help="every finished variant of this sweep")
  p.add_argument("--factors", default="1,2,4,8", help="evaluation lengths as multiples of the training length")
  p.add_argument("--max_tokens", type=int, default=65536, help="validation tokens used at every length")
  p.add_argument("--batch_size", type=int, default=16, help="windows per batch at 1x (divided by the factor)")
  try:
    args = p.parse_args(argv)
    factors = [int(f) for f in args.factors.split(",")]
    workdirs = list(args.workdir)
    if args.sweep_dir:
      workdirs += sorted(str(d) for d in Path(args.sweep_dir).iterdir() if (d / "config.gin").is_file())
    if not workdirs or min(factors) < 1:
      raise UsageError("give --workdir or --sweep_dir (with finished runs) and factors >= 1")
    rows = []
    for w in workdirs:
      rows.append(evaluate(w, factors, args.max_tokens, args.batch_size))
      print(f"{Path(w).name:<28} {rows[-1]['position']:<11} "
            + "  ".join(f"{n}: {_fmt(v) or 'n/a':>8}" for n, v in rows[-1]["perplexity"].items()), flush=True)
  except (UsageError, ValueError, OSError) as e:
    print(f"error: {error_line(e)}", file=sys.stderr)
    return 2
  if args.sweep_dir:
    write_report(rows, factors, Path(args.sweep_dir))
    print(f"wrote {Path(args.sweep_dir, 'length_extrapolation.md')} (.csv, .json, .png)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
