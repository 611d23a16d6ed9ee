"""The KV cache an attention layer keeps in its flax 'cache' collection while decoding.

Self-attention: k, v [batch, slots, kv_heads, head_dim], the absolute position of each slot (-1 = empty)
and a write index. Slots form a ring buffer, so a sliding-window model caches only `window` positions.
Cross-attention: the projected encoder keys/values, computed once. t_jax.inference.cache allocates,
reorders (beam search) and rewinds (speculative decoding) these pytrees.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

Array = jnp.ndarray


def append(layer: nn.Module, k: Array, v: Array, positions: Array, default_slots: int) -> tuple[Array, ...]:
  """(cache ++ new k, v, positions) to attend over; then writes the new entries into the ring buffer.

  The slot count is read from an existing cache, so callers may allocate any length. `index` is a scalar
  (lockstep) or a per-row [batch] write index, which lets speculative decoding rewind rows differently.
  """
  b, s = k.shape[:2]
  ck = layer.variable("cache", "k", jnp.zeros, (b, default_slots) + k.shape[2:], k.dtype)
  cv = layer.variable("cache", "v", jnp.zeros, (b, default_slots) + v.shape[2:], v.dtype)
  cpos = layer.variable("cache", "pos", lambda: jnp.full((b, default_slots), -1, jnp.int32))
  index = layer.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
  slots = ck.value.shape[1]
  positions = positions.astype(jnp.int32)
  out = (jnp.concatenate([ck.value, k], axis=1), jnp.concatenate([cv.value, v], axis=1),
         jnp.concatenate([cpos.value, positions], axis=1))
  keep = min(s, slots)  # only the newest `slots` entries can stay
  start = jnp.broadcast_to(index.value, (b,))[:, None]
  where = (start + s - keep + jnp.arange(keep)) % slots  # [b, keep]
  rows = jnp.arange(b)[:, None]
  ck.value = ck.value.at[rows, where].set(k[:, s - keep:])
  cv.value = cv.value.at[rows, where].set(v[:, s - keep:])
  cpos.value = cpos.value.at[rows, where].set(positions[:, s - keep:])
  index.value = index.value + s
  return out


def cross(layer: nn.Module, encoded: Optional[Array], project: Callable[[Array], tuple[Array, Array]]
          ) -> tuple[Array, Array]:
  """Encoder keys/values: projected from `encoded` (and cached when decoding), or read back from the cache."""
  if encoded is not None:
    k, v = project(encoded)
    if layer.decode:
      layer.variable("cache", "cross_k", lambda: k).value = k
      layer.variable("cache", "cross_v", lambda: v).value = v
    return k, v
  if not layer.has_variable("cache", "cross_k"):
    raise ValueError("cross-attention cache is empty: run the first decode call with encoder outputs")
  return layer.get_variable("cache", "cross_k"), layer.get_variable("cache", "cross_v")
