"""Continuous batching (greedy): requests join a running decode batch in free slots and leave when done.

All slots share one paged KV cache (paged.py). A request is admitted when a slot is free and the pool can
hold its whole worst case (prompt + max_new_tokens), so a running request never waits for a page; its
pages are taken as its sequence grows and returned when it ends. Requests whose prompt starts with a
pinned prefix (add_prefix, or a prompt cache) share the prefix's full pages and copy its partial one.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t_jax.inference import paged as paged_lib
from t_jax.inference.prompt_cache import PromptCache, load_prompt_cache, prompt_kv
from t_jax.inference.runner import Runner, model_config

PyTree = Any


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _prefill(runner: Runner, params: PyTree, cache: PyTree, table: jax.Array, slot: jax.Array, ids: jax.Array,
             lengths: jax.Array, start: jax.Array) -> tuple[jax.Array, PyTree]:
  """One request's prompt (after its `start` shared positions) into its pages: (first token [1], cache)."""
  row = jax.lax.dynamic_slice_in_dim(table, slot, 1)
  logits, state, _ = runner.prefill(params, ids, lengths, dict(cache=cache, table=row, start=start))
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), paged_lib.set_tables(state["cache"], table)


@functools.partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=2)
def _decode(runner: Runner, params: PyTree, cache: PyTree, table: jax.Array, tokens: jax.Array,
            positions: jax.Array, steps: int, eos_id: Optional[int]) -> tuple[jax.Array, PyTree]:
  """`steps` greedy decode steps of every slot in one program: (tokens [slots, steps], cache).

  A slot at position -1 is idle (nothing written, tokens -1); a slot that emits eos_id goes idle after it.
  """
  state = {"cache": paged_lib.set_tables(cache, table)}

  def body(j: jax.Array, c: tuple) -> tuple:
    tok, pos, state, out = c
    logits, state = runner.step(params, state, tok[:, None], pos[:, None])
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = out.at[:, j].set(jnp.where(pos >= 0, nxt, -1))
    stop = (pos < 0) | (nxt == eos_id) if eos_id is not None else pos < 0
    return nxt, jnp.where(stop, -1, pos + 1), state, out

  out = jnp.full((tokens.shape[0], steps), -1, jnp.int32)
  _, _, state, out = jax.lax.fori_loop(0, steps, body, (tokens, positions, state, out))
  return out, state["cache"]


_write = jax.jit(paged_lib.write_pages, donate_argnums=0)
_copy = jax.jit(paged_lib.copy_pages, donate_argnums=0)


@dataclasses.dataclass
class _Request:
  id: int
  prompt: list[int]
  max_new_tokens: int
  out: list[int] = dataclasses.field(default_factory=list)
  pages: list[int] = dataclasses.field(default_factory=list)  # physical pages, in logical order
  shared: int = 0  # leading pages read from a prefix (not written)
  reserved: int = 0  # pages it may still take

  @property
  def written(self) -> int:
    """Positions in the cache: the prompt and every emitted token but the last (fed next)."""
    return len(self.prompt) + len(self.out) - 1


