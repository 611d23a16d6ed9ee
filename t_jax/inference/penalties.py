"""Repetition penalty and n-gram blocking over each row's sequence so far (Hugging Face semantics).

A row's sequence is what the decoder has seen: the prompt (padding excluded) and the generated
tokens for decoder-only / prefix-LM models, the decoder start token and the generated tokens for
encoder-decoder models. Everything has fixed shapes, so it runs inside the jitted while_loop.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from t_jax.inference.runner import Runner

Array = jax.Array


def seen_tokens(seq: Array, first: Array, end: Array, vocab: int) -> Array:
  """[batch, vocab] mask of the tokens in seq[:, first:end] (per-row first [batch], shared end)."""
  pos = jnp.arange(seq.shape[1])[None]
  real = ((pos >= first[:, None]) & (pos < end)).astype(jnp.int32)
  rows = jnp.arange(seq.shape[0])[:, None]
  return jnp.zeros((seq.shape[0], vocab), jnp.int32).at[rows, seq].max(real) > 0


def ngram_bans(seq: Array, first: Array, end: Array, n: int, vocab: int) -> Array:
  """[batch, vocab] mask of the tokens that would complete an n-gram already in seq[:, first:end]."""
  b, length = seq.shape
  w = length - n + 1  # candidate n-gram starts
  if w <= 0:
    return jnp.zeros((b, vocab), bool)
  tail = jax.lax.dynamic_slice_in_dim(seq, jnp.maximum(end - (n - 1), 0), n - 1, axis=1)
  match = jnp.ones((b, w), bool)
  for k in range(n - 1):
    match = match & (seq[:, k:k + w] == tail[:, k:k + 1])
  start = jnp.arange(w)[None]
  match = match & (start >= first[:, None]) & (start + n - 1 < end)  # the whole n-gram is real
  rows = jnp.arange(b)[:, None]
  return jnp.zeros((b, vocab), jnp.int32).at[rows, seq[:, n - 1:]].max(match.astype(jnp.int32)) > 0


@dataclasses.dataclass(frozen=True)
class Penalty:
  """repetition: CTRL penalty (seen tokens' logits / it if positive, * it if negative; 1 = off);
  no_repeat_ngram: tokens completing an n-gram already in the sequence get -inf (0 = off)."""

  repetition: float = 1.0
  no_repeat_ngram: int = 0

  @property
  def active(self) -> bool:
    """Whether the logits change at all."""
    return self.repetition != 1.0 or self.no_repeat_ngram > 0

  def __call__(self, logits: Array, context: Array, first: Array, out: Array, i: Array) -> Array:
    """Logits [b, V] after context [b, c] (real from `first`) and the first i tokens of out [b, T]."""
    if not self.active:
      return logits
    x = logits.astype(jnp.float32)
    seq, end, vocab = jnp.concatenate([context, out], axis=1), context.shape[1] + i, x.shape[-1]
    if self.repetition != 1.0:
      penalised = jnp.where(x < 0, x * self.repetition, x / self.repetition)
      x = jnp.where(seen_tokens(seq, first, end, vocab), penalised, x)
    if self.no_repeat_ngram > 0:
      x = jnp.where(ngram_bans(seq, first, end, self.no_repeat_ngram, vocab), -jnp.inf, x)
    return x


NO_PENALTY = Penalty()


def context(runner: Runner, ids: Array, lengths: Array) -> tuple[Array, Array]:
  """What precedes the generated tokens and where its real part starts: the left-padded prompt, or
  (encoder-decoder) the decoder start token."""
  if runner.seq2seq:
    b = ids.shape[0]
    return jnp.full((b, 1), runner.start_id, jnp.int32), jnp.zeros((b,), jnp.int32)
  return ids.astype(jnp.int32), (ids.shape[1] - lengths).astype(jnp.int32)
