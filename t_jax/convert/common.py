"""Shared conversion machinery: tensor rules, HF<->t_jax activation names, layer stacking, errors."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

Arrays = list[np.ndarray]
Shape = tuple[int, ...]

# HF activation names -> t_jax names (and back: the first HF name of each t_jax name wins).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "relu": "relu", "silu": "silu", "swish": "silu"}
TJ_ACTIVATIONS = {tj: hf for hf, tj in reversed(HF_ACTIVATIONS.items())}


class ConversionError(ValueError):
  """A checkpoint or config cannot be converted; the message names the tensor or field."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """HF tensors `hf` (with shapes `hf_shapes`) <-> t_jax parameters `tj` ('/'-joined paths)."""

  hf: tuple[str, ...]
  tj: tuple[str, ...]
  hf_shapes: tuple[Shape, ...]
  to_tj: Callable[[Arrays], Arrays]
  to_hf: Callable[[Arrays], Arrays]


def copy(hf: str, tj: str, shape: Shape) -> Rule:
  """Same tensor, same shape (embeddings, norm scales, T5 bucket tables)."""
  return Rule((hf,), (tj,), (tuple(shape),), list, list)


def reshape(hf: str, tj: str, hf_shape: Shape, tj_shape: Shape) -> Rule:
  """Same data, different shape (per-head biases)."""
  return Rule((hf,), (tj,), (tuple(hf_shape),), lambda a: [a[0].reshape(tj_shape)],
              lambda a: [a[0].reshape(hf_shape)])


def linear(hf: str, tj: str, in_shape: Shape, out_shape: Shape) -> Rule:
  """torch.nn.Linear weight [out, in] <-> DenseGeneral kernel [*in_shape, *out_shape]."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return Rule((hf,), (tj,), ((n_out, n_in),), lambda a: [a[0].T.reshape(*in_shape, *out_shape)],
              lambda a: [a[0].reshape(n_in, n_out).T])


def conv1d(hf: str, tj: str, in_shape: Shape, out_shape: Shape) -> Rule:
  """GPT-2 Conv1D weight [in, out] <-> DenseGeneral kernel [*in_shape, *out_shape]."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return Rule((hf,), (tj,), ((n_in, n_out),), lambda a: [a[0].reshape(*in_shape, *out_shape)],
              lambda a: [a[0].reshape(n_in, n_out)])


def fused(hf: str, tjs: Sequence[str], lead: Shape, part_shape: Shape) -> Rule:
  """One HF tensor [*lead, k * prod(part)] split along its last axis into k t_jax [*lead, *part_shape]."""
  k, n = len(tjs), math.prod(part_shape)
  return Rule((hf,), tuple(tjs), ((*lead, k * n),),
              lambda a: [p.reshape(*lead, *part_shape) for p in np.split(a[0], k, axis=-1)],
              lambda a: [np.concatenate([p.reshape(*lead, n) for p in a], axis=-1)])


def layer_norm(hf: str, tj: str, dim: int, bias: bool = True) -> list[Rule]:
  """HF LayerNorm/RMSNorm `{hf}.weight` (+ `.bias`) <-> flax `{tj}/scale` (+ `/bias`)."""
  rules = [copy(f"{hf}.weight", f"{tj}/scale", (dim,))]
  return rules + [copy(f"{hf}.bias", f"{tj}/bias", (dim,))] if bias else rules


def dense(hf: str, tj: str, in_shape: Shape, out_shape: Shape, bias: bool) -> list[Rule]:
  """torch Linear `{hf}.weight` (+ `.bias`) <-> DenseGeneral `{tj}/kernel` (+ `/bias` [*out_shape])."""
  rules = [linear(f"{hf}.weight", f"{tj}/kernel", in_shape, out_shape)]
  return rules + [reshape(f"{hf}.bias", f"{tj}/bias", (math.prod(out_shape),), out_shape)] if bias else rules


def attention_rules(hf: str, tj: str, names: Sequence[str], cfg: Any, bias: bool) -> list[Rule]:
  """q/k/v/out torch Linear layers `{hf}.{name}` <-> t_jax query/key/value/out under `tj`."""
  d, hd = cfg.d_model, cfg.head_dim
  heads = (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads)
  rules = []
  for name, tj_name, h in zip(names[:3], ("query", "key", "value"), heads):
    rules += dense(f"{hf}.{name}", f"{tj}/{tj_name}", (d,), (h, hd), bias)
  return rules + dense(f"{hf}.{names[3]}", f"{tj}/out", (cfg.num_heads, hd), (d,), bias)


def mlp_rules(hf: str, tj: str, names: Sequence[str], cfg: Any, bias: bool) -> list[Rule]:
  """Feed-forward torch Linear layers <-> t_jax wi (or wi_0, wi_1) and wo; names = (wi.., wo)."""
  rules = []
  for name, tj_name in zip(names[:-1], ("wi_0", "wi_1") if cfg.gated else ("wi",)):
    rules += dense(f"{hf}.{name}", f"{tj}/{tj_name}", (cfg.d_model,), (cfg.mlp_dim,), bias)
  return rules + dense(f"{hf}.{names[-1]}", f"{tj}/wo", (cfg.mlp_dim,), (cfg.d_model,), bias)


def hf_activation(name: str, field: str) -> str:
  """t_jax activation for an HF activation name; unknown names raise, naming the config field."""
  if name not in HF_ACTIVATIONS:
    raise ConversionError(f"unsupported activation {field}={name!r}; supported: {sorted(HF_ACTIVATIONS)}")
  return HF_ACTIVATIONS[name]


def require(hf: dict, field: str, allowed: Sequence[Any], default: Any = None) -> None:
  """Raises unless hf[field] (or its default) is one of `allowed`."""
  value = hf.get(field, default)
  if value not in allowed:
    raise ConversionError(f"unsupported HF config {field}={value!r}: t_jax supports {list(allowed)}")


def stack_layers(params: dict, stacks: Sequence[str]) -> dict:
  """Un-scanned 'layer_i' subtrees -> one 'layers' subtree stacked on a leading axis (scan_layers=True)."""
  out = dict(params)
  for stack in stacks:
    sub = dict(out[stack])
    n = len([k for k in sub if k.startswith("layer_")])
    layers = [sub.pop(f"layer_{i}") for i in range(n)]
    sub["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)
    out[stack] = sub
  return out


def unstack_layers(params: dict) -> dict:
  """Scanned 'layers' subtrees -> 'layer_0', 'layer_1', ... (a no-op on un-scanned trees)."""
  out = dict(params)
  for stack, sub in params.items():
    if isinstance(sub, dict) and "layers" in sub:
      sub = dict(sub)
      layers = sub.pop("layers")
      n = jax.tree_util.tree_leaves(layers)[0].shape[0]
      for i in range(n):
        sub[f"layer_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], layers)
      out[stack] = sub
  return out
