"""Random-feature linear attention: Performer's FAVOR+ and RFA, bidirectional, causal and recurrent.

softmax(q k^T) v is approximated by phi(q) [phi(k)^T v] / phi(q) [phi(k)^T 1]:
  performer  phi(x) = exp(W x - |x|^2 / 2) / sqrt(m), W: m orthogonalised Gaussian rows scaled to chi norms
             (Choromanski et al. 2021, positive random features); estimates exp(q.k * scale).
  rfa        phi(x) = [sin(W x), cos(W x)] / sqrt(m) on unit-norm q, k, W ~ N(0, sigma^2 I) (Peng et al. 2021);
             estimates exp(sigma^2 q.k / |q||k|), so the scale argument is unused.
`linear_sums` is the engine (AFT reuses it): causal sums run as a scan over chunks (a chunk-sized quadratic
block plus a carried [features, head_dim] state), O(N) memory; the carried state is also the recurrent
decoding state. Segment ids must form runs (packing, padding), as the data pipeline writes them.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from t_jax.attention.masks import Mask

Array = jax.Array
_F32 = jnp.float32


def draw_features(key: Array, kind: str, num: int, dim: int, sigma: float = 1.0) -> Array:
  """The projection W [num, dim]: orthogonal blocks with chi-distributed row norms (performer) or sigma * N(0, I)."""
  if kind == "rfa":
    return sigma * jax.random.normal(key, (num, dim), _F32)
  k_rows, k_norm = jax.random.split(key)
  def orthogonal(k: Array) -> Array:  # Haar-distributed rows: QR's Q with the signs of R's diagonal
    q, r = jnp.linalg.qr(jax.random.normal(k, (dim, dim), _F32))
    return (q * jnp.sign(jnp.diag(r))).T

  blocks = [orthogonal(k) for k in jax.random.split(k_rows, -(-num // dim))]
  norms = jnp.linalg.norm(jax.random.normal(k_norm, (num, dim), _F32), axis=1)
  return jnp.concatenate(blocks)[:num] * norms[:, None]


def feature_map(x: Array, w: Array, kind: str, scale: float, is_query: bool) -> Array:
  """phi(x) [..., F] for x [..., dim] (F = num for performer, 2 num for rfa), in float32."""
  x = x.astype(_F32)
  if kind == "rfa":
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
    proj = x @ w.T
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], -1) / math.sqrt(w.shape[0])
  x = x * math.sqrt(scale)
  proj = x @ w.T - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  if is_query:  # a per-query constant cancels in the ratio; keys stay unstabilised so the state can grow
    proj = proj - jax.lax.stop_gradient(jnp.max(proj, axis=-1, keepdims=True))
  return jnp.exp(proj) / math.sqrt(w.shape[0])


def _scan(fq: Array, fk: Array, v: Array, qs: Array, ks: Array, chunk: int, strict: bool,
          state: Optional[tuple[Array, Array]]) -> tuple[Array, Array, tuple[Array, Array]]:
  """Causal sums over keys j <= i (j < i if strict) of the query's segment run: (num, den, final state)."""
  b, n, h, f = fq.shape
  dv = v.shape[-1]
  c = min(chunk, n)
  pad = -n % c
  padded = lambda x, val=0: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=val)
  split = lambda x: jnp.moveaxis(x.reshape((b, -1, c) + x.shape[2:]), 1, 0)
  xs = [split(padded(a)) for a in (fq, fk, v)] + [split(padded(qs, -1)), split(padded(ks, -1))]
  tri = jnp.tril(jnp.ones((c, c), bool), -1 if strict else 0)
  if state is None:
    state = (jnp.zeros((b, h, f, dv), _F32), jnp.zeros((b, h, f), _F32))
  carry0 = (state[0], state[1], ks[:, 0])  # a given state belongs to the first run

  def body(carry: tuple, x: tuple) -> tuple:
    s, z, cseg = carry
    q_c, k_c, v_c, qs_c, ks_c = x
    same = (qs_c[:, :, None] == ks_c[:, None, :]) & tri  # [b, c, c]
    a = jnp.einsum("bqhf,bkhf->bhqk", q_c, k_c) * same[:, None]
    from_state = (qs_c == cseg[:, None])[:, :, None]  # [b, c, 1]
    num = jnp.einsum("bhqk,bkhd->bqhd", a, v_c) + jnp.einsum("bqhf,bhfd->bqhd", q_c, s) * from_state[..., None]
    den = jnp.einsum("bhqk->bqh", a) + jnp.einsum("bqhf,bhf->bqh", q_c, z) * from_state
    last = ks_c[:, -1]
    keep = (cseg == last)[:, None, None]
    in_last = (ks_c == last[:, None])[:, :, None, None]
    s = s * keep[..., None] + jnp.einsum("bkhf,bkhd->bhfd", k_c * in_last, v_c)
    z = z * keep + jnp.einsum("bkhf->bhf", k_c * in_last)
    return (s, z, last), (num, den)

  (s, z, _), (num, den) = jax.lax.scan(body, carry0, tuple(xs))
  unsplit = lambda x: jnp.moveaxis(x, 0, 1).reshape((b, -1) + x.shape[3:])[:, :n]
  return unsplit(num), unsplit(den), (s, z)


