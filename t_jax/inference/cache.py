"""KV-cache pytrees of t_jax.models.attention: allocation, beam reordering and per-row rewinding.

Leaves are named as in MultiHeadAttention: k, v [..., batch, slots, kv_heads, head_dim],
pos [..., batch, slots] (-1 = empty), index [..., batch] (per-row write index),
cross_k, cross_v [..., batch, src, kv_heads, head_dim]. A leading layer axis appears with scan_layers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
BATCH_AXIS = {"k": -4, "v": -4, "cross_k": -4, "cross_v": -4, "pos": -2, "index": -1,
              "lin_s": -4, "lin_z": -3}  # linear attention's recurrent state (t_jax.models.kv_cache.recurrent)


def _name(path: tuple) -> str:
  return str(getattr(path[-1], "key", path[-1]))


def allocate(shapes: PyTree, batch: int, slots: int) -> PyTree:
  """Empty cache with `slots` self-attention slots and a per-row index, from the default cache's shapes."""

  def make(path: tuple, leaf: jax.ShapeDtypeStruct) -> jax.Array:
    name, shape = _name(path), tuple(leaf.shape)
    if name in ("k", "v"):
      return jnp.zeros(shape[:-3] + (slots,) + shape[-2:], leaf.dtype)
    if name == "pos":
      return jnp.full(shape[:-1] + (slots,), -1, jnp.int32)
    if name == "index":
      return jnp.zeros(shape + (batch,), jnp.int32)
    return jnp.zeros(shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, shapes)


def repeat(cache: PyTree, n: int) -> PyTree:
  """Each row repeated n times in a row ([b0, b0, b1, b1, ...]): one prefill shared by n beams."""
  rep = lambda path, x: jnp.repeat(x, n, axis=BATCH_AXIS[_name(path)] % x.ndim)
  return jax.tree_util.tree_map_with_path(rep, cache)


def gather(cache: PyTree, rows: jax.Array) -> PyTree:
  """Rows picked (and reordered) by flat batch indices: beam-search parents. A parent comes from the same
  example, so the cross-attention k/v (identical along the way) are not copied."""

  def take(path: tuple, x: jax.Array) -> jax.Array:
    name = _name(path)
    return x if name in ("cross_k", "cross_v") else jnp.take(x, rows, axis=BATCH_AXIS[name] % x.ndim)

  return jax.tree_util.tree_map_with_path(take, cache)


def rewind(cache: PyTree, drop: jax.Array, last_kept: jax.Array) -> PyTree:
  """Forgets rejected entries: positions past `last_kept` [batch] empty, write index moved back by `drop`."""

  def fix(path: tuple, x: jax.Array) -> jax.Array:
    name = _name(path)
    if name == "pos":
      return jnp.where(x > last_kept[:, None], -1, x)
    if name == "index":
      return x - drop.astype(x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(fix, cache)
