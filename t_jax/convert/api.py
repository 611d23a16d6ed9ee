"""`from_hf` and `to_hf`: Hugging Face checkpoints <-> t_jax (model, params)."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t_jax.convert import hf_io
from t_jax.convert.common import ConversionError, stack_layers, unstack_layers
from t_jax.convert.families import (
  RUNTIME_FIELDS,
  Family,
  check_architectures,
  check_head_tensors,
  family_for_config,
  family_for_hf,
  hf_class_of,
  normalize_keys,
)
from t_jax.models import ModelConfig, abstract_params, build_model
from t_jax.models.heads import pooling_of

PyTree = Any
Flat = dict[str, np.ndarray]


def from_hf(source: Any, *, overrides: Optional[dict] = None) -> tuple[nn.Module, PyTree]:
  """(t_jax model, plain params) from a `transformers` model or an HF checkpoint directory.

  `overrides` may set run-time ModelConfig fields (dtype, param_dtype, scan_layers, remat_policy,
  attention_impl, dropout rates, init_std); architectural fields always come from the HF config. Errors name
  the directory's file they concern.
  """
  _check_overrides(overrides)
  hf, weights = hf_io.read_source(source)
  with hf_io.naming(source, "config.json"):
    family = family_for_hf(hf)
    check_architectures(family, hf)
    cfg = model_config_from_hf(hf, weights, overrides)
  with hf_io.naming(source):
    check_head_tensors(family, weights)
    flat = _to_tj(family, cfg, normalize_keys(family, weights))
  params = traverse_util.unflatten_dict(flat, sep="/")
  if cfg.scan_layers:
    params = stack_layers(params, [stack for stack in ("encoder", "decoder") if stack in params])
  return build_model(cfg), jax.tree_util.tree_map(jax.numpy.asarray, params)


def model_config_from_hf(hf: dict, weights: dict, overrides: Optional[dict] = None) -> ModelConfig:
  """The ModelConfig of an HF config dict (weights decide whether the head is tied)."""
  _check_overrides(overrides)
  family = family_for_hf(hf)
  try:
    return ModelConfig(**{**family.model_config(hf, normalize_keys(family, weights)), **(overrides or {})})
  except KeyError as e:
    raise ConversionError(f"missing field {e.args[0]!r} (required in HF {family.model_type} configs)") from e
  except ConversionError:
    raise
  except (ValueError, TypeError) as e:  # inconsistent or wrongly typed fields
    raise ConversionError(f"HF {family.model_type} config does not fit ModelConfig: {e}") from e


def _check_overrides(overrides: Optional[dict]) -> None:
  bad = sorted(set(overrides or {}) - RUNTIME_FIELDS)
  if bad:
    raise ConversionError(f"overrides may only set run-time fields {sorted(RUNTIME_FIELDS)}, not {bad}")


def to_hf(model_or_cfg: nn.Module | ModelConfig, params: PyTree, out_dir: str | Path, *,
          tokenizer: Optional[str | Path] = None, token_ids: Optional[dict] = None,
          dtype: str = "float32") -> Path:
  """Writes config.json + model.safetensors that `transformers` loads with `from_pretrained`.

  `token_ids` sets pad/bos/eos/decoder_start ids (default: the t_jax tokenizer's pad=0, eos=1);
  `tokenizer` (a SentencePiece model) is copied beside as tokenizer.model; an HF tokenizer directory's files
  (t_jax.data.hf_tokenizer) are copied as they are.
  """
  cfg = model_or_cfg if isinstance(model_or_cfg, ModelConfig) else model_or_cfg.cfg
  family = family_for_config(cfg)
  check_exportable(family, cfg)
  plain = traverse_util.flatten_dict(unstack_layers(nn.meta.unbox(params)), sep="/")
  flat = {k: np.asarray(v) for k, v in plain.items()}
  _check_tree(flat, _abstract_flat(cfg), "params")
  weights = _to_hf(family, cfg, flat, jnp.dtype(dtype))
  fields = {**family.hf_config(cfg), **(family.token_ids if token_ids is None else token_ids), "dtype": dtype}
  out = Path(out_dir)
  hf_io.write_dir(out, hf_io.hf_config_dict(family.model_type, hf_class_of(family, cfg), fields), weights)
  if tokenizer is not None and Path(tokenizer).is_dir():  # an HF tokenizer's files (t_jax.data.hf_tokenizer)
    from t_jax.data.hf_tokenizer import HFTokenizer

    HFTokenizer.load(tokenizer).save(out)
  elif tokenizer is not None:
    shutil.copyfile(tokenizer, out / "tokenizer.model")
  return out


def check_exportable(family: Family, cfg: ModelConfig) -> None:
  """Raises, naming the field, unless the HF family reproduces cfg exactly."""
  back = ModelConfig(**family.model_config(family.hf_config(cfg), {}))
  want, got = _arch_fields(family, cfg), _arch_fields(family, back)
  for name, value in want.items():
    if got[name] != value:
      raise ConversionError(f"ModelConfig.{name}={value!r} cannot be expressed as an HF {family.model_type} "
                            f"model (it would become {got[name]!r})")


def _arch_fields(family: Family, cfg: ModelConfig) -> dict:
  cfg = cfg.replace(num_encoder_layers=cfg.encoder_layers,  # head_dim, num_kv_heads: resolved by ModelConfig
                    scale_tied_logits=cfg.scale_tied_logits and cfg.tie_embeddings,
                    pooling=pooling_of(cfg) if cfg.num_classes else cfg.pooling)  # None: the architecture's
  skip = RUNTIME_FIELDS | family.irrelevant
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


def _abstract_flat(cfg: ModelConfig) -> dict:
  """Un-scanned parameter shapes/dtypes of cfg's model, '/'-joined paths."""
  shapes = nn.meta.unbox(abstract_params(build_model(cfg.replace(scan_layers=False))))
  return traverse_util.flatten_dict(shapes, sep="/")


def _check_tree(flat: dict, abstract: dict, what: str) -> None:
  """Same paths and shapes as the model's parameters, naming the first difference."""
  missing, extra = sorted(set(abstract) - set(flat)), sorted(set(flat) - set(abstract))
  if missing or extra:
    raise ConversionError(f"{what} do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
  for path, spec in abstract.items():
    if tuple(flat[path].shape) != tuple(spec.shape):
      raise ConversionError(f"{what} {path!r} has shape {tuple(flat[path].shape)}, the model expects "
                            f"{tuple(spec.shape)}")


def _take(weights: dict, name: str, shape: tuple) -> np.ndarray:
  if name not in weights:
    raise ConversionError(f"missing tensor {name!r} (expected shape {shape})")
  if tuple(weights[name].shape) != shape:
    raise ConversionError(f"tensor {name!r} has shape {tuple(weights[name].shape)}, the config implies {shape}")
  return weights[name]


def _to_tj(family: Family, cfg: ModelConfig, weights: dict) -> Flat:
  """Applies the family's rules HF -> t_jax; leftover tensors HF does need are an error."""
  flat: Flat = {}
  used = set()
  for rule in family.rules(cfg):
    arrays = [_take(weights, n, s) for n, s in zip(rule.hf, rule.hf_shapes)]
    used.update(rule.hf)
    flat.update(zip(rule.tj, rule.to_tj(arrays)))
  abstract = _abstract_flat(cfg)
  _check_tree(flat, abstract, "converted parameters")
  ignored = [re.compile(p) for p in family.ignored] + ([re.compile(re.escape(family.head))] if cfg.tie_embeddings
                                                        else [])
  leftover = sorted(k for k in weights if k not in used and not any(p.search(k) for p in ignored))
  if leftover:
    raise ConversionError(f"unexpected tensors for an HF {family.model_type} model with this config: {leftover[:5]}"
                          f"{' ...' if len(leftover) > 5 else ''}")
  return {k: np.asarray(v, abstract[k].dtype) for k, v in flat.items()}


def _to_hf(family: Family, cfg: ModelConfig, flat: Flat, dtype: np.dtype) -> Flat:
  """Applies the family's rules t_jax -> HF (tied tensors are written once, as HF saves them)."""
  weights: Flat = {}
  for rule in family.rules(cfg):
    outs = rule.to_hf([flat[p] for p in rule.tj])
    for name, shape, a in zip(rule.hf, rule.hf_shapes, outs):
      assert a.shape == shape, (name, a.shape, shape)
      weights[name] = a.astype(dtype)
  return {**weights, **{alias: weights[name] for alias, name in family.aliases(cfg).items()}}
