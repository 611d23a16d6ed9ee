"""`t_jax.attention`: the one attention function every layer calls."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from t_jax.attention.masks import make_mask
from t_jax.attention.xla import xla_attention

Array = jnp.ndarray
IMPLEMENTATIONS = ("auto", "xla", "pallas", "cudnn")


def check_shapes(q: Array, k: Array, v: Array) -> None:
  """ValueError unless q [b, sq, h, d], k [b, sk, hkv, d], v [b, sk, hkv, dv] with h % hkv == 0."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"k and v must agree in batch, seq and heads; got {k.shape}, {v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(f"q and k must agree in batch and head_dim; got {q.shape}, {k.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")


def _cudnn_ok(q: Array, bias: Optional[Array], q_segment_ids: Optional[Array], prefix_len: object,
              q_positions: Optional[Array], kv_positions: Optional[Array]) -> bool:
  """Whether jax.nn.dot_product_attention's cuDNN path covers this call (causal/window only)."""
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and q_segment_ids is None and prefix_len is None and bias is None
          and q_positions is None and kv_positions is None)


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    bias: Optional[Array] = None,
    causal: bool = False,
    q_segment_ids: Optional[Array] = None,
    kv_segment_ids: Optional[Array] = None,
    prefix_len: Optional[Array | int] = None,
    window: Optional[int] = None,
    scale: Optional[float] = None,
    implementation: str = "auto",
    q_positions: Optional[Array] = None,
    kv_positions: Optional[Array] = None,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[Array] = None,
    kernel_options: Optional[dict] = None,
) -> Array:
  """Scaled dot-product attention over [batch, seq, heads, head_dim] tensors.

  k/v may have fewer heads than q (GQA/MQA). `bias` broadcasts to [batch, heads, q, kv]
  (ALiBi, T5 relative). Segment id 0 marks padding. `q_positions`/`kv_positions` give absolute
  positions for the causal/window rules (KV-cache decoding); a negative kv position is an empty
  cache slot. Rows with nothing to attend to return zeros. Dropout on the attention
  probabilities (`dropout_rate` > 0 with a `dropout_rng`) runs on the XLA path. `kernel_options`
  (block_q, block_k, block_q_bwd, block_k_bwd, num_warps, num_stages) tune the Pallas kernels and are
  ignored by the other implementations.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
  check_shapes(q, k, v)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  masks = dict(causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
               prefix_len=prefix_len, window=window)
  if dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("attention dropout needs a dropout_rng")
    if implementation not in ("auto", "xla"):
      raise NotImplementedError(f"attention dropout is only implemented for 'xla', not {implementation!r}")
    implementation = "xla"
  if implementation == "auto":
    implementation = _auto(q, k, bias=bias, q_positions=q_positions, kv_positions=kv_positions, **masks)
  if implementation == "pallas":
    from t_jax.kernels import flash_attention  # imported lazily: Pallas is optional on CPU
    if q_positions is not None or kv_positions is not None:
      raise NotImplementedError("the Pallas kernels take no explicit positions (KV-cache decoding); "
                                "use implementation='xla' there")
    return flash_attention(q, k, v, bias=bias, scale=scale, **masks, **(kernel_options or {}))
  if implementation == "cudnn":
    if not _cudnn_ok(q, bias, q_segment_ids, prefix_len, q_positions, kv_positions):
      raise NotImplementedError("cuDNN attention needs a GPU, bf16/f16 inputs, and only causal "
                                "or sliding-window masks")
    return _cudnn(q, k, v, scale=scale, causal=causal, window=window)
  mask = make_mask(q.shape[0], q.shape[1], k.shape[1], q_positions=q_positions,
                   kv_positions=kv_positions, **masks)
  return xla_attention(q, k, v, bias=bias, mask=mask, scale=scale, dropout_rate=dropout_rate,
                       dropout_rng=dropout_rng)


def _auto(q: Array, k: Array, *, bias: Optional[Array], q_positions: Optional[Array],
          kv_positions: Optional[Array], **masks: object) -> str:
  """Pallas on GPU/TPU where the kernels cover the call, XLA elsewhere."""
  if jax.default_backend() in ("gpu", "tpu") and q_positions is None and kv_positions is None:
    try:
      from t_jax.kernels import supports
    except ImportError:
      return "xla"
    if supports(q, k, bias=bias, **masks):
      return "pallas"
  return "xla"


def _cudnn(q: Array, k: Array, v: Array, *, scale: float, causal: bool, window: Optional[int]) -> Array:
  local = None if window is None else (window - 1, 0 if causal else window - 1)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                      local_window_size=local, implementation="cudnn")
