"""Ahead-of-time plans: compile the sharded train step for a TPU topology on a machine without one.

  devices = topology_devices("v5e:4x4")   # compile-only TPU devices (needs the `libtpu` package)
  report = plan(exp, "v5e:4x4", devices)  # lower + compile the step `train` would run; nothing is allocated
  print(format_report(report))

The report (a JSON-able dict) has per-device memory (parameters, optimizer state, XLA's temporaries) against
the chip's HBM, flops, the collectives of the optimized HLO, a predicted step time and MFU. Chip figures
are from the public Cloud TPU documentation (HBM GiB, peak bf16 TFLOP/s and ICI Gbit/s per chip).

Flops of programs with loops (scan_layers, microbatches): XLA's cost analysis counts a while loop's body once.
`loop_flops` re-runs XLA's cost analysis on each loop body of the optimized HLO and counts it once per
iteration (trip counts read from the HLO), so a scanned program gets the flops of its unrolled twin.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import numpy as np

from t_jax.data import Objective
from t_jax.models import ModelConfig, build_model, count_params, speech, vision
from t_jax.sharding import Partitioner, make_mesh, rules_for
from t_jax.training.config import Experiment
from t_jax.training.loop import microbatches
from t_jax.training.optim import make_optimizer, make_schedule
from t_jax.training.step import make_init, make_train_step

GIB = 1 << 30
LIBTPU = "libtpu==0.0.42.*"  # the version jax 0.10.2's own jax[tpu] extra pins


class Chip(NamedTuple):
  """Per-chip HBM (GiB), peak dense bf16 TFLOP/s and inter-chip interconnect Gbit/s (Cloud TPU documentation)."""

  hbm_gib: float
  tflops: float
  ici_gbps: float


CHIPS = {"v4": Chip(32, 275, 2400), "v5e": Chip(16, 197, 1600), "v5p": Chip(95, 459, 4800),
         "v6e": Chip(32, 918, 3584)}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def chip(topology: str) -> Chip:
  """The chip of a topology name such as 'v5e:4x4'; unknown chips are an error that lists the choices."""
  name = topology.split(":")[0]
  if name not in CHIPS or ":" not in topology:
    raise ValueError(f"unknown topology {topology!r}: give <chip>:<shape>, e.g. v5e:4x4, with chip one of "
                     f"{sorted(CHIPS)}")
  return CHIPS[name]


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
  """libtpu logs set-up warnings (no TPU, no metadata server) straight to fd 2; keep them off the terminal."""
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def topology_devices(topology: str) -> list[jax.Device]:
  """Compile-only TPU devices of a topology ('v5e:4x4', 'v5p:4x4x4', ...), on any machine with libtpu."""
  chip(topology)
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"compiling for TPU needs the libtpu package: pip install '{LIBTPU}'")
  # libtpu locks /tmp/libtpu_lockfile, which any other JAX process with libtpu may hold; we need no TPU.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  try:
    with _quiet_fd2():
      return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except jax.errors.JaxRuntimeError as e:
    raise ValueError(f"libtpu cannot describe topology {topology!r}: {str(e).splitlines()[0]}") from e


def batch_spec(objective: Objective, batch_size: int, sharding: Any = None) -> dict[str, Any]:
  """ShapeDtypeStructs of one global batch with the objective's keys, shapes and dtypes (no data read)."""
  return {k: jax.ShapeDtypeStruct((batch_size, *np.shape(v)), np.asarray(v).dtype, sharding=sharding)
          for k, v in objective.spec_row().items()}


def token_lengths(cfg: ModelConfig, objective: Objective) -> dict[str, int]:
  """Sequence lengths the stacks see: the objective's, with an image or audio stem's token count."""
  lengths = dict(objective.lengths())
  if cfg.input_stem == "patches":
    lengths["inputs"] = vision.num_tokens(cfg)
  elif cfg.input_stem == "audio":
    lengths["encoder_inputs"] = speech.stem_length(objective.max_frames)
  return lengths


