"""Serving throughput: static batching vs paged continuous batching (t_jax.inference.Engine).

  python benchmarks/serving.py            # -> benchmarks/results/serving_<device>.json
  python benchmarks/serving.py --smoke    # tiny sizes, seconds on CPU (JSON to the temp dir)

A request mix with Poisson arrivals, a shared system prompt plus a user part of mixed length, and
long-tailed output lengths (most short, some long), served three ways (greedy):
  static              fixed batches in arrival order, each one `t_jax.generate` with contiguous caches
                      running to its longest request (a batch starts when its last request has arrived)
  continuous          Engine: paged cache, requests join free slots between decode steps
  continuous_prompt_cache  the same with the system prompt loaded from a prompt cache (shared pages)
  continuous_chunk1         continuous with decode_chunk=1: a host round trip after every decode step
                            (--profile only: what multi-step decoding saves)
Time is simulated from measured compute: the clock jumps to the next arrival when idle, and advances by
each measured generate call / engine step. Every mode runs once untimed first (compilation), then the
modes run interleaved for --rounds rounds (the order rotating), so a shared machine's load hits them
alike; tokens/s is each mode's median over the rounds, and the speed-up the median of per-round ratios.
Reports generated tokens/s, mean / p99 latency (arrival to last token), KV memory (allocated cache slots
per token actually held: static at each batch's end, paged averaged over steps) and, for the engine,
where its time went (prefill vs decode programs, decode programs run, programs compiled while timed).
Goals: continuous >= 2x the tokens/s of static; paged KV memory within 10% of the tokens held.
CPU numbers (e.g. --smoke) are CPU numbers: never report them as GPU results.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

import flax
import jax
import numpy as np
from _results import default_out  # benchmarks/, the script's directory

from t_jax.inference import Engine, generate, save_prompt_cache
from t_jax.inference import engine as engine_lib
from t_jax.models import ModelConfig, build_model, init_params

MIXES = ("small", "issue")
# (user tokens after the system prompt, short outputs (75%), long outputs (25%)): inclusive ranges.
_LENGTHS = {"small": ((4, 32), (4, 16), (48, 96)), "issue": ((0, 1008), (16, 64), (128, 256))}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true", help="Tiny model and request mix (CPU, seconds).")
  p.add_argument("--mix", default="small", choices=MIXES,
                 help="small: system prompt + 4..32 user tokens, outputs 4..16 (75%%) / 48..96 (CPU-sized); "
                      "issue: 256 requests, prompts 16..1024, outputs 16..64 (75%%) / 128..256, a 2048-context "
                      "model, 64 slots (a GPU's scale).")
  p.add_argument("--requests", type=int, default=None, help="Requests (64; smoke 16).")
  p.add_argument("--rate", type=float, default=None, help="Poisson arrival rate, requests/s (smoke: 500).")
  p.add_argument("--max_batch", type=int, default=None, help="Slots / static batch size (8; issue 64).")
  p.add_argument("--page_size", type=int, default=None, help="Positions per page (8; issue 16).")
  p.add_argument("--system_len", type=int, default=None, help="Shared system-prompt tokens (64; smoke 24).")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--rounds", type=int, default=None, help="Timed rounds of every mode, interleaved (3; smoke 1).")
  p.add_argument("--decode_chunk", type=int, default=8, help="Engine decode steps per program.")
  p.add_argument("--profile", action="store_true", help="Also run continuous_chunk1 (decode_chunk=1).")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/serving_<device>.json; "
                                              "--smoke: the temp dir).")
  args = p.parse_args(argv)
  issue = args.mix == "issue"
  if issue and args.smoke:
    p.error("--smoke runs the small mix")
  args.requests = args.requests or (16 if args.smoke else 256 if issue else 64)
  args.rate = args.rate or (500.0 if args.smoke else 200.0 if issue else 50.0)
  args.system_len = args.system_len or (24 if args.smoke else 16 if issue else 64)
  args.max_batch = args.max_batch or (64 if issue else 8)
  args.page_size = args.page_size or (16 if issue else 8)
  args.rounds = args.rounds or (1 if args.smoke else 3)
  return args


def model_config(args: argparse.Namespace) -> ModelConfig:
  if args.smoke:
    return ModelConfig(vocab_size=256, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=128, num_layers=2,
                       max_len=256, tie_embeddings=False)
  if args.mix == "issue":  # ~150M parameters, bf16
    return ModelConfig(vocab_size=32000, d_model=1024, num_heads=16, num_kv_heads=4, mlp_dim=4096, num_layers=8,
                       max_len=2048, tie_embeddings=False, dtype="bfloat16")
  return ModelConfig(vocab_size=1024, d_model=256, num_heads=8, num_kv_heads=4, mlp_dim=1024, num_layers=4,
                     max_len=512, tie_embeddings=False)


@dataclasses.dataclass
class Request:
  arrival: float
  prompt: list[int]
  new_tokens: int


def request_mix(cfg: ModelConfig, args: argparse.Namespace) -> list[Request]:
  """Poisson arrivals; the system prompt + a user part; long-tailed outputs (see --mix)."""
  rng = np.random.default_rng(args.seed)
  user_len, short, long = _LENGTHS[args.mix]
  system = rng.integers(3, cfg.vocab_size, args.system_len).tolist()
  arrivals = np.cumsum(rng.exponential(1.0 / args.rate, args.requests))
  out = []
  for t in arrivals:
    user = rng.integers(3, cfg.vocab_size, int(rng.integers(user_len[0], user_len[1] + 1))).tolist()
    lo, hi = long if rng.random() < 0.25 else short
    out.append(Request(float(t), system + user, int(rng.integers(lo, hi + 1))))
  return out


def summarize(requests: list[Request], finish: dict[int, float], kv_ratio: float, kv_bytes: float) -> dict:
  latency = np.asarray([finish[i] - r.arrival for i, r in enumerate(requests)])
  tokens = sum(r.new_tokens for r in requests)
  span = max(finish.values()) - requests[0].arrival
  return dict(tokens=tokens, seconds=span, tokens_per_s=tokens / span, mean_latency_s=float(latency.mean()),
              p99_latency_s=float(np.percentile(latency, 99)), kv_slots_per_token_held=kv_ratio,
              mean_kv_bytes=kv_bytes)


def static(cfg: ModelConfig, params, requests: list[Request], args: argparse.Namespace) -> dict:
  """Fixed batches in arrival order through generate, each running exactly to its longest request."""
  now, finish, ratios, kv = 0.0, {}, [], []
  token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
  for at in range(0, len(requests), args.max_batch):
    batch = requests[at:at + args.max_batch]
    steps = max(r.new_tokens for r in batch)
    now = max(now, batch[-1].arrival)
    t = time.perf_counter()
    generate(cfg, params, [r.prompt for r in batch], steps, pad_multiple=16)
    now += time.perf_counter() - t
    finish.update({at + i: now for i in range(len(batch))})
    slots = len(batch) * (-(-max(len(r.prompt) for r in batch) // 16) * 16 + steps)
    ratios.append(slots / sum(len(r.prompt) + r.new_tokens - 1 for r in batch))
    kv.append(slots * token_bytes)
  return summarize(requests, finish, float(np.mean(ratios)), float(np.mean(kv)))


def _programs() -> int:
  """Engine programs compiled so far (prefill widths, decode chunk lengths)."""
  return sum(f._cache_size() for f in (engine_lib._prefill, engine_lib._decode))


def continuous(cfg: ModelConfig, params, requests: list[Request], args: argparse.Namespace,
               prompt_cache: str | None = None, decode_chunk: int | None = None) -> dict:
  """The Engine on a simulated clock; KV slots vs tokens held sampled at every step."""
  longest = max(len(r.prompt) + r.new_tokens for r in requests)
  engine = Engine(cfg, params, max_batch=args.max_batch, page_size=args.page_size, max_seq_len=longest,
                  num_pages=args.max_batch * -(-longest // args.page_size) + 16, prompt_cache=prompt_cache,
                  decode_chunk=decode_chunk or args.decode_chunk)
  now, pending, finish, slots, held, kv = 0.0, collections.deque(range(len(requests))), {}, 0, 0, []
  ids, prefill_s, decode_s, compiled = {}, 0.0, 0.0, _programs()
  while len(finish) < len(requests):
    while pending and requests[pending[0]].arrival <= now:
      i = pending.popleft()
      ids[engine.submit(requests[i].prompt, requests[i].new_tokens)] = i
    t = time.perf_counter()
    engine._admit()  # (step() admits too; timed apart here to split prefill from decoding)
    t2 = time.perf_counter()
    stepped = engine.step()
    t3 = time.perf_counter()
    now, prefill_s, decode_s = now + t3 - t, prefill_s + t2 - t, decode_s + t3 - t2
    if not stepped and not engine.finished:
      now = max(now, requests[pending[0]].arrival) if pending else now
    mem = engine.memory()
    slots, held = slots + mem["slots"], held + mem["tokens"]
    kv.append(mem["bytes"])
    for rid in list(engine.finished):
      engine.finished.pop(rid)
      finish[ids[rid]] = now
  out = summarize(requests, finish, slots / max(held, 1), float(np.mean(kv)))
  out.update(prefill_s=prefill_s, decode_s=decode_s, decode_programs_run=engine.decode_calls,
             programs_compiled_while_timed=_programs() - compiled)
  return out


def median_run(runs: list[dict]) -> dict:
  """The run with the median tokens/s (every number from one run), plus all rounds' tokens/s."""
  ranked = sorted(runs, key=lambda m: m["tokens_per_s"])
  return dict(ranked[(len(ranked) - 1) // 2], tokens_per_s_rounds=[m["tokens_per_s"] for m in runs])


def main(argv: list[str] | None = None) -> int:
  """Runs the modes (each once to compile, then interleaved rounds), prints the table and goals, writes the JSON."""
  args = parse_args(argv)
  cfg = model_config(args)
  params = init_params(build_model(cfg), jax.random.key(0))
  requests = request_mix(cfg, args)
  dev = jax.devices()[0]
  path = os.path.join(tempfile.mkdtemp(), "system_prompt_cache")
  save_prompt_cache(cfg, params, requests[0].prompt[:args.system_len], path)
  runs = {"static": lambda: static(cfg, params, requests, args),
          "continuous": lambda: continuous(cfg, params, requests, args),
          "continuous_prompt_cache": lambda: continuous(cfg, params, requests, args, path)}
  if args.profile:
    runs["continuous_chunk1"] = lambda: continuous(cfg, params, requests, args, decode_chunk=1)
  for run in runs.values():
    run()  # compiles
  names, rounds = list(runs), collections.defaultdict(list)
  for r in range(args.rounds):  # interleaved, the order rotating: load on a shared machine hits every mode
    for name in names[r % len(names):] + names[:r % len(names)]:
      rounds[name].append(runs[name]())
  modes = {name: median_run(rounds[name]) for name in names}
  ratio = lambda a, b: [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(rounds[a], rounds[b])]
  speedups = {f"{a}/{b}": sorted(ratio(a, b)) for a, b in (("continuous", "static"),
                                                           ("continuous_prompt_cache", "static"),
                                                           ("continuous", "continuous_chunk1")) if b in rounds}
  speedup = float(np.median(speedups["continuous/static"]))
  print(f"device: {dev.platform} {dev.device_kind}   requests: {len(requests)}   rounds: {args.rounds}   "
        + "[smoke: CPU-sized, not a GPU result]" * args.smoke)
  print(f"{'mode':>24} {'tok/s':>9} {'mean lat s':>11} {'p99 lat s':>10} {'KV slots/token':>15} {'KV MiB':>8}"
        f" {'prefill s':>9} {'decode s':>9}")
  for name, m in modes.items():
    print(f"{name:>24} {m['tokens_per_s']:>9.1f} {m['mean_latency_s']:>11.3f} {m['p99_latency_s']:>10.3f} "
          f"{m['kv_slots_per_token_held']:>15.2f} {m['mean_kv_bytes'] / 2**20:>8.2f} "
          f"{m.get('prefill_s', float('nan')):>9.2f} {m.get('decode_s', float('nan')):>9.2f}")
  for name, values in speedups.items():
    print(f"tokens/s {name}: median {np.median(values):.2f}x, rounds " + ", ".join(f"{v:.2f}" for v in values))
  goals = {"continuous_at_least_2x_static_tokens_per_s": speedup >= 2,
           "paged_kv_within_10pct_of_tokens_held": modes["continuous"]["kv_slots_per_token_held"] <= 1.10}
  for name, ok in goals.items():
    print(f"goal {name}: {'met' if ok else 'NOT met'}" + (" (CPU)" if dev.platform == "cpu" else ""))
  result = dict(
      device=dict(platform=dev.platform, kind=dev.device_kind, count=jax.device_count()),
      versions=dict(python=platform.python_version(), jax=jax.__version__, flax=flax.__version__,
                    numpy=np.__version__),
      config=dataclasses.asdict(cfg), settings={k: v for k, v in vars(args).items() if k != "out"},
      modes=modes, speedups=speedups, goals=goals, smoke=args.smoke)
  out = args.out or default_out("serving", dev.device_kind, args.smoke, "" if args.mix == "small" else f"_{args.mix}")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
