"""The KV cache an attention layer keeps in its flax 'cache' collection while decoding.

Self-attention: k, v [batch, slots, kv_heads, head_dim], the absolute position of each slot (-1 = empty)
and a write index. Slots form a ring buffer, so a sliding-window model caches only `window` positions.
Paged (a 'page_table' variable present): k_pages, v_pages [num_pages, page_size, kv_heads, head_dim] shared
by all rows and page_table [batch, max_pages] (-1 = unmapped); position p of a row lives in slot p % page_size
of its page p // page_size, so slot positions follow from the table. t_jax.inference.paged builds these.
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
  if layer.has_variable("cache", "page_table"):
    return _paged(layer, k, v, positions.astype(jnp.int32))
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


def _write_pages(layer: nn.Module, k: Array, v: Array, positions: Array) -> tuple[Array, Array, Array]:
  """Writes the new entries into their rows' pages: (k pool, v pool, page table).

  Writes at negative positions (padding) or into unmapped pages are dropped, so a row never touches a page
  that is not in its table.
  """
  kp, vp = layer.variable("cache", "k_pages"), layer.variable("cache", "v_pages")
  table = layer.get_variable("cache", "page_table")
  num_pages, size = kp.value.shape[:2]
  logical = positions // size
  ok = (positions >= 0) & (logical < table.shape[1])
  page = jnp.take_along_axis(table, jnp.where(ok, logical, 0), axis=1)
  page = jnp.where(ok & (page >= 0), page, num_pages)  # out of range: dropped
  kp.value = kp.value.at[page, positions % size].set(k, mode="drop")
  vp.value = vp.value.at[page, positions % size].set(v, mode="drop")
  return kp.value, vp.value, table


def _paged(layer: nn.Module, k: Array, v: Array, positions: Array) -> tuple[Array, Array, Array]:
  """Writes the new entries into their rows' pages, then gathers each row's pages into one contiguous view.

  The view's slot j holds position j (-1 where the page is unmapped); slots of mapped pages not written yet
  lie in the future of every query, and the causal mask hides them.
  """
  k_pool, v_pool, table = _write_pages(layer, k, v, positions)
  num_pages, size = k_pool.shape[:2]
  b, max_pages = table.shape
  mapped = jnp.where(table >= 0, table, num_pages)
  view = lambda pool: jnp.take(pool, mapped, axis=0, mode="fill", fill_value=0).reshape(
      (b, max_pages * size) + pool.shape[2:])
  pos = jnp.where(jnp.repeat(table >= 0, size, axis=1), jnp.arange(max_pages * size, dtype=jnp.int32), -1)
  return view(k_pool), view(v_pool), pos


def paged_decode(layer: nn.Module, q: Array, k: Array, v: Array, positions: Array,
                 scale: Optional[float]) -> Optional[Array]:
  """A decode step over a paged cache with the Pallas kernel (t_jax/kernels/paged_attention.py), when
  cfg.paged_attention_impl selects it: writes k, v into the pages and returns the attention output
  [batch, 1, heads, head_dim]. None (nothing written) for other calls: the caller takes `append`'s
  gather path (contiguous caches, several queries per row, paged_attention_impl 'xla').
  """
  cfg = layer.cfg
  if not layer.has_variable("cache", "page_table") or q.shape[1] != 1:
    return None
  from t_jax.kernels import paged_attention as kernel  # Pallas loads only when a paged cache is used

  if not kernel.use_pallas(cfg.paged_attention_impl):
    return None
  if cfg.position in ("alibi", "t5_relative") or getattr(cfg, "attention_kind", "softmax") != "softmax":
    raise NotImplementedError(f"the Pallas paged decode kernel takes no attention bias or attention kind "
                              f"(position={cfg.position!r}); use paged_attention_impl='xla'")
  positions = positions.astype(jnp.int32)
  k_pool, v_pool, table = _write_pages(layer, k, v, positions)
  lengths = jnp.maximum(positions[:, 0] + 1, 0)  # -1 (an idle row) attends to nothing
  out = kernel.paged_attention(q[:, 0], k_pool, v_pool, table, lengths, scale=scale, window=cfg.window)
  return out[:, None]


def recurrent(layer: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict:
  """The float32 recurrent state of linear attention (performer/rfa) by name, zeros at first: it replaces
  the KV cache (t_jax.attention.variants.state_shapes)."""
  return {name: layer.variable("cache", name, jnp.zeros, shape, jnp.float32) for name, shape in shapes.items()}


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