def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def model_flops(cfg: ModelConfig, params: Any, lengths: dict[str, int], batch_size: int) -> float:
  """Matmul flops of a training step (PaLM, appendix B): 6 x weights x tokens + 12 x L x H x D x S^2 per row.

  Attention counts every (query, key) pair, causal or not. Encoder weights see encoder tokens, the others the
  decoder's (or the only stack's); the token table counts only when it is tied to the output layer.
  """
  dec = lengths.get("decoder_inputs", lengths.get("inputs"))
  enc = lengths.get("encoder_inputs", 0)
  total = 0.0
  for path, leaf in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.endswith("kernel") or (name == "token_embedding/embedding" and cfg.tie_embeddings):
      encoder_side = enc and (name.startswith("encoder") or re.search(r"cross_attention/(key|value)", name))
      total += 6 * math.prod(leaf.shape) * batch_size * (enc if encoder_side else dec)
  width = 12 * cfg.num_heads * cfg.head_dim * batch_size
  total += width * cfg.num_layers * dec * dec
  if enc:
    total += width * (cfg.encoder_layers * enc * enc + cfg.num_layers * dec * enc)
  return total


_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_CALLS = re.compile(r"(?:to_apply|calls|body|condition|branch_computations)=\{?%?([\w.\-]+)")
_OP = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\]")
_CHANNEL = re.compile(r"channel_id=(\d+)")


