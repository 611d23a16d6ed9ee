"""Static kernel configuration, block ranges for skipping masked blocks, and the in-block mask.

Shared by the Triton (GPU, also run in interpret mode on CPU) and Mosaic TPU kernels. The range
helpers take int32 scalars (or arrays, elementwise) and use only min/max/non-negative division, which
lower on every Pallas backend.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


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
  heads: int
  kv_heads: int
  scale: float
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  num_warps: int
  num_stages: int
  num_warps_bwd: int
  exact_f32: bool         # f32 inputs: IEEE f32 matmuls (no TF32)

  @property
  def group(self) -> int:
    """Query heads per kv head."""
    return self.heads // self.kv_heads

  @property
  def any_mask(self) -> bool:
    """Whether any rule (or kv padding) can mask an entry."""
    return (self.causal or self.window is not None or self.has_segments
            or self.kv_len != self.kv_len_padded)


def idiv(x: Array, d: int) -> Array:
  """x // d for a non-negative int32 scalar (lowers on every backend, unlike jnp's floor_divide)."""
  return lax.div(x, jnp.int32(d))


def _div(x: Array, d: int) -> Array:
  """floor(max(x, 0) / d) for int32 x (truncating division on a non-negative value)."""
  return lax.div(jnp.maximum(x, 0), jnp.int32(d))


def _cdiv(x: Array, d: int) -> Array:
  """ceil(max(x, 0) / d)."""
  return _div(x + (d - 1), d)


def _clip(x: Array, lo: Array, hi: Array) -> Array:
  return jnp.minimum(jnp.maximum(x, lo), hi)


def kv_range(cfg: Config, qi: Array, bq: int, bk: int, prefix: Optional[Array]
             ) -> tuple[Array, Array, Array, Array]:
  """kv-block bounds (lo, full_lo, full_hi, hi) for q block `qi`.

  Blocks outside [lo, hi) are fully masked (skipped); blocks in [full_lo, full_hi) are fully visible
  (no mask needed); lo <= full_lo <= full_hi <= hi.
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
    w = cfg.window
    lo = jnp.maximum(lo, _div(q0 - w + 1, bk))
    hi = jnp.minimum(hi, _cdiv(q1 + w, bk))
    full_lo = jnp.maximum(full_lo, _cdiv(q1 - w + 1, bk))
    full_hi = jnp.minimum(full_hi, _div(q0 + w, bk))
  if cfg.has_segments:
    full_lo = full_hi = lo
  hi = jnp.maximum(hi, lo)
  full_lo = _clip(full_lo, lo, hi)
  full_hi = _clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def q_range(cfg: Config, kj: Array, bq: int, bk: int, prefix: Optional[Array]
            ) -> tuple[Array, Array, Array, Array]:
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
    w = cfg.window
    lo = jnp.maximum(lo, _div(k0 - w + 1, bq))
    hi = jnp.minimum(hi, _cdiv(k1 + w, bq))
    full_lo = jnp.maximum(full_lo, _cdiv(k1 - w + 1, bq))
    full_hi = jnp.minimum(full_hi, _div(k0 + w, bq))
  if cfg.has_segments:
    full_lo = full_hi = lo
  # A kv block holding padding columns always needs the mask.
  full_hi = jnp.where(k1 >= cfg.kv_len, lo, full_hi)
  hi = jnp.maximum(hi, lo)
  full_lo = _clip(full_lo, lo, hi)
  full_hi = _clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


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
