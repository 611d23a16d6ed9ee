"""Training-step throughput and MFU: t_jax's own jitted step, beside transformers' PyTorch GPT-2.

  python benchmarks/train_step.py                                    # every config
  python benchmarks/train_step.py --configs=quickstart,quickstart_d256 --rounds=9
  python benchmarks/train_step.py --smoke                            # tiny sizes, seconds (CPU is fine)

The step is built as t_jax/training/loop.py:train builds it: make_optimizer / make_schedule / make_init /
make_train_step with the family's objective (CausalLM, MaskedLM, SpanCorruption), a Partitioner's
shardings and the state donated; AdamW with clipping (the quickstart optimizer) for every config. Batches
are synthetic rows of the objective's batch contract (one document per row), put on the devices each step
as the loop does. GPT-2-style configs also run transformers' GPT2LMHeadModel + torch.optim.AdamW (the same
decay mask) + clip_grad_norm_, same shapes, dropout and loss (skipped with a note without torch).

After compiling and --warmup steps, each of --rounds rounds times --steps steps (block_until_ready after
each) and three dense matmuls per framework, alternating the frameworks' order, so ratios compare both under
the same machine load. Reported: median step time, tokens/s, peak memory (device memory_stats, else the
process's max RSS), and MFU = model FLOPs per step / step time / the device's dense matmul rate: the best
rate either framework reached in the step's dtype (normal inputs, --matmul-n^3: 2048 f32 on CPU, 8192 bf16
elsewhere; the best, as load only ever slows it), so the two MFUs compare like the two tokens/s. Model
FLOPs per token: 6 N + 12 L T d (N = parameters used in matmuls; per stack for encoder-decoders, with
cross-attention). Each framework runs in its own process (own thread pools and max RSS) unless
--no-isolate; --smoke runs in-process. CPU numbers are CPU numbers: never report them as GPU results.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time

import flax
import jax
import jaxlib
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _results import default_out, write_json  # noqa: E402  (benchmarks/, the script's directory)

from launch import config  # noqa: E402
from t_jax import data, training  # noqa: E402
from t_jax.models import ModelConfig, abstract_params, build_model  # noqa: E402
from t_jax.sharding import MeshConfig, Partitioner  # noqa: E402

# name: (gin files, smoke gin files, bindings, accelerator (batch, lengths), CPU (batch, lengths)).
QUICKSTART = ["ModelConfig.dropout_rate=0.0", "ModelConfig.num_heads=4", "ModelConfig.num_layers=4"]
CONFIGS = {
    "tiny": (["models/gpt2_small_tiny.gin"], ["models/gpt2_small_tiny.gin"], [], (8, (64,)), (8, (64,))),
    "quickstart": (["models/gpt2_small.gin"], ["models/gpt2_small_tiny.gin"], QUICKSTART + [
        "ModelConfig.d_model=128", "ModelConfig.mlp_dim=512", "ModelConfig.vocab_size=2048",
        "ModelConfig.max_len=128"], (16, (128,)), (16, (128,))),
    "quickstart_d256": (["models/gpt2_small.gin"], ["models/gpt2_small_tiny.gin"], QUICKSTART + [
        "ModelConfig.d_model=256", "ModelConfig.mlp_dim=1024", "ModelConfig.vocab_size=8192",
        "ModelConfig.max_len=256"], (8, (256,)), (8, (256,))),
    "gpt2_small": (["models/gpt2_small.gin"], ["models/gpt2_small_tiny.gin"], [], (8, (1024,)), (2, (128,))),
    "t5_small": (["models/t5_small.gin"], ["models/t5_small_tiny.gin"], [], (32, (512, 114)), (2, (128, 32))),
    "bert_base": (["models/bert_base.gin"], ["models/bert_base_tiny.gin"], [], (16, (512,)), (2, (128,))),
}
# The quickstart optimizer (configs/experiments/quickstart.gin): AdamW, weight decay on matrices, clipping.
OPTIMIZER = dict(learning_rate=3e-3, warmup_steps=50, weight_decay=0.1, b2=0.98, clip_norm=1.0)
GOALS = {"quickstart_at_least_1.3x_torch": ("quickstart", 1.3), "quickstart_d256_at_least_1.3x_torch":
         ("quickstart_d256", 1.3)}
MFU_GOAL = ("quickstart", 0.45)


def model_config(spec):
  """The ModelConfig of a spec (gin presets read with launch.config)."""
  config.parse(spec["gin"], spec["bindings"] + [f"ModelConfig.dtype='{spec['dtype']}'"])
  return config.build(ModelConfig)


def model_flops(cfg, params, batch, lengths):
  """Model FLOPs of one step: 6 N + 12 L T d per token; encoder-decoders per stack, with cross-attention."""
  size = lambda *keys: sum(x.size for k in keys if k in params for x in jax.tree.leaves(params[k]))
  lookups = size("embedder", "encoder_embedder", "decoder_embedder") + (0 if cfg.tie_embeddings else
                                                                         size("token_embedding"))
  n, d = size(*params) - lookups, cfg.num_heads * cfg.head_dim
  if cfg.architecture != "encoder_decoder":
    (t,) = lengths
    return batch * t * (6 * n + 12 * cfg.num_layers * t * d)
  (te, td), n_enc = lengths, size("encoder")
  return batch * (te * (6 * n_enc + 12 * cfg.encoder_layers * te * d)
                  + td * (6 * (n - n_enc) + 12 * cfg.num_layers * (td + te) * d))


def make_batch(architecture, batch, lengths, vocab, seed=0):
  """Numpy rows of the objective's batch contract (one document per row: segment ids 1, positions 0..T-1)."""
  rng = np.random.default_rng(seed)
  ids = lambda t: rng.integers(4, vocab, (batch, t), dtype=np.int32)
  pos = lambda t: np.broadcast_to(np.arange(t, dtype=np.int32), (batch, t)).copy()
  one = lambda t: np.ones((batch, t), np.int32)
  if architecture == "encoder_decoder":
    te, td = lengths
    return dict(encoder_inputs=ids(te), encoder_segment_ids=one(te), encoder_positions=pos(te),
                decoder_inputs=ids(td), decoder_targets=ids(td), decoder_segment_ids=one(td),
                decoder_positions=pos(td), weights=np.ones((batch, td), np.float32))
  (t,) = lengths
  weights = np.ones((batch, t), np.float32)
  if architecture == "encoder":  # MaskedLM: loss on ~15% of the tokens
    weights = (rng.random((batch, t)) < 0.15).astype(np.float32)
    weights[:, 0] = 1.0
  return dict(inputs=ids(t), targets=ids(t), weights=weights, segment_ids=one(t), positions=pos(t))


