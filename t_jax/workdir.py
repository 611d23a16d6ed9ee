"""The workdir on disk, and `load`: its one config reader and its one params reader.

  workdir/config.gin     the run's gin config (launchers), or one `Class.field = literal` line per field
  workdir/tokenizer.model  (or workdir/hf_tokenizer/: an imported HF checkpoint's tokenizer files)
  workdir/checkpoints/   train-state checkpoints <step>/{state, data} (training), or
  workdir/params/        plain params (converted or exported models: orbax StandardCheckpointer)
  workdir/run.lock       held by the live training run (host, pid, start time)

  from t_jax import load
  cfg, params, tok = load("/tmp/qs")
  logits = build_model(cfg).apply({"params": params}, ids)
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from t_jax.data import Tokenizer
from t_jax.data.hf_tokenizer import HF_TOKENIZER_DIR, load_tokenizer
from t_jax.models import ModelConfig, abstract_params, build_model

CONFIG_FILE = "config.gin"
PARAMS_DIR = "params"
_BINDING = re.compile(r"^\s*(?:[\w.]+\.)?(ModelConfig|TaskConfig)\.(\w+)\s*=\s*(.+?)\s*$")


class Loaded(NamedTuple):
  """What `load` returns; unpacks as (cfg, params, tokenizer)."""

  cfg: ModelConfig
  params: Any
  tokenizer: Optional[Tokenizer]


def config_to_gin(*configs: Any) -> str:
  """`Class.field = literal` lines for the fields of config dataclasses; other values become comments."""
  lines = []
  for cfg in configs:
    for f in dataclasses.fields(cfg):
      value, text = getattr(cfg, f.name), f"{type(cfg).__name__}.{f.name} = {getattr(cfg, f.name)!r}"
      try:
        literal = ast.literal_eval(repr(value)) == value
      except (ValueError, SyntaxError):
        literal = False
      lines.append(text if literal else f"# {text}")
  return "\n".join(lines) + "\n"


def read_config(workdir: str | Path) -> tuple[ModelConfig, dict]:
  """(ModelConfig, literal TaskConfig values) from WORKDIR/config.gin, without gin."""
  path = Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise ValueError(f"no {CONFIG_FILE} in {workdir} (not a t_jax workdir)")
  fields: dict[str, dict] = {"ModelConfig": {}, "TaskConfig": {}}
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  for n, line in enumerate(path.read_text().splitlines(), 1):
    m = _BINDING.match(line.split("#", 1)[0])
    if not m:
      continue
    cls, name, value = m.groups()
    if cls == "ModelConfig" and name not in names:
      raise ValueError(f"{path}:{n}: unknown ModelConfig field {name!r}")
    try:
      fields[cls][name] = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
      if cls == "ModelConfig":
        raise ValueError(f"{path}:{n}: ModelConfig.{name} = {value} is not a Python literal") from e
  return ModelConfig(**fields["ModelConfig"]), fields["TaskConfig"]


def read_params(workdir: str | Path, target: Any, step: Optional[int] = None) -> Any:
  """Params of a workdir placed like `target` (ShapeDtypeStructs): a checkpoint's (latest or `step`), else params/."""
  root = Path(workdir).absolute()
  if (root / "checkpoints").is_dir():
    return _checkpoint_params(root / "checkpoints", step, target)
  directory = root / PARAMS_DIR
  if not directory.is_dir():
    raise ValueError(f"no parameter checkpoint at {directory}")
  with ocp.StandardCheckpointer() as ckptr:
    check_params(ckptr.metadata(directory).item_metadata.tree, target, str(directory))
    return ckptr.restore(directory, target)


def _checkpoint_params(directory: Path, step: Optional[int], target: Any) -> Any:
  """Only the params (a partial restore) of checkpoint `step`, else of the newest readable one (a newer
  unreadable one is named on stderr)."""
  options = ocp.CheckpointManagerOptions(create=False)
  handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
              "config": ocp.JsonCheckpointHandler()}
  with ocp.CheckpointManager(directory, item_handlers=handlers, options=options) as manager:
    steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if not steps or steps[0] not in manager.all_steps():
      raise ValueError(f"no checkpoint {'' if step is None else step} in {directory} (have {manager.all_steps()})")
    item = {"params": target}
    args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True)
    for i, s in enumerate(steps):
      try:
        saved = manager.item_metadata(s)["state"]["params"]
      except Exception as e:  # noqa: BLE001 - unreadable metadata
        saved, error = None, e
      if saved is not None:
        check_params(saved, target, f"{directory}/{s}")
        try:
          return manager.restore(s, args=ocp.args.Composite(state=args))["state"]["params"]
        except Exception as e:  # noqa: BLE001 - a truncated or missing array file
          error = e
      if i == len(steps) - 1:
        raise ValueError(f"checkpoint {directory}/{s} cannot be read: {_first_line(error)}") from error
      print(f"warning: checkpoint {directory}/{s} cannot be read ({_first_line(error)}); using the previous one",
            file=sys.stderr)


