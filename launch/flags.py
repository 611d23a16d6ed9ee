"""Command-line flags shared by the launchers: joining a multi-process run (jax.distributed)."""

from __future__ import annotations

from absl import flags

from t_jax.sharding import initialize_distributed

COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for jax.distributed (unset: auto-detect or single process).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of JAX processes (unset: auto-detect).")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) (unset: auto-detect).")


def initialize_from_flags() -> bool:
  """initialize_distributed() from --coordinator_address / --num_processes / --process_id (auto-detect if unset)."""
  if not flags.FLAGS.is_parsed():
    return initialize_distributed()
  return initialize_distributed(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
