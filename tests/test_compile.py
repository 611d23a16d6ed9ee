"""Ahead-of-time TPU plans (launch.compile, t_jax.training.aot) and the Mosaic kernels compiled for a TPU.

The TPU compiler comes with the optional libtpu package (the tpu-aot extra); tests that compile skip
without it. They run in subprocesses: libtpu holds process-wide state (a lockfile, its plugin).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from launch import config
from t_jax.attention import Mask
from t_jax.data import CausalLM, MaskedLM, PrefixLM, Seq2Seq
from t_jax.models import ModelConfig, abstract_params, build_model
from t_jax.sharding import AXES, mesh_shape, resolve_spec, rules_for
from t_jax.training import TrainConfig, aot
from tests.conftest import REPO

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu-aot]'): no TPU compiler here")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
TINY = ["--gin_file=experiments/quickstart_tiny.gin", "--gin_file=hardware/fsdp.gin"]
HEAD_DIMS, MASKS, DIRECTIONS = (64, 128), ("none", "causal", "segments"), ("fwd", "bwd")
KNOWN_KERNEL_FAILURES: dict[str, str] = {}  # "64-causal-bwd": "reason" for a kernel Mosaic cannot compile


def run(*args, module="launch.compile"):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
  out = tmp_path_factory.mktemp("plan") / "plan.json"
  res = run(*TINY, "--topology=v5e:2x2", f"--out={out}")
  assert res.returncode == 0, res.stderr[-3000:]
  return res.stdout, json.loads(out.read_text())


def expected_param_bytes(files, devices):
  """Per-device parameter bytes from the parameter shapes and the rules' specs (no TPU, no compile)."""
  config.parse(files)
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
  files = [f.split("=", 1)[1] for f in TINY]
  assert report["devices"] == 4 and report["device_kind"] == "TPU v5 lite"
  assert report["mesh"] == {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 1}
  assert report["memory"]["params"] == expected_param_bytes(files, 4)
  assert report["memory"]["optimizer"] > 2 * report["memory"]["params"]  # adamw: two moments, some replicated
  assert report["fits"] and report["memory"]["temporaries"] > 0
  assert report["collectives"]["all-gather"]["count"] > 0  # FSDP gathers the parameters
  assert report["flops_per_device"] > 0 and 0 < report["mfu"] < 1
  assert "FITS" in text and "all-gather" in text and "MFU" in text and "optimal_seconds" in text


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
], ids=["causal", "prefix", "mlm", "seq2seq"])
def test_batch_spec_has_the_objectives_keys(objective, keys):
  spec = aot.batch_spec(objective, 4)
  assert set(spec) == keys
  assert spec["weights"].dtype == np.float32 and spec[objective.label_key].dtype == np.int32
  assert all(v.shape[0] == 4 for v in spec.values())
  if "prefix_len" in spec:
    assert spec["prefix_len"].shape == (4,)
  args, kwargs = objective.model_inputs(spec)  # everything the model is called with is there
  assert all(a.shape[0] == 4 for a in (*args, *kwargs.values()))


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
  assert aot._step_time(cost, False, 1e12) == (0.5, "XLA cost model (optimal_seconds)")
  assert aot._step_time(cost, True, 1e12)[0] is None  # XLA counted the loop bodies once
  seconds, source = aot._step_time({"optimal_seconds": -14.7, "flops": 2e12}, False, 1e12)  # big programs
  assert seconds == 2.0 and source.startswith("XLA flops / peak")


def test_microbatches_and_chips():
  assert aot.microbatches(TrainConfig(batch_size=16, per_device_batch_size=2), 4) == 2
  with pytest.raises(ValueError, match="per_device_batch_size=3"):
    aot.microbatches(TrainConfig(batch_size=16, per_device_batch_size=3), 4)
  assert aot.chip("v5p:4x8x8") == aot.Chip(95, 459)
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
  segments = {"q_segment_ids": seg, "kv_segment_ids": seg} if kind == "segments" else {}
  return Mask(causal=kind == "causal", **segments)


def _kernel_matrix() -> dict[str, str]:
  """The Mosaic flash-attention kernels compiled for a v5e chip: {'<head_dim>-<mask>-<fwd|bwd>': 'ok' or why}.

  The gradient program holds the forward kernel too; the forward alone is compiled only when it fails.
  """
  import jax.numpy as jnp
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
def kernel_matrix():
  res = run(module="tests.test_compile")
  assert res.returncode == 0, res.stderr[-3000:]
  return json.loads(res.stdout.splitlines()[-1])


@needs_libtpu
@pytest.mark.parametrize("name", [f"{d}-{m}-{x}" for d in HEAD_DIMS for m in MASKS for x in DIRECTIONS])
def test_mosaic_kernel_compiles_for_tpu(kernel_matrix, name):
  if name in KNOWN_KERNEL_FAILURES:
    pytest.xfail(KNOWN_KERNEL_FAILURES[name])
  assert kernel_matrix[name] == "ok"


if __name__ == "__main__":
  print(json.dumps(_kernel_matrix()))
