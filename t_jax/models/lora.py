"""LoRA (Hu et al. 2021): a low-rank update beside a frozen dense kernel, and merging it back.

With ModelConfig.lora_rank set, every `layers.dense` is a LoRADense: the same `kernel`/`bias` parameters
(so pretrained params load unchanged) plus `lora_a` [*in, r] and `lora_b` [r, *out] on the layers whose
module path ('encoder/layer_0/self_attention/query') matches ModelConfig.lora_targets:

  y = x W + b + (alpha / r) (x A) B          A ~ normal(1 / sqrt(fan_in)), B = 0: the base model at step 0

`merge_lora(cfg, params)` folds W + (alpha / r) A B into the kernels and drops the adapters: a plain model
that gives the same outputs.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t_jax.models.config import ModelConfig

Array = jnp.ndarray
DEFAULT_TARGETS = "query|value"  # the LoRA paper's W_q and W_v


def lora_settings(cfg: ModelConfig) -> tuple[int, float, str]:
  """(rank, scale alpha / rank, target regex) of a config with lora_rank set."""
  rank = cfg.lora_rank
  return rank, (cfg.lora_alpha or rank) / rank, cfg.lora_targets or DEFAULT_TARGETS


class LoRADense(nn.DenseGeneral):
  """DenseGeneral (trailing `axis` contracted) plus a rank-r update when its module path matches `lora_targets`."""

  lora_rank: int = 8
  lora_scale: float = 1.0
  lora_targets: str = DEFAULT_TARGETS
  lora_axes: tuple = ()  # logical axis names of the kernel: A takes the input ones, B the output ones

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    """DenseGeneral's output, plus scale * (x A) B on target layers."""
    y = super().__call__(inputs)
    if not re.search(self.lora_targets, "/".join(self.scope.path)):
      return y
    n_in = len(self.axis) if isinstance(self.axis, tuple) else 1
    features = self.features if isinstance(self.features, tuple) else (self.features,)
    in_shape = inputs.shape[-n_in:]
    names_in, names_out = tuple(self.lora_axes[:n_in]), tuple(self.lora_axes[n_in:])
    a = self.param("lora_a", nn.with_logical_partitioning(
        nn.initializers.normal(float(np.prod(in_shape)) ** -0.5), (*names_in, "lora")),
        (*in_shape, self.lora_rank), self.param_dtype)
    b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora", *names_out)),
                   (self.lora_rank, *features), self.param_dtype)
    x = inputs.astype(self.dtype)
    h = jnp.tensordot(x, jnp.asarray(a, self.dtype), axes=(tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))))
    delta = jnp.tensordot(h, jnp.asarray(b, self.dtype), axes=1) * self.lora_scale
    return y + delta.astype(y.dtype)


def merge_lora(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
  """(config without LoRA, params with W + scale * A B in every adapted kernel and no adapters).

  Works on unscanned and scanned (stacked `layers`) parameters; the merge is computed in float32.
  """
  if cfg.lora_rank is None:
    return cfg, params
  _, scale, _ = lora_settings(cfg)
  flat = traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")
  out = {k: v for k, v in flat.items() if not k.endswith(("/lora_a", "/lora_b"))}
  for key in [k for k in flat if k.endswith("/lora_a")]:
    module = key[:-len("/lora_a")]
    a, b, w = (np.asarray(flat[f"{module}/{n}"], np.float32) for n in ("lora_a", "lora_b", "kernel"))
    if w.ndim == a.ndim + b.ndim - 2:
      delta = np.tensordot(a, b, axes=1)
    else:  # stacked layers: one leading axis shared by a, b and the kernel
      delta = np.stack([np.tensordot(a[i], b[i], axes=1) for i in range(a.shape[0])])
    out[f"{module}/kernel"] = jnp.asarray(w + scale * delta, flat[f"{module}/kernel"].dtype)
  return cfg.replace(lora_rank=None, lora_alpha=None, lora_targets=None), traverse_util.unflatten_dict(out, sep="/")
