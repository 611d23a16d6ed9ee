"""Static kernel configuration and shared tile math, block ranges for skipping masked blocks, in-block mask,
and BigBird's visit tables (the key blocks each query block visits; `sparse_visits`).

Shared by the Triton (GPU, also run in interpret mode on CPU) and Mosaic TPU kernels. The range
helpers take int32 scalars (or arrays, elementwise) and use only min/max/non-negative division, which
lower on every Pallas backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything static about one flash-attention call (hashable: a custom_vjp nondiff argument)."""
  backend: str            # "triton" or "mosaic_tpu"
  interpret: bool
  causal: bool
  window: Optional[int]
  has_prefix: bool
  has_segments: bool
  has_bias: bool
  bias_batch: bool        # bias has a real (non-broadcast) batch dim
  bias_heads: bool        # bias has a real (non-broadcast) head dim
  q_len: int              # true lengths; the arrays the kernels see are padded to block multiples
  kv_len: int
  q_len_padded: int
  kv_len_padded: int
  num_heads: int
  num_kv_heads: int
  scale: float
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  num_warps: int
  num_stages: int
  num_warps_bwd: int
  exact_f32: bool         # f32 inputs: IEEE f32 matmuls (no TF32)
  block_sparse: Optional[Any] = None  # a `BlockSparse` rule (BigBird); its block is a multiple of every block

  @property
  def group(self) -> int:
    """Query heads per kv head."""
    return self.num_heads // self.num_kv_heads

  @property
  def any_mask(self) -> bool:
    """Whether any rule (or kv padding) can mask an entry."""
    return (self.causal or self.window is not None or self.has_segments
            or self.kv_len != self.kv_len_padded)

  def dot(self, a: Array, b: Array, ca: int, cb: int) -> Array:
    """a·b contracting dim `ca` of a with dim `cb` of b, accumulated in f32."""
    prec = lax.Precision.HIGHEST if self.exact_f32 else None
    return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), precision=prec, preferred_element_type=_F32)

  def bias_index(self, b: Array, h: Array) -> tuple:
    """The (batch, head) block index into the bias: 0 along a broadcast dim."""
    return (b if self.bias_batch else 0, h if self.bias_heads else 0)

  def probs_and_ds(self, q: Array, k: Array, v: Array, do: Array, lse: Array, delta: Array,
                   bias: Optional[Array], mask: Optional[Array]) -> tuple[Array, Array]:
    """Recomputes a tile's probabilities p and ds = dL/dlogits = p * (dO v^T - delta); lse, delta [bq, 1]."""
    s = self.dot(q, k, 1, 1) * self.scale
    if bias is not None:
      s = s + bias.astype(_F32)
    p = jnp.exp(s - lse)
    if mask is not None:
      p = jnp.where(mask, p, 0.0)
    return p, p * (self.dot(do, v, 1, 1) - delta)


def idiv(x: Array, d: int) -> Array:
  """x // d for a non-negative int32 scalar (lowers on every backend, unlike jnp's floor_divide)."""
  return lax.div(x, jnp.int32(d))


def _div(x: Array, d: int) -> Array:
  """floor(max(x, 0) / d) for int32 x (truncating division on a non-negative value)."""
  return lax.div(jnp.maximum(x, 0), jnp.int32(d))


def _cdiv(x: Array, d: int) -> Array:
  """ceil(max(x, 0) / d)."""
  return _div(x + (d - 1), d)


Bounds = tuple[Array, Array, Array, Array]


def _window(lo: Array, full_lo: Array, full_hi: Array, hi: Array, x0: Array, x1: Array, w: int, blk: int
            ) -> Bounds:
  """Narrows bounds over blocks of size `blk` to those within the window w of positions x0..x1 (symmetric)."""
  return (jnp.maximum(lo, _div(x0 - w + 1, blk)), jnp.maximum(full_lo, _cdiv(x1 - w + 1, blk)),
          jnp.minimum(full_hi, _div(x0 + w, blk)), jnp.minimum(hi, _cdiv(x1 + w, blk)))