def linear_sums(fq: Array, fk: Array, v: Array, mask: Mask, chunk: int,
                state: Optional[tuple[Array, Array]] = None) -> tuple[Array, Array, tuple[Array, Array]]:
  """sum_j m_ij phi(q_i).phi(k_j) v_j and sum_j m_ij phi(q_i).phi(k_j) for the mask m; fq [b, n, h, F],
  fk [b, m, h, F], v [b, m, h, dv]. Returns (num [b, n, h, dv], den [b, n, h], state after all keys).

  Causal (optionally prefix-LM), or bidirectional over q and kv of one sequence; segment ids as runs.
  Explicit positions only mark empty keys (< 0): new tokens come in order (recurrent decoding). `state`
  (sum phi(k) v^T [b, h, F, dv], sum phi(k) [b, h, F]) continues a causal sequence. No window.
  """
  b, n = fq.shape[:2]
  m = fk.shape[1]
  ks = mask.kv_segment_ids if mask.kv_segment_ids is not None else jnp.ones((b, m), jnp.int32)
  qs = mask.q_segment_ids if mask.q_segment_ids is not None else jnp.ones((b, n), jnp.int32)
  kp = jnp.broadcast_to(jnp.arange(m) if mask.kv_positions is None else mask.kv_positions, (b, m))
  fk = jnp.where((kp >= 0)[:, :, None, None], fk, 0.0)
  if not mask.causal:
    if mask.q_segment_ids is None:  # one global sum
      s, z = jnp.einsum("bkhf,bkhd->bhfd", fk, v), jnp.sum(fk, axis=1)
      return jnp.einsum("bqhf,bhfd->bqhd", fq, s), jnp.einsum("bqhf,bhf->bqh", fq, z), (s, z)
    fwd = _scan(fq, fk, v, qs, ks, chunk, False, None)  # keys at or before i, plus those after (reversed)
    rev = lambda x: jnp.flip(x, 1)
    bwd = _scan(rev(fq), rev(fk), rev(v), rev(qs), rev(ks), chunk, True, None)
    return fwd[0] + rev(bwd[0]), fwd[1] + rev(bwd[1]), fwd[2]
  extra = None
  if mask.prefix_len is not None:  # every query sees the prefix; the causal part runs over the rest
    in_prefix = (kp < jnp.broadcast_to(jnp.asarray(mask.prefix_len), (b,))[:, None])[:, :, None, None]
    s_p, z_p = jnp.einsum("bkhf,bkhd->bhfd", fk * in_prefix, v), jnp.sum(fk * in_prefix, axis=1)
    extra = (s_p, z_p)
    fk = jnp.where(in_prefix, 0.0, fk)
  num, den, (s, z) = _scan(fq, fk, v, qs, ks, chunk, False, state)
  if extra is not None:
    num = num + jnp.einsum("bqhf,bhfd->bqhd", fq, extra[0])
    den = den + jnp.einsum("bqhf,bhf->bqh", fq, extra[1])
    s, z = s + extra[0], z + extra[1]
  return num, den, (s, z)


def linear_attention(q: Array, k: Array, v: Array, *, mask: Mask, kind: str, w: Array, scale: float,
                     chunk: int = 64, state: Optional[tuple[Array, Array]] = None
                     ) -> tuple[Array, tuple[Array, Array]]:
  """Performer / RFA attention over [batch, seq, heads, head_dim] (GQA: kv heads repeated); (out, state)."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  fq, fk = feature_map(q, w, kind, scale, True), feature_map(k, w, kind, scale, False)
  num, den, state = linear_sums(fq, fk, v.astype(_F32), mask, chunk, state)
  tiny = 1e-6 if kind == "rfa" else 1e-30  # RFA's estimate can cross zero
  den = jnp.where(jnp.abs(den) < tiny, jnp.where(den < 0, -tiny, tiny), den)
  return (num / den[..., None]).astype(q.dtype), state
