"""Multi-process start-up with JAX's own runtime (jax.distributed), and the primary-process test.

One JAX process runs per host (TPU VM worker, or GPU node) or per GPU; all processes run the same
program over one global mesh. `initialize_distributed` must run before anything touches a device.

  * Explicit: coordinator_address='host:port', num_processes=N, process_id=i (launch/flags.py: the same
    as --coordinator_address/--num_processes/--process_id).
  * Cloud TPU pod slice, SLURM (inside `srun`), Open MPI: call with no arguments; JAX reads the
    cluster environment itself (TPU metadata server, SLURM_* / OMPI_* variables).
  * Otherwise (a single process): nothing to do.

On CPU the cross-process collectives are gloo (`jax_cpu_collectives_implementation`, JAX's default).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Optional

import jax

log = logging.getLogger(__name__)

def cluster_environment() -> Optional[str]:
  """The multi-process environment JAX can auto-configure from, or None: 'slurm', 'ompi' or 'tpu'."""
  env = os.environ
  if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"  # inside an `srun` step with more than one task
  if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "ompi"
  if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES"):
    return "tpu"  # GKE TPU pods
  if _libtpu_installed() and "TPU_SKIP_MDS_QUERY" not in env:
    return "tpu"  # Cloud TPU VM (jax[tpu]); one host of a slice also works as a 1-process cluster
  return None


def _libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
  """Joins the multi-process JAX runtime when there is more than one process; returns whether it did.

  Any explicit argument means "configure it like this" (JAX auto-detects the ones left None on a
  cluster); num_processes=1 means a single process. Calling again after success is a no-op.
  """
  if jax.distributed.is_initialized():
    return True
  explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
  if num_processes == 1 or (not explicit and cluster_environment() is None):
    return False
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except ValueError as e:  # a TPU-looking host that JAX does not recognise as a cluster member
    if explicit or "should be defined" not in str(e):
      raise
    log.warning("no multi-process environment found (%s); running as a single process", e)
    return False
  log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  """True on process 0, the one that writes logs, metrics and configs."""
  return jax.process_index() == 0