def _arrays(shapes: str) -> list[int]:
  """Bytes of each array in an HLO result type such as 'bf16[4,128]{1,0}' or a tuple of them."""
  out = []
  for dtype, dims in _ARRAY.findall(shapes):
    bits = 8 if dtype == "pred" else int(re.match(r"\D+(\d+)", dtype).group(1))
    out.append(math.prod(int(d) for d in dims.split(",") if d) * max(bits, 8) // 8)
  return out


def _trip_count(line: str, computations: dict[str, list[str]]) -> tuple[str, Optional[int]]:
  """(body, trips) of a while: its known_trip_count, or N from `i < constant(N)` in its condition, else None."""
  body = re.search(r"body=%?([\w.\-]+)", line).group(1)
  known = re.search(r"\"known_trip_count\":\{\"n\":\"(\d+)\"", line)
  if known:
    return body, int(known.group(1))
  cond = computations.get(re.search(r"condition=%?([\w.\-]+)", line).group(1), [])
  consts = dict(re.findall(r"%([\w.\-]+) = s32\[\][^ ]* constant\((\d+)\)", "\n".join(cond)))
  root = next((c for c in cond if "ROOT" in c and "direction=LT" in c), "")
  limit = re.search(r"compare\(%[\w.\-]+, %([\w.\-]+)\)", root)
  return body, int(consts[limit.group(1)]) if limit and limit.group(1) in consts else None


def loop_trips(hlo_computations: dict[str, list[str]]) -> dict[str, int]:
  """How often each computation runs per step: while bodies multiply everything they call."""
  trips = {name: 1 for name in hlo_computations}
  for _ in range(8):  # loops nest a few levels at most
    for name, lines in hlo_computations.items():
      for line in lines:
        body, n = _trip_count(line, hlo_computations) if " while(" in line else ("", 1)
        n = n or 1
        for callee in _CALLS.findall(line):
          if callee in trips:
            trips[callee] = max(trips[callee], trips[name] * (n if callee == body else 1))
  return trips


def computations(hlo: str) -> dict[str, list[str]]:
  """Optimized HLO text split into {computation name: its instruction lines}."""
  out: dict[str, list[str]] = {}
  current: list[str] = []
  for line in hlo.splitlines():
    m = _COMP.match(line)
    if m:
      current = out.setdefault(m.group(1), [])
    else:
      current.append(line)
  return out


def _loops_run_by(comps: dict[str, list[str]]) -> dict[str, list[dict]]:
  """{computation: [{body, trips, known}, ...]}: the while ops a computation runs itself or through calls.

  `known` is False when neither a known_trip_count nor an `i < constant` condition gave the trip count.
  """
  direct: dict[str, list[dict]] = {}
  callees: dict[str, set[str]] = {}
  for name, lines in comps.items():
    for line in lines:
      if " while(" in line:
        body, trips = _trip_count(line, comps)
        direct.setdefault(name, []).append({"body": body, "trips": trips or 1, "known": trips is not None})
      else:  # calls and conditionals run their computations' loops; fusions and reducers hold none
        callees.setdefault(name, set()).update(c for c in _CALLS.findall(line) if c in comps)
  out: dict[str, list[dict]] = {}

  def collect(name: str, seen: frozenset) -> list[dict]:
    if name not in out:
      found = list(direct.get(name, []))
      for callee in callees.get(name, ()):
        if callee not in seen:
          found += collect(callee, seen | {callee})
      out[name] = found
    return out[name]

  for name in comps:
    collect(name, frozenset({name}))
  return out


def _entry_flops(hlo: str, entry: str) -> float:
  """XLA's flops of one computation of the module as if it were the entry (its own loop bodies counted once).

  The module is re-parsed with that computation as ENTRY and costed by XLA's HloCostAnalysis on the CPU
  client (the compile-only TPU client offers no cost analysis of a module; on a whole TPU program the two
  flop counts agreed to within a few flops). Uses jaxlib's private bindings, as `jax.stages` does.
  """
  from jax._src.lib import _jax, xla_client

  lines = hlo.splitlines()
  lines[0] = lines[0].split(",")[0]  # 'HloModule name': the entry's layout and aliasing belong to the old one
  for i, line in enumerate(lines):
    m = _COMP.match(line)
    if m:
      line = line.removeprefix("ENTRY ")
      lines[i] = "ENTRY " + line if m.group(1) == entry else line
  module = xla_client.hlo.hlo_module_from_text("\n".join(lines))
  return float(_jax.hlo_module_cost_analysis(jax.local_devices(backend="cpu")[0].client, module)["flops"])


def loop_flops(hlo: str, xla_flops: float) -> tuple[float, list[dict]]:
  """(flops per step, loops): XLA's count `xla_flops` with every while body counted once per iteration.

  XLA's cost analysis counts a loop body once. For each loop of the optimized HLO (scanned layers forward and
  backward, microbatches) this costs the body alone with XLA's cost analysis and adds it (trips - 1) more
  times, nested loops included. Loops whose trip count the HLO does not state count once (`known` False).
  The loop conditions (a compare per iteration) are left out.
  """
  comps = computations(hlo)
  loops = _loops_run_by(comps)
  entry = next(m.group(1) for line in hlo.splitlines() if line.startswith("ENTRY ") and (m := _COMP.match(line)))
  cache: dict[str, tuple[float, float]] = {}
  rows: list[dict] = []

  def total(name: str, once: Optional[float] = None) -> float:
    """Flops of one run of `name` with its loops expanded; `once` = XLA's count with bodies once, if known."""
    if name not in cache:
      counted = _entry_flops(hlo, name) if once is None else once
      extra = 0.0
      for loop in loops.get(name, []):
        body_total = total(loop["body"])
        extra += loop["trips"] * body_total - cache[loop["body"]][0]
        rows.append({**loop, "flops_per_trip": body_total})
      cache[name] = (counted, counted + extra)
    return cache[name][1]

  return total(entry, xla_flops), rows


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """Collectives per step in optimized HLO text: {op: {count, bytes}} with full-size bytes per device.

  Bytes are the unsharded buffer: an all-gather's result, an all-reduce's operand, and for a reduce-scatter
  its input (TPU writes one as an all-reduce inside an `all-reduce-scatter` fusion; it counts as such).
  An op in a while loop with a known trip count (scanned layers, microbatches) counts once per iteration.
  TPU's async collective fusion spreads one collective over several fusions that share its channel id:
  it counts once. A `-start` all-gather or collective-permute returns (operand, result): the largest counts.
  """
  comps = computations(hlo)
  trips = loop_trips(comps)
  seen: dict[tuple, tuple[str, int, int]] = {}
  for name, lines in comps.items():
    for line in lines:
      m = _OP.match(line)
      if not m:
        continue
      op = "reduce-scatter" if name.startswith("all-reduce-scatter") else m.group(3)
      sizes = _arrays(m.group(2))
      size = max(sizes) if m.group(4) and op != "all-reduce" else sum(sizes)
      channel = _CHANNEL.search(line)
      key = (op, channel.group(1) if channel else (name, m.group(1)))
      _, n, old = seen.get(key, (op, 0, 0))
      seen[key] = (op, max(n, trips[name]), max(old, size))
  out: dict[str, dict[str, int]] = {}
  for op, n, size in seen.values():
    row = out.setdefault(op, {"count": 0, "bytes": 0})
    row["count"] += n
    row["bytes"] += n * size
  return out


class _Build:
  """Model, optimizer, mesh, shardings and abstract inputs, built as `t_jax.training.train` builds them but
  abstractly: no array is allocated."""

  def __init__(self, exp: Experiment, devices: Sequence[jax.Device]) -> None:
    cfg = exp.train
    self.partitioner = Partitioner(make_mesh(exp.mesh, devices), rules_for(exp.mesh.rules), exp.mesh.indivisible)
    self.accum = microbatches(cfg, self.partitioner.data_shards)
    train_model, eval_model = build_model(exp.model, deterministic=False), build_model(exp.model)
    tx, schedule = make_optimizer(exp.optimizer, cfg.num_steps), make_schedule(exp.optimizer, cfg.num_steps)
    init = make_init(eval_model, tx, length=8)
    self.abstract = jax.eval_shape(lambda: init(jax.random.key(cfg.seed)))
    self.shardings = self.partitioner.shardings(self.abstract)
    self.state = self.partitioner.abstract(self.abstract)
    self.batch = batch_spec(exp.task.objective, cfg.batch_size, self.partitioner.batch_sharding)
    self.step = make_train_step(train_model, tx, exp.task.objective, cfg, schedule, self.accum,
                                self.shardings["params"])

  def lower(self) -> Any:
    """The train step lowered with loop.py's in/out shardings and donation."""
    p = self.partitioner
    with p.context():
      jitted = jax.jit(self.step, in_shardings=(self.shardings, p.batch_sharding),
                       out_shardings=(self.shardings, p.replicated), donate_argnums=0)
      return jitted.lower(self.state, self.batch)


def plan(exp: Experiment, topology: str, devices: Sequence[jax.Device]) -> dict:
  """Compiles `exp`'s train step (as `t_jax.training.train` jits it) for `devices`; returns the report.

  A program that does not fit in HBM (the TPU compiler's verdict, or ours) has fits=False and a reason;
  `largest` lists the largest per-device arrays of the train state.
  """
  build, hw = _Build(exp, devices), chip(topology)
  per_chip = len(devices) // len({tuple(d.coords) for d in devices})  # v4 lists each TensorCore as a device
  lengths, params = token_lengths(exp.model, exp.task.objective), build.abstract["params"]
  report = {"topology": topology, "device_kind": devices[0].device_kind, "devices": len(devices),
            "hbm_bytes": hw.hbm_gib * GIB / per_chip, "peak_flops": hw.tflops * 1e12 / per_chip,
            "ici_bytes_per_second": hw.ici_gbps * 1e9 / 8 / per_chip,
            "mesh": dict(build.partitioner.mesh.shape), "rules": exp.mesh.rules,
            "parameters": count_params(params), "batch_size": exp.train.batch_size, "lengths": lengths,
            "microbatches": build.accum,
            "model_flops": model_flops(exp.model, params, lengths, exp.train.batch_size),
            "memory": {"params": shard_bytes(build.state["params"]),
                       "optimizer": shard_bytes(build.state["opt_state"]), "batch": shard_bytes(build.batch)},
            "largest": _largest(build.state)}
  report["roofline_seconds"] = report["model_flops"] / (report["devices"] * report["peak_flops"])
  start = time.time()
  try:
    compiled = build.lower().compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    reason = str(e).strip().splitlines()[0]
    return {**report, "fits": False, "reason": reason, "compile_seconds": time.time() - start}
  report["compile_seconds"] = time.time() - start
  return {**report, **_analyse(compiled, report)}


def _xla_memory(compiled: Any) -> dict[str, int]:
  """XLA's per-device bytes of a compiled program, and their peak (arguments + outputs - aliased + the rest)."""
  m = compiled.memory_analysis()
  mem = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes, "aliased": m.alias_size_in_bytes,
         "temporaries": m.temp_size_in_bytes, "code": m.generated_code_size_in_bytes}
  return {**mem, "peak": mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["code"]}


