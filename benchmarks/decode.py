"""Decoding throughput vs the memory-bandwidth bound, and speculative-decoding speed-up.

  python benchmarks/decode.py            # accelerator sizes -> benchmarks/results/decode_<device>.json
  python benchmarks/decode.py --smoke    # tiny sizes, runs on CPU (JSON to the temp dir)
  python benchmarks/decode.py --workdir=DIR --out=X.json   # a trained run's model: throughput only

Per batch size: greedy decode tokens/s (prefill excluded: time(N tokens) - time(1 token)) and the
bound B / (bytes read per step / bandwidth), bytes = parameters + the whole KV cache (the masked
decode step reads every slot). Bandwidth = a large on-device copy (read + write). Speculative:
greedy with an early-exit draft (the target's first layers, shared embeddings and head) vs plain
greedy, twice: with the random target as is (the draft rarely agrees), and with an "agreeing" target
whose later layers' output projections are scaled by --late_layer_scale, so they barely move the residual
stream and the draft agrees often (same FLOPs and bytes per step: the speed-up of the mechanism at a
high acceptance rate, as with a well-matched trained draft). The goals (batch-1 decode >= 70% of the
bound; speculative >= 2x where the draft agrees) are checked and printed.
CPU numbers (e.g. --smoke) are CPU numbers: never report them as GPU results.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
from _results import default_out, write_json  # benchmarks/, the script's directory

from t_jax import workdir as workdir_lib
from t_jax.inference import api
from t_jax.models import ModelConfig, build_model, count_params, init_params


def measure_bandwidth(nbytes: int, repeats: int) -> float:
  """Bytes/s of an on-device elementwise copy (reads and writes nbytes each) of normal-distributed data."""
  x = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)
  f = jax.jit(lambda a: a * 1.0001)
  f(x).block_until_ready()
  t = time.perf_counter()
  for _ in range(repeats):
    y = f(x)
  y.block_until_ready()
  return 2 * x.nbytes * repeats / (time.perf_counter() - t)


def timed(plan, params, draft_params, ids, lengths, repeats: int) -> tuple[float, dict]:
  """Median seconds of one jitted generation (compiled first) and its stats."""
  args = (plan, params, draft_params, jnp.asarray(ids), jnp.asarray(lengths), jax.random.key(0))
  out = api._decode(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = jax.block_until_ready(api._decode(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times)), out[2]


def step_bytes(cfg: ModelConfig, params, batch: int, slots: int) -> int:
  """Bytes a decode step must read: every parameter plus every k/v cache slot of every layer."""
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  kv = 2 * cfg.num_layers * batch * slots * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
  return int(weights + kv)


def throughput(cfg: ModelConfig, params, batch: int, args: argparse.Namespace, bandwidth: float) -> dict:
  """One row of the table."""
  rng = np.random.default_rng(batch)
  prompts = rng.integers(3, cfg.vocab_size, (batch, args.prompt_len)).tolist()
  plan, ids, lengths = api.prepare(cfg, prompts, args.new_tokens, "greedy")
  plan1, _, _ = api.prepare(cfg, prompts, 1, "greedy")
  full, _ = timed(plan, params, None, ids, lengths, args.repeats)
  prefill, _ = timed(plan1, params, None, ids, lengths, args.repeats)
  decode_s = max(full - prefill, 1e-9)
  tok_s = batch * (args.new_tokens - 1) / decode_s
  bound = batch * bandwidth / step_bytes(cfg, params, batch, plan.target.slots)
  return dict(batch=batch, decode_tok_s=tok_s, end_to_end_tok_s=batch * args.new_tokens / full,
              step_ms=1e3 * decode_s / (args.new_tokens - 1), prefill_ms=1e3 * prefill,
              bound_tok_s=bound, fraction_of_bound=tok_s / bound)


def early_exit_draft(cfg: ModelConfig, params, layers: int) -> tuple[ModelConfig, dict]:
  """The target's first `layers` layers with its embeddings, final norm and head."""
  if cfg.scan_layers:
    dec = dict(params["decoder"], layers=jax.tree_util.tree_map(lambda x: x[:layers], params["decoder"]["layers"]))
  else:
    dec = {k: v for k, v in params["decoder"].items() if not k.startswith("layer_") or int(k[6:]) < layers}
  return cfg.replace(num_layers=layers), dict(params, decoder=dec)