def _peak_rss():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _timed(f, n, sync):
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    sync(f())
    times.append(time.perf_counter() - t0)
  return times


class JaxRunner:
  """t_jax's jitted train step, built as t_jax.training.loop.train builds it."""

  framework = "t_jax"

  def __init__(self, spec):
    cfg, (b, lengths) = model_config(spec), spec["shape"]
    objective = {"decoder": lambda: data.CausalLM(seq_len=lengths[0]),
                 "encoder": lambda: data.MaskedLM(seq_len=lengths[0]),
                 "encoder_decoder": lambda: data.SpanCorruption(*lengths)}[cfg.architecture]()
    opt, train_cfg = training.OptimizerConfig(**OPTIMIZER), training.TrainConfig(num_steps=1000, batch_size=b)
    partitioner = Partitioner.from_config(config.build(MeshConfig))
    tx, schedule = training.make_optimizer(opt, 1000), training.make_schedule(opt, 1000)
    init, key = training.make_init(build_model(cfg), tx, length=8), jax.random.key(0)
    shardings = partitioner.shardings(jax.eval_shape(init, key))
    self.state, _ = partitioner.init(init, key)
    self.partitioner, self.rows = partitioner, make_batch(cfg.architecture, b, lengths, cfg.vocab_size)
    with partitioner.context():
      model = build_model(cfg, deterministic=False)
      step = training.make_train_step(model, tx, objective, train_cfg, schedule, 1, shardings["params"])
      self.step_fn = jax.jit(step, in_shardings=(shardings, partitioner.batch_sharding),
                             out_shardings=(shardings, partitioner.replicated), donate_argnums=0)
      t0 = time.perf_counter()
      compiled = self.step_fn.lower(self.state, partitioner.global_batch(self.rows)).compile()
      compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    self.info = dict(compile_s=compile_s, hlo_flops=cost.get("flops"), hlo_bytes=cost.get("bytes accessed"),
                     params=sum(x.size for x in jax.tree.leaves(self.state["params"])))
    n = spec["matmul_n"]
    a = jax.random.normal(jax.random.key(1), (n, n), spec["dtype"])
    mm = jax.jit(lambda x, y: x @ y)
    self._matmul = lambda: mm(a, a)
    self.run("step", spec["warmup"])
    self.run("matmul", 1)

  def _step(self):
    self.state, metrics = self.step_fn(self.state, self.partitioner.global_batch(self.rows))
    return metrics

  def run(self, what, n):
    """Seconds of n steps (or matmuls), each waited for."""
    return _timed(self._step if what == "step" else self._matmul, n, jax.block_until_ready)

  def summary(self):
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return dict(self.info, peak_bytes=peak or _peak_rss(), peak_kind="device" if peak else "process max RSS",
                loss=float(self._step()["loss"]))


