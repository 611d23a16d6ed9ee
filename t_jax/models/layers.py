"""Small building blocks: logically-partitioned dense layers, norms, feed-forward, embeddings."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t_jax.models.config import ModelConfig
from t_jax.models.lora import LoRADense, lora_settings

Array = jnp.ndarray
P = nn.with_logical_partitioning


def kernel_init(cfg: ModelConfig) -> Callable:
  """normal(init_std) when set, else truncated-normal fan-in scaling (DenseGeneral inits a 2-D view)."""
  if cfg.init_std is not None:
    return nn.initializers.normal(cfg.init_std)
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class _Logical(nn.LogicallyPartitioned):
  """Logical-axis box whose unbox skips the constraint on DenseGeneral's flattened 2-D init view.

  DenseGeneral calls kernel_init with a 2-D shape and unboxes before reshaping; under `jax.set_mesh`
  flax would constrain that 2-D value with the 3-D names and fail.
  """

  def unbox(self, apply_constraint: bool = True) -> Any:
    """The value, constrained only when its rank matches the axis names."""
    return super().unbox(apply_constraint and jnp.ndim(self.value) == len(self.names))


def _logical(init: Callable, axes: tuple[str, ...]) -> Callable:
  return lambda *args, **kwargs: _Logical(init(*args, **kwargs), axes)


def matmul_2d(x: Array, w: Array, n: int = 1) -> Array:
  """x's last n axes contracted with w's first n, as one 2-D matmul [tokens, in] @ [in, out].

  Same values as the einsum. The weight gradient of a 2-D matmul then contracts the token axis in place;
  from the N-D form XLA CPU first copies the whole transposed [tokens, out] gradient (benchmarks/NOTES.md).
  """
  y = jnp.dot(x.reshape(-1, math.prod(x.shape[-n:])), w.reshape(math.prod(w.shape[:n]), -1))
  return y.reshape(*x.shape[:-n], *w.shape[n:])


def _dot_general_2d(x: Array, w: Array, dimension_numbers: Any, precision: Any = None) -> Array:
  """DenseGeneral's dot_general for `dense`: trailing axes of x with leading axes of w, no batch axes."""
  (contracting, _), _ = dimension_numbers
  return matmul_2d(x, w, len(contracting))


def dense(cfg: ModelConfig, features: int | Sequence[int], axes: tuple[str, ...], name: Optional[str] = None,
          in_axes: int = 1, use_bias: Optional[bool] = None) -> nn.DenseGeneral:
  """DenseGeneral contracting the last `in_axes` axes, with logical axis names on every parameter."""
  bias = cfg.use_bias if use_bias is None else use_bias
  kw = dict(features=features, axis=tuple(range(-in_axes, 0)), use_bias=bias, name=name, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, kernel_init=_logical(kernel_init(cfg), axes),
            bias_init=_logical(nn.initializers.zeros, axes[in_axes:]), dot_general=_dot_general_2d)
  if cfg.lora_rank is not None:  # the same kernel/bias, plus adapters where the path matches lora_targets
    rank, scale, targets = lora_settings(cfg)
    return LoRADense(**kw, lora_rank=rank, lora_scale=scale, lora_targets=targets, lora_axes=axes)
  return nn.DenseGeneral(**kw)


def norm(cfg: ModelConfig, name: Optional[str] = None) -> nn.Module:
  """LayerNorm or RMSNorm over `embed`, per config."""
  if cfg.norm == "rmsnorm":
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      scale_init=P(nn.initializers.ones, ("embed",)), name=name)
  return nn.LayerNorm(epsilon=cfg.norm_eps, use_bias=cfg.use_bias, dtype=cfg.dtype,
                      param_dtype=cfg.param_dtype, scale_init=P(nn.initializers.ones, ("embed",)),
                      bias_init=P(nn.initializers.zeros, ("embed",)), name=name)


def activation(name: str) -> Callable[[Array], Array]:
  """The activation function by config name."""
  return {"relu": nn.relu, "gelu": lambda x: nn.gelu(x, approximate=False),
          "gelu_tanh": lambda x: nn.gelu(x, approximate=True), "silu": nn.silu}[name]


class MLP(nn.Module):
  """Feed-forward: act(x W_i) W_o, or the gated form act(x W_0) * (x W_1) W_o (SwiGLU, GeGLU)."""

  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[batch, seq, embed] -> [batch, seq, embed]."""
    cfg = self.cfg
    act = activation(cfg.activation)
    if cfg.gated:
      h = act(dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "wi_0")(x)) * dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "wi_1")(x)
    else:
      h = act(dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "wi")(x))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
    return dense(cfg, cfg.d_model, ("mlp", "embed"), "wo")(h)


def embed_std(cfg: ModelConfig) -> float:
  """Token-embedding init std: init_std if set; d_model**-0.5 when inputs are scaled by sqrt(d_model)
  (Vaswani et al.: unit-scale inputs and tied logits); else 1.0 (T5)."""
  if cfg.init_std is not None:
    return cfg.init_std
  return cfg.d_model ** -0.5 if cfg.scale_embeddings else 1.0


class Embed(nn.Module):
  """Token embedding table [vocab, embed]; `attend` gives tied logits."""

  cfg: ModelConfig

  def setup(self) -> None:
    """Creates the table."""
    init = nn.initializers.normal(embed_std(self.cfg))
    self.embedding = self.param("embedding", P(init, ("vocab", "embed")),
                                (self.cfg.vocab_size, self.cfg.d_model), self.cfg.param_dtype)

  def __call__(self, ids: Array) -> Array:
    """[batch, seq] ids -> [batch, seq, embed]."""
    x = jnp.take(jnp.asarray(self.embedding, self.cfg.dtype), ids, axis=0)
    return x * jnp.sqrt(self.cfg.d_model).astype(x.dtype) if self.cfg.scale_embeddings else x

  def attend(self, x: Array) -> Array:
    """Tied un-embedding: x @ E^T -> [batch, seq, vocab]."""
    return matmul_2d(x, jnp.asarray(self.embedding, self.cfg.dtype).T)


class PositionEmbed(nn.Module):
  """The learned absolute-position table [max_len, embed] (looked up by t_jax.models.positions.absolute)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self) -> Array:
    """The table in the compute dtype."""
    init = nn.initializers.normal(self.cfg.init_std or 0.02)
    table = self.param("embedding", P(init, ("position", "embed")), (self.cfg.max_len, self.cfg.d_model),
                       self.cfg.param_dtype)
    return jnp.asarray(table, self.cfg.dtype)


def remat_policy(name: str) -> Optional[Callable]:
  """jax.checkpoint policy by config name ('full' saves nothing)."""
  cp = jax.checkpoint_policies
  return {"full": cp.nothing_saveable, "dots": cp.checkpoint_dots,
          "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
          "save_attention_out": cp.save_only_these_names("attention_out")}[name]
