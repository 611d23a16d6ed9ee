"""load(workdir) -> (ModelConfig, params, tokenizer): a trained (or converted) model for notebooks and decoding.

  from t_jax import load
  cfg, params, tok = load("/tmp/qs")
  logits = build_model(cfg).apply({"params": params}, ids)
"""

from __future__ import annotations

import os
from typing import Any, Optional

import flax.linen as nn
import gin
import grain
import jax
import orbax.checkpoint as ocp

from t_jax.data import Tokenizer
from t_jax.models import ModelConfig, abstract_params, build_model
from t_jax.training import checkpoint as ckpt
from t_jax.training import tasks  # noqa: F401 - registers the data configurables named in config.gin


def read_config(path: str) -> tuple[ModelConfig, dict]:
  """ModelConfig and a few TaskConfig values from a config.gin; the caller's gin config is left as it was."""
  if not os.path.isfile(path):
    raise ValueError(f"no config.gin at {path}")
  saved = gin.config_str()
  with gin.unlock_config():
    gin.clear_config()
    try:
      gin.parse_config_file(path, skip_unknown=True)
      cfg = ModelConfig()
      task = {k: _query(f"TaskConfig.{k}", d) for k, d in (("num_extra_ids", 0), ("tokenizer", None))}
    finally:
      gin.clear_config()
      gin.parse_config(saved)
  return cfg, task


def _query(binding: str, default: Any) -> Any:
  try:
    return gin.query_parameter(binding)
  except ValueError:
    return default


def load(workdir: str, step: Optional[int] = None) -> tuple[ModelConfig, Any, Optional[Tokenizer]]:
  """(ModelConfig, params, tokenizer or None) of a training workdir (its latest, or the given, checkpoint)
  or of a converted workdir (DIR/config.gin + DIR/params/). Params land on the default device."""
  cfg, task = read_config(os.path.join(workdir, "config.gin"))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        nn.meta.unbox(abstract_params(build_model(cfg))))
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    params = _restore_params(os.path.join(workdir, "checkpoints"), step, target)
  else:
    params = ckpt.read_params(os.path.join(workdir, "params"), target)
  path = task["tokenizer"] or os.path.join(workdir, "tokenizer.model")
  tok = Tokenizer.load(path, task["num_extra_ids"]) if os.path.isfile(path) else None
  return cfg, params, tok


def _restore_params(directory: str, step: Optional[int], target: Any) -> Any:
  """Only the params of a train-state checkpoint (partial restore: the optimizer state is not read)."""
  handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
  options = ocp.CheckpointManagerOptions(create=False)
  with ocp.CheckpointManager(os.path.abspath(directory), item_handlers=handlers, options=options) as manager:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
      raise ValueError(f"no checkpoint {'' if step is None else step} in {directory} (have {manager.all_steps()})")
    where = f"{directory}/{step}"
    ckpt.check_params(manager.item_metadata(step)["state"]["params"], target, where)
    item = {"params": target}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    return manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]
