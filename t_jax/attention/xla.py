"""The XLA reference: plain einsums and a float32 softmax. Every kernel is tested against it."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from t_jax.attention.masks import Mask

Array = jnp.ndarray


def xla_attention(q: Array, k: Array, v: Array, *, mask: Optional[Mask] = None, bias: Optional[Array] = None,
                  scale: float, dropout_rate: float = 0.0, dropout_rng: Optional[Array] = None) -> Array:
  """softmax(q k^T * scale + bias, masked) v with GQA by grouping; fully masked rows give 0."""
  b, sq, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  # The GQA group axis goes after the queries, and is left out without GQA: the group axis before the queries
  # made XLA:CPU's forward+backward 1.3x slower with GQA and 2x slower with size 1 (benchmarks/NOTES.md).
  gx = "g" if g > 1 else ""
  mask = None if mask is None else mask.dense(b, sq, k.shape[1])
  qg = q.reshape(b, sq, hkv, g, d) if g > 1 else q
  logits = jnp.einsum(f"bqh{gx}d,bkhd->bhq{gx}k", qg, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    bias = jnp.broadcast_to(bias, (b, h, sq, k.shape[1])).astype(jnp.float32)
    logits = logits + bias.reshape(b, hkv, g, sq, -1).swapaxes(2, 3).reshape(logits.shape)
  if mask is not None:
    m = mask[..., None, :] if g > 1 else mask  # [b, 1, q, (1,) k]
    logits = jnp.where(m, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(m, jnp.exp(logits - jax.lax.stop_gradient(row_max)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
  else:
    p = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, p.shape)
    p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum(f"bhq{gx}k,bkhd->bqh{gx}d", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, sq, h, v.shape[-1]).astype(q.dtype)