def _first_line(e: BaseException) -> str:
  """`Type: first line of the message` (tensorstore errors carry a page-long spec after it), at most 200 chars."""
  return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def check_params(saved: Any, expected: Any, where: str) -> None:
  """Raises ValueError naming the first parameters whose names or shapes differ."""
  saved_shapes, expected_shapes = _shapes(saved), _shapes(expected)
  if saved_shapes == expected_shapes:
    return
  missing = sorted(set(expected_shapes) - set(saved_shapes))[:3]
  extra = sorted(set(saved_shapes) - set(expected_shapes))[:3]
  differ = [f"{k}: saved {saved_shapes[k]} vs model {v}" for k, v in expected_shapes.items()
            if k in saved_shapes and saved_shapes[k] != v][:3]
  raise ValueError(f"{where} does not match the configured ModelConfig: missing {missing}, unexpected {extra}, "
                   f"different shapes {differ}")


def _shapes(tree: Any) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in flat}


def params_target(cfg: ModelConfig, sharding: Any = None) -> Any:
  """ShapeDtypeStructs of cfg's plain params (placed by `sharding`, default the first device)."""
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      nn.meta.unbox(abstract_params(build_model(cfg))))


def load(workdir: str, step: Optional[int] = None) -> Loaded:
  """(ModelConfig, params, tokenizer or None) of a training or converted workdir; params on the default device."""
  cfg, task = read_config(workdir)
  params = read_params(workdir, params_target(cfg), step)
  path = task.get("tokenizer") or os.path.join(workdir, "tokenizer.model")
  if not os.path.exists(path):  # an imported or fine-tuned HF checkpoint's tokenizer, kept beside its params
    path = os.path.join(workdir, HF_TOKENIZER_DIR)
  tok = load_tokenizer(path, task.get("num_extra_ids", 0)) if os.path.exists(path) else None
  return Loaded(cfg, params, tok)


def write_params_workdir(workdir: str | Path, cfg: ModelConfig, params: Any, *, overwrite: bool = False) -> Path:
  """Writes workdir/config.gin and the Orbax checkpoint workdir/params; returns the workdir."""
  root = Path(workdir).absolute()
  target = root / PARAMS_DIR
  if target.exists() and not overwrite:
    raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
  root.mkdir(parents=True, exist_ok=True)
  (root / CONFIG_FILE).write_text(config_to_gin(cfg))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, nn.meta.unbox(params), force=overwrite)
    ckptr.wait_until_finished()
  return root


def read_params_workdir(workdir: str | Path) -> tuple[ModelConfig, Any]:
  """(ModelConfig, plain params) of a workdir (written by `write_params_workdir`, or a training run)."""
  cfg, _ = read_config(workdir)
  return cfg, read_params(workdir, params_target(cfg))


@contextlib.contextmanager
def lock(workdir: str | Path, force: bool = False) -> Iterator[None]:
  """Holds WORKDIR/run.lock (host, pid, start time) while inside; one live run per workdir.

  A lock left by a dead process on this host is taken over with a message; a live one is refused; one from
  another host is refused unless `force` (the launchers' --force_unlock). Only process 0 takes it.
  """
  if jax.process_index() != 0:
    yield
    return
  path = Path(workdir) / "run.lock"
  me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  while True:
    try:
      with open(path, "x") as f:
        json.dump(me, f)
      break
    except FileExistsError:
      _break_stale(path, force)
  try:
    yield
  finally:
    path.unlink(missing_ok=True)


def _break_stale(path: Path, force: bool) -> None:
  """Removes a lock that may be taken over; raises ValueError naming the holder otherwise."""
  try:
    held = json.loads(path.read_text())
  except (OSError, ValueError):
    held = {}
  holder = f"pid {held.get('pid')} on {held.get('host')} since {held.get('started')}"
  if held.get("host") == socket.gethostname() and not _alive(held.get("pid")):
    print(f"taking over the stale lock {path} of {holder} (that process is gone)", file=sys.stderr)
  elif held.get("host") != socket.gethostname() and force:
    print(f"warning: --force_unlock: breaking the lock {path} of {holder}", file=sys.stderr)
  else:
    raise ValueError(f"workdir {path.parent} is in use by {holder} ({path}); "
                     + ("wait for it or stop it" if held.get("host") == socket.gethostname()
                        else "if that run is dead, pass --force_unlock"))
  path.unlink(missing_ok=True)


def _alive(pid: Any) -> bool:
  try:
    os.kill(int(pid), 0)
  except (OSError, TypeError, ValueError):
    return False
  return True
