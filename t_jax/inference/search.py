"""Token-by-token decoding loops: greedy / sampling and beam search, each one `jax.lax.while_loop`."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from t_jax.inference import paged as paged_lib
from t_jax.inference.penalties import NO_PENALTY, Penalty, context
from t_jax.inference.runner import Runner, gather_state, repeat_state
from t_jax.inference.sampling import Sampler, token_logprob

Array = jax.Array
PyTree = Any
NEG = -1.0e9  # log-probability of impossible hypotheses (finite: no inf - inf)


def _is_eos(tokens: Array, eos_id: Optional[int]) -> Array:
  return jnp.zeros(tokens.shape, bool) if eos_id is None else tokens == eos_id


def sample_loop(runner: Runner, params: PyTree, ids: Array, lengths: Array, rng: Array, *, sampler: Sampler,
                max_new_tokens: int, eos_id: Optional[int], pad_id: int,
                penalty: Penalty = NO_PENALTY, paged: Optional[dict] = None) -> tuple[Array, Array, dict]:
  """Prefill, then one token per iteration until every row emitted EOS or max_new_tokens.

  The penalty processes the raw logits before the sampler (temperature, top-k, top-p) sees them.
  Returns (tokens [batch, max_new_tokens] padded with pad_id after EOS, sum of the raw model's
  log-probabilities of the emitted tokens [batch], stats).
  """
  logits, state, pos = runner.prefill(params, ids, lengths, paged)
  ctx, first = context(runner, ids, lengths)
  out = jnp.full((ids.shape[0], max_new_tokens), pad_id, jnp.int32)
  choose = lambda key, logits, out, i: sampler.choose(key, penalty(logits, ctx, first, out, i))
  rng, sub = jax.random.split(rng)
  tok = choose(sub, logits, out, 0)
  out = out.at[:, 0].set(tok)
  carry = (jnp.int32(1), tok, pos, state, out, _is_eos(tok, eos_id), token_logprob(logits, tok), rng)

  def body(c: tuple) -> tuple:
    i, tok, pos, state, out, done, score, rng = c
    logits, state = runner.step(params, state, tok[:, None], pos[:, None])
    rng, sub = jax.random.split(rng)
    new = choose(sub, logits[:, -1], out, i)
    score = score + jnp.where(done, 0.0, token_logprob(logits[:, -1], new))
    new = jnp.where(done, pad_id, new)
    out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
    return i + 1, new, pos + 1, state, out, done | _is_eos(new, eos_id), score, rng

  cond = lambda c: (c[0] < max_new_tokens) & ~jnp.all(c[5])  # (step, ..., done, ...)
  i, _, _, _, out, _, score, _ = jax.lax.while_loop(cond, body, carry)
  return out, score, {"steps": i}


def length_penalty(length: Array, alpha: float) -> Array:
  """GNMT length penalty lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al. 2016)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam_search(runner: Runner, params: PyTree, ids: Array, lengths: Array, *, num_beams: int, alpha: float,
                max_new_tokens: int, eos_id: Optional[int], pad_id: int, penalty: Penalty = NO_PENALTY,
                paged: Optional[dict] = None) -> tuple[Array, Array, dict]:
  """Beam search scoring hypotheses by log P(Y|X) / lp(|Y|) (|Y| counts generated tokens incl. EOS).

  A hypothesis is finished when it emits EOS, or when it reaches max_new_tokens (then it is scored
  at that length). Each step ranks the 2K best extensions: EOS ones enter the finished pool (best K
  kept), the best K others stay alive. A row stops early once its K-th finished score beats any
  score an alive hypothesis can still reach (log-probs only fall; lp is monotone in |Y|).
  A penalty applies to the log-probs (as in Hugging Face), and the scores sum the penalised values.
  paged (a paged cache, as for sample_loop, plus `own`: each beam's pages, paged.plan_rows): a prompt's
  pages are shared by its beams, and reordering beams moves page-table entries (paged.beam_reorder).
  Returns (best tokens [batch, max_new_tokens], their scores [batch], stats with all beams).
  """
  k, steps = num_beams, max_new_tokens
  logits, state, pos = runner.prefill(params, ids, lengths, paged)
  b, vocab = logits.shape
  ctx, first = context(runner, ids, lengths)
  ctx, first = jnp.repeat(ctx, k, axis=0), jnp.repeat(first, k)
  logits, pos = jnp.repeat(logits, k, axis=0), jnp.repeat(pos, k)
  if paged is None:
    state, reorder = repeat_state(state, k), lambda state, rows, t: gather_state(state, rows)
  else:  # the examples' rows onto their beams: the partly filled prompt page copied per beam
    reorder = lambda state, rows, t: paged_lib.beam_reorder(state, rows, pos + t, runner.page_size)
    state = repeat_state(dict(state, table=paged["table"], own=paged["own"]), k, paged=True)
    state = reorder(state, jnp.repeat(jnp.arange(b), k), 0)
  alive_seq = jnp.full((b, k, steps), pad_id, jnp.int32)
  alive_lp = jnp.tile(jnp.asarray([0.0] + [NEG] * (k - 1), jnp.float32), (b, 1))
  fin_seq, fin_score = alive_seq, jnp.full((b, k), NEG, jnp.float32)
  n_cand = min(2 * k, k * vocab)

  def select(t: Array, logits: Array, alive_seq: Array, alive_lp: Array, fin_seq: Array, fin_score: Array):
    """Ranks the extensions of the alive beams at step t (0-based)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if penalty.active:  # banned tokens get the finite NEG
      logp = jnp.maximum(penalty(logp, ctx, first, alive_seq.reshape(b * k, steps), t), NEG)
    cand = (alive_lp[:, :, None] + logp.reshape(b, k, vocab)).reshape(b, k * vocab)
    top_lp, top_idx = jax.lax.top_k(cand, n_cand)
    parent, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(alive_seq, parent[:, :, None], axis=1)
    seqs = jax.lax.dynamic_update_slice(seqs, tok[:, :, None], (0, 0, t))
    real = top_lp > NEG / 2
    ends = (_is_eos(tok, eos_id) | (t == steps - 1)) & real
    new_fin = jnp.where(ends, top_lp / length_penalty(t + 1, alpha), NEG)
    fin_score, fi = jax.lax.top_k(jnp.concatenate([fin_score, new_fin], axis=1), k)
    fin_seq = jnp.take_along_axis(jnp.concatenate([fin_seq, seqs], axis=1), fi[:, :, None], axis=1)
    alive_lp, ai = jax.lax.top_k(jnp.where(_is_eos(tok, eos_id), NEG, top_lp), k)
    alive_seq = jnp.take_along_axis(seqs, ai[:, :, None], axis=1)
    rows = (jnp.arange(b)[:, None] * k + jnp.take_along_axis(parent, ai, axis=1)).reshape(-1)
    return alive_seq, alive_lp, fin_seq, fin_score, rows, jnp.take_along_axis(tok, ai, axis=1).reshape(-1)

  def finished(t: Array, alive_lp: Array, fin_score: Array) -> Array:
    """Whether no alive hypothesis of length >= t + 2 can enter the finished top K."""
    bound = jnp.maximum(alive_lp[:, 0] / length_penalty(t + 2, alpha),
                        alive_lp[:, 0] / length_penalty(steps, alpha))
    return jnp.all(fin_score[:, -1] >= bound) | (t + 1 >= steps)

  def body(c: tuple) -> tuple:
    t, logits, state, alive_seq, alive_lp, fin_seq, fin_score, _ = c
    alive_seq, alive_lp, fin_seq, fin_score, rows, tok = select(t, logits, alive_seq, alive_lp, fin_seq, fin_score)
    stop = finished(t, alive_lp, fin_score)

    def feed(state: dict) -> tuple[Array, dict]:
      state = reorder(state, rows, t)
      logits, state = runner.step(params, state, tok[:, None], (pos + t)[:, None])
      return logits[:, -1], state

    logits, state = jax.lax.cond(stop, lambda s: (logits, s), feed, state)
    return t + 1, logits, state, alive_seq, alive_lp, fin_seq, fin_score, stop

  carry = (jnp.int32(0), logits, state, alive_seq, alive_lp, fin_seq, fin_score, jnp.bool_(False))
  t, _, _, _, _, fin_seq, fin_score, _ = jax.lax.while_loop(lambda c: ~c[-1], body, carry)
  return fin_seq[:, 0], fin_score[:, 0], {"steps": t, "beams": fin_seq, "beam_scores": fin_score}