class TorchRunner:
  """transformers' GPT2LMHeadModel with torch.optim.AdamW and clip_grad_norm_, the same shapes."""

  framework = "pytorch"

  def __init__(self, spec):
    import torch
    import transformers

    cfg, (b, (t,)) = model_config(spec), spec["shape"]
    torch.manual_seed(0)
    self.torch, self.device = torch, "cuda" if torch.cuda.is_available() else "cpu"
    gpt2 = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model, n_layer=cfg.num_layers,
        n_head=cfg.num_heads, n_inner=cfg.mlp_dim, activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate,
        attn_pdrop=cfg.attention_dropout_rate, bos_token_id=None, eos_token_id=None)
    self.model = transformers.GPT2LMHeadModel(gpt2).to(self.device).train()
    params = list(self.model.parameters())
    self.opt = torch.optim.AdamW([dict(params=[p for p in params if p.ndim >= 2]),
                                  dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)],
                                 lr=OPTIMIZER["learning_rate"], betas=(0.9, OPTIMIZER["b2"]), eps=1e-8,
                                 weight_decay=OPTIMIZER["weight_decay"])
    rows = make_batch("decoder", b, (t,), cfg.vocab_size)
    self.inputs, self.targets = (torch.from_numpy(rows[k]).long().to(self.device)
                                  for k in ("inputs", "targets"))
    self.autocast = torch.autocast(self.device, torch.bfloat16, enabled=spec["dtype"] == "bfloat16")
    n = spec["matmul_n"]
    a = torch.randn(n, n, device=self.device, dtype=getattr(torch, spec["dtype"]))
    self._matmul = lambda: a @ a
    self.info = dict(params=sum(p.numel() for p in params), threads=torch.get_num_threads(),
                     interop_threads=torch.get_num_interop_threads(), torch=torch.__version__,
                     transformers=transformers.__version__,
                     attn_implementation=getattr(self.model.config, "_attn_implementation", None))
    self.run("step", spec["warmup"])
    self.run("matmul", 1)

  def _step(self):
    torch = self.torch
    with self.autocast:
      logits = self.model(input_ids=self.inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten())
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPTIMIZER["clip_norm"])
    self.opt.step()
    return loss

  def _sync(self, _):
    if self.device == "cuda":
      self.torch.cuda.synchronize()

  def run(self, what, n):
    """Seconds of n steps (or matmuls), each waited for."""
    return _timed(self._step if what == "step" else self._matmul, n, self._sync)

  def summary(self):
    cuda = self.device == "cuda"
    peak = self.torch.cuda.max_memory_allocated() if cuda else _peak_rss()
    return dict(self.info, peak_bytes=peak, peak_kind="device" if cuda else "process max RSS",
                loss=float(self._step().detach()))


def _serve(conn, runner_cls, spec):
  """A worker process: builds one runner, then answers ('run', what, n) and ('summary',) until closed."""
  try:
    runner = runner_cls(spec)
    conn.send(("ok", None))
    while (msg := conn.recv())[0] != "summary":
      conn.send(("ok", runner.run(*msg[1:])))
    conn.send(("ok", runner.summary()))
  except Exception as e:  # noqa: BLE001 - reported by the parent as this framework's result
    conn.send(("error", f"{type(e).__name__}: {str(e)[:500]}"))


class Remote:
  """A runner in its own process (its own thread pools and max RSS)."""

  def __init__(self, runner_cls, spec):
    self.framework = runner_cls.framework
    self.conn, child = multiprocessing.get_context("spawn").Pipe()
    self.proc = multiprocessing.get_context("spawn").Process(target=_serve, args=(child, runner_cls, spec))
    self.proc.start()
    child.close()  # a crashed worker then ends recv() with EOFError instead of hanging
    self._answer()

  def _answer(self):
    status, value = self.conn.recv()
    if status != "ok":
      self.proc.join()
      raise RuntimeError(value)
    return value

  def run(self, what, n):
    self.conn.send(("run", what, n))
    return self._answer()

  def summary(self):
    self.conn.send(("summary",))
    out = self._answer()
    self.proc.join()
    return out