def step_memory(exp: Experiment, devices: Sequence[jax.Device]) -> dict[str, int]:
  """XLA's per-device memory of `exp`'s train step compiled for `devices` (e.g. this host's): bytes and peak."""
  return _xla_memory(_Build(exp, devices).lower().compile())


def _largest(state: Any, n: int = 5) -> list[dict]:
  """The n largest per-device shards of the train state."""
  rows = [{"name": jax.tree_util.keystr(path), "shape": list(x.sharding.shard_shape(x.shape)),
           "bytes": math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize}
          for path, x in jax.tree_util.tree_flatten_with_path(state)[0]]
  return sorted(rows, key=lambda r: -r["bytes"])[:n]


def collective_seconds(colls: dict[str, dict[str, int]], ici_bytes_per_second: float) -> float:
  """Time to move the step's collective bytes through one chip's ICI at the documented bandwidth, no overlap.

  Full-size bytes once per op (an all-reduce twice: reduce-scatter + all-gather); a ring moves (n-1)/n of them
  through each chip. A rough lower bound: it assumes every link busy, no latency, no contention.
  """
  return sum(c["bytes"] * (2 if op == "all-reduce" else 1) for op, c in colls.items()) / ici_bytes_per_second


def _step_time(cost: dict, flops: Optional[float], loops: list, comm_seconds: float, peak_flops: float
               ) -> tuple[Optional[float], str]:
  """(seconds, source): XLA's cost-model estimate when it is usable, else a compute/ICI roofline.

  XLA's `optimal_seconds` (TPU cost model: compute, memory, communication) is used for loop-free programs
  when positive; it is negative for big programs, and counts loop bodies once. Otherwise: max(flops / peak,
  collective bytes / ICI bandwidth), flops with loop bodies counted per iteration -- a lower bound on the
  step (no memory-bound time, perfect overlap), so the MFU derived from it is an upper bound.
  """
  seconds = cost.get("optimal_seconds", -1.0)
  if not loops and math.isfinite(seconds) and seconds > 0:
    return float(seconds), "XLA cost model (optimal_seconds)"
  if not flops:
    return None, "n/a: no cost analysis"
  compute = flops / peak_flops
  bound = "collectives at ICI bandwidth" if comm_seconds > compute else "XLA flops at peak"
  how = "loop bodies x trip count" if loops else "no loops"
  return max(compute, comm_seconds), (f"roofline, bound by {bound} ({how}); a lower bound: memory-bound time "
                                      "and imperfect overlap are not modelled")