def agreeing_target(cfg: ModelConfig, params, layers: int, scale: float) -> dict:
  """The target with the attention and MLP output projections of layers >= `layers` scaled by `scale`."""
  def shrink(path: tuple, x: jax.Array) -> jax.Array:
    names = [getattr(k, "key", "") for k in path]
    late = any(n.startswith("layer_") and int(n[6:]) >= layers for n in names)
    return x * scale if late and ("out" in names or "wo" in names) else x

  if cfg.scan_layers:
    raise ValueError("--late_layer_scale needs unrolled layers (no --scan_layers)")
  return jax.tree_util.tree_map_with_path(shrink, params)


def speculative(cfg: ModelConfig, params, args: argparse.Namespace, setting: str) -> list[dict]:
  """Speed-up of greedy speculative decoding over greedy, per batch size."""
  if setting == "agreeing":
    params = agreeing_target(cfg, params, args.draft_layers, args.late_layer_scale)
  dcfg, dparams = early_exit_draft(cfg, params, args.draft_layers)
  rows = []
  for batch in args.spec_batches:
    prompts = np.random.default_rng(batch).integers(3, cfg.vocab_size, (batch, args.prompt_len)).tolist()
    plan, ids, lengths = api.prepare(cfg, prompts, args.new_tokens, "greedy")
    splan, _, _ = api.prepare(cfg, prompts, args.new_tokens, "speculative", draft=(dcfg, dparams),
                              num_draft_tokens=args.num_draft_tokens)
    base, _ = timed(plan, params, None, ids, lengths, args.repeats)
    spec, stats = timed(splan, params, dparams, ids, lengths, args.repeats)
    rows.append(dict(setting=setting, batch=batch, greedy_s=base, speculative_s=spec, speedup=base / spec,
                     acceptance_rate=int(stats["accepted"]) / max(1, int(stats["drafted"])),
                     target_calls=int(stats["iterations"]) + 1, draft_layers=args.draft_layers,
                     num_draft_tokens=args.num_draft_tokens))
  return rows


