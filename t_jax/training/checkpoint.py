"""Checkpoints under DIR/checkpoints/<step>/{state, data} with orbax; converted-params reading for init_from.

orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a save that was
killed half-way never looks like a checkpoint: restore takes the newest complete step (we say so).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from t_jax.training.config import TrainConfig
from t_jax.training.metrics import log

PyTree = Any


def make_manager(workdir: str, cfg: TrainConfig) -> ocp.CheckpointManager:
  """Async CheckpointManager keeping the last K (and optionally the K best by eval_loss) steps."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if os.path.isdir(directory):
    for tmp in sorted(ocp.path.step.tmp_checkpoints(directory)):
      log(f"checkpoints: ignoring incomplete checkpoint {tmp} (its save was interrupted); deleting it")
  keep: list = [policies.LatestN(cfg.keep_checkpoints)]
  if cfg.keep_best:
    keep.append(policies.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=cfg.keep_best,
                               keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(keep), enable_async_checkpointing=cfg.async_checkpoints,
      cleanup_tmp_directories=True, create=True)
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, data_iter: Any,
         metrics: Optional[dict] = None) -> None:
  """Starts an (async) save of the train state and the data iterator position; no-op if already saved."""
  if manager.latest_step() == step:
    return
  args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter))
  manager.save(step, args=args, metrics=metrics, force=True)


def restore_latest(manager: ocp.CheckpointManager, target: PyTree, data_iter: Any) -> Optional[PyTree]:
  """The newest complete checkpoint (state placed like `target`; data_iter repositioned), or None."""
  step = manager.latest_step()
  if step is None:
    return None
  saved = manager.item_metadata(step)["state"]
  check_params(saved["params"], target["params"], f"checkpoint {manager.directory / str(step)}")
  args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data_iter))
  try:
    restored = manager.restore(step, args=args)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"checkpoint {manager.directory / str(step)} does not fit the configured run "
                     f"(optimizer changed?): {e}") from e
  log(f"checkpoints: resuming from step {step} ({manager.directory / str(step)})")
  return restored["state"]


def check_params(saved: PyTree, expected: PyTree, where: str) -> None:
  """Raises ValueError naming the first parameters whose names or shapes differ."""
  saved_shapes = _shapes(saved)
  expected_shapes = _shapes(expected)
  if saved_shapes == expected_shapes:
    return
  missing = sorted(set(expected_shapes) - set(saved_shapes))[:3]
  extra = sorted(set(saved_shapes) - set(expected_shapes))[:3]
  differ = [f"{k}: saved {saved_shapes[k]} vs model {v}" for k, v in expected_shapes.items()
            if k in saved_shapes and saved_shapes[k] != v][:3]
  raise ValueError(f"{where} does not match the configured ModelConfig: missing {missing}, unexpected {extra}, "
                   f"different shapes {differ}")


def _shapes(tree: PyTree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in flat}


def check_converted(workdir: str, expected: PyTree) -> None:
  """Validates a converted workdir (DIR/config.gin + DIR/params/) against the model before any compute."""
  if not os.path.isfile(os.path.join(workdir, "config.gin")):
    raise ValueError(f"TrainConfig.init_from={workdir!r} has no config.gin (not a converted workdir)")
  directory = os.path.abspath(os.path.join(workdir, "params"))
  if not os.path.isdir(directory):
    raise ValueError(f"TrainConfig.init_from={workdir!r} has no params/ checkpoint")
  with ocp.StandardCheckpointer() as ckptr:
    check_params(ckptr.metadata(directory).item_metadata.tree, expected, directory)


def read_params(directory: str, target: PyTree) -> PyTree:
  """Plain params saved with orbax StandardCheckpointer (the conversion workdir contract: DIR/params/)."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise ValueError(f"no parameter checkpoint at {directory}")
  with ocp.StandardCheckpointer() as ckptr:
    check_params(ckptr.metadata(directory).item_metadata.tree, target, directory)
    return ckptr.restore(directory, target)


def abstract_like(tree: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs with the given shardings: restore targets."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)
