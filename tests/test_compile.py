"""Ahead-of-time TPU plans (launch.compile, t_jax.training.aot) and the Mosaic kernels compiled for a TPU.

The TPU compiler comes with the optional libtpu package (the tpu-aot extra); tests that compile skip
without it. They run in subprocesses: libtpu holds process-wide state (a lockfile, its plugin).
"""

import fcntl
import importlib.util
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch import config
from t_jax.attention import Mask
from t_jax.attention.masks import BlockSparse
from t_jax.data import CausalLM, Classification, ImageClassification, MaskedLM, PrefixLM, Seq2Seq
from t_jax.data.audio import SpeechToText
from t_jax.models import ModelConfig, abstract_params, build_model
from t_jax.sharding import AXES, mesh_shape, resolve_spec, rules_for
from t_jax.training import TrainConfig, aot
from tests.conftest import REPO

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu-aot]'): no TPU compiler here")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
TINY = ["--gin_file=experiments/quickstart_tiny.gin", "--gin_file=hardware/fsdp.gin"]
LAYERS = ["--gin_bindings=ModelConfig.num_layers=3"]  # the plans: 3 layers, unrolled and scanned
HEAD_DIMS, MASKS, DIRECTIONS = (64, 128), ("none", "causal", "segments", "bigbird"), ("fwd", "bwd")
KNOWN_KERNEL_FAILURES: dict[str, str] = {}  # "64-causal-bwd": "reason" for a kernel Mosaic cannot compile


def run(*args, module="launch.compile"):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=600)


