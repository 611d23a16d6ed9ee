"""Position schemes behind three hooks: `absolute` (added to the embeddings: sinusoidal, learned),
`rotate` (RoPE on queries and keys) and `bias` (ALiBi, T5 relative buckets). Each is a no-op for the
other schemes, so the layers call all three without asking which scheme is configured."""

from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray


def sinusoidal(positions: Array, dim: int, max_timescale: float = 10000.0) -> Array:
  """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same)."""
  inv = 1.0 / (max_timescale ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = positions.astype(jnp.float32)[..., None] * inv  # [..., d/2]
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, dim)


def apply_rope(x: Array, positions: Array, theta: float = 10000.0) -> Array:
  """Rotary embedding (Su et al. 2021) on [batch, seq, heads, dim], rotate-half pairing (i, i + d/2)."""
  d = x.shape[-1]
  inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions.astype(jnp.float32)[:, :, None, None] * inv  # [b, s, 1, d/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """Press et al. 2022: geometric slopes 2^(-8/n), 2^(-16/n), ...; interleaved when n is not a power of 2."""

  def power_of_2(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  if math.log2(num_heads).is_integer():
    return np.asarray(power_of_2(num_heads), np.float32)
  closest = 2 ** math.floor(math.log2(num_heads))
  extra = power_of_2(2 * closest)[0::2][: num_heads - closest]
  return np.asarray(power_of_2(closest) + extra, np.float32)


def alibi_bias(q_positions: Array, kv_positions: Array, num_heads: int) -> Array:
  """ALiBi bias [batch, heads, q, kv] = -slope * |q_pos - kv_pos|."""
  slopes = jnp.asarray(alibi_slopes(num_heads))[None, :, None, None]
  dist = jnp.abs(q_positions[:, None, :, None] - kv_positions[:, None, None, :]).astype(jnp.float32)
  return -slopes * dist


def t5_bucket(relative_position: Array, *, bidirectional: bool, num_buckets: int = 32,
              max_distance: int = 128) -> Array:
  """T5's relative-position bucket (Raffel et al. 2020): exact for small |d|, log-spaced up to max_distance.

  relative_position = kv_pos - q_pos. Bidirectional halves the buckets by sign; causal clips
  future positions to bucket 0.
  """
  rel = relative_position.astype(jnp.int32)
  bucket = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (rel > 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(rel)
  else:
    n = -jnp.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(is_small, n, large)


def t5_relative_bias(table: Array, q_positions: Array, kv_positions: Array, *, bidirectional: bool,
                     max_distance: int) -> Array:
  """Bias [batch, heads, q, kv] looked up from a [buckets, heads] table."""
  rel = kv_positions[:, None, :] - q_positions[:, :, None]
  buckets = t5_bucket(rel, bidirectional=bidirectional, num_buckets=table.shape[0],
                      max_distance=max_distance)
  return jnp.transpose(table[buckets], (0, 3, 1, 2)).astype(jnp.float32)


def absolute(position: str, positions: Array, d_model: int, learned: Optional[Array]) -> Optional[Array]:
  """What to add to the token embeddings [batch, seq, embed] (learned: rows of the given table), or None."""
  if position == "sinusoidal":
    return sinusoidal(positions, d_model)
  if position == "learned":
    return jnp.take(learned, jnp.clip(positions, 0, None), axis=0)
  return None


def rotate(position: str, q: Array, k: Array, positions: Array, theta: float) -> tuple[Array, Array]:
  """Queries and keys with RoPE applied (unchanged for other schemes)."""
  if position != "rope":
    return q, k
  return apply_rope(q, positions, theta), apply_rope(k, positions, theta)


def bias(position: str, q_positions: Array, kv_positions: Array, *, num_heads: int, table: Optional[Array],
         bidirectional: bool, max_distance: int) -> Optional[Array]:
  """Additive attention bias [batch, heads, q, kv] (ALiBi, T5 buckets from `table`), or None."""
  if position == "alibi":
    return alibi_bias(q_positions, kv_positions, num_heads)
  if position == "t5_relative":
    return t5_relative_bias(table, q_positions, kv_positions, bidirectional=bidirectional,
                            max_distance=max_distance)
  return None