def torch_note(cfg):
  """Why the PyTorch reference cannot run this config, or None."""
  gpt2 = dict(architecture="decoder", position="learned", norm="layernorm", activation="gelu_tanh",
              pre_norm=True, use_bias=True, tie_embeddings=True, gated=False, logits_bias=False)
  if any(getattr(cfg, k) != v for k, v in gpt2.items()):
    return "not GPT-2-style"
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as e:
    return f"skipped: {e}"
  return None


def bench(name, spec, args):
  """Rounds of both frameworks on one config; one result row per framework."""
  cfg, (batch, lengths) = model_config(spec), spec["shape"]
  flops = model_flops(cfg, abstract_params(build_model(cfg)), batch, lengths)
  note = "disabled (--no-torch)" if args.no_torch else torch_note(cfg)
  make = (lambda cls: cls(spec)) if args.no_isolate else (lambda cls: Remote(cls, spec))
  runners, rows = {}, {}
  for cls in [JaxRunner] + ([TorchRunner] if note is None else []):
    try:
      runners[cls.framework] = make(cls)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: a result too
      rows[cls.framework] = dict(status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
  steps, mm = {fw: [] for fw in runners}, {fw: [] for fw in runners}
  for i in range(args.rounds):
    for fw in list(runners)[::-1] if i % 2 else list(runners):  # alternate who goes first
      steps[fw].append(runners[fw].run("step", args.steps))
      mm[fw] += runners[fw].run("matmul", 3)
  rates = {fw: 2 * args.matmul_n ** 3 / min(mm[fw]) for fw in runners}
  device_rate = max(rates.values(), default=None)  # the device's dense matmul rate: the best either reached
  for fw, r in runners.items():
    times = [t for rnd in steps[fw] for t in rnd]
    step_s = statistics.median(times)
    rows[fw] = dict(r.summary(), status="ok", step_s=step_s, best_step_s=min(times), step_s_rounds=steps[fw],
                    tokens_per_s=batch * sum(lengths) / step_s, matmul_flops_per_s=rates[fw],
                    mfu=flops / step_s / device_rate)
  if len(steps) == 2:
    jx, pt = rows["t_jax"], rows["pytorch"]
    jx.update(speedup_vs_torch=pt["step_s"] / jx["step_s"],
              speedup_vs_torch_best=pt["best_step_s"] / jx["best_step_s"],
              speedup_vs_torch_rounds=[statistics.median(t) / statistics.median(j)
                                       for j, t in zip(steps["t_jax"], steps["pytorch"])])
  return dict(config=name, model=dataclasses.asdict(cfg), batch=batch, lengths=lengths, dtype=spec["dtype"],
              model_flops_per_step=flops, device_matmul_flops_per_s=device_rate, torch_note=note, results=rows)


def _fmt(x, spec, scale=1.0):
  return "-" if x is None else format(x * scale, spec)


def print_table(entries):
  print(f"{'config':<16}{'framework':<9}{'batch x len':>12}{'params':>13}{'step ms':>9}{'best ms':>9}"
        f"{'tokens/s':>10}{'MFU':>7}{'peak MiB':>10}{'vs torch':>10}{'(best)':>7}  note")
  for e in entries:
    for fw, r in e["results"].items():
      shape = f"{e['batch']}x{'+'.join(map(str, e['lengths']))}"
      note = r.get("error", "")[:60] if r["status"] != "ok" else r["peak_kind"].replace("device", "")
      print(f"{e['config']:<16}{fw:<9}{shape:>12}{_fmt(r.get('params'), ',.0f'):>13}"
            f"{_fmt(r.get('step_s'), '.1f', 1e3):>9}{_fmt(r.get('best_step_s'), '.1f', 1e3):>9}"
            f"{_fmt(r.get('tokens_per_s'), ',.0f'):>10}{_fmt(r.get('mfu'), '.1%'):>7}"
            f"{_fmt(r.get('peak_bytes'), ',.0f', 2**-20):>10}{_fmt(r.get('speedup_vs_torch'), '.2f'):>9}x"
            f"{_fmt(r.get('speedup_vs_torch_best'), '.2f'):>6}x  {note}")
    if e["torch_note"]:
      print(f"{e['config']:<16}{'pytorch':<9}  {e['torch_note']}")
    rates = ", ".join(f"{fw} {r['matmul_flops_per_s'] / 1e9:.0f}" for fw, r in e["results"].items() if "mfu" in r)
    if rates:
      print(f"{'':<16}MFU denominator {e['device_matmul_flops_per_s'] / 1e9:.0f} GFLOP/s (matmul: {rates}); "
            f"model {e['model_flops_per_step'] / 1e9:.2f} GFLOP/step")


def check_goals(entries, platform_name):
  """The issue's goals; None when a goal's config (or its PyTorch run) was not measured."""
  by_name = {e["config"]: e["results"] for e in entries}
  goals = {}
  for goal, (name, ratio) in GOALS.items():
    speed = by_name.get(name, {}).get("t_jax", {}).get("speedup_vs_torch")
    goals[f"{platform_name}_{goal}"] = None if speed is None else speed >= ratio
  name, mfu = MFU_GOAL
  value = by_name.get(name, {}).get("t_jax", {}).get("mfu")
  goals[f"{name}_mfu_at_least_{mfu:.0%}"] = None if value is None else value >= mfu
  return goals


def _version(module):
  try:
    return importlib.metadata.version(module)
  except importlib.metadata.PackageNotFoundError:
    return None


def _cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
  except OSError:
    return platform.processor() or None


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", default=None, help=f"comma-separated subset of {list(CONFIGS)} (default: all; "
                 "smoke: tiny)")
  p.add_argument("--batch", type=int, default=None, help="override every config's batch size")
  p.add_argument("--seq", type=int, default=None,
                 help="override the length (encoder-decoders: the inputs; targets get a quarter)")
  p.add_argument("--dtype", default=None, help="compute dtype (default float32 on CPU, else bfloat16)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=3, help="timed steps per framework per round")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument("--matmul-n", type=int, default=None, help="matmul size (default 2048 on CPU, else 8192)")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  p.add_argument("--no-isolate", action="store_true", help="run both frameworks in this process")
  p.add_argument("--smoke", action="store_true", help="tiny sizes, a couple of steps, in-process")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  if args.smoke:
    args.batch, args.seq, args.rounds, args.steps, args.warmup = 2, 16, 2, 1, 1
    args.matmul_n, args.no_isolate = args.matmul_n or 128, True
  args.configs = args.configs or ("tiny" if args.smoke else ",".join(CONFIGS))
  unknown = set(args.configs.split(",")) - set(CONFIGS)
  if unknown:
    p.error(f"unknown configs {sorted(unknown)}; choose from {list(CONFIGS)}")
  return args


def main(argv=None):
  args = parse_args(argv)
  dev, load = jax.devices()[0], [os.getloadavg()]
  cpu = dev.platform == "cpu"
  print(f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}; {os.cpu_count()} CPUs, 1-min load "
        f"average {load[0][0]:.1f} (shared with other processes: noisy timings, compare ratios)")
  args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
  args.matmul_n = args.matmul_n or (2048 if cpu else 8192)
  entries = []
  for name in args.configs.split(","):
    gin, smoke_gin, bindings, accel, on_cpu = CONFIGS[name]
    batch, lengths = on_cpu if cpu else accel
    if args.batch:
      batch = args.batch
    if args.seq:
      lengths = (args.seq,) if len(lengths) == 1 else (args.seq, max(2, args.seq // 4))
    spec = dict(gin=smoke_gin if args.smoke else gin, bindings=[] if args.smoke else bindings,
                shape=(batch, lengths), dtype=args.dtype, matmul_n=args.matmul_n, warmup=args.warmup)
    entries.append(bench(name, spec, args))
    print_table(entries[-1:])
  print()
  print_table(entries)
  load.append(os.getloadavg())
  goals = check_goals(entries, dev.platform)
  for goal, ok in goals.items():
    print(f"goal {goal}: {'not measured' if ok is None else 'met' if ok else 'NOT met'}")
  threads = dict(cpu_count=os.cpu_count(), affinity=len(os.sched_getaffinity(0)),
                 **{k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
  out = dict(
      device=dict(platform=dev.platform, kind=dev.device_kind, count=jax.device_count()), smoke=args.smoke,
      cpu_model=_cpu_model(),
      versions=dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
                    flax=flax.__version__, optax=optax.__version__, numpy=np.__version__,
                    **{m: _version(m) for m in ("torch", "transformers")}),
      threads=threads, load_average_start_end=load, settings=vars(args), optimizer=OPTIMIZER,
      time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
      flops_note="model FLOPs/token = 6 N + 12 L T d; MFU = model FLOPs/s / best measured dense matmul FLOP/s",
      goals=goals, configs=entries)
  path = args.out or default_out("train_step", dev.device_kind, args.smoke)
  write_json(out, path)


if __name__ == "__main__":
  main()
