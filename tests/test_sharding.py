"""Sharding presets: every parameter of every model maps to a valid, intended sharding, and training on
8 (virtual CPU) devices under each preset matches one device.

The mapping checks run in-process on abstract meshes. The training checks need 8 devices, so they run
in worker subprocesses (see tests/multidevice.py): `python tests/test_sharding.py --worker FAMILY`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from t_jax import data
from t_jax.models import abstract_params, build_model
from t_jax.sharding import AXES, MeshConfig, Partitioner, mesh_shape, rules_for

try:  # tests/ as a package (pytest from the repo root) or as the script's directory (worker)
  from tests import multidevice as md
except ImportError:
  import multidevice as md

KNOWN_NAMES = {"vocab", "embed", "heads", "kv", "head_dim", "mlp", "layers", "position", "relpos_buckets",
               "token_types", "embed_out"}
MESH_CASES = [  # (preset, MeshConfig fields) on 8 devices, including indivisible ones (tensor=8 > 4 heads)
    ("data_parallel", dict(data=8)),
    ("fsdp", dict(data=1, fsdp=8)),
    ("fsdp", dict(data=2, fsdp=4)),
    ("fsdp", dict(data=1, fsdp=4, sequence=2)),
    ("tensor", dict(data=2, tensor=4)),
    ("tensor", dict(data=1, tensor=8)),
    ("fsdp_tensor", dict(data=1, fsdp=2, tensor=4)),
    ("fsdp_tensor", dict(data=1, fsdp=4, tensor=2)),
]
ARCHS = [(f, p, s) for f in md.FAMILIES for p in ("learned", "rope", "t5_relative") for s in (False, True)]
# Megatron layout: (kernel logical names without `layers`, the dim split over tensor). Column-parallel
# layers split an output dim, row-parallel ones (out, wo) the contracted input dim.
MEGATRON = {"query": (("embed", "heads", "head_dim"), "heads"), "key": (("embed", "kv", "head_dim"), "kv"),
            "value": (("embed", "kv", "head_dim"), "kv"), "out": (("heads", "head_dim", "embed"), "heads"),
            "wi": (("embed", "mlp"), "mlp"), "wi_0": (("embed", "mlp"), "mlp"), "wi_1": (("embed", "mlp"), "mlp"),
            "wo": (("mlp", "embed"), "mlp")}


def abstract_partitioner(preset: str, **mesh: int) -> Partitioner:
  """A Partitioner over an abstract 8-device mesh (no devices needed)."""
  shape = mesh_shape(MeshConfig(**mesh), 8)
  return Partitioner(AbstractMesh(shape, AXES), rules_for(preset))


@functools.cache
def boxed(family: str, position: str, scan: bool):
  return abstract_params(build_model(md.model_config(family, position=position, scan_layers=scan)))


def _leaves(tree):
  import flax.linen as nn
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  return [(jax.tree_util.keystr(p), x) for p, x in flat]


def _check_leaf(where: str, names: tuple, shape: tuple, spec: tuple, axis_sizes: dict, preset: str) -> None:
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  used = [a for s in spec if s for a in ((s,) if isinstance(s, str) else s)]
  assert len(used) == len(set(used)), f"{where}: a mesh axis is used twice in {spec}"
  for name, size, s in zip(names, shape, spec):
    axes = () if s is None else ((s,) if isinstance(s, str) else s)
    n = math.prod(axis_sizes[a] for a in axes)
    assert size % n == 0, f"{where}: dim {name} of size {size} split {n} ways ({spec})"
    tensor, fsdp = axis_sizes["tensor"], axis_sizes["fsdp"] * axis_sizes["sequence"]
    if preset == "data_parallel":
      assert not axes, f"{where}: data parallel must replicate parameters, got {spec}"
    if name in ("heads", "kv", "mlp", "vocab") and "tensor" in preset and tensor > 1:
      assert ("tensor" in axes) == (size % tensor == 0), f"{where}: {name} ({size}) vs tensor={tensor}: {spec}"
    if name in ("embed", "head_dim", "layers") or "tensor" not in preset:
      assert "tensor" not in axes, f"{where}: {name} must not be tensor-split: {spec}"
    if name == "embed" and "fsdp" in preset and fsdp > 1:
      want = tuple(a for a in ("fsdp", "sequence") if axis_sizes[a] > 1)
      assert axes == want or size % fsdp, f"{where}: embed ({size}) should be split over {want}, got {spec}"
    if "fsdp" not in preset:
      assert "fsdp" not in axes and "sequence" not in axes, f"{where}: {preset} must not use fsdp: {spec}"


@pytest.mark.parametrize("family,position,scan", ARCHS)
def test_every_parameter_maps_to_a_valid_sharding(family, position, scan):
  tree = boxed(family, position, scan)
  leaves = _leaves(tree)
  assert leaves
  for preset, mesh in MESH_CASES:
    part = abstract_partitioner(preset, **mesh)
    sizes = dict(part.mesh.shape)
    shardings = dict(_leaves(part.shardings(tree)))
    per_device = total = 0
    for where, leaf in leaves:
      names, shape = tuple(leaf.names), tuple(leaf.value.shape)
      assert set(n for n in names if n) <= KNOWN_NAMES, f"{where}: unknown logical axis in {names}"
      spec = tuple(shardings[where].spec)
      _check_leaf(f"{preset} {mesh} {where}", names, shape, spec, sizes, preset)
      layer = where.split("['")[-2].rstrip("']") if where.endswith("['kernel']") else ""
      if "tensor" in preset and sizes["tensor"] > 1 and layer in MEGATRON:
        layout, split = MEGATRON[layer]
        assert tuple(n for n in names if n != "layers") == layout, f"{where}: unexpected layout {names}"
        dim = names.index(split)
        assert (spec[dim] == "tensor") == (shape[dim] % sizes["tensor"] == 0), f"{preset} {where}: {spec}"
      total += math.prod(shape)
      per_device += math.prod(shape) // math.prod(
          sizes[a] for s in spec if s for a in ((s,) if isinstance(s, str) else s))
    if preset == "fsdp":
      n = sizes["fsdp"] * sizes["sequence"]
      assert per_device <= 1.05 * total / n, f"{mesh}: FSDP keeps {per_device}/{total} elements per device"


def test_megatron_rules_by_name():
  P = jax.sharding.PartitionSpec
  part = abstract_partitioner("tensor", data=2, tensor=4)
  assert part.spec(("embed", "heads", "head_dim"), (32, 4, 8)) == P(None, "tensor", None)  # column
  assert part.spec(("heads", "head_dim", "embed"), (4, 8, 32)) == P("tensor", None, None)  # row
  assert part.spec(("embed", "mlp"), (32, 64)) == P(None, "tensor")
  assert part.spec(("mlp", "embed"), (64, 32)) == P("tensor", None)
  both = abstract_partitioner("fsdp_tensor", data=1, fsdp=2, tensor=4)
  assert both.spec(("layers", "embed", "mlp"), (2, 32, 64)) == P(None, "fsdp", "tensor")
  assert both.spec(("vocab", "embed"), (128, 32)) == P("tensor", "fsdp")
  assert both.spec(("heads", "head_dim"), (4, 8)) == P("tensor", "fsdp")  # a bias: fsdp falls back to head_dim


def test_indivisible_dims_fall_back_with_a_warning_or_raise(caplog):
  tree = boxed("decoder", "rope", False)  # 4 heads, 2 kv heads
  part = abstract_partitioner("fsdp_tensor", data=1, fsdp=1, tensor=8)
  with caplog.at_level(logging.WARNING, logger="t_jax.sharding.partitioner"):
    specs = dict(_leaves(part.shardings(tree)))
  assert "'heads' (size 4) is not divisible by mesh axes ('tensor',)" in caplog.text
  assert specs["['decoder']['layer_0']['self_attention']['query']['kernel']"].spec == jax.sharding.PartitionSpec(None, None, None)
  # Narrowing: embed over (fsdp, sequence) = 8 does not divide 12, fsdp alone (4) does.
  narrow = abstract_partitioner("fsdp", data=1, fsdp=4, sequence=2)
  assert narrow.spec(("embed", "mlp"), (12, 16)) == jax.sharding.PartitionSpec("fsdp", None)
  assert narrow.spec(("embed", "mlp"), (16, 12)) == jax.sharding.PartitionSpec(("fsdp", "sequence"), None)
  strict = Partitioner(part.mesh, part.rules, indivisible="error")
  with pytest.raises(ValueError, match=r"attention'\]\['(query|key)'\]\['kernel'\] \(32, \d, 8\): dim '(heads|kv)' of size \d is not divisible by mesh axes \('tensor',\)"):
    strict.shardings(tree)
  with pytest.raises(ValueError, match="indivisible"):
    Partitioner(part.mesh, part.rules, indivisible="ignore")


def test_mesh_config_errors():
  assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 1, 2)
  with pytest.raises(ValueError, match="needs 6 devices"):
    mesh_shape(MeshConfig(data=3, tensor=2), 8)
  with pytest.raises(ValueError, match="at most one"):
    mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)
  with pytest.raises(ValueError, match="unknown sharding rules preset"):
    rules_for("zero4")


@pytest.mark.parametrize("name,shape8,preset", [
    ("dp", (8, 1, 1, 1), "data_parallel"), ("fsdp", (1, 8, 1, 1), "fsdp"), ("tp", (2, 1, 1, 4), "tensor"),
    ("fsdp_tp", (1, 2, 1, 4), "fsdp_tensor"), ("sp", (1, 4, 2, 1), "fsdp")])
def test_hardware_presets(name, shape8, preset):
  import gin

  from launch.config import build, parse
  from t_jax.models import ModelConfig
  try:
    parse([f"hardware/{name}.gin"])
    cfg = build(MeshConfig)
    assert (mesh_shape(cfg, 8), cfg.rules) == (shape8, preset)
    assert math.prod(mesh_shape(cfg, 64)) == 64
    assert build(ModelConfig).dtype == "bfloat16" and build(ModelConfig).param_dtype == "float32"
  finally:
    gin.clear_config()


# ---- 8 devices: training under every preset equals one device (worker subprocesses) ----

def _axes(entry):
  return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


# Every preset on the decoder and on the encoder-decoder (the most layer kinds); the prefix-LM and encoder
# bodies are the decoder's stack with another mask, so they train under two meshes each (CI time).
PRESETS_OF = {"decoder": tuple(md.MESHES), "encoder_decoder": tuple(md.MESHES),
              "prefix_lm": ("tensor", "fsdp_sequence"), "encoder": ("fsdp", "fsdp_tensor")}


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
@pytest.mark.parametrize("families", [("decoder", "prefix_lm"), ("encoder_decoder", "encoder")])
def test_presets_train_like_one_device(families):
  # One test per pair of families, each family in its own (concurrent) 8-device worker: pytest-xdist
  # spreads the two tests over its workers without running any worker twice.
  for family, report in zip(families, md.run_workers(__file__, [[f] for f in families])):
    assert set(report) - {"log"} == {"reference", *PRESETS_OF[family]}
    for label in PRESETS_OF[family]:
      try:
        _check_run(report["reference"], report[label], md.MESHES[label][0])
      except AssertionError as e:
        raise AssertionError(f"{family} under {label} {report[label]['mesh']}: {e}") from e


def _check_run(ref: dict, got: dict, preset: str) -> None:
  np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["grad_norms"], ref["grad_norms"], rtol=1e-4)
  assert got["losses"][-1] < got["losses"][0], "training did not reduce the loss"
  assert got["init_max_diff"] < 1e-6, "sharded init differs from single-device init"
  assert got["final_max_diff"] < 2e-3, "parameters after training differ from one device"  # adam: lr 1e-2/step
  assert got["donated"], "the step did not donate the input state"
  assert got["moments_follow_params"], "adam moments are not sharded like their parameters"
  sizes = got["mesh"]
  n = sizes["fsdp"] * sizes["sequence"]
  for kind in ("params", "opt_state"):
    per_device, total = max(got["bytes"][kind].values()), got["total_bytes"][kind]
    assert len(got["bytes"][kind]) == 8
    if preset == "data_parallel":
      assert per_device == total
    elif preset == "fsdp":
      assert per_device <= 1.05 * total / n + 64, f"{kind}: {per_device} of {total} bytes on one device"
    else:
      assert per_device < 0.6 * total, f"{kind}: {per_device} of {total} bytes on one device"
  for leaf in got["leaves"]:
    expect = [size // math.prod(sizes[a] for a in _axes(s)) for size, s in
              zip(leaf["shape"], leaf["spec"] + [None] * (len(leaf["shape"]) - len(leaf["spec"])))]
    assert leaf["shard_shape"] == expect, f"{leaf['path']}: placed {leaf['shard_shape']}, spec says {expect}"
    _check_leaf(leaf["path"], tuple(leaf["names"]), tuple(leaf["shape"]), tuple(map(
        lambda s: s if s is None or isinstance(s, str) else tuple(s), leaf["spec"])), sizes, preset)
  assert got["constraints"] > 0, "activation constraints missing (is the mesh set in Partitioner.context?)"
  if "tensor" in preset:
    assert got["tensor_constraints"] > 0, "no activation is constrained over the tensor axis"
  if sizes["sequence"] > 1:
    assert got["sequence_constraints"] > 0, "no activation is constrained over the sequence axis"


@pytest.mark.slow
@pytest.mark.xdist_group("processes")
def test_training_loop_step_under_presets():
  # t_jax.training's own init/train_step (adamw via make_optimizer, microbatching) on 8 devices.
  (report,) = md.run_workers(__file__, [["train_step"]])
  runs = {k: v for k, v in report.items() if k != "log"}
  assert len(runs) == 6
  for label, got in runs.items():
    ref = report["seq2seq reference" if label.startswith("seq2seq") else "causal_lm reference"]
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-4, atol=1e-5, err_msg=label)
    np.testing.assert_allclose(got["grad_norms"], ref["grad_norms"], rtol=1e-4, err_msg=label)
    assert got["losses"][-1] < got["losses"][0], label


# ---- workers ----

def _run(family: str, part: Partitioner, batches: list, reference: dict | None) -> dict:
  from t_jax.sharding import bytes_per_device

  _, tx, init_fn, loss = md.make_training(family)
  key = jax.random.key(0)
  state, shardings = part.init(init_fn, key)
  names = {k: v.names for k, v in _leaves(jax.eval_shape(init_fn, key)["params"])}
  init_params = jax.device_get(state["params"])
  step = md.make_step(loss, tx, part, shardings)
  losses, grad_norms = [], []
  with part.context():
    hlo = step.lower(state, part.global_batch(batches[0])).as_text()
    for batch in batches:
      old = state
      state, metrics = step(state, part.global_batch(batch))
      losses.append(float(metrics["loss"]))
      grad_norms.append(float(metrics["grad_norm"]))
  constraints = [line for line in hlo.splitlines() if "sharding_constraint" in line]
  adam = shardings["opt_state"][0]
  same = jax.tree.map(lambda a, b, p: a == p and b == p, adam.mu, adam.nu, shardings["params"])
  out = {
      "losses": losses, "grad_norms": grad_norms, "mesh": dict(part.mesh.shape), "donated": all(x.is_deleted() for x in jax.tree.leaves(old)),
      "moments_follow_params": all(jax.tree.leaves(same)),
      "bytes": {k: {str(d): b for d, b in bytes_per_device(state[k]).items()} for k in ("params", "opt_state")},
      "total_bytes": {k: sum(x.nbytes for x in jax.tree.leaves(state[k])) for k in ("params", "opt_state")},
      "constraints": len(constraints), "tensor_constraints": sum('"tensor"' in c for c in constraints),
      "sequence_constraints": sum('"sequence"' in c for c in constraints),
      "leaves": [{"path": p, "names": list(names[p]), "shape": list(x.shape),
                  "spec": [s if s is None or isinstance(s, str) else list(s) for s in x.sharding.spec],
                  "shard_shape": list(x.addressable_shards[0].data.shape)}
                 for p, x in _leaves(state["params"])],
      "params": jax.device_get(state["params"]), "init": init_params,
  }
  if reference is not None:
    diff = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    out["init_max_diff"] = diff(init_params, reference["init"])
    out["final_max_diff"] = diff(out["params"], reference["params"])
  return out


def worker(family: str, out: str) -> None:
  """Trains the family's tiny model on 1 device, then under every preset on 8; writes the report."""
  md.use_cpu_devices(8)
  from t_jax.sharding import make_mesh
  assert jax.device_count() == 8
  batches = [md.make_batch(family, seed) for seed in range(md.STEPS)]
  single = Partitioner(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]), rules_for("data_parallel"))
  report = {"reference": _run(family, single, batches, None)}
  for label in PRESETS_OF[family]:
    preset, mesh = md.MESHES[label]
    report[label] = _run(family, Partitioner.from_config(MeshConfig(rules=preset, **mesh)), batches,
                         report["reference"])
  for r in report.values():
    r.pop("params"), r.pop("init")
  md.write_report(out, report)


