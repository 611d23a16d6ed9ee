"""Train a model from gin files (or, with --dry_run, just build it and print its parameter table).

  python -m launch.train --gin_file=experiments/quickstart.gin --workdir=/tmp/qs
  python -m launch.train --gin_file=experiments/quickstart.gin --gin_bindings='TrainConfig.num_steps=100' \\
      --workdir=/tmp/qs            # the same command again resumes from the latest checkpoint
  python -m launch.train --gin_file=models/gpt2_small.gin --dry_run
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging

from t_jax.config_utils import ConfigError, parse_gin
from t_jax.models import ModelConfig, abstract_params, build_model, param_table
from t_jax.sharding import maybe_initialize_from_flags
from t_jax.training import train

FLAGS = flags.DEFINE_multi_string("gin_file", [], "Gin files (searched in . and configs/).")
BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings, e.g. 'ModelConfig.d_model=256'.")
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, config.gin).")
DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build the model, print its parameter table and exit.")


def dry_run() -> int:
  """Builds the configured model without allocating it and prints the parameter table."""
  cfg = ModelConfig()
  model = build_model(cfg)
  print(f"model: {type(model).__name__} ({cfg.architecture}), devices: {jax.device_count()}")
  print(param_table(abstract_params(model)))
  return 0


def main(argv: list[str]) -> int:
  """Entry point: parse gin, then dry-run or train; config errors exit 2 with one line naming the problem."""
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  try:
    maybe_initialize_from_flags()  # multi-process runs join jax.distributed before any device use
    parse_gin(FLAGS.value, BINDINGS.value)
    if DRY_RUN.value:
      return dry_run()
    if not WORKDIR.value:
      raise ConfigError("--workdir is required for training")
    train(WORKDIR.value)
  except (ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except FloatingPointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