def _intersect(cfg: Config, lo: Array, full_lo: Array, full_hi: Array, hi: Array, seg: Optional[Bounds]
               ) -> Bounds:
  """Narrows the bounds by the segment-id bounds `seg` (if any) and makes lo <= full_lo <= full_hi <= hi."""
  assert cfg.has_segments == (seg is not None), "segment ids need their block bounds"
  if seg is not None:
    lo, full_lo = jnp.maximum(lo, seg[0]), jnp.maximum(full_lo, seg[1])
    full_hi, hi = jnp.minimum(full_hi, seg[2]), jnp.minimum(hi, seg[3])
  hi = jnp.maximum(hi, lo)
  full_lo = jnp.clip(full_lo, lo, hi)
  full_hi = jnp.clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def kv_range(cfg: Config, qi: Array, bq: int, bk: int, prefix: Optional[Array], seg: Optional[Bounds] = None
             ) -> Bounds:
  """kv-block bounds (lo, full_lo, full_hi, hi) for q block `qi`.

  Blocks outside [lo, hi) are fully masked (skipped); blocks in [full_lo, full_hi) are fully visible
  (no mask needed); lo <= full_lo <= full_hi <= hi. With segment ids, `seg` is this q block's row of
  `segment_bounds` (required: without it every block would count as visible).
  """
  q0 = qi * bq                      # first and last query position of the block
  q1 = q0 + (bq - 1)
  zero = jnp.zeros_like(qi)
  lo, hi = zero, zero + _cdiv(jnp.int32(cfg.kv_len), bk)
  full_lo, full_hi = zero, zero + cfg.kv_len // bk
  if cfg.causal:
    c_hi, c_full = _cdiv(q1 + 1, bk), _div(q0 + 1, bk)
    if prefix is not None:
      c_hi, c_full = jnp.maximum(c_hi, _cdiv(prefix, bk)), jnp.maximum(c_full, _div(prefix, bk))
    hi, full_hi = jnp.minimum(hi, c_hi), jnp.minimum(full_hi, c_full)
  if cfg.window is not None:
    lo, full_lo, full_hi, hi = _window(lo, full_lo, full_hi, hi, q0, q1, cfg.window, bk)
  return _intersect(cfg, lo, full_lo, full_hi, hi, seg)


def q_range(cfg: Config, kj: Array, bq: int, bk: int, prefix: Optional[Array], seg: Optional[Bounds] = None
            ) -> Bounds:
  """q-block bounds (lo, full_lo, full_hi, hi) for kv block `kj`; same contract as `kv_range`."""
  k0 = kj * bk
  k1 = k0 + (bk - 1)
  zero = jnp.zeros_like(kj)
  lo, hi = zero, zero + _cdiv(jnp.int32(cfg.q_len), bq)
  full_lo, full_hi = zero, hi
  if cfg.causal:
    c_lo, c_full = _div(k0, bq), _cdiv(k1, bq)
    if prefix is not None:
      c_lo = jnp.where(k0 < prefix, 0, c_lo)
      c_full = jnp.where(k1 < prefix, 0, c_full)
    lo, full_lo = jnp.maximum(lo, c_lo), jnp.maximum(full_lo, c_full)
  if cfg.window is not None:
    lo, full_lo, full_hi, hi = _window(lo, full_lo, full_hi, hi, k0, k1, cfg.window, bq)
  # A kv block holding padding columns always needs the mask.
  full_hi = jnp.where(k1 >= cfg.kv_len, lo, full_hi)
  return _intersect(cfg, lo, full_lo, full_hi, hi, seg)


def segment_block_bounds(cfg: Config, q_seg: Optional[Array], kv_seg: Optional[Array], bq: int, bk: int,
                         by_kv: bool = False) -> Optional[Array]:
  """`segment_bounds` per q block (kv-block ranges) or, by_kv, per kv block; None without segment ids."""
  if not cfg.has_segments:
    return None
  if by_kv:
    return segment_bounds(kv_seg, q_seg, cfg.kv_len, cfg.q_len, bk, bq)
  return segment_bounds(q_seg, kv_seg, cfg.q_len, cfg.kv_len, bq, bk)