def _analyse(compiled: Any, report: dict) -> dict:
  """Memory, flops, collectives, step time and MFU of a compiled step."""
  hlo, cost = compiled.as_text(), compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost
  mem = {**report["memory"], **_xla_memory(compiled)}  # per-device bytes: ours (params, optimizer, batch), XLA's
  once, colls = cost.get("flops"), collectives(hlo)
  comm = collective_seconds(colls, report["ici_bytes_per_second"])
  try:  # only a program with loops re-parses HLO
    flops, loops = loop_flops(hlo, once) if once else (None, [])
    seconds, source = _step_time(cost, flops, loops, comm, report["peak_flops"])
  except Exception as e:  # noqa: BLE001 - HLO that XLA's parser or cost analysis refuses: say so, guess nothing
    flops, loops = None, []
    seconds, source = None, f"n/a: the loop bodies could not be costed ({type(e).__name__}: {e})"
  out = {"memory": mem, "fits": mem["peak"] <= report["hbm_bytes"], "reason": None, "loops": loops,
         "flops_per_device": flops, "xla_flops_loop_bodies_once": once, "collectives": colls,
         "compute_seconds": flops and flops / report["peak_flops"], "collective_seconds": comm,
         "step_seconds": seconds, "step_source": source, "mfu": seconds and report["roofline_seconds"] / seconds}
  if not out["fits"]:
    out["reason"] = f"needs {mem['peak'] / GIB:.2f} GiB per device, has {report['hbm_bytes'] / GIB:.2f}"
  return out


