"""Attention benchmark: forward and forward+backward TFLOP/s and peak memory per implementation.

  python benchmarks/attention.py                 # GPU: seq 512..16384, head_dim 64/128, causal and not
  python benchmarks/attention.py --smoke         # tiny sizes, proves the script runs (e.g. on CPU)
  python benchmarks/attention.py --docs=4        # packed rows: 4 documents each (segment ids)
  python benchmarks/attention.py --sweep-blocks --impls=pallas --seqs=2048,8192   # tune block sizes
  python benchmarks/attention.py --kinds=softmax,performer,rfa,bigbird,lsh,aft   # one forward per attention kind
  python benchmarks/attention.py --kinds=softmax,softmax@pallas,bigbird,bigbird@pallas   # beside the flash kernel

FLOPs: forward 4*B*H*S^2*D (halved when causal), backward 2.5x forward (so fwd+bwd = 3.5x). Tokens per
step are fixed (B = tokens // S) and H = model_dim // D, as in the FlashAttention papers. With --docs=N
each row packs N equal documents (segment ids) and FLOPs count only the visible 1/N. Each
(implementation, shape) runs in a fresh subprocess so `peak_bytes_in_use` belongs to that run alone.
Results go to --out (default benchmarks/results/attention_<device>.json; smoke runs default to the
temp dir, so CPU numbers are never mistaken for GPU ones).
--kinds times one bidirectional forward of each `ModelConfig.attention_kind` (t_jax/attention/variants.py, its
default knobs; XLA, or the implementation after '@', e.g. softmax@pallas for the flash kernel) at batch 1, 4 heads of 32, float32 (--seqs default 1k..64k), with XLA's temporary memory
from the compiled program's memory analysis; a kind whose temporary memory is above --max-gib is not run.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import jaxlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _results import default_out, write_json  # noqa: E402  (benchmarks/, the script's directory)

from t_jax.attention import attention  # noqa: E402

IMPLS = ("pallas", "xla", "cudnn")


def _timeit(f, *args, warmup, iters):
  """Median seconds of f(*args) over iters calls, after warmup calls (the first one compiles)."""
  for _ in range(warmup):
    jax.block_until_ready(f(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _peak_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def attention_flops(b, h, s, d, causal):
  """Forward FLOPs of attention (two matmuls), halved for causal."""
  f = 4 * b * h * s * s * d
  return f // 2 if causal else f


def run_one(cfg):
  """Times one (implementation, shape); returns a result dict (status 'ok', 'unsupported' or 'error')."""
  b, s, h, d, causal, impl = cfg["batch"], cfg["seq"], cfg["heads"], cfg["head_dim"], cfg["causal"], cfg["impl"]
  docs = cfg.get("docs", 1)
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, do = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in ks)
  masks = dict(causal=causal)
  if docs > 1:  # docs equal documents per row
    seg = jnp.broadcast_to(1 + jnp.arange(s, dtype=jnp.int32) * docs // s, (b, s))
    masks.update(q_segment_ids=seg, kv_segment_ids=seg)
  opts = cfg.get("kernel_options") or None
  attn = lambda q, k, v: attention(q, k, v, **masks, implementation=impl, kernel_options=opts)
  fwd = jax.jit(attn)

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(do)

  fwd_bwd = jax.jit(fwd_bwd)
  res = dict(cfg)
  flops = attention_flops(b, h, s, d, causal) // docs
  try:
    t = _timeit(fwd, q, k, v, warmup=cfg["warmup"], iters=cfg["iters"])
    res.update(fwd_ms=t * 1e3, fwd_tflops=flops / t / 1e12, fwd_peak_bytes=_peak_bytes())
    t = _timeit(fwd_bwd, q, k, v, do, warmup=cfg["warmup"], iters=cfg["iters"])
    res.update(fwd_bwd_ms=t * 1e3, fwd_bwd_tflops=3.5 * flops / t / 1e12, fwd_bwd_peak_bytes=_peak_bytes(),
               status="ok")
  except NotImplementedError as e:
    res.update(status="unsupported", error=str(e)[:300])
  except Exception as e:  # noqa: BLE001 - OOM and compile failures are results too
    res.update(status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
  return res


def run_kind(cfg):
  """One forward of an attention kind: ms and XLA's temporary bytes (status 'too big' above max_bytes: not run)."""
  from t_jax.attention import attention
  from t_jax.attention.masks import Mask
  from t_jax.attention.variants import Spec
  b, s, h, d = cfg["batch"], cfg["seq"], cfg["heads"], cfg["head_dim"]
  q, k, v = (jax.random.normal(kk, (b, s, h, d), jnp.float32) for kk in jax.random.split(jax.random.PRNGKey(0), 3))
  kind, _, impl = cfg["kind"].partition("@")  # e.g. 'bigbird@pallas': the flash kernel's visit table
  spec = Spec(kind=kind)
  k = q if spec.kind == "lsh" else k  # Reformer's shared QK
  res = dict(cfg)
  try:
    f = jax.jit(lambda q, k, v: attention(q, k, v, kind=spec, mask=Mask(), implementation=impl or "xla"))
    compiled = f.lower(q, k, v).compile()
    res.update(temp_bytes=compiled.memory_analysis().temp_size_in_bytes)
    if res["temp_bytes"] > cfg["max_bytes"]:
      return dict(res, status="too big")
    res.update(fwd_ms=_timeit(compiled, q, k, v, warmup=cfg["warmup"], iters=cfg["iters"]) * 1e3, status="ok")
  except Exception as e:  # noqa: BLE001 - OOM and compile failures are results too
    res.update(status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
  return res


def print_kinds(results):
  print(f"{'kind':<16}{'seq':>7}{'fwd ms':>10}{'temp MiB':>10}  status")
  for r in results:
    temp = r.get("temp_bytes")
    print(f"{r['kind']:<16}{r['seq']:>7}{_fmt(r.get('fwd_ms'), '.2f'):>10}"
          f"{_fmt(None if temp is None else temp / 2**20, '.1f'):>10}  {r['status']} {r.get('error', '')[:60]}")


def kinds_main(args, device):
  """--kinds: every (kind, seq), each in a fresh process; prints the table and writes the JSON."""
  results = []
  for s in map(int, args.seqs.split(",")):
    for kind in args.kinds.split(","):
      cfg = dict(kind=kind, seq=s, batch=1, heads=4, head_dim=32, warmup=args.warmup, iters=args.iters,
                 max_bytes=int(args.max_gib * 2**30), worker="kind")
      r = run_kind(cfg) if args.no_isolate else _run_isolated(cfg)
      results.append(r)
      print_kinds([r])
  print()
  print_kinds(results)
  out = dict(device=device, smoke=args.smoke, jax=jax.__version__, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             config=vars(args), note="one bidirectional forward, batch 1, 4 heads of 32, float32, XLA",
             results=results)
  write_json(out, args.out or default_out("attention", device, args.smoke, "_kinds"))


def matmul_tflops(n, warmup, iters):
  """Dense bf16 [n, n] x [n, n] matmul rate, the device's practical peak for reference."""
  a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
  return 2 * n**3 / _timeit(f, a, a, warmup=warmup, iters=iters) / 1e12


def _run_isolated(cfg):
  """run_one in a fresh Python process (clean peak-memory counter)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  for line in proc.stdout.splitlines()[::-1]:
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  return dict(cfg, status="error", error=f"worker exited {proc.returncode}: {proc.stderr[-300:]}")


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def _opts_str(opts):
  return ",".join(f"{k}={v}" for k, v in (opts or {}).items()) or "default"


def print_table(results):
  print(f"{'impl':<7}{'seq':>7}{'B':>4}{'H':>4}{'D':>5}{'causal':>7}{'docs':>5}{'fwd TF/s':>10}{'f+b TF/s':>10}"
        f"{'fwd ms':>10}{'f+b ms':>10}{'peak GiB':>10}  status / kernel options")
  for r in results:
    peak = r.get("fwd_bwd_peak_bytes")
    note = r.get("error", "")[:60] if r["status"] != "ok" else _opts_str(r.get("kernel_options"))
    print(f"{r['impl']:<7}{r['seq']:>7}{r['batch']:>4}{r['heads']:>4}{r['head_dim']:>5}{str(r['causal']):>7}"
          f"{r.get('docs', 1):>5}{_fmt(r.get('fwd_tflops'), '.1f'):>10}{_fmt(r.get('fwd_bwd_tflops'), '.1f'):>10}"
          f"{_fmt(r.get('fwd_ms'), '.2f'):>10}{_fmt(r.get('fwd_bwd_ms'), '.2f'):>10}"
          f"{_fmt(None if peak is None else peak / 2**30, '.2f'):>10}  {r['status']} {note}")


# Candidates for --sweep-blocks: forward tiles with the default backward, then backward tiles.
SWEEP_FWD = [dict(block_q=bq, block_k=bk, num_warps=w) for bq, bk in [(64, 64), (128, 64), (128, 128), (64, 128)]
             for w in (4, 8)]
SWEEP_BWD = [dict(block_q_bwd=bq, block_k_bwd=bk) for bq, bk in [(32, 64), (64, 64), (64, 128), (128, 64)]]


def parse_options(text):
  """'block_q=128,block_k=64' -> {'block_q': 128, 'block_k': 64}."""
  if not text:
    return {}
  opts = dict(kv.split("=", 1) for kv in text.split(","))
  return {k.strip(): int(v) for k, v in opts.items()}


def best_blocks(results):
  """Per (head_dim, causal, seq): the fastest forward and backward candidates of a sweep."""
  best = {}
  for r in results:
    opts = r.get("kernel_options") or {}
    if r["status"] != "ok" or r["impl"] != "pallas" or not opts:
      continue
    key = f"D={r['head_dim']} causal={r['causal']} seq={r['seq']}"
    which, metric = ("fwd", "fwd_ms") if "block_q" in opts else ("bwd", "fwd_bwd_ms")
    cur = best.setdefault(key, {}).get(which)
    if cur is None or r[metric] < cur[metric]:
      best[key][which] = dict(options=opts, **{metric: r[metric]})
  return best


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="tiny sizes; checks the script runs (CPU is fine)")
  p.add_argument("--impls", default=",".join(IMPLS))
  p.add_argument("--seqs", default=None, help="default 512,...,16384; with --kinds 1024,4096,16384,65536")
  p.add_argument("--head-dims", default="64,128")
  p.add_argument("--causal", default="false,true")
  p.add_argument("--tokens", type=int, default=16384, help="batch * seq per step")
  p.add_argument("--model-dim", type=int, default=2048, help="heads * head_dim")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--docs", type=int, default=1, help="documents packed per row (segment ids)")
  p.add_argument("--kernel-options", default="", help="Pallas options, e.g. block_q=128,block_k=64,num_warps=4")
  p.add_argument("--sweep-blocks", action="store_true", help="time each Pallas block-size candidate")
  p.add_argument("--matmul-n", type=int, default=8192)
  p.add_argument("--no-isolate", action="store_true", help="run all configs in this process")
  p.add_argument("--out", default=None)
  p.add_argument("--kinds", default="", help="attention kinds to time instead, e.g. softmax,performer,lsh,softmax@pallas")
  p.add_argument("--max-gib", type=float, default=8.0, help="--kinds: skip a kind needing more temporary memory")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()

  if args.worker:
    cfg = json.loads(args.worker)
    print("RESULT " + json.dumps(run_kind(cfg) if cfg.get("worker") == "kind" else run_one(cfg)), flush=True)
    return
  args.seqs = args.seqs or ("1024,4096,16384,65536" if args.kinds else "512,1024,2048,4096,8192,16384")
  if args.smoke:
    args.seqs, args.head_dims, args.tokens, args.model_dim = "64,128", "64", 128, 128
    args.warmup, args.iters, args.matmul_n = 1, 2, 256

  dev = jax.devices()[0]
  device = getattr(dev, "device_kind", dev.platform)
  if args.kinds:
    return kinds_main(args, device)
  results = []
  for d in map(int, args.head_dims.split(",")):
    for s in map(int, args.seqs.split(",")):
      for causal in (c.strip().lower() == "true" for c in args.causal.split(",")):
        for impl in args.impls.split(","):
          variants = [parse_options(args.kernel_options)]
          if impl == "pallas" and args.sweep_blocks:
            variants = [dict(variants[0], **o) for o in SWEEP_FWD + SWEEP_BWD]
          for opts in variants if impl == "pallas" else [{}]:
            cfg = dict(impl=impl, seq=s, batch=max(1, args.tokens // s), heads=max(1, args.model_dim // d),
                       head_dim=d, causal=causal, docs=args.docs, kernel_options=opts, warmup=args.warmup,
                       iters=args.iters)
            r = run_one(cfg) if args.no_isolate else _run_isolated(cfg)
            results.append(r)
            print_table([r])
  mm = matmul_tflops(args.matmul_n, args.warmup, args.iters)
  print()
  print_table(results)
  print(f"\ndense bf16 matmul {args.matmul_n}^3: {mm:.1f} TFLOP/s on {device}")
  best = best_blocks(results) if args.sweep_blocks else None
  for key, b in (best or {}).items():
    print(key, " ".join(f"{w}: {_opts_str(v['options'])}" for w, v in sorted(b.items())))

  from t_jax.kernels import default_blocks
  out = dict(
      device=device, platform=dev.platform, device_count=jax.device_count(), smoke=args.smoke,
      jax=jax.__version__, jaxlib=jaxlib.__version__, python=platform.python_version(),
      time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), config=vars(args),
      pallas_default_blocks={d: default_blocks("mosaic_tpu" if dev.platform == "tpu" else "triton", int(d))
                             for d in args.head_dims.split(",")},
      flops_note="fwd = 4*B*H*S^2*D (x0.5 causal, x1/docs packed); fwd+bwd = 3.5 x fwd",
      matmul_bf16_tflops=mm, best_blocks=best, results=results)
  tag = "_sweep" if args.sweep_blocks else f"_docs{args.docs}" if args.docs > 1 else ""
  path = args.out or default_out("attention", device, args.smoke, tag)
  write_json(out, path)


if __name__ == "__main__":
  main()
