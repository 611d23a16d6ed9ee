"""Float64 NumPy oracle for attention: masks from the documented rules, forward and analytic backward."""

import numpy as np


def np_mask(b, sq, sk, causal=False, qseg=None, kseg=None, prefix=None, window=None):
  """[b, sq, sk] mask from the documented rules, element by element (independent of make_mask)."""
  prefix = None if prefix is None else np.broadcast_to(np.asarray(prefix), (b,))
  m = np.ones((b, sq, sk), bool)
  for bi in range(b):
    for i in range(sq):
      for j in range(sk):
        ok = True
        if causal:
          ok &= j <= i or (prefix is not None and j < prefix[bi])
        if window is not None:
          ok &= abs(i - j) < window
        if qseg is not None:
          ok &= qseg[bi, i] == kseg[bi, j]
        m[bi, i, j] = ok
  return m


def np_attention(q, k, v, mask, bias, scale, dout):
  """Output and (dq, dk, dv, dlogits) of masked softmax attention in float64; GQA by repetition."""
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  g = q.shape[2] // k.shape[2]
  kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
  m = np.broadcast_to(mask[:, None], s.shape)
  s = np.where(m, s, -np.inf)
  mx = np.max(s, -1, keepdims=True)
  p = np.where(m, np.exp(s - np.where(np.isfinite(mx), mx, 0)), 0)
  den = p.sum(-1, keepdims=True)
  p = p / np.where(den == 0, 1, den)
  out = np.einsum("bhqk,bkhd->bqhd", p, vr)
  dp = np.einsum("bqhd,bkhd->bhqk", dout, vr)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
  fold = lambda x: x.reshape(x.shape[0], x.shape[1], -1, g, x.shape[3]).sum(3)
  dk = fold(np.einsum("bhqk,bqhd->bkhd", ds, q) * scale)
  dv = fold(np.einsum("bhqk,bqhd->bkhd", p, dout))
  return out, (dq, dk, dv, ds)
