"""Serving throughput: static batching vs paged continuous batching (t_jax.inference.Engine).

  python benchmarks/serving.py            # -> benchmarks/results/serving_<device>.json
  python benchmarks/serving.py --smoke    # tiny sizes, seconds on CPU (JSON to the temp dir)

A request mix with Poisson arrivals, a shared system prompt plus a user part of mixed length, and
long-tailed output lengths (most short, some long), served three ways (greedy):
  static              fixed batches in arrival order, each one `t_jax.generate` with contiguous caches
                      running to its longest request (a batch starts when its last request has arrived)
  continuous          Engine: paged cache, requests join free slots between decode steps
  continuous_prompt_cache  the same with the system prompt loaded from a prompt cache (shared pages)
Time is simulated from measured compute: the clock jumps to the next arrival when idle, and advances by
each measured generate call / engine step. Every mode runs once untimed first (compilation).
Reports generated tokens/s, mean / p99 latency (arrival to last token) and KV memory: allocated cache
slots per token actually held (static: at each batch's end; paged: averaged over steps).
Goals: continuous >= 2x the tokens/s of static; paged KV memory within 10% of the tokens held.
CPU numbers (e.g. --smoke) are CPU numbers: never report them as GPU results.
"""

from __future__ import annotations

import argparse
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
from t_jax.models import ModelConfig, build_model, init_params


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true", help="Tiny model and request mix (CPU, seconds).")
  p.add_argument("--requests", type=int, default=None, help="Requests (64; smoke 16).")
  p.add_argument("--rate", type=float, default=None, help="Poisson arrival rate, requests/s (smoke: 500).")
  p.add_argument("--max_batch", type=int, default=8)
  p.add_argument("--page_size", type=int, default=8)
  p.add_argument("--system_len", type=int, default=None, help="Shared system-prompt tokens (64; smoke 24).")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/serving_<device>.json; "
                                              "--smoke: the temp dir).")
  args = p.parse_args(argv)
  args.requests = args.requests or (16 if args.smoke else 64)
  args.rate = args.rate or (500.0 if args.smoke else 50.0)
  args.system_len = args.system_len or (24 if args.smoke else 64)
  return args


def model_config(args: argparse.Namespace) -> ModelConfig:
  if args.smoke:
    return ModelConfig(vocab_size=256, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=128, num_layers=2,
                       max_len=256, tie_embeddings=False)
  return ModelConfig(vocab_size=1024, d_model=256, num_heads=8, num_kv_heads=4, mlp_dim=1024, num_layers=4,
                     max_len=512, tie_embeddings=False)


@dataclasses.dataclass
class Request:
  arrival: float
  prompt: list[int]
  new_tokens: int


def request_mix(cfg: ModelConfig, args: argparse.Namespace) -> list[Request]:
  """Poisson arrivals; system prompt + 4..32 user tokens; 75% outputs of 4..16 tokens, 25% of 48..96."""
  rng = np.random.default_rng(args.seed)
  system = rng.integers(3, cfg.vocab_size, args.system_len).tolist()
  arrivals = np.cumsum(rng.exponential(1.0 / args.rate, args.requests))
  out = []
  for t in arrivals:
    user = rng.integers(3, cfg.vocab_size, int(rng.integers(4, 33))).tolist()
    long = rng.random() < 0.25
    out.append(Request(float(t), system + user, int(rng.integers(48, 97) if long else rng.integers(4, 17))))
  return out


def summarize(requests: list[Request], finish: dict[int, float], kv_ratio: float, kv_bytes: float) -> dict:
  latency = np.asarray([finish[i] - r.arrival for i, r in enumerate(requests)])
  tokens = sum(r.new_tokens for r in requests)
  span = max(finish.values()) - requests[0].arrival
  return dict(tokens=tokens, seconds=span, tokens_per_s=tokens / span, mean_latency_s=float(latency.mean()),
              p99_latency_s=float(np.percentile(latency, 99)), kv_slots_per_token_held=kv_ratio,
              mean_kv_bytes=kv_bytes)