class Engine:
  """Greedy continuous batching over a page pool: submit, step, run_until_done.

  Each request's tokens equal `generate(..., method='greedy')` run on it alone. max_seq_len (default
  max_len) bounds prompt + new tokens per request and sets the pages a decode step reads per row;
  prefill_multiple rounds prompt widths up (fewer compilations); paged_impl overrides the config's
  paged_attention_impl (decode steps: 'xla' gathers pages, 'pallas' runs the paged kernel). decode_chunk:
  decode steps per program (one host round trip); a step that runs k < decode_chunk steps does so because
  a request ends after k, so a slot frees as soon as a request is done, but a request that arrives (or one
  that ends at EOS) mid-chunk waits for the chunk to end. 1 = admit between every two steps.
  prompt_cache: a save_prompt_cache directory whose pages every request starting with its prompt shares.
  """

  def __init__(self, model_or_cfg: Any, params: PyTree, *, max_batch: int = 8, page_size: int = 16,
               num_pages: int = 256, eos_id: Optional[int] = None, prompt_cache: Optional[str] = None,
               tokenizer: Any = None, max_seq_len: Optional[int] = None, prefill_multiple: int = 16,
               paged_impl: Optional[str] = None, decode_chunk: int = 8) -> None:
    self.cfg = model_config(model_or_cfg)
    if paged_impl is not None:  # the decode steps' attention: 'xla' (gather) | 'pallas' | 'auto'
      self.cfg = self.cfg.replace(paged_attention_impl=paged_impl)
    if self.cfg.architecture != "decoder":
      raise ValueError(f"Engine serves decoder-only models, not {self.cfg.architecture!r}")
    if min(max_batch, page_size, num_pages, prefill_multiple, decode_chunk) < 1:
      raise ValueError("max_batch, page_size, num_pages, prefill_multiple and decode_chunk must be >= 1")
    self.params, self.eos_id, self.page_size = nn.meta.unbox(params), eos_id, page_size
    self.prefill_multiple, self.decode_chunk, self.decode_calls = prefill_multiple, decode_chunk, 0
    self.max_seq_len = min(max_seq_len or self.cfg.max_len, self.cfg.max_len)
    max_pages = paged_lib.num_pages_for(self.max_seq_len, page_size)
    self.runner = Runner(self.cfg, 0, page_size=page_size, num_pages=num_pages, max_pages=max_pages)
    self.allocator = paged_lib.PageAllocator(num_pages)
    self.cache = self.runner.empty_pages(self.params, max_batch)
    self.table = np.full((max_batch, max_pages), -1, np.int32)
    self.slots: list[Optional[_Request]] = [None] * max_batch
    self.waiting: collections.deque[_Request] = collections.deque()
    self.prefixes: list[paged_lib.Prefix] = []
    self.finished: dict[int, np.ndarray] = {}
    self._next_id = self._reserved = 0
    if prompt_cache is not None:
      self.add_prefix(load_prompt_cache(prompt_cache, self.cfg, self.params, tokenizer))

  def add_prefix(self, prefix: PromptCache | list[int]) -> None:
    """Pins a prompt's KV (a PromptCache, or token ids to compute it from) in the pool for requests to share."""
    pc = prefix if isinstance(prefix, PromptCache) else prompt_kv(self.cfg, self.params, prefix)
    pages = self.allocator.alloc(paged_lib.num_pages_for(len(pc.tokens), self.page_size))
    pad = ((0, 0), (0, len(pages) * self.page_size - len(pc.tokens)), (0, 0), (0, 0))
    self.cache = _write(self.cache, jnp.asarray(pages), np.pad(pc.k, pad), np.pad(pc.v, pad))
    self.prefixes.append(paged_lib.Prefix(pc.tokens, pages))

  def submit(self, prompt_ids: list[int], max_new_tokens: int) -> int:
    """Queues a request; returns its id (a key of run_until_done's result)."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt or not all(0 <= t < self.cfg.vocab_size for t in prompt):
      raise ValueError(f"a prompt needs at least one token, all in [0, {self.cfg.vocab_size})")
    if max_new_tokens < 1 or len(prompt) + max_new_tokens > self.max_seq_len:
      raise ValueError(f"need 1 <= max_new_tokens and prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens})"
                       f" <= max_seq_len={self.max_seq_len}")
    usable = self.allocator.num_pages - sum(len(p.pages) for p in self.prefixes)
    if paged_lib.num_pages_for(len(prompt) + max_new_tokens, self.page_size) > usable:
      raise paged_lib.PoolExhausted(f"a request of {len(prompt) + max_new_tokens} tokens can never fit the "
                                    f"{usable} unpinned pages of {self.page_size}; raise num_pages")
    self.waiting.append(_Request(self._next_id, prompt, int(max_new_tokens)))
    self._next_id += 1
    return self._next_id - 1

  def pages(self, request_id: int) -> list[int]:
    """The physical pages of a running request, in logical order."""
    return next(list(r.pages) for r in self.slots if r is not None and r.id == request_id)

  def memory(self) -> dict:
    """KV pages held and the tokens they hold (pinned prefixes included, shared pages counted once)."""
    held = self.allocator.num_pages - self.allocator.num_free
    tokens = sum(len(p.tokens) for p in self.prefixes)
    tokens += sum(r.written - r.shared * self.page_size for r in self.slots if r is not None)
    per_page = sum(x.nbytes // self.allocator.num_pages for x in jax.tree_util.tree_leaves(self.cache)
                   if x.ndim >= 4)
    return dict(pages=held, slots=held * self.page_size, tokens=tokens, bytes=held * per_page)

  def _admit(self) -> None:
    """Moves waiting requests (in order) into free slots while the pool can hold their worst case."""
    while self.waiting and None in self.slots:
      r = self.waiting[0]
      start, shared, partial = max((p.reuse(r.prompt, self.page_size) for p in self.prefixes),
                                   key=lambda x: x[0], default=(0, [], None))
      need = paged_lib.num_pages_for(len(r.prompt) + r.max_new_tokens, self.page_size) - len(shared)
      if need > self.allocator.num_free - self._reserved:
        return
      self.waiting.popleft()
      slot = self.slots.index(None)
      self.allocator.share(shared)
      own = self.allocator.alloc(paged_lib.num_pages_for(len(r.prompt), self.page_size) - len(shared))
      r.pages, r.shared, r.reserved = shared + own, len(shared), need - len(own)
      self._reserved += r.reserved
      if partial is not None:  # copy-on-write of the page where the prompt leaves the prefix
        self.cache = _copy(self.cache, jnp.asarray([partial]), jnp.asarray([own[0]]))
      self.table[slot, :len(r.pages)] = r.pages
      rest = r.prompt[start:]
      width = -(-len(rest) // self.prefill_multiple) * self.prefill_multiple
      ids = np.zeros((1, width), np.int32)
      ids[0, width - len(rest):] = rest
      tok, self.cache = _prefill(self.runner, self.params, self.cache, self.table, slot, ids,
                                 np.asarray([len(rest)], np.int32), np.asarray([start], np.int32))
      self.slots[slot] = r
      self._emit(slot, int(tok[0]))

  def _emit(self, slot: int, token: int) -> None:
    r = self.slots[slot]
    r.out.append(token)
    if len(r.out) >= r.max_new_tokens or token == self.eos_id:
      self.allocator.free(r.pages)
      self._reserved -= r.reserved
      self.table[slot] = -1
      self.slots[slot] = None
      self.finished[r.id] = np.asarray(r.out, np.int32)

  def step(self) -> int:
    """Admits waiting requests into free slots, then decodes the running ones: `decode_chunk` steps in one
    program at most, fewer so that no request passes its max_new_tokens (a power of two: few programs).
    Returns how many requests ran."""
    self._admit()
    running = [i for i, r in enumerate(self.slots) if r is not None]
    if not running:
      return 0
    left = min(self.slots[i].max_new_tokens - len(self.slots[i].out) for i in running)
    steps = 1 << (min(left, self.decode_chunk).bit_length() - 1)
    tokens = np.zeros(len(self.slots), np.int32)
    positions = np.full(len(self.slots), -1, np.int32)
    for i in running:
      r = self.slots[i]
      positions[i], tokens[i] = r.written, r.out[-1]
      while (r.written + steps - 1) // self.page_size >= len(r.pages):  # the sequence grows onto new pages
        r.pages += self.allocator.alloc(1)
        r.reserved, self._reserved = r.reserved - 1, self._reserved - 1
        self.table[i, len(r.pages) - 1] = r.pages[-1]
    out, self.cache = _decode(self.runner, self.params, self.cache, self.table, tokens, positions, steps,
                              self.eos_id)
    out = np.asarray(out)
    for i in running:
      for token in out[i]:
        if self.slots[i] is None or token < 0:
          break
        self._emit(i, int(token))
    self.decode_calls += 1
    return len(running)

  def run_until_done(self) -> dict[int, np.ndarray]:
    """Steps until every submitted request is finished: {request id: its tokens}."""
    while self.waiting or any(r is not None for r in self.slots):
      if self.step() == 0 and self.waiting:
        raise paged_lib.PoolExhausted("waiting requests cannot be admitted: the pool is too small")
    out, self.finished = self.finished, {}
    return out
