"""The training step's own matmuls, one by one: XLA (what t_jax's step runs) beside PyTorch, same device.

  python benchmarks/matmuls.py                        # the quickstart shape (d 128, 4 layers, 16 x 128, vocab 2048)
  python benchmarks/matmuls.py --d=256 --mlp=1024 --vocab=8192 --batch=8 --seq=256
  python benchmarks/matmuls.py --smoke

A GPT-2-style decoder step does, per layer, the q/k/v/out and the two MLP projections forward (NN), their
input gradients (NT: times the transposed weight) and their weight gradients (TN: contracted over the
tokens), the batched attention matmuls forward and backward, and once the tied un-embedding in the same
three forms. Each is timed alone (jitted dot_general / torch.matmul on transposed views, median of
--reps after a warm-up), rounds alternate the frameworks, and the table gives GFLOP/s per form and the
matmul time of one step (time x count): the part of the step the matmul library decides. CPU numbers are
CPU numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import default_out, write_json  # noqa: E402


def step_matmuls(batch, seq, d, mlp, vocab, heads, layers):
  """(name, batch dims, m, k, n, transposed lhs, transposed rhs, count per step) of one decoder step."""
  n, hd, bh = batch * seq, d // heads, batch * heads
  rows = []
  for name, k_in, k_out, count in (("qkv/out proj", d, d, 4 * layers), ("mlp in", d, mlp, layers),
                                   ("mlp out", mlp, d, layers), ("un-embed (tied)", d, vocab, 1)):
    rows += [(f"{name} fwd", (), n, k_in, k_out, False, False, count),            # x @ W
             (f"{name} dx", (), n, k_out, k_in, False, True, count),              # dy @ W^T
             (f"{name} dW", (), k_in, n, k_out, True, False, count)]              # x^T @ dy
  rows += [("attn q k^T", (bh,), seq, hd, seq, False, True, layers),
           ("attn p v", (bh,), seq, seq, hd, False, False, layers),
           ("attn bwd dp = dout v^T", (bh,), seq, hd, seq, False, True, layers),
           ("attn bwd dv = p^T dout", (bh,), seq, seq, hd, True, False, layers),
           ("attn bwd dq = ds k", (bh,), seq, seq, hd, False, False, layers),
           ("attn bwd dk = ds^T q", (bh,), seq, seq, hd, True, False, layers)]
  return rows


def operands(rng, bdims, m, k, n, ta, tb):
  lhs = rng.standard_normal(bdims + ((k, m) if ta else (m, k)), np.float32)
  rhs = rng.standard_normal(bdims + ((n, k) if tb else (k, n)), np.float32)
  return lhs, rhs


def jax_matmul(bdims, ta, tb, rank):
  """The dot_general XLA sees in the step: contract the named axes, no explicit transpose."""
  b = tuple(range(len(bdims)))
  lc, rc = (rank - 2 if ta else rank - 1), (rank - 1 if tb else rank - 2)
  f = jax.jit(lambda a, c: jax.lax.dot_general(a, c, (((lc,), (rc,)), (b, b))))
  return f


def median_time(f, sync, reps):
  sync(f())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    sync(f())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  for name, default in (("batch", 16), ("seq", 128), ("d", 128), ("mlp", 512), ("vocab", 2048), ("heads", 4),
                        ("layers", 4), ("reps", 15), ("rounds", 3)):
    p.add_argument(f"--{name}", type=int, default=default)
  p.add_argument("--smoke", action="store_true", help="tiny shapes, one round")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  if args.smoke:
    args.batch, args.seq, args.d, args.mlp, args.vocab, args.reps, args.rounds = 2, 16, 32, 64, 64, 2, 1
  try:
    import torch
  except ImportError:
    torch = None
  rng, rows = np.random.default_rng(0), step_matmuls(args.batch, args.seq, args.d, args.mlp, args.vocab,
                                                     args.heads, args.layers)
  times = {r[0]: {"xla": [], "pytorch": []} for r in rows}
  cases = []
  for name, bdims, m, k, n, ta, tb, count in rows:
    a, c = operands(rng, bdims, m, k, n, ta, tb)
    ja, jc, f = jax.device_put(a), jax.device_put(c), jax_matmul(bdims, ta, tb, a.ndim)
    runs = {"xla": (lambda f=f, ja=ja, jc=jc: f(ja, jc), jax.block_until_ready)}
    if torch is not None:
      lhs, rhs = (torch.from_numpy(x).transpose(-1, -2) if t else torch.from_numpy(x) for x, t in ((a, ta), (c, tb)))
      runs["pytorch"] = (lambda lhs=lhs, rhs=rhs: torch.matmul(lhs, rhs), lambda x: x)  # transposed views: no copy
    cases.append((name, runs, 2 * int(np.prod(bdims or (1,))) * m * k * n, count, (bdims, m, k, n, ta, tb)))
  for i in range(args.rounds):
    for name, runs, *_ in cases:
      for fw in list(runs)[::-1] if i % 2 else list(runs):
        times[name][fw].append(median_time(*runs[fw], args.reps))
  table, totals = [], {"xla": 0.0, "pytorch": 0.0}
  print(f"{'matmul':<26}{'shape (batch) m x k x n':>26}{'count':>6}{'XLA GFLOP/s':>13}{'torch GFLOP/s':>15}"
        f"{'XLA/torch':>10}")
  for name, runs, flops, count, (bdims, m, k, n, ta, tb) in cases:
    best = {fw: min(times[name][fw]) for fw in runs}
    rate = {fw: flops / t / 1e9 for fw, t in best.items()}
    for fw, t in best.items():
      totals[fw] += t * count
    shape = f"{'x'.join(map(str, bdims)) + ' ' if bdims else ''}{m}x{k}x{n}{' T.' if ta else ''}{' .T' if tb else ''}"
    ratio = rate["xla"] / rate["pytorch"] if "pytorch" in rate else None
    print(f"{name:<26}{shape:>26}{count:>6}{rate['xla']:>13.1f}{rate.get('pytorch', float('nan')):>15.1f}"
          f"{'-' if ratio is None else format(ratio, '.2f'):>10}")
    table.append(dict(matmul=name, batch_dims=bdims, m=m, k=k, n=n, transposed_lhs=ta, transposed_rhs=tb,
                      count=count, flops=flops, seconds=times[name], gflops_per_s=rate, xla_over_torch=ratio))
  print(f"matmul time of one step: XLA {totals['xla'] * 1e3:.1f} ms"
        + (f", PyTorch {totals['pytorch'] * 1e3:.1f} ms" if torch is not None else " (no torch)"))
  dev = jax.devices()[0]
  out = dict(device=dict(platform=dev.platform, kind=dev.device_kind), cpu_count=os.cpu_count(),
             load_average=os.getloadavg(), settings=vars(args),
             versions=dict(jax=jax.__version__, numpy=np.__version__, torch=getattr(torch, "__version__", None)),
             time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), step_matmul_seconds=totals if torch else dict(xla=totals["xla"]),
             matmuls=table)
  write_json(out, args.out or default_out("matmuls", dev.device_kind, args.smoke))


if __name__ == "__main__":
  main()