def _block_min_max(ids: Array, length: int, blk: int) -> tuple[Array, Array]:
  """Per-block min and max segment id [B, n // blk] over the first `length` (real) positions."""
  b, n = ids.shape
  real = (jnp.arange(n) < length).reshape(n // blk, blk)
  ids = ids.reshape(b, n // blk, blk)
  big = jnp.iinfo(jnp.int32).max
  return jnp.where(real, ids, big).min(-1), jnp.where(real, ids, -big).max(-1)


def _matching_span(row_ids: Array, col_ids: Array) -> tuple[Array, Array]:
  """For each row position [B, R]: the first and last column position with the same id (C and -1 if none)."""
  n = col_ids.shape[1]
  order = jnp.argsort(col_ids, axis=1, stable=True)        # equal ids keep their position order
  sorted_ids = jnp.take_along_axis(col_ids, order, axis=1)
  search = jax.vmap(lambda a, v, side: jnp.searchsorted(a, v, side=side), (0, 0, None))
  left, right = search(sorted_ids, row_ids, "left"), search(sorted_ids, row_ids, "right")
  first = jnp.take_along_axis(order, jnp.minimum(left, n - 1), axis=1)
  last = jnp.take_along_axis(order, jnp.maximum(right - 1, 0), axis=1)
  found = right > left
  return jnp.where(found, first, n), jnp.where(found, last, -1)


def segment_bounds(row_ids: Array, col_ids: Array, row_len: int, col_len: int, row_blk: int, col_blk: int
                   ) -> Array:
  """Block bounds that segment ids allow: int32 [B, n_row_blocks, 4] of (lo, full_lo, full_hi, hi).

  Run outside the kernels, in O(S log S). For each row block (a q block, or a kv block with the roles
  swapped), column blocks outside [lo, hi) hold no id of the row block: [lo, hi) spans from the first
  to the last column position matching any of its rows, so any ids are safe and ids that form runs
  (packing, including a trailing padding run) are tight. Blocks in [full_lo, full_hi) hold only the
  row block's single id. Padding positions (past row_len / col_len) are ignored.
  """
  n_row, n_col = row_ids.shape[1], col_ids.shape[1]
  first, last = _matching_span(row_ids[:, :row_len], col_ids[:, :col_len])
  pad = ((0, 0), (0, n_row - row_len))
  first = jnp.pad(first, pad, constant_values=n_col).reshape(-1, n_row // row_blk, row_blk).min(-1)
  last = jnp.pad(last, pad, constant_values=-1).reshape(-1, n_row // row_blk, row_blk).max(-1)
  lo, hi = lax.div(first, col_blk), lax.div(last + col_blk, col_blk)
  rmin, rmax = _block_min_max(row_ids, row_len, row_blk)
  cmin, cmax = _block_min_max(col_ids, col_len, col_blk)
  full = (rmin == rmax)[:, :, None] & (cmin == cmax)[:, None, :] & (rmin[:, :, None] == cmin[:, None, :])
  j = jnp.arange(n_col // col_blk, dtype=jnp.int32)
  full_lo = jnp.where(full, j, j.size).min(-1)
  full_hi = jnp.where(~full & (j > full_lo[..., None]), j, j.size).min(-1)  # first non-full block after
  return jnp.stack([lo, full_lo, full_hi, hi], axis=-1).astype(jnp.int32)


def sparse_blocks(cfg: Config, batch: int, bq: int, bk: int, prefix: Optional[Array], seg: Optional[Array]
                  ) -> Array:
  """Boolean [batch, q blocks, kv blocks]: the tiles BigBird's rule visits. The kernel blocks divide the
  rule's block, so the rule is uniform on each tile and is read at one position per tile; the tiles are
  narrowed by `kv_range` (causal, window, prefix, segment ids from `seg`, this layout's
  `segment_block_bounds`) and to real query and key blocks."""
  nq, nk = cfg.q_len_padded // bq, cfg.kv_len_padded // bk
  qi = jnp.arange(nq, dtype=jnp.int32)[None, :, None]
  kj = jnp.arange(nk, dtype=jnp.int32)[None, None, :]
  seg = None if seg is None else tuple(seg[..., c, None] for c in range(4))
  lo, _, _, hi = kv_range(cfg, qi, bq, bk, None if prefix is None else prefix[:, None, None], seg)
  visit = cfg.block_sparse.allowed(qi * bq, kj * bk, cfg.causal, cfg.kv_len)
  return jnp.broadcast_to(visit & (kj >= lo) & (kj < hi) & (qi * bq < cfg.q_len), (batch, nq, nk))


def sparse_visits(cfg: Config, batch: int, bq: int, bk: int, prefix: Optional[Array], seg: Optional[Array],
                  by_kv: bool = False) -> tuple[Array, Array]:
  """BigBird's visit table: int32 [batch, rows, cols] whose first count[b, row] entries (ascending) are the
  column blocks row block `row` visits, and count [batch, rows]; rows are q blocks, or kv blocks by_kv (the
  transpose of `sparse_blocks`)."""
  visit = sparse_blocks(cfg, batch, bq, bk, prefix, seg)
  if by_kv:
    visit = jnp.swapaxes(visit, 1, 2)
  table = jnp.argsort(~visit, axis=-1, stable=True).astype(jnp.int32)  # visited blocks first, in order
  return table, jnp.sum(visit, axis=-1, dtype=jnp.int32)


def block_mask(cfg: Config, q_pos: Array, kv_pos: Array, q_seg: Optional[Array], kv_seg: Optional[Array],
               prefix: Optional[Array]) -> Array:
  """Boolean [bq, bk] mask (True = attend) from q positions [bq, 1] and kv positions [1, bk]."""
  mask = kv_pos < cfg.kv_len
  if cfg.causal:
    allowed = kv_pos <= q_pos
    if prefix is not None:
      allowed = allowed | (kv_pos < prefix)
    mask = mask & allowed
  if cfg.window is not None:
    diff = q_pos - kv_pos
    mask = mask & (diff < cfg.window) & (diff > -cfg.window)
  if q_seg is not None:
    mask = mask & (q_seg == kv_seg)
  return mask


def online_softmax_step(s: Array, v: Array, m_sc: Any, l_sc: Any, acc_sc: Any, dot: Callable) -> None:
  """Folds one block of scores s [rows, keys] (masked entries -inf) and its values v into the running max
  m_sc, sum l_sc and output acc_sc (VMEM scratch refs) of the online softmax; dot(a, b, contract_a, contract_b)."""
  m_prev = m_sc[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  p = jnp.exp(s - shift)
  alpha = jnp.exp(m_prev - shift)
  l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
  acc_sc[...] = acc_sc[...] * alpha + dot(p.astype(v.dtype), v, 1, 0)
  m_sc[...] = m_new
