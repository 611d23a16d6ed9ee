"""Multi-head attention layer (self or cross, MHA/GQA/MQA) with an optional KV cache."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from t_jax.attention import attention
from t_jax.models import positions as pos_lib
from t_jax.models.config import ModelConfig
from t_jax.models.layers import dense

Array = jnp.ndarray


class MultiHeadAttention(nn.Module):
  """Projects to heads, adds positions (RoPE / ALiBi / T5 buckets), calls `t_jax.attention`.

  Decoding (`decode=True`) keeps a 'cache' collection: k, v [batch, slots, kv_heads, head_dim],
  the absolute position of each slot (-1 = empty) and a write index. Slots form a ring buffer,
  so a sliding-window model caches only `window` positions. Cross-attention caches the
  projected encoder keys/values once (pass `kv=None` on later steps).
  """

  cfg: ModelConfig
  causal: bool = False
  cross: bool = False
  deterministic: bool = True
  decode: bool = False
  cache_len: Optional[int] = None  # slots in the KV cache (default: window or max_len)

  @nn.compact
  def __call__(self, x: Array, kv: Optional[Array], *, q_positions: Array, kv_positions: Optional[Array],
               q_segment_ids: Optional[Array] = None, kv_segment_ids: Optional[Array] = None,
               prefix_len: Optional[Any] = None, rel_table: Optional[Array] = None) -> Array:
    """x [batch, q, embed]; kv [batch, kv, embed] for cross-attention (None = self-attention)."""
    cfg = self.cfg
    h, hkv, d = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    q = dense(cfg, (h, d), ("embed", "heads", "head_dim"), "query")(x)
    if self.cross:
      k, v, kv_positions = self._cross_kv(kv, kv_positions)
    else:
      k = dense(cfg, (hkv, d), ("embed", "kv", "head_dim"), "key")(x)
      v = dense(cfg, (hkv, d), ("embed", "kv", "head_dim"), "value")(x)
      kv_positions = q_positions
      if cfg.position == "rope":
        q = pos_lib.apply_rope(q, q_positions, cfg.rope_theta)
        k = pos_lib.apply_rope(k, q_positions, cfg.rope_theta)
      if self.decode:
        k, v, kv_positions = self._update_cache(k, v, q_positions)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
    bias = self._position_bias(q_positions, kv_positions, rel_table)
    dropout_rng = None
    if not self.deterministic and cfg.attention_dropout_rate > 0:
      dropout_rng = self.make_rng("dropout")
    explicit = self.decode and not self.cross  # cache slots carry absolute positions
    out = attention(
        q, k, v, bias=bias, causal=self.causal, window=None if self.cross else cfg.window,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, prefix_len=prefix_len,
        scale=None if cfg.scale_attention else 1.0, implementation=cfg.attention_impl,
        kernel_options=cfg.attention_kernel_options,
        q_positions=q_positions if explicit else None, kv_positions=kv_positions if explicit else None,
        dropout_rate=cfg.attention_dropout_rate if dropout_rng is not None else 0.0,
        dropout_rng=dropout_rng)
    out = checkpoint_name(out, "attention_out")
    return dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), "out", in_axes=2)(out)

  def _cross_kv(self, kv: Optional[Array], kv_mask: Optional[Array]):
    """Projected encoder keys/values; cached once when decoding."""
    cfg = self.cfg
    proj_k = dense(cfg, (cfg.kv_heads, cfg.dim_per_head), ("embed", "kv", "head_dim"), "key")
    proj_v = dense(cfg, (cfg.kv_heads, cfg.dim_per_head), ("embed", "kv", "head_dim"), "value")
    if not self.decode:
      return proj_k(kv), proj_v(kv), None
    if kv is not None:  # prefill: compute once and store
      k, v = proj_k(kv), proj_v(kv)
      self.variable("cache", "cross_k", lambda: k).value = k
      self.variable("cache", "cross_v", lambda: v).value = v
      return k, v, None
    if not self.has_variable("cache", "cross_k"):
      raise ValueError("cross-attention cache is empty: run the first decode call with encoder outputs")
    return self.get_variable("cache", "cross_k"), self.get_variable("cache", "cross_v"), None

  def _update_cache(self, k: Array, v: Array, positions: Array):
    """Attend over (cache ++ new), then write the new entries into the ring buffer.

    The slot count is read from an existing cache, so callers may allocate any length (default:
    cache_len, window or max_len). `index` is a scalar (lockstep) or a per-row [batch] write index,
    which lets speculative decoding rewind rows by different amounts.
    """
    cfg = self.cfg
    b, s = k.shape[:2]
    slots = self.cache_len or (cfg.window if cfg.window is not None else cfg.max_len)
    ck = self.variable("cache", "k", jnp.zeros, (b, slots) + k.shape[2:], k.dtype)
    cv = self.variable("cache", "v", jnp.zeros, (b, slots) + v.shape[2:], v.dtype)
    cpos = self.variable("cache", "pos", lambda: jnp.full((b, slots), -1, jnp.int32))
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    slots = ck.value.shape[1]
    all_k = jnp.concatenate([ck.value, k], axis=1)
    all_v = jnp.concatenate([cv.value, v], axis=1)
    all_pos = jnp.concatenate([cpos.value, positions.astype(jnp.int32)], axis=1)
    keep = min(s, slots)  # only the newest `slots` entries can stay
    start = jnp.broadcast_to(index.value, (b,))[:, None]
    where = (start + s - keep + jnp.arange(keep)) % slots  # [b, keep]
    rows = jnp.arange(b)[:, None]
    ck.value = ck.value.at[rows, where].set(k[:, s - keep:])
    cv.value = cv.value.at[rows, where].set(v[:, s - keep:])
    cpos.value = cpos.value.at[rows, where].set(positions[:, s - keep:].astype(jnp.int32))
    index.value = index.value + s
    return all_k, all_v, all_pos

  def _position_bias(self, q_positions: Array, kv_positions: Optional[Array], rel_table: Optional[Array]):
    """ALiBi or T5 relative bias for self-attention; none otherwise."""
    cfg = self.cfg
    if self.cross or cfg.position not in ("alibi", "t5_relative"):
      return None
    kvp = q_positions if kv_positions is None else kv_positions
    if cfg.position == "alibi":
      return pos_lib.alibi_bias(q_positions, kvp, cfg.num_heads)
    return pos_lib.t5_relative_bias(rel_table, q_positions, kvp, bidirectional=not self.causal,
                                    max_distance=cfg.relative_max_distance)
