"""Checkpoints under DIR/checkpoints/<step>/{state, data, config} with orbax.

`data` is the position of the global data stream (the same on every process), so a checkpoint written by N
processes resumes on M.

orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a save that was
killed half-way never looks like a checkpoint. A complete step that cannot be read (a truncated array file,
a missing _METADATA, an empty directory) is moved to DIR/checkpoints_broken/ and the previous step restored.
`config` is the fingerprint of what the parameters mean (model and task fields; not the schedule): a resume
that changes it is refused unless allowed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Optional

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from t_jax.models.config import RUNTIME_FIELDS, ModelConfig
from t_jax.training.config import TrainConfig
from t_jax.training.metrics import log
from t_jax.workdir import check_params

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
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
              "config": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, data_iter: Any, fingerprint: dict,
         metrics: Optional[dict] = None) -> None:
  """Starts an (async) save of the train state, data iterator position and fingerprint; no-op if saved."""
  if manager.latest_step() == step:
    return
  args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_iter.get_state()),
                            config=ocp.args.JsonSave(fingerprint))
  manager.save(step, args=args, metrics=metrics, force=True)


def restore_latest(manager: ocp.CheckpointManager, target: PyTree, data_iter: Any, fingerprint: dict,
                   allow_change: bool = False) -> Optional[PyTree]:
  """The newest readable checkpoint (state placed like `target`; data_iter repositioned), or None.

  Steps that cannot be read are moved aside (never deleted) when an older one can; if none can, the newest
  one's error is raised. A changed fingerprint is refused (ValueError listing it) unless `allow_change`.
  """
  broken, first_error = [], None
  for step in sorted(manager.all_steps(), reverse=True):
    where = manager.directory / str(step)
    try:
      saved = manager.item_metadata(step)["state"]["params"]
    except Exception as e:  # noqa: BLE001 - any unreadable metadata
      first_error = first_error or e
      broken.append(step)
      log(f"checkpoints: {where} cannot be read ({type(e).__name__}: {str(e)[:200]})")
      continue
    check_params(saved, target["params"], f"checkpoint {where}")  # another model: refused
    _check_fingerprint(manager, step, fingerprint, allow_change)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    try:
      restored = manager.restore(step, args=args)
      data_iter.set_state(restored["data"])
    except Exception as e:  # noqa: BLE001 - a truncated or missing array file, or a changed optimizer
      first_error = first_error or e
      broken.append(step)
      log(f"checkpoints: {where} cannot be restored ({type(e).__name__}: {str(e)[:200]})")
      continue
    _move_aside(manager, broken)
    log(f"checkpoints: resuming from step {step} ({where})")
    return restored["state"]
  if broken:
    raise ValueError(f"no checkpoint in {manager.directory} can be restored into the configured run "
                     f"(optimizer changed?): {first_error}")
  return None


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves unreadable step directories to DIR/checkpoints_broken/<step> and makes orbax forget them."""
  if not steps:
    return
  aside = manager.directory.parent / "checkpoints_broken"
  aside.mkdir(exist_ok=True)
  for step in steps:
    dest = aside / str(step)
    n = 1
    while dest.exists():
      dest, n = aside / f"{step}.{n}", n + 1
    shutil.move(str(manager.directory / str(step)), str(dest))
    log(f"checkpoints: moved the unreadable step {step} to {dest}; restoring an older one")
  manager.reload()


def fingerprint(model: Any, task: Any) -> dict:
  """What the parameters mean: model fields except run-time ones, and the task's tokenizer and objective."""
  out = {f"ModelConfig.{k}": v for k, v in dataclasses.asdict(model).items() if k not in RUNTIME_FIELDS}
  out.update({f"TaskConfig.{k}": getattr(task, k) for k in ("tokenizer", "vocab_size", "num_extra_ids",
                                                            "tokenizer_type")})
  out["TaskConfig.objective"] = type(task.objective).__name__
  return out


def _check_fingerprint(manager: ocp.CheckpointManager, step: int, now: dict, allow_change: bool) -> None:
  if not (manager.directory / str(step) / "config").is_dir():
    return  # a checkpoint from before fingerprints
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  # A field the checkpoint does not name is newer than it: the checkpoint meant the field's default.
  defaults = {f"ModelConfig.{f.name}": f.default for f in dataclasses.fields(ModelConfig)}
  changed = [f"{k}: {saved.get(k, defaults.get(k))!r} -> {v!r}" for k, v in now.items()
             if saved.get(k, defaults.get(k)) != v]
  if not changed:
    return
  if not allow_change:
    raise ValueError(f"the run changed what its parameters mean since checkpoint {step}: {'; '.join(changed)} "
                     "(schedule and run-time changes are allowed; pass --allow_config_change to override)")
  log(f"warning: resuming with changed model/task config (--allow_config_change): {'; '.join(changed)}")
  with open(manager.directory.parent / "config_changes.log", "a") as f:
    f.write(f"step {step}: {'; '.join(changed)}\n")