def model_config(args: argparse.Namespace) -> ModelConfig:
  """The benchmarked decoder (GQA, RoPE), tiny under --smoke."""
  if args.smoke:
    return ModelConfig(vocab_size=256, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=128, num_layers=4,
                       max_len=256, activation="silu", gated=True, norm="rmsnorm", use_bias=False,
                       tie_embeddings=False, scan_layers=args.scan_layers)
  return ModelConfig(vocab_size=32000, d_model=args.d_model, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                     mlp_dim=4 * args.d_model, num_layers=args.num_layers, max_len=4096, activation="silu",
                     gated=True, norm="rmsnorm", use_bias=False, tie_embeddings=False, dtype=args.dtype,
                     param_dtype=args.dtype, scan_layers=args.scan_layers)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  """Command-line flags (smoke overrides the sizes)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/decode_<device>.json; "
                 "smoke runs: the temp dir).")
  p.add_argument("--smoke", action="store_true", help="Tiny sizes that run on CPU.")
  p.add_argument("--workdir", default=None, help="Time a trained (or converted) workdir's model instead; "
                 "throughput only, no speculative rows.")
  p.add_argument("--batches", default="1,2,4,8,16,32,64")
  p.add_argument("--spec_batches", default="1,8")
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--d_model", type=int, default=1024)
  p.add_argument("--num_heads", type=int, default=16)
  p.add_argument("--num_kv_heads", type=int, default=4)
  p.add_argument("--num_layers", type=int, default=16)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--scan_layers", action="store_true")
  p.add_argument("--draft_layers", type=int, default=2)
  p.add_argument("--num_draft_tokens", type=int, default=4)
  p.add_argument("--late_layer_scale", type=float, default=0.02,
                 help="Scale of the late layers' output projections in the 'agreeing' speculative setting.")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--bandwidth_mib", type=int, default=2048, help="Size of the bandwidth probe.")
  args = p.parse_args(argv)
  if args.smoke:
    args.batches, args.spec_batches, args.prompt_len, args.new_tokens = "1", "1", 16, 16
    args.repeats, args.bandwidth_mib, args.draft_layers = 2, 64, 1
  args.batches = [int(b) for b in args.batches.split(",")]
  args.spec_batches = [int(b) for b in args.spec_batches.split(",")]
  return args


def main(argv: list[str] | None = None) -> int:
  """Runs everything, prints the table, writes the JSON."""
  args = parse_args(argv)
  if args.workdir:  # e.g. each variant of ablations/mha_gqa_mqa.gin
    cfg, params, _ = workdir_lib.load(args.workdir)
  else:
    cfg = model_config(args)
    params = init_params(build_model(cfg), jax.random.key(0))
  dev = jax.devices()[0]
  bandwidth = measure_bandwidth(args.bandwidth_mib << 20, max(args.repeats, 5))
  print(f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}   params: {count_params(params):,}   "
        f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s" + ("   [smoke: CPU-sized, not a GPU result]" * args.smoke))
  rows = [throughput(cfg, params, b, args, bandwidth) for b in args.batches]
  print(f"{'batch':>5} {'decode tok/s':>13} {'e2e tok/s':>10} {'step ms':>8} {'bound tok/s':>12} {'of bound':>9}")
  for r in rows:
    print(f"{r['batch']:>5} {r['decode_tok_s']:>13.1f} {r['end_to_end_tok_s']:>10.1f} {r['step_ms']:>8.2f} "
          f"{r['bound_tok_s']:>12.1f} {r['fraction_of_bound']:>9.1%}")
  if any(r["fraction_of_bound"] > 1 for r in rows):
    print("note: above the bound = the working set fits in on-chip caches, faster than the copy probe")
  spec = [] if args.workdir else speculative(cfg, params, args, "random") + speculative(cfg, params, args, "agreeing")
  for s in spec:
    print(f"speculative ({s['setting']} target) batch {s['batch']}: speed-up {s['speedup']:.2f}x, acceptance "
          f"{s['acceptance_rate']:.1%} (draft: first {s['draft_layers']} of {cfg.num_layers} layers, "
          f"{s['num_draft_tokens']} tokens)")
  goals = {} if args.workdir else check_goals(rows, spec)
  for name, ok in goals.items():
    print(f"goal {name}: {'met' if ok else 'NOT met'}" + (" (CPU: meaningless)" if dev.platform == "cpu" else ""))
  result = dict(
      device=dict(platform=dev.platform, kind=dev.device_kind, count=jax.device_count()),
      versions=dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jax.lib.__version__,
                    flax=flax.__version__, numpy=np.__version__),
      config=dataclasses.asdict(cfg), workdir=args.workdir,
      settings={k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
      bandwidth_bytes_per_s=bandwidth, throughput=rows, speculative=spec, goals=goals, smoke=args.smoke)
  out = args.out or default_out("decode", dev.device_kind, args.smoke)
  write_json(result, out)
  return 0


def check_goals(rows: list[dict], spec: list[dict]) -> dict:
  """The issue's goals: batch-1 decode >= 70% of the bandwidth bound; speculative >= 2x with an agreeing draft."""
  batch1 = [r["fraction_of_bound"] for r in rows if r["batch"] == 1]
  agreeing = [s["speedup"] for s in spec if s["setting"] == "agreeing" and s["batch"] == 1]
  return {"batch1_at_least_70pct_of_bound": bool(batch1) and batch1[0] >= 0.7,
          "speculative_at_least_2x_when_agreeing": bool(agreeing) and agreeing[0] >= 2.0}


if __name__ == "__main__":
  sys.exit(main())
