"""Paged KV caches: a host-side page allocator and the page-pool pytrees of t_jax.models.kv_cache.

Per layer, k_pages / v_pages [num_pages, page_size, kv_heads, head_dim] hold every sequence's entries
and page_table [batch, max_pages] maps a row's logical page j (positions j*page_size ...) to a physical
page (-1 = none). Sequences that start with the same prompt share its full pages (reference-counted);
the partially filled page where they diverge is copied (copy-on-write), so no row ever writes a shared page.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

PyTree = Any


class PoolExhausted(RuntimeError):
  """The page pool has fewer free pages than a request needs (nothing was allocated)."""


class PageAllocator:
  """Hands out physical page ids; shared pages are reference-counted and return to the pool at zero."""

  def __init__(self, num_pages: int) -> None:
    if num_pages < 1:
      raise ValueError(f"num_pages must be >= 1, got {num_pages}")
    self.num_pages = num_pages
    self._free = list(range(num_pages))[::-1]  # pop() hands out the lowest id first
    self._refs = np.zeros(num_pages, np.int32)

  @property
  def num_free(self) -> int:
    """Pages not held by any sequence."""
    return len(self._free)

  def alloc(self, n: int) -> list[int]:
    """n fresh pages (reference count 1), or PoolExhausted without allocating any."""
    if n > len(self._free):
      raise PoolExhausted(f"KV page pool exhausted: {n} pages needed, {len(self._free)} of {self.num_pages} "
                          "free; raise num_pages, or lower the batch size or the sequence lengths")
    pages = [self._free.pop() for _ in range(n)]
    self._refs[pages] = 1
    return pages

  def share(self, pages: list[int]) -> None:
    """One more sequence reads these (allocated) pages."""
    if any(self._refs[p] < 1 for p in pages):
      raise ValueError(f"cannot share pages that are not allocated: {pages}")
    self._refs[pages] += 1

  def free(self, pages: list[int]) -> None:
    """One sequence stops reading these pages; a page nobody reads returns to the pool."""
    for p in pages:
      if self._refs[p] < 1:
        raise ValueError(f"page {p} freed twice")
      self._refs[p] -= 1
      if self._refs[p] == 0:
        self._free.append(p)


@dataclasses.dataclass(frozen=True)
class PagedCacheConfig:
  """A run's page pool (launchers fill it from gin): generate(cache='paged', **dataclasses.asdict(it))."""

  page_size: int = 16  # positions per page
  num_pages: Optional[int] = None  # pages in the pool; None = exactly what each generate() call needs

  def __post_init__(self) -> None:
    """Rejects sizes that are not ints >= 1, naming the field."""
    positive = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
    if not positive(self.page_size):
      raise ValueError(f"PagedCacheConfig.page_size must be an int >= 1, got {self.page_size!r}")
    if self.num_pages is not None and not positive(self.num_pages):
      raise ValueError(f"PagedCacheConfig.num_pages must be an int >= 1 or None, got {self.num_pages!r}")


def num_pages_for(tokens: int, page_size: int) -> int:
  """Pages that hold `tokens` positions."""
  return -(-tokens // page_size)


def allocate(shapes: PyTree, num_pages: int, page_size: int, max_pages: int, batch: int) -> PyTree:
  """An all-zero page pool and unmapped page tables, from the default (contiguous) cache's shapes."""
  out = {}
  for path, leaf in traverse_util.flatten_dict(shapes).items():
    *head, name = path
    if name in ("k", "v"):  # [..., batch, slots, kv_heads, head_dim]
      shape = leaf.shape[:-4] + (num_pages, page_size) + leaf.shape[-2:]
      out[(*head, f"{name}_pages")] = jnp.zeros(shape, leaf.dtype)
    elif name == "pos":  # [..., batch, slots]
      out[(*head, "page_table")] = jnp.full(leaf.shape[:-2] + (batch, max_pages), -1, jnp.int32)
    elif name in ("cross_k", "cross_v"):  # encoder-decoder: the encoder's keys/values stay one block per row
      out[path] = jnp.zeros(leaf.shape, leaf.dtype)
    elif name != "index":
      raise ValueError(f"the paged cache does not hold {name!r}")
  return traverse_util.unflatten_dict(out)


LAYER_NDIM = {"k": 4, "v": 4, "k_pages": 4, "v_pages": 4, "page_table": 2}  # a scanned leaf has one more


def _map(cache: PyTree, name: str, fn: Any) -> PyTree:
  """fn(leaf, layer_ids) on the leaves called `name`, layer_ids being their layers in model order."""
  flat = traverse_util.flatten_dict(cache)
  natural = lambda path: [[int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(k))] for k in path]
  layer = 0
  for path in sorted((p for p in flat if p[-1] == name), key=natural):
    leaf = flat[path]
    n = leaf.shape[0] if leaf.ndim > LAYER_NDIM[name] else 0  # scanned layers: n of them in one leaf
    flat[path] = fn(leaf, np.arange(layer, layer + n) if n else layer)
    layer += max(n, 1)
  return traverse_util.unflatten_dict(flat)


def set_tables(cache: PyTree, table: jax.Array) -> PyTree:
  """Every layer's page table set to table [batch, max_pages]."""
  table = jnp.asarray(table, jnp.int32)
  return _map(cache, "page_table", lambda x, _: jnp.broadcast_to(table, x.shape[:-2] + table.shape))


def stack_layers(cache: PyTree, name: str) -> list[jax.Array]:
  """The leaves called `name`, one array per layer in model order (a scanned leaf split on its layer axis)."""
  out = []
  _map(cache, name, lambda x, ids: out.extend(list(x) if np.ndim(ids) else [x]) or x)
  return out


