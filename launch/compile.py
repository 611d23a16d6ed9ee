"""Plan a TPU run from any machine: compile the train step for a TPU topology ahead of time, print a report.

  python -m launch.compile --gin_file=experiments/quickstart.gin --gin_file=hardware/fsdp.gin \\
      --topology=v5e:4x4                       # 16 chips; v5e:16x16 is a v5e-256 pod
  python -m launch.compile ... --topology=v5p:4x8x8 --out=plan.json    # the report as JSON too

Builds the model, optimizer, mesh and train step exactly as launch.train would, with abstract inputs (no
data is read, no tokenizer trained, nothing allocated). Needs the libtpu package (the `tpu-aot` extra), no
TPU. Exit code 2: bad input, or a program that does not fit the chip's HBM.

Flops count every iteration of scanned layers and microbatch loops (each loop body costed by XLA's cost
analysis, times its trip count). The predicted step time is XLA's TPU cost model for loop-free programs
where it gives one, else a roofline max(flops / peak, collective bytes / ICI bandwidth): a lower bound, so
the MFU is an upper bound (configs/topologies/README.md).
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags, logging

from launch import config
from t_jax.training import aot

FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files (searched in . and configs/).")
BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings, e.g. 'ModelConfig.d_model=64'.")
TOPOLOGY = flags.DEFINE_string("topology", None, f"TPU topology <chip>:<shape>, chip in {sorted(aot.CHIPS)}, "
                               "e.g. v5e:4x4 (16 chips), v5e:16x16, v5p:4x8x8.")
OUT = flags.DEFINE_string("out", None, "Also write the report here as JSON.")


def main(argv: list[str]) -> int:
  """Parse gin, compile for the topology, print the report; exit 2 with one `error:` line when it cannot."""
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  jax.config.update("jax_platforms", "cpu")  # tracing needs no accelerator; libtpu loads for the topology
  try:
    if not TOPOLOGY.value:
      raise config.ConfigError("--topology is required, e.g. --topology=v5e:4x4")
    if OUT.value and not os.path.isdir(os.path.dirname(os.path.abspath(OUT.value))):
      raise config.ConfigError(f"--out={OUT.value}: no such directory")
    config.parse(FILES.value, BINDINGS.value)
    exp = config.experiment()
    report = aot.plan(exp, TOPOLOGY.value, aot.topology_devices(TOPOLOGY.value))
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(aot.format_report(report))
  if OUT.value:
    with open(OUT.value, "w") as f:
      json.dump(report, f, indent=1)
  if not report["fits"]:
    print(f"error: does not fit on {TOPOLOGY.value}: {report['reason']}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(main)
