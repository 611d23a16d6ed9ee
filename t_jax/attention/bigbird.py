"""BigBird block-sparse attention in O(N) memory on the XLA path: gather each query block's key blocks.

Query block i attends the key blocks its `BlockSparse` rule names: the window around i, the global blocks
and its random draws (deduplicated), gathered into [window + global + random] * block keys; global query
blocks (i < global_blocks) attend every key, computed as dense rows. Within the gathered keys the Mask's
rules (causal, prefix, segment ids, window, the pattern itself) apply per position, so the result equals
`xla_attention` with the same Mask, which computes the pattern densely (the oracle).

`t_jax.attention(..., kind='bigbird')` uses this path for implementation 'auto'/'xla'; 'pallas' runs the
flash kernel, which walks a visit table of the same blocks (`t_jax.kernels._blocks.sparse_visits`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t_jax.attention.masks import Mask
from t_jax.attention.xla import xla_attention

Array = jax.Array
_F32 = jnp.float32


def supported(q: Array, k: Array, mask: Mask) -> bool:
  """Self-attention without explicit positions (decoding uses the dense form)."""
  return (mask.block_sparse is not None and q.shape[1] == k.shape[1] and mask.q_positions is None
          and mask.kv_positions is None)


def _candidates(mask: Mask, nb: int, n: int) -> tuple[Array, Array]:
  """Key-block indices [nb, K] per query block and whether each is a first occurrence in range."""
  rule = mask.block_sparse
  i = jnp.arange(nb)[:, None]
  half = rule.window_blocks // 2
  cols = [i + jnp.arange(-half, half + 1)[None], jnp.broadcast_to(jnp.arange(rule.global_blocks), (nb, rule.global_blocks))]
  if rule.random_blocks:
    cols.append(rule.draws(jnp.arange(nb), mask.causal, n))
  idx = jnp.concatenate(cols, axis=1)
  k = idx.shape[1]
  earlier = jnp.tril(jnp.ones((k, k), bool), -1)
  dup = jnp.any((idx[:, :, None] == idx[:, None, :]) & earlier[None], axis=-1)
  return jnp.clip(idx, 0, nb - 1), (idx >= 0) & (idx < nb) & ~dup


def bigbird_attention(q: Array, k: Array, v: Array, *, mask: Mask, scale: float) -> Array:
  """Equals xla_attention(q, k, v, mask=mask, scale=scale) for `supported` calls; [b, n, h, d] in and out."""
  rule = mask.block_sparse
  b, n, h, d = q.shape
  blk = rule.block
  nb = -(-n // blk)
  pad = nb * blk - n
  k, v = jnp.repeat(k, h // k.shape[2], axis=2), jnp.repeat(v, h // v.shape[2], axis=2)
  padded = lambda x, val=0: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=val)
  seg = None if mask.q_segment_ids is None else (padded(mask.q_segment_ids, -1), padded(mask.kv_segment_ids, -2))
  idx, fresh = _candidates(mask, nb, n)  # [nb, K]
  blocks = lambda x: padded(x).reshape((b, nb, blk) + x.shape[2:])
  kg, vg = blocks(k)[:, idx], blocks(v)[:, idx]  # [b, nb, K, blk, h, d]
  qp = jnp.arange(nb * blk).reshape(nb, blk)  # query positions [nb, blk], key positions [nb, K, blk]
  kp = idx[:, :, None] * blk + jnp.arange(blk)
  ok = (fresh[:, :, None] & (kp < n))[:, None] & rule.allowed(qp[:, :, None, None], kp[:, None], mask.causal, n)
  if mask.causal:
    prefix = jnp.broadcast_to(jnp.asarray(0 if mask.prefix_len is None else mask.prefix_len), (b,))
    ok = ok[None] & ((kp[:, None] <= qp[:, :, None, None])[None] | (kp[None, :, None] < prefix[:, None, None, None, None]))
  if mask.window is not None:
    ok = ok & (jnp.abs(qp[:, :, None, None] - kp[:, None]) < mask.window)
  ok = jnp.broadcast_to(ok, (b, nb, blk) + kp.shape[1:])
  if seg is not None:
    qs, ks = seg[0].reshape(b, nb, blk), seg[1].reshape(b, nb, blk)[:, idx]  # [b, nb, K, blk]
    ok = ok & (qs[:, :, :, None, None] == ks[:, :, None])
  ok = ok.reshape(b, nb, blk, -1)  # [b, nb, blk, K * blk]
  qb = padded(q).reshape(b, nb, blk, h, d)
  logits = jnp.einsum("bnqhd,bnkchd->bhnqkc", qb, kg, preferred_element_type=_F32) * scale
  logits = jnp.where(ok[:, None], logits.reshape(logits.shape[:4] + (-1,)), -jnp.inf)
  top = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(ok[:, None], jnp.exp(logits - jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))), 0.0)
  total = jnp.sum(p, axis=-1, keepdims=True)
  p = (p / jnp.where(total == 0, 1.0, total)).reshape(p.shape[:4] + kg.shape[2:4])
  out = jnp.einsum("bhnqkc,bnkchd->bnqhd", p.astype(v.dtype), vg, preferred_element_type=_F32)
  out = out.reshape(b, nb * blk, h, d)[:, :n].astype(q.dtype)
  g = min(rule.global_blocks * blk, n)
  if g:  # global query blocks see every key: dense rows
    rows = xla_attention(q[:, :g], k, v, scale=scale, mask=mask.replace(
        q_segment_ids=None if seg is None else mask.q_segment_ids[:, :g], q_positions=jnp.arange(g)[None]))
    out = out.at[:, :g].set(rows)
  return out
