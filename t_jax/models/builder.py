"""Model construction and parameter utilities: build, init, logical axes, counts."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t_jax.models.config import ModelConfig
from t_jax.models.transformer import EncoderDecoder, Transformer

PyTree = Any


def build_model(cfg: ModelConfig, *, deterministic: bool = True, decode: bool = False) -> nn.Module:
  """EncoderDecoder for architecture='encoder_decoder', else Transformer (decoder / prefix_lm / encoder)."""
  cls = EncoderDecoder if cfg.architecture == "encoder_decoder" else Transformer
  return cls(cfg, deterministic=deterministic, decode=decode)


def dummy_inputs(cfg: ModelConfig, batch: int = 1, length: int = 8) -> tuple:
  """Positional inputs with which `model.init` traces every parameter."""
  if cfg.input_stem == "patches":  # images of the configured size (`length` does not apply)
    return (jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32),)
  ids = jnp.zeros((batch, length), jnp.int32)
  if cfg.input_stem == "audio":  # `length` log-mel frames
    return (jnp.zeros((batch, length, cfg.num_mel_bins), jnp.float32), ids)
  return (ids, ids) if cfg.architecture == "encoder_decoder" else (ids,)


def init_boxed(model: nn.Module, rng: jax.Array, length: int = 8) -> PyTree:
  """`model.init` output with flax's logical-axis boxes still on the parameters."""
  return model.init({"params": rng}, *dummy_inputs(model.cfg, length=length))["params"]


def init_params(model: nn.Module, rng: jax.Array, length: int = 8) -> PyTree:
  """Plain parameter pytree (no metadata boxes) for `model.apply({'params': params}, ...)`."""
  return nn.meta.unbox(init_boxed(model, rng, length))


def abstract_params(model: nn.Module) -> PyTree:
  """Boxed ShapeDtypeStructs of the parameters, computed without allocating them."""
  return jax.eval_shape(lambda r: init_boxed(model, r), jax.random.key(0))


def logical_axes(model: nn.Module) -> PyTree:
  """PartitionSpec of logical axis names for every parameter (the sharding rules map these)."""
  return nn.get_partition_spec(abstract_params(model))


def count_params(params: PyTree) -> int:
  """Number of scalars in a parameter tree (boxed or plain, arrays or shape structs)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.meta.unbox(params))))


def param_table(params: PyTree) -> str:
  """Per-module parameter table; the last line is exactly `total parameters: N`."""
  flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]
  rows, total = [], 0
  for path, leaf in flat:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    n = int(np.prod(leaf.shape))
    total += n
    rows.append(f"{name:<64} {str(tuple(leaf.shape)):<22} {n:>14,}")
  header = f"{'parameter':<64} {'shape':<22} {'count':>14}"
  return "\n".join([header, "-" * len(header), *rows, "-" * len(header), f"total parameters: {total}"])