OBJECTIVES = {"causal_lm": data.CausalLM(), "seq2seq": data.Seq2Seq()}


def _training_batch(kind: str, seed: int) -> dict:
  """A batch in t_jax.training's layout (unpacked: one segment per row, all weights 1)."""
  b = md.make_batch("encoder_decoder" if kind == "seq2seq" else "decoder", seed)
  n, length = b["inputs"].shape
  pos = np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)).copy()
  seg, weights = np.ones((n, length), np.int32), np.ones((n, length), np.float32)
  if kind == "seq2seq":
    return dict(encoder_inputs=b["inputs"], decoder_inputs=b["decoder_inputs"], decoder_targets=b["targets"],
                encoder_segment_ids=seg, encoder_positions=pos, decoder_segment_ids=seg, decoder_positions=pos,
                weights=weights)
  return dict(inputs=b["inputs"], targets=b["targets"], positions=pos, segment_ids=seg, weights=weights)


def _train_loop_step(kind: str, part: Partitioner, accum: int = 1) -> dict:
  from t_jax import training
  model = build_model(md.model_config("encoder_decoder" if kind == "seq2seq" else "decoder"))
  opt = training.OptimizerConfig(learning_rate=1e-2, schedule="constant")
  tx, schedule = training.make_optimizer(opt, 10), training.make_schedule(opt, 10)
  state, shardings = part.init(training.make_init(model, tx, 8), jax.random.key(0))
  out = {"losses": [], "grad_norms": []}
  with part.context():
    step = jax.jit(training.make_train_step(model, tx, OBJECTIVES[kind], training.TrainConfig(), schedule, accum),
                   in_shardings=(shardings, part.batch_sharding), out_shardings=(shardings, part.replicated),
                   donate_argnums=0)
    for seed in range(md.STEPS):
      state, metrics = step(state, part.global_batch(_training_batch(kind, seed)))
      out["losses"].append(float(metrics["loss"]))
      out["grad_norms"].append(float(metrics["grad_norm"]))
  return out


def train_step_worker(out: str) -> None:
  """t_jax.training's step: causal LM under tensor and FSDP x TP (and FSDP with accumulation), seq2seq under
  FSDP x TP. (The data-parallel and plain FSDP layouts of the same model are checked by the presets test.)"""
  md.use_cpu_devices(8)
  from t_jax.sharding import make_mesh
  single = Partitioner(make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]), rules_for("data_parallel"))
  preset = lambda label: Partitioner.from_config(MeshConfig(rules=md.MESHES[label][0], **md.MESHES[label][1]))
  report = {"causal_lm reference": _train_loop_step("causal_lm", single),
            "seq2seq reference": _train_loop_step("seq2seq", single),
            "seq2seq fsdp_tensor": _train_loop_step("seq2seq", preset("fsdp_tensor")),
            "causal_lm fsdp 2 microbatches": _train_loop_step("causal_lm", preset("fsdp"), accum=2)}
  for label in ("tensor", "fsdp_tensor"):
    report[f"causal_lm {label}"] = _train_loop_step("causal_lm", preset(label))
  md.write_report(out, report)


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", nargs=1, required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  if args.worker[0] == "train_step":
    train_step_worker(args.out)
  else:
    worker(args.worker[0], args.out)
