"""Reformer LSH attention (Kitaev et al. 2020): shared-QK, n hash rounds, bucket sort, chunked attention.

Keys are the unit-normalised queries. Each round hashes every position by a random rotation
(argmax over [xR, -xR], `num_buckets` buckets), sorts by (bucket, position), cuts the sorted order into
chunks of `chunk` positions and lets each chunk attend to itself and the chunk before it. The Mask's
rules (causal, prefix, segments, window) apply to the original positions, so causal queries never see
the future. A position attends to itself only when nothing else is allowed. The rounds are combined by
their log-sum-exp weights. With a KV cache (explicit positions) `lsh_attention` attends densely to the
cached keys that share a bucket with the query in the round: generation without chunk boundaries.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from t_jax.attention.masks import Mask

Array = jax.Array
_F32 = jnp.float32
SELF = -1e5  # Reformer's logit for attending to oneself


def hash_buckets(x: Array, rotations: Array) -> Array:
  """Buckets [b, h, rounds, n] of x [b, n, h, d]; rotations [d, rounds, buckets // 2] (None: one bucket)."""
  if rotations is None:
    return jnp.zeros((x.shape[0], x.shape[2], 1, x.shape[1]), jnp.int32)
  proj = jnp.einsum("bnhd,dre->bhrne", x.astype(_F32), rotations)
  return jnp.argmax(jnp.concatenate([proj, -proj], axis=-1), axis=-1).astype(jnp.int32)


def draw_rotations(key: Array, dim: int, num_hashes: int, num_buckets: int) -> Array | None:
  """Random rotations for `hash_buckets` (None when num_buckets is 1)."""
  return None if num_buckets == 1 else jax.random.normal(key, (dim, num_hashes, num_buckets // 2), _F32)


def _rules(mask: Mask, qp: Array, kp: Array, qs: Array, ks: Array, prefix: Array) -> Array:
  """The Mask's rules on gathered positions/segments (broadcasting); kp < 0 marks an empty key."""
  ok = kp >= 0
  if mask.causal:
    ok = ok & ((kp <= qp) | (kp < prefix))
  if mask.window is not None:
    ok = ok & (jnp.abs(qp - kp) < mask.window)
  return ok & (qs == ks)


def _attend(q: Array, k: Array, v: Array, ok: Array, is_self: Array, scale: float) -> tuple[Array, Array]:
  """Masked softmax attention over the last key axis: (out, log-sum-exp); shapes [..., q, d] / [..., k, d]."""
  logits = jnp.einsum("...qd,...kd->...qk", q, k) * scale
  logits = jnp.where(is_self, SELF, logits)
  logits = jnp.where(ok, logits, -jnp.inf)
  top = jnp.max(logits, axis=-1, keepdims=True)
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  p = jnp.where(ok, jnp.exp(logits - top), 0.0)  # relative to the max: exact even near SELF
  total = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("...qk,...kd->...qd", p / jnp.where(total == 0, 1.0, total), v)
  return out, jnp.where(total[..., 0] > 0, top[..., 0] + jnp.log(total[..., 0]), -jnp.inf)


def _combine(out: Array, lse: Array, axis: int) -> Array:
  """Rounds weighted by softmax of their log-sum-exp; rows with nothing to attend give 0."""
  top = jnp.max(lse, axis=axis, keepdims=True)
  w = jnp.exp(lse - jnp.where(jnp.isfinite(top), top, 0.0))
  w = w / jnp.where(jnp.sum(w, axis=axis, keepdims=True) == 0, 1.0, jnp.sum(w, axis=axis, keepdims=True))
  return jnp.sum(out * w[..., None], axis=axis)


def lsh_attention(q: Array, k: Array, v: Array, *, mask: Mask, scale: float, rotations: Array | None,
                  chunk: int = 64) -> Array:
  """q [b, n, h, d]; k the (shared-QK) keys [b, m, h, d], = q unless decoding; v [b, m, hkv, dv]."""
  b, n, h, d = q.shape
  m = k.shape[1]
  v = jnp.repeat(v, h // v.shape[2], axis=2)
  pos = lambda p, L: jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32) if p is None else p, (b, L))
  qp, kp = pos(mask.q_positions, n), pos(mask.kv_positions, m)
  qs = jnp.zeros((b, n), jnp.int32) if mask.q_segment_ids is None else mask.q_segment_ids
  ks = jnp.zeros((b, m), jnp.int32) if mask.kv_segment_ids is None else mask.kv_segment_ids
  prefix = jnp.broadcast_to(jnp.asarray(0 if mask.prefix_len is None else mask.prefix_len), (b,))
  unit = lambda x: (x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)).astype(_F32)
  qf, kf, vf = q.astype(_F32), unit(k), v.astype(_F32)
  if mask.kv_positions is not None:  # decoding against a cache: dense, restricted to shared buckets
    qb, kb = hash_buckets(q, rotations), hash_buckets(k, rotations)  # [b, h, r, n] / [b, h, r, m]
    ok = (_rules(mask, qp[:, :, None], kp[:, None], qs[:, :, None], ks[:, None], prefix[:, None, None])[:, None, None]
          & (qb[..., :, None] == kb[..., None, :]))
    is_self = (qp[:, :, None] == kp[:, None])[:, None, None]
    t = lambda x: jnp.moveaxis(x, 2, 1)[:, :, None]  # [b, h, 1, L, d]
    out, lse = _attend(t(qf), t(kf), t(vf), ok, is_self, scale)  # [b, h, r, n, d]
    return jnp.moveaxis(_combine(out, lse, 2), 1, 2).astype(q.dtype)
  c = min(chunk, n)
  pad = -n % c
  padded = lambda x, val=0: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=val)
  qf, kf, vf, qs, ks, qp = padded(qf), padded(kf), padded(vf), padded(qs), padded(ks), padded(qp)
  kp = padded(kp, -1)
  np_ = n + pad
  buckets = hash_buckets(padded(q), rotations)  # [b, h, r, np]
  r = buckets.shape[2]
  order = jnp.argsort(buckets * np_ + jnp.arange(np_), axis=-1)  # per round: by bucket, then position
  idx = order.reshape(b, h, r * (np_ // c), c)  # chunks of positions
  heads = lambda x: jnp.moveaxis(x, 2, 1)  # [b, np, h, d] -> [b, h, np, d]
  take = lambda x: jax.vmap(jax.vmap(lambda a, i: a[i]))(heads(x), idx)  # [b, h, chunks, c, d]
  takeb = lambda x: jax.vmap(lambda a, i: a[i], (0, 0))(x, idx)  # [b, np] -> [b, h, chunks, c]
  back = lambda x: jnp.concatenate([x, jnp.roll(x, 1, axis=2)], axis=3)  # + the previous chunk
  qc, kc, vc = take(qf), back(take(kf)), back(take(vf))
  qpc, kpc, qsc, ksc = takeb(qp), back(takeb(kp)), takeb(qs), back(takeb(ks))
  ok = _rules(mask, qpc[..., :, None], kpc[..., None, :], qsc[..., :, None], ksc[..., None, :],
              prefix[:, None, None, None, None])
  out, lse = _attend(qc, kc, vc, ok, qpc[..., :, None] == kpc[..., None, :], scale)
  # Undo the sort: each round's result back at its position, then combine the rounds.
  inv = jnp.argsort(order, axis=-1)  # [b, h, r, np]
  out = jnp.take_along_axis(out.reshape(b, h, r, np_, -1), inv[..., None], axis=3)
  lse = jnp.take_along_axis(lse.reshape(b, h, r, np_), inv, axis=3)
  return jnp.moveaxis(_combine(out, lse, 2), 1, 2)[:, :n].astype(q.dtype)
