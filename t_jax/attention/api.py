"""`t_jax.attention`: the one attention function every layer calls, for every attention kind."""

from __future__ import annotations

import math
from typing import Optional, Union

import jax
import jax.numpy as jnp

from t_jax.attention import bigbird
from t_jax.attention.masks import Mask, check_shapes
from t_jax.attention.variants import KINDS, Spec, other_kind
from t_jax.attention.xla import xla_attention

Array = jnp.ndarray
IMPLEMENTATIONS = ("auto", "xla", "pallas", "cudnn")

# Device kinds (jax.devices()[0].device_kind) where 'auto' picks the Pallas kernels, each with the
# committed benchmark under benchmarks/results/ that admitted it (compiled, matched XLA, and was faster).
# Empty: the kernels have never been compiled or timed on a GPU or TPU, so 'auto' means XLA everywhere.
VERIFIED_PALLAS: dict[str, str] = {}


def attention(q: Array, k: Array, v: Array, *, mask: Optional[Mask] = None, bias: Optional[Array] = None,
              scale: Optional[float] = None, implementation: str = "auto", dropout_rate: float = 0.0,
              dropout_rng: Optional[Array] = None, kernel_options: Optional[dict] = None,
              kind: Union[str, Spec] = "softmax", rng: Optional[Array] = None, aft_bias: Optional[Array] = None,
              state: Optional[tuple[Array, Array]] = None, **mask_fields: object
              ) -> Array | tuple[Array, tuple[Array, Array]]:
  """Scaled dot-product attention over [batch, seq, heads, head_dim] tensors.

  k/v may have fewer heads than q (GQA/MQA). `mask` is a `Mask`; or pass its fields as keywords
  (causal=, q_segment_ids=, kv_segment_ids=, prefix_len=, window=, q_positions=, kv_positions=).
  `bias` broadcasts to [batch, heads, q, kv] (ALiBi, T5 relative). Rows with nothing to attend to
  return zeros. Dropout on the attention probabilities (`dropout_rate` > 0 with a `dropout_rng`) runs
  on the XLA path. `kernel_options` (block_q, block_k, block_q_bwd, block_k_bwd, num_warps, num_stages)
  tune the Pallas kernels and are ignored by the other implementations.

  `kind` (a name or a `variants.Spec` with its knobs) picks the attention kind (see variants.py); `rng`
  redraws its random features or hash rotations, `aft_bias` is AFT's learned bias. With `state` (performer /
  rfa decoding) the result is (out, new state).
  """
  spec = Spec(kind=kind) if isinstance(kind, str) else kind
  if spec.kind not in KINDS:
    raise ValueError(f"unknown attention kind {spec.kind!r}; choose from {KINDS}")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; choose from {IMPLEMENTATIONS}")
  if mask is not None and mask_fields:
    raise ValueError(f"give mask=Mask(...) or mask keywords, not both; got {sorted(mask_fields)}")
  if spec.kind != "lsh":  # lsh's shared-QK keys have the queries' heads, v the kv heads
    check_shapes(q, k, v)
  mask = Mask(**mask_fields) if mask is None else mask
  mask = (mask.replace(block_sparse=spec.block_sparse) if spec.kind == "bigbird" else mask).validate(q.shape, k.shape)
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  if spec.kind not in ("softmax", "bigbird"):
    out, new_state = other_kind(q, k, v, spec, mask, bias, scale, rng, aft_bias, state)
    return out if state is None else (out, new_state)
  if (spec.kind == "bigbird" and bias is None and not dropout_rate and implementation in ("auto", "xla")
      and bigbird.supported(q, k, mask)):  # gathered key blocks; the dense XLA form is the oracle
    return bigbird.bigbird_attention(q, k, v, mask=mask, scale=scale)
  return _softmax(q, k, v, mask, bias, scale, implementation, dropout_rate, dropout_rng, kernel_options)


def _softmax(q: Array, k: Array, v: Array, mask: Mask, bias: Optional[Array], scale: float, implementation: str,
             dropout_rate: float, dropout_rng: Optional[Array], kernel_options: Optional[dict]) -> Array:
  """Softmax attention (a validated mask) by the XLA reference, the Pallas kernels or cuDNN."""
  if dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("attention dropout needs a dropout_rng")
    if implementation not in ("auto", "xla"):
      raise NotImplementedError(f"attention dropout is only implemented for 'xla', not {implementation!r}")
    implementation = "xla"
  if implementation == "auto":
    implementation = _auto(q, k, mask, bias)
  if implementation == "pallas":
    from t_jax.kernels import flash_attention  # imported lazily: Pallas is optional on CPU
    return flash_attention(q, k, v, mask=mask, bias=bias, scale=scale, **(kernel_options or {}))
  if implementation == "cudnn":
    # jax.nn.dot_product_attention's cuDNN path: no segment ids, prefix, positions or bias.
    if not (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and bias is None
            and not jax.tree.leaves(mask) and mask.block_sparse is None):
      raise NotImplementedError("cuDNN attention needs a GPU, bf16/f16 inputs, and only causal "
                                "or sliding-window masks")
    local = None if mask.window is None else (mask.window - 1, 0 if mask.causal else mask.window - 1)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=mask.causal, local_window_size=local,
                                        implementation="cudnn")
  return xla_attention(q, k, v, mask=mask, bias=bias, scale=scale, dropout_rate=dropout_rate,
                       dropout_rng=dropout_rng)


def _auto(q: Array, k: Array, mask: Mask, bias: Optional[Array]) -> str:
  """Pallas on a GPU/TPU kind listed in VERIFIED_PALLAS where the kernels cover the call; XLA elsewhere."""
  if jax.default_backend() not in ("gpu", "tpu") or jax.devices()[0].device_kind not in VERIFIED_PALLAS:
    return "xla"
  from t_jax.kernels import supports
  return "pallas" if supports(q, k, mask, bias) else "xla"
