"""Reading Hugging Face sources (model objects or checkpoint directories) and writing HF directories."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from t_jax.convert.common import ConversionError

Weights = dict[str, np.ndarray]


def read_source(source: Any) -> tuple[dict, Weights]:
  """(config dict, {tensor name: numpy array}) from a `transformers` model or a checkpoint directory."""
  if isinstance(source, (str, os.PathLike)):
    return read_dir(Path(source))
  if hasattr(source, "config") and hasattr(source, "state_dict"):
    return source.config.to_dict(), {k: _torch_to_numpy(v) for k, v in source.state_dict().items()}
  raise TypeError(f"from_hf takes a transformers model or a checkpoint directory, not {type(source).__name__}")


def read_dir(path: Path) -> tuple[dict, Weights]:
  """config.json plus every *.safetensors file (else pytorch_model*.bin); a bad file's error names it."""
  config_file = path / "config.json"
  if not config_file.is_file():
    raise ConversionError(f"{path} has no config.json")
  try:
    config = json.loads(config_file.read_text())
  except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    raise ConversionError(f"{config_file}: invalid JSON ({e})") from e
  if not isinstance(config, dict):
    raise ConversionError(f"{config_file}: not a JSON object")
  weights: Weights = {}
  shards = sorted(path.glob("*.safetensors"))
  if shards:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    for shard in shards:
      try:
        weights.update(load_file(str(shard)))
      except (SafetensorError, OSError) as e:
        raise ConversionError(f"{shard}: not a readable safetensors file (truncated?): {e}") from e
    return config, weights
  bins = sorted(path.glob("pytorch_model*.bin"))
  if not bins:
    raise ConversionError(f"{path} has no *.safetensors or pytorch_model*.bin weights")
  import torch

  for shard in bins:
    try:
      state = torch.load(shard, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch reports bad files as RuntimeError, EOFError, UnpicklingError
      raise ConversionError(f"{shard}: not a readable PyTorch file (truncated?): {e}") from e
    weights.update({k: _torch_to_numpy(v) for k, v in state.items()})
  return config, weights


@contextlib.contextmanager
def naming(source: Any, file: str = "") -> Iterator[None]:
  """Prefixes ConversionErrors raised inside with `source/file` when the source is a checkpoint directory."""
  try:
    yield
  except ConversionError as e:
    if not isinstance(source, (str, os.PathLike)):
      raise
    raise ConversionError(f"{Path(source) / file}: {e}") from e


def _torch_to_numpy(t: Any) -> np.ndarray:
  import torch

  t = t.detach().cpu()
  return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def hf_config_dict(model_type: str, hf_class: str, fields: dict) -> dict:
  """Full config.json content: transformers' defaults for `model_type` (when installed) under `fields`."""
  base: dict = {}
  with contextlib.suppress(ImportError):
    from transformers import AutoConfig
    base = AutoConfig.for_model(model_type, **fields).to_dict()
  return {**base, **fields, "model_type": model_type, "architectures": [hf_class]}


def write_dir(out_dir: Path, config: dict, weights: Weights) -> None:
  """Writes config.json and model.safetensors (metadata format 'pt', as `from_pretrained` expects)."""
  from safetensors.numpy import save_file

  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  tensors = {k: np.ascontiguousarray(v) for k, v in sorted(weights.items())}
  save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