def static(cfg: ModelConfig, params, requests: list[Request], args: argparse.Namespace) -> dict:
  """Fixed batches in arrival order through generate (outputs bucketed to multiples of 16)."""
  now, finish, ratios, kv = 0.0, {}, [], []
  token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
  for at in range(0, len(requests), args.max_batch):
    batch = requests[at:at + args.max_batch]
    steps = -(-max(r.new_tokens for r in batch) // 16) * 16
    now = max(now, batch[-1].arrival)
    t = time.perf_counter()
    generate(cfg, params, [r.prompt for r in batch], steps, pad_multiple=16)
    now += time.perf_counter() - t
    finish.update({at + i: now for i in range(len(batch))})
    slots = len(batch) * (-(-max(len(r.prompt) for r in batch) // 16) * 16 + steps)
    ratios.append(slots / sum(len(r.prompt) + r.new_tokens - 1 for r in batch))
    kv.append(slots * token_bytes)
  return summarize(requests, finish, float(np.mean(ratios)), float(np.mean(kv)))


def continuous(cfg: ModelConfig, params, requests: list[Request], args: argparse.Namespace,
               prompt_cache: str | None = None) -> dict:
  """The Engine on a simulated clock; KV slots vs tokens held sampled at every step."""
  longest = max(len(r.prompt) + r.new_tokens for r in requests)
  engine = Engine(cfg, params, max_batch=args.max_batch, page_size=args.page_size, max_seq_len=longest,
                  num_pages=args.max_batch * -(-longest // args.page_size) + 16, prompt_cache=prompt_cache)
  now, pending, finish, slots, held, kv = 0.0, list(range(len(requests))), {}, 0, 0, []
  ids = {}
  while len(finish) < len(requests):
    while pending and requests[pending[0]].arrival <= now:
      i = pending.pop(0)
      ids[engine.submit(requests[i].prompt, requests[i].new_tokens)] = i
    t = time.perf_counter()
    stepped = engine.step()
    now += time.perf_counter() - t
    if not stepped and not engine.finished:
      now = max(now, requests[pending[0]].arrival) if pending else now
    mem = engine.memory()
    slots, held = slots + mem["slots"], held + mem["tokens"]
    kv.append(mem["bytes"])
    for rid in list(engine.finished):
      engine.finished.pop(rid)
      finish[ids[rid]] = now
  return summarize(requests, finish, slots / max(held, 1), float(np.mean(kv)))


def main(argv: list[str] | None = None) -> int:
  """Runs the three modes (each once to compile, once timed), prints the table and goals, writes the JSON."""
  args = parse_args(argv)
  cfg = model_config(args)
  params = init_params(build_model(cfg), jax.random.key(0))
  requests = request_mix(cfg, args)
  dev = jax.devices()[0]
  path = os.path.join(tempfile.mkdtemp(), "system.npz")
  save_prompt_cache(cfg, params, requests[0].prompt[:args.system_len], path)
  runs = {"static": lambda: static(cfg, params, requests, args),
          "continuous": lambda: continuous(cfg, params, requests, args),
          "continuous_prompt_cache": lambda: continuous(cfg, params, requests, args, path)}
  modes = {}
  for name, run in runs.items():
    run()  # compiles
    modes[name] = run()
  print(f"device: {dev.platform} {dev.device_kind}   requests: {len(requests)}   "
        + "[smoke: CPU-sized, not a GPU result]" * args.smoke)
  print(f"{'mode':>24} {'tok/s':>9} {'mean lat s':>11} {'p99 lat s':>10} {'KV slots/token':>15} {'KV MiB':>8}")
  for name, m in modes.items():
    print(f"{name:>24} {m['tokens_per_s']:>9.1f} {m['mean_latency_s']:>11.3f} {m['p99_latency_s']:>10.3f} "
          f"{m['kv_slots_per_token_held']:>15.2f} {m['mean_kv_bytes'] / 2**20:>8.2f}")
  goals = {"continuous_at_least_2x_static_tokens_per_s":
           modes["continuous"]["tokens_per_s"] >= 2 * modes["static"]["tokens_per_s"],
           "paged_kv_within_10pct_of_tokens_held": modes["continuous"]["kv_slots_per_token_held"] <= 1.10}
  for name, ok in goals.items():
    print(f"goal {name}: {'met' if ok else 'NOT met'}" + (" (CPU)" if dev.platform == "cpu" else ""))
  result = dict(
      device=dict(platform=dev.platform, kind=dev.device_kind, count=jax.device_count()),
      versions=dict(python=platform.python_version(), jax=jax.__version__, flax=flax.__version__,
                    numpy=np.__version__),
      config=dataclasses.asdict(cfg), settings={k: v for k, v in vars(args).items() if k != "out"},
      modes=modes, goals=goals, smoke=args.smoke)
  out = args.out or default_out("serving", dev.device_kind, args.smoke)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