def once_per_session(tmp_path_factory, name, produce):
  """produce() once per test session, also under pytest-xdist: the first worker computes, the others read.

  (Module fixtures run once per xdist worker, and the `xdist_group` marks of --dist loadgroup are lost
  with pytest 9 + pytest-xdist 3.8.) The result must be JSON-able; a failure is not cached.
  """
  if "PYTEST_XDIST_WORKER" not in os.environ:
    return produce()
  path = tmp_path_factory.getbasetemp().parent / f"{name}.json"  # the session's dir, shared by the workers
  with open(f"{path}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not path.exists():
      path.write_text(json.dumps(produce()))
    return json.loads(path.read_text())


def _plan(tmp_path_factory, scan):
  def produce():
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    res = run(*TINY, *LAYERS, f"--gin_bindings=ModelConfig.scan_layers={scan}", "--topology=v5e:2x2",
              f"--out={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout, json.loads(out.read_text())
  return once_per_session(tmp_path_factory, f"tiny_plan_scan_{scan}", produce)


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
  return _plan(tmp_path_factory, scan=False)


@pytest.fixture(scope="module")
def scanned_plan(tmp_path_factory):
  return _plan(tmp_path_factory, scan=True)


def expected_param_bytes(files, bindings, devices):
  """Per-device parameter bytes from the parameter shapes and the rules' specs (no TPU, no compile)."""
  config.parse(files, bindings)
  exp = config.experiment()
  sizes = dict(zip(AXES, mesh_shape(exp.mesh, devices)))
  total = 0
  boxed = abstract_params(build_model(exp.model))
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    spec, _ = resolve_spec(leaf.names, leaf.value.shape, rules_for(exp.mesh.rules), sizes)
    split = [math.prod(sizes[a] for a in ((s,) if isinstance(s, str) else s or ())) for s in spec]
    split += [1] * (leaf.value.ndim - len(split))
    total += math.prod(n // k for n, k in zip(leaf.value.shape, split)) * leaf.value.dtype.itemsize
  return total


@needs_libtpu
def test_tiny_plan_matches_the_sharding_rules(tiny_plan):
  text, report = tiny_plan
  files, bindings = [f.split("=", 1)[1] for f in TINY], [b.split("=", 1)[1] for b in LAYERS]
  assert report["devices"] == 4 and report["device_kind"] == "TPU v5 lite"
  assert report["mesh"] == {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 1}
  assert report["memory"]["params"] == expected_param_bytes(files, bindings, 4)
  assert report["memory"]["optimizer"] > 2 * report["memory"]["params"]  # adamw: two moments, some replicated
  assert report["fits"] and report["memory"]["temporaries"] > 0
  assert report["collectives"]["all-gather"]["count"] > 0  # FSDP gathers the parameters
  assert report["flops_per_device"] > 0 and 0 < report["mfu"] < 1 and not report["loops"]
  assert "FITS" in text and "all-gather" in text and "MFU" in text and "optimal_seconds" in text


@needs_libtpu
def test_a_scanned_plan_predicts_the_flops_of_its_unrolled_twin(tiny_plan, scanned_plan):
  (_, unrolled), (text, scanned) = tiny_plan, scanned_plan
  assert [(lp["trips"], lp["known"]) for lp in scanned["loops"]] == [(3, True), (3, True)]  # forward, backward
  assert scanned["xla_flops_loop_bodies_once"] < 0.8 * scanned["flops_per_device"]
  assert scanned["flops_per_device"] == pytest.approx(unrolled["flops_per_device"], rel=0.03)
  assert scanned["step_seconds"] >= scanned["compute_seconds"] > 0 and 0 < scanned["mfu"] < 1
  assert "3 x" in text and "roofline" in text and "MFU" in text


@needs_libtpu
def test_a_config_that_does_not_fit_exits_2():
  res = run(*TINY, "--topology=v5e:2x2", "--gin_bindings=ModelConfig.d_model=32768",
            "--gin_bindings=ModelConfig.mlp_dim=32768", "--gin_bindings=ModelConfig.num_heads=64")
  assert res.returncode == 2, res.stderr[-3000:]
  assert len(res.stderr.splitlines()) == 1, res.stderr
  assert res.stderr.startswith("error: does not fit on v5e:2x2"), res.stderr
  assert "DOES NOT FIT" in res.stdout and "largest per-device arrays" in res.stdout and "kernel" in res.stdout


@pytest.mark.parametrize("args,match", [
    ((*TINY,), "--topology is required"),
    ((*TINY, "--topology=v9z:2x2"), "unknown topology"),
    ((*TINY, "--topology=v5e:2x2", "--gin_bindings=TrainConfig.batch_size=6"), "not divisible"),
    ((*TINY, "--topology=v5e:2x2", "--out=/nonexistent/plan.json"), "no such directory"),
    ((*TINY, "--topology=v5e:3x3"), "libtpu cannot describe topology 'v5e:3x3'"),
], ids=["no_topology", "bad_chip", "batch", "out", "bad_shape"])
def test_bad_command_lines(args, match):
  if not HAS_LIBTPU and match in ("not divisible", "libtpu cannot describe topology 'v5e:3x3'"):
    match = "needs the libtpu package"  # the topology is looked up first
  res = run(*args)
  assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr[-3000:]
  assert res.stderr.startswith("error: ") and match in res.stderr, res.stderr


@pytest.mark.parametrize("objective,keys", [
    (CausalLM(seq_len=16), {"inputs", "targets", "weights", "segment_ids", "positions"}),
    (PrefixLM(seq_len=16), {"inputs", "targets", "weights", "segment_ids", "positions", "prefix_len"}),
    (MaskedLM(seq_len=16), {"inputs", "targets", "weights", "segment_ids", "positions"}),
    (Seq2Seq(inputs_len=16, targets_len=8), {"encoder_inputs", "encoder_segment_ids", "encoder_positions",
                                             "decoder_inputs", "decoder_targets", "decoder_segment_ids",
                                             "decoder_positions", "weights"}),
    (ImageClassification(image_size=8, num_channels=1, num_classes=10), {"image", "label", "weights"}),
    (SpeechToText(max_frames=30, targets_len=8), {"encoder_inputs", "encoder_segment_ids", "decoder_inputs",
                                                  "decoder_targets", "decoder_segment_ids", "decoder_positions",
                                                  "weights"}),
    (Classification(seq_len=16, num_classes=3), {"inputs", "segment_ids", "positions", "label", "weights"}),
    (Classification(seq_len=16, num_classes=1, text_pair_key="b"),
     {"inputs", "segment_ids", "positions", "token_type_ids", "label", "weights"}),
], ids=["causal", "prefix", "mlm", "seq2seq", "image", "speech", "classification", "regression-pair"])
def test_batch_spec_has_the_objectives_keys(objective, keys):
  spec = aot.batch_spec(objective, 4)
  assert set(spec) == keys
  regression = getattr(objective, "regression", False)
  assert spec["weights"].dtype == np.float32
  assert spec[objective.label_key].dtype == (np.float32 if regression else np.int32)
  assert all(v.shape[0] == 4 for v in spec.values())
  if "prefix_len" in spec:
    assert spec["prefix_len"].shape == (4,)
  if "image" in spec:
    assert spec["image"].shape == (4, 8, 8, 1) and spec["image"].dtype == np.float32
  if isinstance(objective, SpeechToText):
    assert spec["encoder_inputs"].shape == (4, 30, objective.n_mels) and spec["encoder_inputs"].dtype == np.float32
  args, kwargs = objective.model_inputs(spec)  # everything the model is called with is there
  assert all(a.shape[0] == 4 for a in (*args, *kwargs.values()))


def test_token_lengths_of_the_image_and_audio_stems():
  """The stacks see 16 patches + the class token, and half the audio frames (the stride-2 stem)."""
  vit = ModelConfig(architecture="encoder", input_stem="patches", image_size=8, patch_size=2, num_channels=1,
                    num_classes=10, class_token=True, pooling="first")
  assert aot.token_lengths(vit, ImageClassification(image_size=8, num_channels=1, num_classes=10)) == {"inputs": 17}
  whisper = ModelConfig(architecture="encoder_decoder", input_stem="audio", position="learned")
  assert aot.token_lengths(whisper, SpeechToText(max_frames=30, targets_len=8)) == {
      "encoder_inputs": 15, "decoder_inputs": 8, "decoder_targets": 8}


def test_model_flops_of_a_decoder():
  cfg = ModelConfig(vocab_size=100, d_model=16, num_heads=2, mlp_dim=32, num_layers=2, tie_embeddings=True)
  params = abstract_params(build_model(cfg))
  per_layer = 4 * 16 * 16 + 2 * 16 * 32  # q, k, v, out + wi, wo
  weights = 2 * per_layer + 100 * 16  # + the tied table as the output layer
  expected = 6 * weights * 3 * 8 + 12 * 2 * 2 * 8 * 3 * 8 * 8
  assert aot.model_flops(cfg, params, {"inputs": 8}, 3) == expected
  untied = cfg.replace(tie_embeddings=False)  # the table is a lookup, the separate output kernel counts
  assert aot.model_flops(untied, abstract_params(build_model(untied)), {"inputs": 8}, 3) == expected


HLO = """HloModule m, entry_computation_layout={(f32[16]{0})->f32[16]{0}}

%cond (p: (s32[])) -> pred[] {
  %c.1 = s32[]{:T(128)} constant(3)
  %p = (s32[]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %c.1), direction=LT
}

%fused (x: bf16[8,64]) -> (bf16[8,64], bf16[32,64]) {
  %x = bf16[8,64]{1,0} parameter(0)
  %ag = bf16[32,64]{1,0:T(8,128)} all-gather(%x), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %t = (bf16[8,64]{1,0}, /*index=1*/bf16[32,64]{1,0}) tuple(%x, %ag)
}

%fused.2 (x: bf16[8,64]) -> bf16[32,64] {
  %x = bf16[8,64]{1,0} parameter(0)
  ROOT %ag.2 = bf16[32,64]{1,0} all-gather(%x), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}
}

%all-reduce-scatter (input: bf16[512,32]) -> bf16[512,8] {
  %input = bf16[512,32]{0,1} parameter(0)
  %all-reduce.1 = bf16[512,32]{0,1:T(8,128)(2,1)} all-reduce(%input), channel_id=5, replica_groups={{0,1,2,3}}
  ROOT %ds = bf16[512,8]{0,1} dynamic-slice(%all-reduce.1, %z, %i), dynamic_slice_sizes={512,8}
}

%body (p: (s32[])) -> (s32[]) {
  %f = (bf16[8,64]{1,0}, bf16[32,64]{1,0}) fusion(%a), kind=kLoop, calls=%fused
  ROOT %g = bf16[32,64]{1,0} fusion(%a), kind=kLoop, calls=%fused.2
}

ENTRY %main (a: f32[16]) -> f32[16] {
  %w = (s32[]) while(%t0), condition=%cond, body=%body
  %ar = (f32[16]{0}, /*index=1*/f32[4]{0}) all-reduce(%a, %b), channel_id=9, to_apply=%add
  %rs = bf16[512,8]{0,1} fusion(%g), kind=kCustom, calls=%all-reduce-scatter
  %ags = (bf16[8,64]{1,0}, bf16[32,64]{1,0}) all-gather-start(%x), channel_id=11
  ROOT %agd = bf16[32,64]{1,0} all-gather-done(%ags)
}
"""


def test_collectives_count_loops_once_per_trip_and_fused_pieces_once():
  assert aot.collectives(HLO) == {"all-gather": {"count": 3 + 1, "bytes": 4 * 32 * 64 * 2},
                                  "all-reduce": {"count": 1, "bytes": (16 + 4) * 4},
                                  "reduce-scatter": {"count": 1, "bytes": 512 * 32 * 2}}


def test_step_time_prefers_a_usable_xla_estimate():
  cost = {"optimal_seconds": 0.5, "flops": 1e12}
  assert aot._step_time(cost, 1e12, [], 0.1, 1e12) == (0.5, "XLA cost model (optimal_seconds)")
  seconds, source = aot._step_time(cost, 3e12, [{"trips": 3}], 0.1, 1e12)  # XLA counted the loop body once
  assert seconds == 3.0 and "bound by XLA flops at peak (loop bodies x trip count)" in source
  seconds, source = aot._step_time({"optimal_seconds": -14.7, "flops": 2e12}, 2e12, [], 5.0, 1e12)  # big programs
  assert seconds == 5.0 and "bound by collectives at ICI bandwidth" in source
  assert aot.collective_seconds({"all-reduce": {"count": 2, "bytes": 10}, "all-gather": {"count": 1, "bytes": 5}},
                                5.0) == 5.0


def _layer(h, w):
  return jnp.tanh(h @ w)


def _scanned(x, w):
  return jax.lax.scan(lambda h, wi: (_layer(h, wi), None), x, w)[0].sum()


def _nested(x, w):  # 3 x 4 layers: a scan in a scan
  inner = lambda h, ws: (jax.lax.scan(lambda g, wi: (_layer(g, wi), None), h, ws)[0], None)
  return jax.lax.scan(inner, x, w.reshape(3, 4, *w.shape[1:]))[0].sum()


def _unrolled(x, ws):
  for w in ws:
    x = _layer(x, w)
  return x.sum()


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "gradient"])
@pytest.mark.parametrize("looped", [_scanned, _nested], ids=["scan", "nested_scan"])
def test_loop_flops_count_each_iteration_like_the_unrolled_program(looped, grad):
  x, w = jnp.ones((8, 64)), jnp.ones((12, 64, 64))
  def flops(f, *args):
    compiled = jax.jit(jax.grad(f, argnums=1) if grad else f).lower(*args).compile()
    once = compiled.cost_analysis()["flops"]
    return once, aot.loop_flops(compiled.as_text(), once)
  once, (total, loops) = flops(looped, x, w)
  _, (unrolled, none) = flops(_unrolled, x, list(w))
  assert none == [] and all(lp["known"] for lp in loops) and {lp["trips"] for lp in loops} <= {12, 3, 4}
  assert once < total / 3  # XLA alone counts a loop body once
  assert total == pytest.approx(unrolled, rel=0.05)  # the backward loop carries a few more elementwise flops


def test_microbatches_and_chips():
  assert aot.microbatches(TrainConfig(batch_size=16, per_device_batch_size=2), 4) == 2
  with pytest.raises(ValueError, match="per_device_batch_size=3"):
    aot.microbatches(TrainConfig(batch_size=16, per_device_batch_size=3), 4)
  assert aot.chip("v5p:4x8x8") == aot.Chip(95, 459, 4800)
  with pytest.raises(ValueError, match="unknown topology"):
    aot.chip("v5e")


def _compiles(fn, args, kernels) -> str:
  """'ok' when fn compiles for the TPU with each named Mosaic kernel in the program, else why not."""
  try:
    hlo = jax.jit(fn).lower(*args).compile().as_text()
  except Exception as e:  # noqa: BLE001 - any compiler error is the finding
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
  calls = [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
  missing = [k for k in kernels if not any(k in line for line in calls)]
  return f"compiled without the Mosaic kernels {missing}" if missing else "ok"


def _mask(kind, seg):
  segments = {"q_segment_ids": seg, "kv_segment_ids": seg} if kind in ("segments", "bigbird") else {}
  sparse = BlockSparse(128, 1, 0, 1) if kind == "bigbird" else None  # with segments: the fetch-table path
  return Mask(causal=kind in ("causal", "bigbird"), block_sparse=sparse, **segments)


def _kernel_matrix() -> dict[str, str]:
  """The Mosaic flash-attention kernels compiled for a v5e chip: {'<head_dim>-<mask>-<fwd|bwd>': 'ok' or why}.

  The gradient program holds the forward kernel too; the forward alone is compiled only when it fails.
  """
  from jax.sharding import SingleDeviceSharding

  from t_jax.kernels import flash_attention

  jax.config.update("jax_platforms", "cpu")
  place = SingleDeviceSharding(aot.topology_devices("v5e:2x2")[0])
  seg = jax.ShapeDtypeStruct((1, 256), jnp.int32, sharding=place)
  out = {}
  for d in HEAD_DIMS:
    q = jax.ShapeDtypeStruct((1, 256, 2, d), jnp.bfloat16, sharding=place)
    for kind in MASKS:
      fwd = lambda q, k, v, s, kind=kind: flash_attention(q, k, v, mask=_mask(kind, s), backend="mosaic_tpu",
                                                          interpret=False)
      bwd = jax.grad(lambda q, k, v, s, fwd=fwd: fwd(q, k, v, s).astype(jnp.float32).sum(), argnums=(0, 1, 2))
      kernels = [f"flash_attention_{k}" for k in ("fwd", "dq", "dkdv")]
      out[f"{d}-{kind}-bwd"] = _compiles(bwd, (q, q, q, seg), kernels)
      out[f"{d}-{kind}-fwd"] = ("ok" if out[f"{d}-{kind}-bwd"] == "ok"
                                else _compiles(fwd, (q, q, q, seg), ["flash_attention_fwd"]))
  return out


@pytest.fixture(scope="module")
def kernel_matrix(tmp_path_factory):
  def produce():
    res = run(module="tests.test_compile")
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])
  return once_per_session(tmp_path_factory, "mosaic_kernel_matrix", produce)


@needs_libtpu
@pytest.mark.parametrize("name", [f"{d}-{m}-{x}" for d in HEAD_DIMS for m in MASKS for x in DIRECTIONS])
def test_mosaic_kernel_compiles_for_tpu(kernel_matrix, name):
  if name in KNOWN_KERNEL_FAILURES:
    pytest.xfail(KNOWN_KERNEL_FAILURES[name])
  assert kernel_matrix[name] == "ok"


if __name__ == "__main__":
  print(json.dumps(_kernel_matrix()))
