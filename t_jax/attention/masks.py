"""`Mask`: one description of which keys each query sees, validated once. No upward imports."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jnp.ndarray


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


def _broadcasts(shape: tuple[int, ...], full: tuple[int, ...]) -> bool:
  return len(shape) <= len(full) and all(n in (1, f) for n, f in zip(shape[::-1], full[::-1]))


@dataclasses.dataclass(frozen=True)
class BlockSparse:
  """BigBird's pattern (Zaheer et al. 2020) over blocks of `block` positions: query block i sees key block j
  when |i - j| <= window_blocks // 2, when i or j is one of the first `global_blocks`, or when j is one of
  `random_blocks` draws (with replacement) among the earlier blocks (causal) or all `kv_len` blocks. The draws
  depend only on (seed, i), so they are the same in every layer, step and decode step."""
  block: int = 64
  window_blocks: int = 3
  global_blocks: int = 1
  random_blocks: int = 2
  seed: int = 0

  def allowed(self, qp: Array, kp: Array, causal: bool, kv_len: int) -> Array:
    """Boolean, broadcasting q positions [..., q, 1] against kv positions [..., 1, k]."""
    qb, kb = qp // self.block, kp // self.block
    ok = (jnp.abs(qb - kb) <= self.window_blocks // 2) | (qb < self.global_blocks) | (kb < self.global_blocks)
    if self.random_blocks:
      ok = ok | jnp.any(self.draws(qb, causal, kv_len) == kb[..., None], axis=-1)
    return ok

  def draws(self, qb: Array, causal: bool, kv_len: int) -> Array:
    """The random key blocks [..., random_blocks] of query blocks qb (-1: none to draw from)."""
    n = qb if causal else jnp.full_like(qb, -(-kv_len // self.block))
    key = jax.random.PRNGKey(self.seed)
    u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (self.random_blocks,)))(qb.reshape(-1))
    draws = jnp.floor(u.reshape(qb.shape + (-1,)) * n[..., None]).astype(jnp.int32)
    return jnp.where(n[..., None] > 0, draws, -1)


@struct.dataclass
class Mask:
  """Which keys each query attends to: every rule given, combined with AND.

    causal:       kv_pos <= q_pos, or kv_pos < prefix_len (prefix-LM; an int or a [batch] array)
    segment ids:  q_segment == kv_segment, both [batch, seq] (packing); id 0 marks padding
    window:       |q_pos - kv_pos| < window (sliding window; a static int >= 1)
    block_sparse: a static `BlockSparse` (BigBird); XLA computes it densely (the oracle), the Pallas kernels
                  compute only the key blocks it allows
  Positions default to 0..len-1; KV-cache decoding passes absolute positions (broadcastable to
  [batch, seq]), a negative kv position marking an empty cache slot. A pytree: the arrays are leaves,
  `causal` and `window` static.
  """
  causal: bool = struct.field(pytree_node=False, default=False)
  window: Optional[int] = struct.field(pytree_node=False, default=None)
  q_segment_ids: Optional[Array] = None
  kv_segment_ids: Optional[Array] = None
  prefix_len: Optional[Array | int] = None
  q_positions: Optional[Array] = None
  kv_positions: Optional[Array] = None
  block_sparse: Optional[BlockSparse] = struct.field(pytree_node=False, default=None)

  def validate(self, q_shape: tuple[int, ...], k_shape: tuple[int, ...]) -> Mask:
    """Returns self, or raises ValueError naming the bad field; shapes start [batch, seq]."""
    (b, sq), sk = q_shape[:2], k_shape[1]
    if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
      raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    for name, n in [("q_segment_ids", sq), ("kv_segment_ids", sk), ("q_positions", sq), ("kv_positions", sk)]:
      x, full, exact = getattr(self, name), (b, n), name.endswith("segment_ids")
      if x is not None and np.shape(x) != full and (exact or not _broadcasts(np.shape(x), full)):
        raise ValueError(f"{name} must be {'' if exact else 'broadcastable to '}[batch, seq] = {full}; "
                         f"got shape {np.shape(x)}")
    if self.prefix_len is not None and not self.causal:
      raise ValueError("prefix_len only has a meaning with causal=True (prefix-LM)")
    if self.prefix_len is not None and np.shape(self.prefix_len) not in ((), (b,)):
      raise ValueError(f"prefix_len must be an int or a [batch] array; got shape {np.shape(self.prefix_len)}")
    if self.window is not None and (not isinstance(self.window, int | np.integer) or self.window < 1):
      raise ValueError(f"window must be a static int >= 1; got {self.window!r}")
    return self

  def dense(self, batch: int, q_len: int, kv_len: int) -> Optional[Array]:
    """Boolean [batch, 1, q_len, kv_len] (True = attend), or None when nothing is masked."""
    if not (self.causal or self.window is not None or self.q_segment_ids is not None
            or self.kv_positions is not None or self.block_sparse is not None):
      return None
    pos = lambda p, n: jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32) if p is None else p, (batch, n))
    qp, kp = pos(self.q_positions, q_len)[:, :, None], pos(self.kv_positions, kv_len)[:, None, :]
    mask = jnp.broadcast_to(kp >= 0, (batch, q_len, kv_len))
    if self.causal:
      allowed = kp <= qp
      if self.prefix_len is not None:
        prefix = jnp.broadcast_to(jnp.asarray(self.prefix_len, jnp.int32), (batch,))
        allowed = allowed | (kp < prefix[:, None, None])
      mask = mask & allowed
    if self.window is not None:
      mask = mask & (jnp.abs(qp - kp) < self.window)
    if self.block_sparse is not None:
      mask = mask & self.block_sparse.allowed(qp, kp, self.causal, kv_len)
    if self.q_segment_ids is not None:
      mask = mask & (self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :])
    return mask[:, None]
