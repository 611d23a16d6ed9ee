"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) with a small draft model.

Each iteration the draft proposes K tokens one by one, the target scores all of them in one
parallel pass, and each row keeps its accepted prefix plus one target token. Sampling accepts
draft token d with probability min(1, p(d)/q(d)) and on rejection resamples from
norm(max(0, p - q)); when all K are accepted a bonus token comes from p, so the output follows the
target distribution exactly. Greedy accepts d iff it is the target's argmax, so the output equals the
target's greedy output. Rows accept different counts: both caches rewind per row (cache.rewind).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from t_jax.inference.cache import rewind
from t_jax.inference.runner import Runner
from t_jax.inference.sampling import Sampler, token_logprob

Array = jax.Array
PyTree = Any


def _draft(draft: Runner, params: PyTree, state: dict, tok: Array, pos: Array, rng: Array, sampler: Sampler,
           k: int) -> tuple[dict, Array, Array]:
  """K+1 draft steps feeding tok, d1..dK (the last one only fills the cache): (state, d [b, K], q [b, K, V])."""

  def step(c: tuple, j: Array) -> tuple:
    state, x, key = c
    logits, state = draft.step(params, state, x[:, None], (pos + j)[:, None])
    key, sub = jax.random.split(key)
    d = sampler.choose(sub, logits[:, -1])
    q = jnp.zeros((x.shape[0], 0)) if sampler.greedy else sampler.probs(logits[:, -1])
    return (state, d, key), (d, q)

  (state, _, _), (ds, qs) = jax.lax.scan(step, (state, tok, rng), jnp.arange(k + 1))
  return state, ds[:k].T, jnp.swapaxes(qs[:k], 0, 1)


def _verify(logits: Array, drafts: Array, q: Array, rng: Array, sampler: Sampler) -> tuple[Array, Array]:
  """Target logits [b, K+1, V] vs drafts [b, K]: (number accepted n [b], the target's next token [b])."""
  b, k = drafts.shape
  if sampler.greedy:
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    n = jnp.sum(jnp.cumprod(drafts == best[:, :k], axis=1), axis=1)
    return n, jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]
  r_acc, r_res = jax.random.split(rng)
  p = sampler.probs(logits)
  pd = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
  qd = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
  accept = jax.random.uniform(r_acc, (b, k)) * qd < pd  # u < p/q without dividing
  n = jnp.sum(jnp.cumprod(accept, axis=1), axis=1)
  q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # bonus token: residual of p - 0 = p
  p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
  resid = jnp.maximum(p_n - jnp.take_along_axis(q_pad, n[:, None, None], axis=1)[:, 0], 0.0)
  resid = jnp.where(jnp.sum(resid, axis=-1, keepdims=True) > 0, resid, p_n)
  return n, jax.random.categorical(r_res, jnp.log(resid), axis=-1).astype(jnp.int32)


def speculative_loop(target: Runner, draft: Runner, params: PyTree, draft_params: PyTree, ids: Array,
                     lengths: Array, rng: Array, *, sampler: Sampler, num_draft: int, max_new_tokens: int,
                     eos_id: Optional[int], pad_id: int, paged: Optional[dict] = None,
                     draft_paged: Optional[dict] = None) -> tuple[Array, Array, dict]:
  """Returns (tokens [batch, max_new_tokens], target log-prob of each row's tokens, stats).

  paged / draft_paged: paged caches of the two models (as for sample_loop, pages for num_draft + 1 positions
  past the end). A position's page slot is rewritten whenever it is fed again, and queries never see later
  slots, so rejected entries need no rewinding there (cache.rewind leaves pages alone).
  """
  k = num_draft
  logits, tstate, pos = target.prefill(params, ids, lengths, paged)
  _, dstate, _ = draft.prefill(draft_params, ids, lengths, draft_paged)
  b = ids.shape[0]
  rng, sub = jax.random.split(rng)
  tok = sampler.choose(sub, logits)
  out = jnp.full((b, max_new_tokens + k + 1), pad_id, jnp.int32).at[:, 0].set(tok)
  g = jnp.ones((b,), jnp.int32)
  eos = (tok == eos_id) if eos_id is not None else jnp.zeros((b,), bool)
  zero = jnp.int32(0)
  carry = (tok, pos, tstate, dstate, out, g, eos | (g >= max_new_tokens), token_logprob(logits, tok), rng,
           zero, zero, zero)
  j = jnp.arange(k + 1)

  def body(c: tuple) -> tuple:
    tok, pos, tstate, dstate, out, g, done, score, rng, iters, drafted, accepted = c
    rng, r_draft, r_verify = jax.random.split(rng, 3)
    dstate, drafts, q = _draft(draft, draft_params, dstate, tok, pos, r_draft, sampler, k)
    fed = jnp.concatenate([tok[:, None], drafts], axis=1)
    logits, tstate = target.step(params, tstate, fed, pos[:, None] + j)
    n, new = _verify(logits, drafts, q, r_verify, sampler)
    # Emitted this iteration: d1..dn then the target's token, cut at EOS and at max_new_tokens.
    emitted = jnp.where(j < n[:, None], jnp.concatenate([drafts, drafts[:, :1]], axis=1), new[:, None])
    valid = (j <= n[:, None]) & (j < (max_new_tokens - g)[:, None])
    hit = valid & ((emitted == eos_id) if eos_id is not None else False)
    count = jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1) + 1, jnp.sum(valid, axis=1))
    kept = (j < count[:, None]) & ~done[:, None]
    window = jnp.where(kept, emitted, pad_id)
    new_out = jax.vmap(lambda row, w, at: jax.lax.dynamic_update_slice(row, w, (at,)))(out, window, g)
    out = jnp.where(done[:, None], out, new_out)
    score = score + jnp.sum(jnp.where(kept, token_logprob(logits, emitted), 0.0), axis=1)
    # Rewind both caches to the accepted prefix (finished rows keep nothing new).
    last_kept = jnp.where(done, pos - 1, pos + n)
    drop = jnp.where(done, k + 1, k - n)
    tstate = dict(tstate, cache=rewind(tstate["cache"], drop, last_kept))
    dstate = dict(dstate, cache=rewind(dstate["cache"], drop, last_kept))
    active = ~done
    g = jnp.where(done, g, g + count)
    new_done = done | jnp.any(hit, axis=1) | (g >= max_new_tokens)
    stats = (iters + 1, drafted + k * jnp.sum(active), accepted + jnp.sum(jnp.where(active, n, 0)))
    return (jnp.where(done, tok, new), jnp.where(done, pos, pos + n + 1), tstate, dstate, out, g, new_done,
            score, rng) + stats

  c = jax.lax.while_loop(lambda c: ~jnp.all(c[6]), body, carry)
  iters, drafted, accepted = c[9:]
  return c[4][:, :max_new_tokens], c[7], {"iterations": iters, "drafted": drafted, "accepted": accepted}
