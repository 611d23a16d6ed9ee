"""Train (or, with --dry_run, just build and summarise) a model from gin files.

  python -m launch.train --gin_file=models/gpt2_small.gin --dry_run
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags

from t_jax.config_utils import ConfigError, parse_gin
from t_jax.models import ModelConfig, abstract_params, build_model, param_table

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
  """Entry point."""
  del argv
  try:
    parse_gin(FLAGS.value, BINDINGS.value)
    if DRY_RUN.value:
      return dry_run()
  except (ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("error: training is not implemented yet; use --dry_run", file=sys.stderr)
  return 2


if __name__ == "__main__":
  app.run(main)
