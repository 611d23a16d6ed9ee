"""Attention Free Transformer (Zhai et al. 2021), AFT-local with a learned relative bias.

  Y_i = sigmoid(Q_i) * sum_j m_ij exp(K_j + w_ij) V_j / sum_j m_ij exp(K_j + w_ij)     (elementwise per channel)
with w_ij = bias[head, i - j] for |i - j| < window and 0 beyond (no bias table: AFT-simple), m the Mask.
`aft_attention` is O(N): the w = 0 part is linear attention with one feature per channel (linear.linear_sums,
so causal, prefix-LM and segment runs come for free), plus 2 window - 1 shifted corrections. `aft_dense` is
the O(N^2) form, used when decoding against a KV cache (explicit positions).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from t_jax.attention.linear import linear_sums
from t_jax.attention.masks import Mask

Array = jax.Array
_F32 = jnp.float32


def _expand(q: Array, k: Array, v: Array) -> tuple[Array, Array]:
  g = q.shape[2] // k.shape[2]
  return jnp.repeat(k, g, axis=2).astype(_F32), jnp.repeat(v, g, axis=2).astype(_F32)


def _pair_mask(mask: Mask, b: int, n: int, delta: int) -> Array:
  """m[b, i] for the pair (i, i - delta) of one sequence, by the Mask's rules (no window)."""
  i = jnp.arange(n)
  j = jnp.clip(i - delta, 0, n - 1)
  pos = lambda p: jnp.broadcast_to(jnp.arange(n) if p is None else p, (b, n))
  qp, kp = pos(mask.q_positions), jnp.take(pos(mask.kv_positions), j, axis=1)
  ok = ((i - delta >= 0) & (i - delta < n))[None] & (kp >= 0)
  if mask.causal:
    allowed = kp <= qp
    if mask.prefix_len is not None:
      allowed = allowed | (kp < jnp.broadcast_to(jnp.asarray(mask.prefix_len), (b,))[:, None])
    ok = ok & allowed
  if mask.q_segment_ids is not None:
    ok = ok & (mask.q_segment_ids == jnp.take(mask.kv_segment_ids, j, axis=1))
  return ok


def aft_attention(q: Array, k: Array, v: Array, *, mask: Mask, bias: Optional[Array] = None,
                  chunk: int = 64) -> Array:
  """AFT over q [b, n, h, d], k/v [b, n, hkv, d] of one sequence; bias [h, 2 window - 1] or None."""
  if mask.kv_positions is not None:
    return aft_dense(q, k, v, mask=mask, bias=bias)
  b, n, h, d = q.shape
  k, v = _expand(q, k, v)
  ek = jnp.exp(k - jax.lax.stop_gradient(jnp.max(k, axis=1, keepdims=True)))  # a per-channel constant cancels
  flat = lambda x: x.reshape(b, x.shape[1], h * d, 1)
  num, den, _ = linear_sums(jnp.ones((b, n, h * d, 1), _F32), flat(ek), flat(v), mask, chunk)
  num, den = num.reshape(b, n, h, d), den.reshape(b, n, h, d)
  if bias is not None:
    s = (bias.shape[1] + 1) // 2
    coef = jnp.exp(bias.astype(_F32)) - 1.0  # [h, 2s - 1]: the bias' change over w = 0
    for delta in range(-(s - 1), s):
      if abs(delta) >= n:
        continue
      c = coef[:, delta + s - 1][None, None, :, None] * _pair_mask(mask, b, n, delta)[:, :, None, None]
      # row i of the rolled arrays holds key i - delta (wrapped rows are masked)
      num, den = num + c * jnp.roll(ek * v, delta, axis=1), den + c * jnp.roll(ek, delta, axis=1)
  return (jax.nn.sigmoid(q.astype(_F32)) * num / jnp.where(den == 0, 1.0, den)).astype(q.dtype)


def aft_dense(q: Array, k: Array, v: Array, *, mask: Mask, bias: Optional[Array] = None) -> Array:
  """The same, O(N^2): [b, n, m, h, d] weights; any positions (KV-cache decoding)."""
  b, n, h, d = q.shape
  m = k.shape[1]
  k, v = _expand(q, k, v)
  allowed = mask.dense(b, n, m)
  allowed = jnp.ones((b, n, m), bool) if allowed is None else allowed[:, 0]
  logits = jnp.broadcast_to(k[:, None], (b, n, m, h, d))
  if bias is not None:
    s = (bias.shape[1] + 1) // 2
    pos = lambda p, L: jnp.broadcast_to(jnp.arange(L) if p is None else p, (b, L))
    rel = pos(mask.q_positions, n)[:, :, None] - pos(mask.kv_positions, m)[:, None, :]
    w = jnp.where(jnp.abs(rel)[..., None] < s, bias.astype(_F32).T[jnp.clip(rel + s - 1, 0, 2 * s - 2)], 0.0)
    logits = logits + w[..., None]
  logits = jnp.where(allowed[..., None, None], logits, -jnp.inf)
  top = jnp.max(logits, axis=2, keepdims=True)
  wts = jnp.exp(logits - jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0)))
  num, den = jnp.einsum("bqkhd,bkhd->bqhd", wts, v), jnp.sum(wts, axis=2)
  return (jax.nn.sigmoid(q.astype(_F32)) * num / jnp.where(den == 0, 1.0, den)).astype(q.dtype)
