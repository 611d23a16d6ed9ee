"""Mask descriptions -> boolean masks. Shared by the XLA reference and the kernel tests."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

Array = jnp.ndarray


def default_positions(batch: int, length: int, offset: int = 0) -> Array:
  """Positions 0..length-1 (plus offset) for every row, shape [batch, length]."""
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) + offset, (batch, length))


def make_mask(
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    causal: bool = False,
    q_segment_ids: Optional[Array] = None,
    kv_segment_ids: Optional[Array] = None,
    prefix_len: Optional[Array | int] = None,
    window: Optional[int] = None,
    q_positions: Optional[Array] = None,
    kv_positions: Optional[Array] = None,
) -> Optional[Array]:
  """Boolean mask [batch, 1, q_len, kv_len] (True = attend), or None when nothing is masked.

  Rules, all combined with AND:
    causal:       kv_pos <= q_pos, or kv_pos < prefix_len (prefix-LM: bidirectional prefix)
    segment ids:  q_segment == kv_segment (packing); id 0 marks padding
    window:       |q_pos - kv_pos| < window (sliding window)
  Positions default to 0..len-1; decoding passes absolute positions of the cache slots
  (a negative kv position marks an empty cache slot, never attended).
  """
  if prefix_len is not None and not causal:
    raise ValueError("prefix_len only has a meaning with causal=True (prefix-LM).")
  if not (causal or window is not None or q_segment_ids is not None
          or kv_segment_ids is not None or kv_positions is not None):
    return None
  qp = default_positions(batch, q_len) if q_positions is None else q_positions
  kp = default_positions(batch, kv_len) if kv_positions is None else kv_positions
  qp = jnp.broadcast_to(qp, (batch, q_len))[:, :, None]
  kp = jnp.broadcast_to(kp, (batch, kv_len))[:, None, :]
  mask = jnp.broadcast_to(kp >= 0, (batch, q_len, kv_len))
  if causal:
    allowed = kp <= qp
    if prefix_len is not None:
      pl = jnp.broadcast_to(jnp.asarray(prefix_len, jnp.int32), (batch,))[:, None, None]
      allowed = allowed | (kp < pl)
    mask = mask & allowed
  if window is not None:
    if window < 1:
      raise ValueError(f"window must be >= 1, got {window}")
    mask = mask & (jnp.abs(qp - kp) < window)
  if q_segment_ids is not None or kv_segment_ids is not None:
    if q_segment_ids is None or kv_segment_ids is None:
      raise ValueError("q_segment_ids and kv_segment_ids must be given together.")
    mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  return mask[:, None]
