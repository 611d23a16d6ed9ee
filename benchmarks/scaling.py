"""Step time and per-device memory of each sharding preset (configs/hardware/*.gin) on the devices at hand.

  python benchmarks/scaling.py                                   # CPU: 8 virtual devices, tiny GPT-2
  python benchmarks/scaling.py --model=models/llama.gin --batch_size=64 --seq_len=2048 --dtype=bfloat16

For every preset it jits one adamw train step with the Partitioner's shardings (state donated) and
reports: median step time, tokens/s, compile time, bytes of parameters + optimizer state held per
device (from the actual shard sizes), XLA's compiled memory analysis (per device), and the device's
peak memory (jax memory_stats; GPU/TPU only). Prints a table and writes JSON naming the device,
versions and config. On CPU the "devices" are threads of one host sharing its cores: the step times
say nothing about scaling there; run it to check memory (which is exact), not speed.
Multi-process: pass --coordinator_address/--num_processes/--process_id or run under SLURM/TPU pods.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _results import default_out, write_json  # noqa: E402  (benchmarks/, the script's directory)

from launch import flags as launch_flags  # noqa: E402  (defines the --coordinator_address/... flags)

MODEL = flags.DEFINE_string("model", "models/gpt2_small_tiny.gin", "Model gin file.")
PRESETS = flags.DEFINE_list("presets", ["dp", "fsdp", "tp", "fsdp_tp"], "configs/hardware/<name>.gin presets.")
BATCH = flags.DEFINE_integer("batch_size", 16, "Global batch size.")
SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per example.")
STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up step).")
DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype override (default: float32 on CPU, else the preset's).")
BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings, e.g. 'MeshConfig.tensor=2'.")
CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 8, "Virtual devices when running on CPU.")
OUT = flags.DEFINE_string("out", None, "JSON path (default benchmarks/results/scaling_<device>.json).")


def _loss_fn(model, cfg):
  import optax

  def loss(params, batch):
    ids = batch["ids"]
    args = (ids[:, :-1], ids[:, :-1]) if cfg.architecture == "encoder_decoder" else (ids[:, :-1],)
    logits = model.apply({"params": params}, *args)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  return loss


def run_preset(name: str) -> dict:
  """Builds, compiles and times one preset; returns its measurements."""
  import jax
  import numpy as np
  import optax

  from launch import config
  from t_jax.models import ModelConfig, build_model, init_boxed
  from t_jax.sharding import MeshConfig, Partitioner, bytes_per_device

  dtype = DTYPE.value or ("float32" if jax.default_backend() == "cpu" else None)
  config.parse([MODEL.value, f"hardware/{name}.gin"], BINDINGS.value + ([f"ModelConfig.dtype='{dtype}'"] if dtype else []))
  cfg, mesh_cfg = config.build(ModelConfig), config.build(MeshConfig)
  part = Partitioner.from_config(mesh_cfg)
  model, tx = build_model(cfg), optax.adamw(1e-4)
  loss = _loss_fn(model, cfg)

  def init_fn(key):
    params = init_boxed(model, key)
    return {"params": params, "opt_state": tx.init(params)}

  state, shardings = part.init(init_fn, jax.random.key(0))

  def step(state, batch):
    value, grads = jax.value_and_grad(loss)(state["params"], batch)
    grads = jax.lax.with_sharding_constraint(grads, shardings["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, value

  rows = BATCH.value // jax.process_count()
  ids = np.random.default_rng(jax.process_index()).integers(0, cfg.vocab_size, (rows, SEQ_LEN.value + 1), np.int32)
  with part.context():
    batch = part.global_batch({"ids": ids})
    jitted = jax.jit(step, in_shardings=(shardings, part.batch_sharding),
                     out_shardings=(shardings, part.replicated), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, value = compiled(state, batch)
    value.block_until_ready()
    times = []
    for _ in range(STEPS.value):
      t0 = time.perf_counter()
      state, value = compiled(state, batch)
      value.block_until_ready()
      times.append(time.perf_counter() - t0)
  held = {k: bytes_per_device(state[k]) for k in ("params", "opt_state")}
  per_device = {d: held["params"].get(d, 0) + held["opt_state"].get(d, 0) for d in held["params"]}
  total = sum(x.nbytes for x in jax.tree.leaves(state))
  mem = compiled.memory_analysis()
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  return {
      "preset": name, "rules": mesh_cfg.rules, "mesh": dict(part.mesh.shape), "dtype": cfg.dtype,
      "loss": float(value), "compile_s": compile_s, "step_s_median": statistics.median(times), "step_s_all": times,
      "tokens_per_s": BATCH.value * SEQ_LEN.value / statistics.median(times),
      "state_bytes_total": total, "state_bytes_per_device_max": max(per_device.values()),
      "state_fraction_per_device": max(per_device.values()) / total,
      "xla_memory_analysis": None if mem is None else {
          k: getattr(mem, k) for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                                       "alias_size_in_bytes", "generated_code_size_in_bytes")},
      "peak_bytes_in_use_max": max((s.get("peak_bytes_in_use", 0) for s in stats), default=0) or None,
  }


def _table(results: list[dict]) -> str:
  head = f"{'preset':<9} {'mesh d/f/s/t':<13} {'step ms':>9} {'tok/s':>10} {'compile s':>9} " \
         f"{'state MB/dev':>12} {'frac':>6} {'temp MB':>8} {'peak MB':>8}"
  lines = [head, "-" * len(head)]
  for r in results:
    mesh = "/".join(str(v) for v in r["mesh"].values())
    temp = (r["xla_memory_analysis"] or {}).get("temp_size_in_bytes")
    peak = r["peak_bytes_in_use_max"]
    lines.append(f"{r['preset']:<9} {mesh:<13} {1e3 * r['step_s_median']:>9.1f} {r['tokens_per_s']:>10.0f} "
                 f"{r['compile_s']:>9.1f} {r['state_bytes_per_device_max'] / 2**20:>12.2f} "
                 f"{r['state_fraction_per_device']:>6.3f} {'-' if temp is None else f'{temp / 2**20:.1f}':>8} "
                 f"{'-' if peak is None else f'{peak / 2**20:.1f}':>8}")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  """Initialises (multi-process if configured), runs every preset, prints and saves the results."""
  del argv
  import jax

  jax.config.update("jax_num_cpu_devices", CPU_DEVICES.value)
  launch_flags.initialize_from_flags()
  import flax
  import jaxlib
  import optax

  device = jax.devices()[0]
  results = [run_preset(name) for name in PRESETS.value]
  if jax.process_index() != 0:
    return
  print(f"device: {device.device_kind} x {jax.device_count()} ({jax.process_count()} processes), "
        f"model {MODEL.value}, batch {BATCH.value} x {SEQ_LEN.value}")
  if jax.default_backend() == "cpu":
    print("CPU: virtual devices share one host's cores, so step times are not a scaling measurement; "
          "this run checks memory per device (exact from shard sizes), not speed.")
  print(_table(results))
  report = {
      "device": {"platform": jax.default_backend(), "kind": device.device_kind, "count": jax.device_count(),
                 "processes": jax.process_count(), "host": platform.node()},
      "versions": {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                   "flax": flax.__version__, "optax": optax.__version__},
      "config": {"model": MODEL.value, "batch_size": BATCH.value, "seq_len": SEQ_LEN.value, "steps": STEPS.value,
                 "dtype": DTYPE.value, "gin_bindings": BINDINGS.value},
      "results": results,
  }
  out = OUT.value or default_out("scaling", device.device_kind)
  write_json(report, out)


if __name__ == "__main__":
  app.run(main)
