"""The params workdir shared with training: `config.gin` (ModelConfig bindings) + `params/` (Orbax).

  workdir/config.gin   one `ModelConfig.<field> = <repr>` line per field (gin-parseable)
  workdir/params/      orbax.checkpoint.StandardCheckpointer().save(abs_path, params)
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax

from t_jax.models import ModelConfig, abstract_params, build_model

CONFIG_FILE = "config.gin"
PARAMS_DIR = "params"
_BINDING = re.compile(r"^\s*(?:[\w.]+\.)?ModelConfig\.(\w+)\s*=\s*(.+?)\s*$")


def config_to_gin(cfg: ModelConfig) -> str:
  """Gin bindings for every ModelConfig field, one per line."""
  lines = [f"ModelConfig.{f.name} = {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)]
  return "\n".join(lines) + "\n"


def config_from_gin(text: str) -> ModelConfig:
  """ModelConfig from `ModelConfig.<field> = <literal>` lines; other bindings and comments are skipped."""
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  fields: dict[str, Any] = {}
  for line in text.splitlines():
    m = _BINDING.match(line.split("#", 1)[0])  # no ModelConfig value contains '#'
    if not m:
      continue
    name, value = m.groups()
    if name not in names:
      raise ValueError(f"unknown ModelConfig field {name!r} in {CONFIG_FILE}")
    try:
      fields[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"ModelConfig.{name} = {value!r} in {CONFIG_FILE} is not a Python literal") from e
  return ModelConfig(**fields)


def write_params_workdir(workdir: str | Path, cfg: ModelConfig, params: Any, *, overwrite: bool = False) -> Path:
  """Writes workdir/config.gin and the Orbax checkpoint workdir/params; returns the workdir."""
  import orbax.checkpoint as ocp

  root = Path(workdir).absolute()
  target = root / PARAMS_DIR
  if target.exists() and not overwrite:
    raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
  root.mkdir(parents=True, exist_ok=True)
  (root / CONFIG_FILE).write_text(config_to_gin(cfg))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(str(target), nn.meta.unbox(params), force=overwrite)
  ckpt.wait_until_finished()
  return root


def read_params_workdir(workdir: str | Path) -> tuple[ModelConfig, Any]:
  """(ModelConfig, plain params) from a workdir written by `write_params_workdir`."""
  import orbax.checkpoint as ocp

  root = Path(workdir).absolute()
  cfg = config_from_gin((root / CONFIG_FILE).read_text())
  shapes = nn.meta.unbox(abstract_params(build_model(cfg)))
  target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes)
  return cfg, ocp.StandardCheckpointer().restore(str(root / PARAMS_DIR), target)
