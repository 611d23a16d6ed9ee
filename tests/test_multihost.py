"""Multi-process training and checkpoints on localhost: two JAX processes x 4 CPU devices (gloo
collectives, jax.distributed via t_jax.sharding.initialize_distributed) train exactly like one process
with 8 devices; their orbax checkpoint (8-way FSDP) restores across the processes and, in a single
process, under a different mesh (2-way data x 4-way tensor) where training continues identically.

Each process is a worker subprocess (see tests/multidevice.py): `python tests/test_multihost.py --worker ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from launch.flags import initialize_from_flags
from t_jax.sharding import cluster_environment, distributed, initialize_distributed, is_primary

try:  # tests/ as a package (pytest from the repo root) or as the script's directory (worker)
  from tests import multidevice as md
except ImportError:
  import multidevice as md

# Every test here that starts processes runs on one xdist worker (--dist loadgroup), one at a time.
pytestmark = pytest.mark.xdist_group("processes")

FAMILY = "decoder"
FSDP8 = dict(rules="fsdp", data=1, fsdp=8)
REMESH = dict(rules="tensor", data=2, tensor=4)
SAVE_AT, STEPS = 3, 5


@pytest.mark.slow
def test_two_processes_and_checkpoints_across_processes_and_meshes(tmp_path):
  # One test (not a shared fixture) so that pytest-xdist never starts these processes twice.
  ckpt, port = str(tmp_path / "state"), str(md.free_port())
  p0, p1, ref = md.run_workers(__file__, [["multi", "0", port, ckpt], ["multi", "1", port, ckpt], ["reference"]])
  (remesh,) = md.run_workers(__file__, [["remesh", ckpt]])
  _check_two_processes(p0, p1, ref)
  _check_remesh(remesh, ref)


def _check_two_processes(p0: dict, p1: dict, ref: dict) -> None:
  """Same loss curve as one process with 8 devices, including the 2 steps after the orbax restore."""
  for p in (p0, p1):
    assert p["process_count"] == 2 and p["device_count"] == 8 and p["local_device_count"] == 4
    assert p["initialized"] and p["initialize_again"]
    assert p["param_bytes_per_device"] * 8 <= 1.05 * p["param_bytes"] + 512, "FSDP across processes is not ~1/8"
    assert p["restored_equal"], "restored shards differ from the saved ones"
    assert p["restored_sharding_ok"], "restored arrays are not placed as the target asked"
    assert len(p["losses"]) == STEPS
  assert (p0["is_primary"], p1["is_primary"]) == (True, False)
  assert ref["process_count"] == 1
  np.testing.assert_allclose(p0["losses"], ref["losses"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(p0["grad_norms"], ref["grad_norms"], rtol=1e-4)
  assert p0["losses"] == p1["losses"], "the two processes disagree on the (replicated) loss"
  assert ref["losses"][-1] < ref["losses"][0]


def _check_remesh(remesh: dict, ref: dict) -> None:
  """The 8-way FSDP checkpoint restored under data=2 x tensor=4 continues like the unchanged run."""
  assert remesh["mesh"] == {"data": 2, "fsdp": 1, "sequence": 1, "tensor": 4}
  assert remesh["restored_sharding_ok"] and remesh["tensor_split_leaves"] > 0
  assert remesh["restored_equal_to_saved_values"]
  np.testing.assert_allclose(remesh["losses"], ref["losses"][SAVE_AT:], rtol=1e-4, atol=1e-5)


def _launch_two(workdir, port: int, *bindings: str) -> list:
  """launch.train as 2 processes x 2 CPU devices (gloo) on localhost, quickstart_tiny, logging every step.

  The learning-rate schedule is fixed (decay_steps) so that runs with different num_steps can be compared.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
  bindings = ("TrainConfig.log_every = 1", "TrainConfig.eval_every = 0", "TrainConfig.checkpoint_every = 100000",
              "OptimizerConfig.decay_steps = 1000", *bindings)
  flags = ["--gin_file=experiments/quickstart_tiny.gin", f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", *(f"--gin_bindings={b}" for b in bindings)]
  return [subprocess.Popen([sys.executable, "-m", "launch.train", *flags, f"--process_id={i}"], cwd=md.REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]


def _finish(procs: list) -> list[str]:
  outs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def _launch_one(workdir, *bindings: str) -> list:
  """launch.train as 1 process x 4 CPU devices: the same global mesh size as _launch_two."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
  bindings = ("TrainConfig.log_every = 1", "TrainConfig.eval_every = 0", "TrainConfig.checkpoint_every = 100000",
              "OptimizerConfig.decay_steps = 1000", "TrainConfig.num_samples = 0", *bindings)
  flags = ["--gin_file=experiments/quickstart_tiny.gin", f"--workdir={workdir}", *(f"--gin_bindings={b}" for b in bindings)]
  return [subprocess.Popen([sys.executable, "-m", "launch.train", *flags], cwd=md.REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]


def _losses(workdir) -> list:
  return [(r["step"], r["loss"]) for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
          if "loss" in r]


@pytest.mark.slow
def test_sigterm_on_one_process_then_elastic_resume_on_one_and_two(tmp_path):
  """launch.train with 2 processes: SIGTERM to process 1 alone (the preemption service spreads it) makes both
  save one checkpoint at an agreed step and exit 0. The data stream does not depend on how many processes
  read it: the checkpoint resumes on 1 process (2 -> 1), that one on 2 again (1 -> 2), and the losses are
  those of one straight single-process run. (One test: four launches instead of nine.)"""
  run = tmp_path / "run"
  procs = _launch_two(run, md.free_port(), "TrainConfig.num_steps = 100000", "TrainConfig.num_samples = 0")
  deadline = time.time() + 300
  while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
    assert all(p.poll() is None for p in procs) and time.time() < deadline, procs[0].communicate()[0][-3000:]
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  out0, _ = _finish(procs)
  step = int(out0.split("saved a checkpoint at step ")[1].split(";")[0])
  assert [int(d.name) for d in (run / "checkpoints").iterdir()] == [step]
  _finish(_launch_one(run, f"TrainConfig.num_steps = {step + 2}"))
  _finish(_launch_two(run, md.free_port(), f"TrainConfig.num_steps = {step + 4}", "TrainConfig.num_samples = 0"))
  assert [s for s, _ in _losses(run)][-5:] == list(range(step, step + 5))
  assert sorted(int(d.name) for d in (run / "checkpoints").iterdir())[-1] == step + 4
  _finish(_launch_one(tmp_path / "straight", f"TrainConfig.num_steps = {step + 4}"))
  straight, resumed = _losses(tmp_path / "straight"), _losses(run)
  assert [s for s, _ in straight] == [s for s, _ in resumed]
  np.testing.assert_allclose([v for _, v in resumed], [v for _, v in straight], rtol=1e-4)


CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_SKIP_MDS_QUERY")


@pytest.fixture
def no_cluster(monkeypatch):
  """No cluster variables, no libtpu, and a jax.distributed.initialize that only records its calls."""
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(distributed, "_libtpu_installed", lambda: False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a: calls.append(a))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  return calls


def test_single_process_does_not_initialize(no_cluster):
  assert cluster_environment() is None
  assert not initialize_distributed() and not initialize_distributed(num_processes=1)
  assert not initialize_from_flags()  # flags unparsed: auto-detect
  assert no_cluster == [] and is_primary()


def test_clusters_are_left_to_jax_auto_detection(no_cluster, monkeypatch):
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert cluster_environment() is None and not initialize_distributed()  # one task: nothing to join
  monkeypatch.setenv("SLURM_NTASKS", "16")
  assert cluster_environment() == "slurm"
  assert initialize_distributed() and no_cluster == [(None, None, None)]
  monkeypatch.delenv("SLURM_JOB_ID")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
  assert cluster_environment() == "tpu"
  assert initialize_distributed("10.0.0.1:1234", 4, 3) and no_cluster[-1] == ("10.0.0.1:1234", 4, 3)


def test_unrecognised_tpu_host_runs_single_process(no_cluster, monkeypatch):
  def fail(*args):
    raise ValueError("coordinator_address should be defined.")
  monkeypatch.setattr(distributed, "_libtpu_installed", lambda: True)
  monkeypatch.setattr(jax.distributed, "initialize", fail)
  assert not distributed.initialize_distributed()
  with pytest.raises(ValueError, match="should be defined"):
    distributed.initialize_distributed(num_processes=2, process_id=0)  # explicit: the error stands


# ---- workers ----

def _setup(mesh: dict):
  from t_jax.sharding import MeshConfig, Partitioner
  part = Partitioner.from_config(MeshConfig(**mesh))
  _, tx, init_fn, loss = md.make_training(FAMILY)
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  return part, tx, init_fn, loss, abstract


def _local_rows(part, batch: dict) -> dict:
  """This process's rows of the global batch: the rows its devices hold under the batch sharding."""
  rows = sorted({i for idx in part.batch_sharding.addressable_devices_indices_map((md.BATCH,)).values()
                 for i in range(*idx[0].indices(md.BATCH))})
  return {k: v[rows] for k, v in batch.items()}


def _train(part, step, state, first: int, last: int, out: dict):
  with part.context():
    for i in range(first, last):
      state, metrics = step(state, part.global_batch(_local_rows(part, md.make_batch(FAMILY, i))))
      out.setdefault("losses", []).append(float(metrics["loss"]))
      out.setdefault("grad_norms", []).append(float(metrics["grad_norm"]))
  return state


def _same(a, b) -> bool:
  return all(np.array_equal(x.data, y.data) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
             for x, y in zip(u.addressable_shards, v.addressable_shards))


def _sharding_ok(tree, target) -> bool:
  return all(x.sharding.is_equivalent_to(t.sharding, x.ndim) for x, t in zip(jax.tree.leaves(tree), jax.tree.leaves(target)))


def multi(process_id: int, port: str, ckpt: str, out: str) -> None:
  """One of two processes: 3 steps under 8-way FSDP, orbax save, restore, 2 more steps."""
  md.use_cpu_devices(4)
  import orbax.checkpoint as ocp

  from t_jax.sharding import bytes_per_device
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  report = {"initialized": initialize_distributed(f"127.0.0.1:{port}", 2, process_id)}
  report["initialize_again"] = initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
  report.update(process_count=jax.process_count(), device_count=jax.device_count(),
                local_device_count=jax.local_device_count(), is_primary=is_primary())
  part, tx, init_fn, loss, abstract = _setup(FSDP8)
  state, shardings = part.init(init_fn, jax.random.key(0))
  report["param_bytes_per_device"] = max(bytes_per_device(state["params"]).values())
  report["param_bytes"] = sum(x.nbytes for x in jax.tree.leaves(state["params"]))
  step = md.make_step(loss, tx, part, shardings)
  state = _train(part, step, state, 0, SAVE_AT, report)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(ckpt, state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(ckpt, part.abstract(abstract))
  report["restored_equal"] = _same(restored, state)
  report["restored_sharding_ok"] = _sharding_ok(restored, part.abstract(abstract))
  del state
  _train(part, step, restored, SAVE_AT, STEPS, report)
  md.write_report(out, report)
  jax.distributed.shutdown()


def reference(out: str) -> None:
  """One process, 8 devices, the same 5 steps without interruption."""
  md.use_cpu_devices(8)
  part, tx, init_fn, loss, _ = _setup(FSDP8)
  state, shardings = part.init(init_fn, jax.random.key(0))
  report = {"process_count": jax.process_count()}
  _train(part, md.make_step(loss, tx, part, shardings), state, 0, STEPS, report)
  md.write_report(out, report)


def remesh(ckpt: str, out: str) -> None:
  """One process restores the two-process FSDP checkpoint under data=2 x tensor=4 and trains on."""
  md.use_cpu_devices(8)
  import orbax.checkpoint as ocp

  from t_jax.sharding import MeshConfig, Partitioner
  part, tx, _, loss, abstract = _setup(REMESH)
  target = part.abstract(abstract)
  state = ocp.StandardCheckpointer().restore(ckpt, target)
  shardings = jax.tree.map(lambda t: t.sharding, target)
  fsdp = Partitioner.from_config(MeshConfig(**FSDP8))  # read it back as saved, to compare values
  saved = ocp.StandardCheckpointer().restore(ckpt, fsdp.abstract(abstract))
  report = {"mesh": dict(part.mesh.shape), "restored_sharding_ok": _sharding_ok(state, target),
            "tensor_split_leaves": sum("tensor" in str(x.sharding.spec) for x in jax.tree.leaves(state)),
            "restored_equal_to_saved_values": all(
                np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(saved)))}
  _train(part, md.make_step(loss, tx, part, shardings), state, SAVE_AT, STEPS, report)
  md.write_report(out, report)


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", nargs="+", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  kind, *rest = args.worker
  if kind == "multi":
    multi(int(rest[0]), rest[1], rest[2], args.out)
  elif kind == "reference":
    reference(args.out)
  else:
    remesh(rest[0], args.out)