def write_pages(cache: PyTree, pages: jax.Array, k: jax.Array, v: jax.Array) -> PyTree:
  """k, v [layers, len(pages) * page_size, kv_heads, head_dim] written into those physical pages."""
  for name, x in (("k_pages", k), ("v_pages", v)):
    split = x.reshape((x.shape[0], len(pages), -1) + x.shape[2:])
    put = lambda pool, ids, s=split: pool.at[..., pages, :, :, :].set(s[ids].astype(pool.dtype))
    cache = _map(cache, name, put)
  return cache


def copy_pages(cache: PyTree, src: jax.Array, dst: jax.Array) -> PyTree:
  """Pages src copied onto pages dst (copy-on-write of a shared, partially filled page)."""
  copy = lambda pool, _: pool.at[..., dst, :, :, :].set(pool[..., src, :, :, :])
  return _map(_map(cache, "k_pages", copy), "v_pages", copy)


@dataclasses.dataclass
class Prefix:
  """A prompt whose KV already sits in pool pages (pinned), for sequences that start with it to share."""

  tokens: tuple[int, ...]
  pages: list[int]

  def reuse(self, prompt: list[int], page_size: int) -> tuple[int, list[int], Optional[int]]:
    """(start, shared pages, page to copy or None) for a prompt: its tokens before `start` need no computing.

    `start` is the common prefix's length, less one if that is the whole prompt (its last token is always
    fed: its logits pick the first new token). Full pages below `start` are shared, the page holding
    `start` (when it starts mid-page) is copied.
    """
    common = next((i for i, (a, b) in enumerate(zip(prompt, self.tokens)) if a != b),
                  min(len(prompt), len(self.tokens)))
    start = min(common, len(prompt) - 1)
    full = start // page_size
    return start, self.pages[:full], self.pages[full] if start % page_size else None


def plan_rows(rows: list[list[int]], max_new_tokens: int, page_size: int, num_pages: Optional[int],
              prefix: tuple[int, ...] = (), extra: int = 0, beams: int = 1) -> dict:
  """Pages for a one-shot batch (generate): the prefix first (pages 0..), then every row's own pages.

  A row holds len(row) + max_new_tokens + extra positions (extra: speculative overrun). With beams > 1
  a row's prompt pages are written once and read by its beams; each beam owns pages from the one holding
  position len(row) on (beam_reorder). Returns numpy inputs for the jitted program: table [batch,
  max_pages], start [batch], prefix_pages, copy_src / copy_dst (the partial prefix page copied per row),
  own [batch * beams, max_pages] (beams > 1: each beam's pages, -1 before its first), the pool size.
  """
  prefix_pages = num_pages_for(len(prefix), page_size)
  need = [num_pages_for(len(r) + max_new_tokens + extra, page_size) for r in rows]
  first = [len(r) // page_size if beams > 1 else n for r, n in zip(rows, need)]  # a beam's first own page
  prompt = [num_pages_for(len(r), page_size) if beams > 1 else n for r, n in zip(rows, need)]  # row pages
  total = prefix_pages + sum(prompt) + sum(beams * (n - f) for n, f in zip(need, first))
  alloc = PageAllocator(num_pages or total)
  held = Prefix(tuple(prefix), alloc.alloc(prefix_pages))
  table = np.full((len(rows), max(need)), -1, np.int32)
  own = np.full((len(rows) * beams, max(need)), -1, np.int32)
  start, src, dst = np.zeros(len(rows), np.int32), [], []
  for i, row in enumerate(rows):
    start[i], shared, partial = held.reuse(row, page_size)
    alloc.share(shared)
    table[i, :prompt[i]] = shared + alloc.alloc(prompt[i] - len(shared))
    if partial is not None:
      src.append(partial)
      dst.append(table[i, len(shared)])
    if beams > 1:
      for j in range(beams):
        own[i * beams + j, first[i]:need[i]] = alloc.alloc(need[i] - first[i])
  return dict(table=table, start=start, prefix_pages=np.asarray(held.pages, np.int32),
              copy_src=np.asarray(src, np.int32), copy_dst=np.asarray(dst, np.int32), own=own,
              num_pages=alloc.num_pages)


def beam_reorder(state: dict, rows: jax.Array, next_pos: jax.Array, page_size: int) -> dict:
  """Beam search on pages: beam r continues the sequence of row rows[r] (of state["table"]), and writes
  next at next_pos[r] (the same for a beam and its parent).

  Full pages are never written again, so r reads its parent's pages below the one holding next_pos by
  pointing at them (no copy); from that page on it uses its own pages (state["own"]), and the parent's
  partly filled page is copied into r's own one: one page per beam and layer, not the whole history. The
  first call maps an example's rows (prefill) onto its beams (rows = each example repeated).
  """
  table, own = state["table"], state["own"]
  num_pages = stack_layers(state["cache"], "k_pages")[0].shape[0]
  cur = jnp.minimum(next_pos // page_size, table.shape[1] - 1)
  parent = jnp.take(table, rows, axis=0)
  new = jnp.where(jnp.arange(table.shape[1])[None, :] < cur[:, None], parent, own)
  src = jnp.take_along_axis(parent, cur[:, None], axis=1)[:, 0]
  dst = jnp.take_along_axis(own, cur[:, None], axis=1)[:, 0]
  dst = jnp.where((src >= 0) & (dst >= 0) & (src != dst), dst, num_pages)  # num_pages: no copy (dropped)
  src = jnp.maximum(src, 0)
  copy = lambda pool, _: pool.at[..., dst, :, :, :].set(pool[..., src, :, :, :], mode="drop")
  cache = set_tables(_map(_map(state["cache"], "k_pages", copy), "v_pages", copy), new)
  return dict(state, cache=cache, table=new)
