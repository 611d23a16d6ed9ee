"""Helpers for the multi-device / multi-process tests (test_sharding.py, test_multihost.py).

Virtual CPU devices must be configured before JAX initialises its backend, which another test
module in the same pytest process may already have done. So every check that needs 8 devices (or 2
processes) runs in a fresh interpreter: `run_workers` starts the test file itself as a script
(`python tests/test_x.py --worker ...`), which calls `use_cpu_devices` first and writes a JSON
report that the pytest side asserts on. No conftest or environment set-up is needed, and the tests
run the same alone, together, or under pytest-xdist.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BASE = dict(vocab_size=128, d_model=32, num_heads=4, head_dim=8, mlp_dim=64, num_layers=2, max_len=32,
            init_std=0.02, dropout_rate=0.0, attention_dropout_rate=0.0)
# One tiny config per architecture family; together they cover rope / learned / t5_relative
# positions, scanned and unrolled layers, GQA, gated MLPs, tied and untied logits, biases.
FAMILIES = {
    "decoder": dict(architecture="decoder", position="rope", gated=True, activation="silu", norm="rmsnorm",
                    use_bias=False, tie_embeddings=False, num_kv_heads=2, scan_layers=True),
    "prefix_lm": dict(architecture="prefix_lm", position="learned", scan_layers=False),
    "encoder": dict(architecture="encoder", position="learned", num_token_types=2, pre_norm=False, embed_norm=True,
                    logits_bias=True, scan_layers=True),
    "encoder_decoder": dict(architecture="encoder_decoder", position="t5_relative", gated=True, norm="rmsnorm",
                            use_bias=False, tie_embeddings=False, scale_attention=False, scan_layers=False),
}
# Run label -> (rules preset, mesh on 8 devices as MeshConfig fields).
MESHES = {
    "data_parallel": ("data_parallel", dict(data=8)),
    "fsdp": ("fsdp", dict(data=1, fsdp=8)),
    "tensor": ("tensor", dict(data=2, tensor=4)),
    "fsdp_tensor": ("fsdp_tensor", dict(data=1, fsdp=2, tensor=4)),
    "fsdp_sequence": ("fsdp", dict(data=1, fsdp=4, sequence=2)),  # sequence-parallel activations
}
BATCH, LENGTH, STEPS = 16, 16, 3


def use_cpu_devices(n: int) -> None:
  """n virtual CPU devices; call before anything touches a JAX device."""
  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", n)


def model_config(family: str, **changes: object):
  """The tiny ModelConfig of a family."""
  from t_jax.models import ModelConfig

  return ModelConfig(**{**BASE, **FAMILIES[family], **changes})


def make_batch(family: str, seed: int, batch: int = BATCH, length: int = LENGTH) -> dict:
  """A deterministic random batch (numpy) with the inputs the family's model takes."""
  import numpy as np

  rng = np.random.default_rng(seed)
  vocab = BASE["vocab_size"]
  out = {"inputs": rng.integers(1, vocab, (batch, length), dtype=np.int32)}
  out["targets"] = (out["inputs"] * 7 + 3) % vocab  # learnable token by token, so the loss falls
  if family == "prefix_lm":
    out["prefix_len"] = rng.integers(1, length, (batch,), dtype=np.int32)
  if family == "encoder":
    out["token_type_ids"] = (np.arange(length)[None] >= rng.integers(1, length, (batch, 1))).astype(np.int32)
  if family == "encoder_decoder":
    out["decoder_inputs"] = rng.integers(1, vocab, (batch, length), dtype=np.int32)
    out["targets"] = (out["decoder_inputs"] * 7 + 3) % vocab
  return out


def loss_fn(model, family: str):
  """Mean token cross-entropy of the model's logits against batch['targets']."""
  import optax

  def loss(params, batch):
    extra = {k: batch[k] for k in ("prefix_len", "token_type_ids") if k in batch}
    args = (batch["inputs"], batch["decoder_inputs"]) if family == "encoder_decoder" else (batch["inputs"],)
    logits = model.apply({"params": params}, *args, **extra)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

  return loss


def make_training(family: str, learning_rate: float = 1e-2, **changes: object):
  """(model, optimizer, init_fn(key) -> boxed {'params', 'opt_state'}, loss) for a family."""
  import optax

  from t_jax.models import build_model, init_boxed

  model = build_model(model_config(family, **changes))
  tx = optax.adamw(learning_rate, weight_decay=0.1)

  def init_fn(key):
    params = init_boxed(model, key)
    return {"params": params, "opt_state": tx.init(params)}  # optax maps into the boxes: moments keep the axes

  return model, tx, init_fn, loss_fn(model, family)


def make_step(loss, tx, partitioner, shardings):
  """jit(step) with the Partitioner's shardings and the state donated; grads reduce-scattered like params."""
  import jax
  import optax

  def step(state, batch):
    value, grads = jax.value_and_grad(loss)(state["params"], batch)
    grads = jax.lax.with_sharding_constraint(grads, shardings["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
    return new, {"loss": value, "grad_norm": optax.global_norm(grads)}  # adam hides gradient scale; check it

  return jax.jit(step, in_shardings=(shardings, partitioner.batch_sharding),
                 out_shardings=(shardings, partitioner.replicated), donate_argnums=0)


def free_port() -> int:
  """An unused localhost TCP port."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_workers(script: str, jobs: list[list[str]], timeout: float = 400) -> list[dict]:
  """Runs `python script --worker <args> --out <json>` for every job concurrently; returns their reports."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  if "xla_backend_optimization_level" not in env.get("XLA_FLAGS", ""):  # compile faster
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  with tempfile.TemporaryDirectory() as tmp:
    procs = []
    for i, args in enumerate(jobs):
      out, log = Path(tmp, f"{i}.json"), Path(tmp, f"{i}.log")
      with open(log, "w") as f:
        cmd = [sys.executable, script, "--worker", *args, "--out", str(out)]
        procs.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO), out, log))
    deadline, reports = time.time() + timeout, []
    try:
      for proc, out, log in procs:
        try:
          proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
          raise AssertionError(f"worker timed out after {timeout}s:\n{log.read_text()[-4000:]}") from None
        if proc.returncode or not out.exists():
          raise AssertionError(f"worker {proc.args} failed ({proc.returncode}):\n{log.read_text()[-6000:]}")
        reports.append(json.loads(out.read_text()) | {"log": log.read_text()[-4000:]})
    finally:
      for proc, _, _ in procs:  # a failed process leaves its partner waiting on collectives
        if proc.poll() is None:
          proc.kill()
          proc.wait()
  return reports


def write_report(path: str, report: dict) -> None:
  """Writes a worker's JSON report."""
  Path(path).write_text(json.dumps(report))
