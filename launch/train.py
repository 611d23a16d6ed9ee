"""Train a model from gin files (or, with --dry_run, just build it and print its parameter table).

  python -m launch.train --gin_file=experiments/quickstart.gin --workdir=/tmp/qs
  python -m launch.train --gin_file=experiments/quickstart.gin --gin_bindings='TrainConfig.num_steps=100' \\
      --workdir=/tmp/qs            # the same command again resumes from the latest checkpoint
  python -m launch.train --gin_file=models/gpt2_small.gin --dry_run
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import jax
from absl import app, flags, logging

from launch import config, error_line
from launch.flags import initialize_from_flags
from t_jax.models import ModelConfig, abstract_params, build_model, param_table
from t_jax.training import train

FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files (searched in . and configs/).")
BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Extra gin bindings, e.g. 'ModelConfig.d_model=256'.")
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, config.gin).")
DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build the model, print its parameter table and exit.")
FORCE_UNLOCK = flags.DEFINE_bool("force_unlock", False, "Break a workdir lock held by a run on another host.")
ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False,
                                 "Resume although the model/task config changed what the parameters mean.")


def dry_run() -> int:
  """Builds the configured model without allocating it and prints the parameter table."""
  cfg = config.build(ModelConfig)
  model = build_model(cfg)
  print(f"model: {type(model).__name__} ({cfg.architecture}), devices: {jax.device_count()}")
  print(param_table(abstract_params(model)))
  return 0


def check_workdir(workdir: str) -> None:
  """ValueError naming --workdir when it, or the nearest existing folder above it, is a file or not writable.

  Nothing is created here (a probe file is written and removed); training creates the workdir.
  """
  existing = Path(workdir).absolute()
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  where = f"--workdir={workdir}" + ("" if existing == Path(workdir).absolute() else f": {existing}")
  if not existing.is_dir():
    raise ValueError(f"{where} is a file, not a directory")
  try:
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as e:
    raise ValueError(f"{where} is not writable ({e.strerror or e})") from e


def main(argv: list[str]) -> int:
  """Entry point: parse gin, then dry-run or train; bad input exits 2 with one `error:` line naming it."""
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  try:
    initialize_from_flags()  # multi-process runs join jax.distributed before any device use
    config.parse(FILES.value, BINDINGS.value)
    if DRY_RUN.value:
      return dry_run()
    if not WORKDIR.value:
      raise config.ConfigError("--workdir is required for training")
    check_workdir(WORKDIR.value)
    exp = config.experiment()
    train(WORKDIR.value, exp, config_text=config.operative(), force_unlock=FORCE_UNLOCK.value,
          allow_config_change=ALLOW_CHANGE.value)
  except (ValueError, OSError, FloatingPointError) as e:
    print(f"error: {error_line(e)}", file=sys.stderr)
    return 1 if isinstance(e, FloatingPointError) else 2  # 1: training diverged
  return 0


if __name__ == "__main__":
  app.run(main)