def _size(n: float) -> str:
  """Bytes in binary units, right-aligned: '    1.50 GiB'."""
  for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if n >= scale:
      return f"{n / scale:8.2f} {unit}"
  return f"{n:8.0f} B  "


def _memory_lines(r: dict) -> list[str]:
  mem = r["memory"]
  rows = [("parameters", "params"), ("optimizer state", "optimizer"), ("batch", "batch"),
          ("activations/temporaries", "temporaries"), ("program code", "code"),
          ("peak (arguments + outputs - donated + temporaries + code)", "peak")]
  verdict = "FITS" if r["fits"] else f"DOES NOT FIT: {r['reason']}"
  return (["memory per device:"] + [f"  {label:<58}{_size(mem[k])}" for label, k in rows if k in mem]
          + [f"  {'HBM':<58}{_size(r['hbm_bytes'])}  -> {verdict}"])


def format_report(r: dict) -> str:
  """The report as a short text table."""
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [f"topology {r['topology']}: {r['devices']} x {r['device_kind']} ({r['hbm_bytes'] / GIB:.2f} GiB "
           f"HBM, {r['peak_flops'] / 1e12:.0f} TFLOP/s bf16 each); mesh {mesh}; rules {r['rules']}",
           f"model {r['parameters']:,} parameters; batch {r['batch_size']} x {r['lengths']}, "
           f"{r['microbatches']} microbatch(es); compile {r['compile_seconds']:.1f} s", *_memory_lines(r)]
  if not r["fits"]:
    lines.append("largest per-device arrays of the train state:")
    return "\n".join(lines + [f"  {a['name']:<58}{_size(a['bytes'])}  {a['shape']}" for a in r["largest"]])
  xla, loops = r["flops_per_device"], r["loops"]
  counted = "" if not loops else ", while bodies x trip count (" + ", ".join(
      f"{lp['trips']} x {lp['flops_per_trip']:.3g}" + ("" if lp["known"] else " [trip count unknown: once]")
      for lp in loops) + f"; XLA alone, bodies once: {r['xla_flops_loop_bodies_once']:.3e})"
  lines.append(f"flops per step: model {r['model_flops']:.3e} (6 x weights x tokens + attention); XLA "
               + (f"{xla * r['devices']:.3e} ({xla:.3e} per device{counted})" if xla else "n/a"))
  lines.append("collectives per step (result bytes per device):")
  lines += [f"  {op:<20}{c['count']:>8} ops {_size(c['bytes'])}"
            for op, c in sorted(r["collectives"].items())]
  lines.append(f"step time at 100% MFU {1e3 * r['roofline_seconds']:.4g} ms; XLA flops at peak "
               + (f"{1e3 * r['compute_seconds']:.4g} ms" if r["compute_seconds"] else "n/a")
               + f"; collectives at ICI bandwidth {1e3 * r['collective_seconds']:.4g} ms")
  lines.append("predicted " + (f"{1e3 * r['step_seconds']:.4g} ms per step, MFU {100 * r['mfu']:.1f}% "
                               f"({r['step_source']})" if r["step_seconds"] else f"step time and MFU {r['step_source']}"))
  return "\n".join(lines)
