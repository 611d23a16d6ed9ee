"""End-of-run extras: greedy/temperature samples (full forward pass per token) and the unigram baseline."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t_jax.data import Tokenizer


def extend(logits_fn: Callable[[jax.Array], jax.Array], tokens: jax.Array, lengths: jax.Array,
           key: jax.Array, temperature: float) -> jax.Array:
  """Fills tokens[b, lengths[b]:] one position at a time from logits_fn(tokens) [B, L, V] (no cache)."""

  def body(i: jax.Array, carry: tuple) -> tuple:
    tokens, key = carry
    key, sub = jax.random.split(key)
    logits = jax.lax.dynamic_index_in_dim(logits_fn(tokens), i - 1, axis=1, keepdims=False)
    if temperature > 0:
      new = jax.random.categorical(sub, logits / temperature)
    else:
      new = jnp.argmax(logits, -1)
    return tokens.at[:, i].set(jnp.where(i < lengths, tokens[:, i], new).astype(tokens.dtype)), key

  return jax.lax.fori_loop(jnp.min(lengths), tokens.shape[1], body, (tokens, key))[0]


def lm_samples(model: nn.Module, params: Any, tok: Tokenizer, texts: Sequence[str], prompt_len: int,
               sample_len: int, temperature: float, seed: int, prefix_lm: bool = False) -> list[tuple[str, str]]:
  """(prompt, continuation) pairs: the first prompt_len tokens of each text, continued by the model."""
  prompts = [[tok.bos_id, *tok.encode(t)[:prompt_len]] for t in texts]
  total = max(map(len, prompts)) + sample_len
  if model.cfg.position == "learned":
    total = min(total, model.cfg.max_len)
  tokens = np.zeros((len(prompts), total), np.int32)
  for row, p in zip(tokens, prompts):
    row[:len(p)] = p
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  kw = {"prefix_len": lengths} if prefix_lm else {}
  fn = jax.jit(lambda p, t, k: extend(lambda x: model.apply({"params": p}, x, **kw), t, lengths, k, temperature))
  out = np.asarray(fn(params, jnp.asarray(tokens), jax.random.key(seed)))
  return [(tok.decode(p[1:]), tok.decode(row[len(p):])) for p, row in zip(prompts, out)]


def seq2seq_samples(model: nn.Module, params: Any, tok: Tokenizer, sources: Sequence[str], inputs_len: int,
                    sample_len: int, temperature: float, seed: int) -> list[tuple[str, str]]:
  """(source, output) pairs decoded from the pad start token, one full decoder pass per token."""
  enc = np.zeros((len(sources), inputs_len), np.int32)
  for row, s in zip(enc, sources):
    ids = [*tok.encode(s)[:inputs_len - 1], tok.eos_id]
    row[:len(ids)] = ids
  enc_seg = jnp.asarray(enc > 0, jnp.int32)
  starts = jnp.ones((len(sources),), jnp.int32)  # position 0 holds the start token (pad = 0)

  def logits_fn(p: Any, dec: jax.Array) -> jax.Array:
    return model.apply({"params": p}, jnp.asarray(enc), dec, encoder_segment_ids=enc_seg)

  fn = jax.jit(lambda p, d, k: extend(lambda x: logits_fn(p, x), d, starts, k, temperature))
  out = np.asarray(fn(params, jnp.zeros((len(sources), sample_len + 1), jnp.int32), jax.random.key(seed)))
  return [(s, tok.decode(row[1:])) for s, row in zip(sources, out)]


def target_counts(batches: Iterable[dict], vocab_size: int) -> np.ndarray:
  """Weighted histogram of target ids over host batches."""
  counts = np.zeros(vocab_size, np.float64)
  for b in batches:
    targets = b["decoder_targets"] if "decoder_targets" in b else b["targets"]
    counts += np.bincount(targets.ravel(), b["weights"].ravel(), minlength=vocab_size)[:vocab_size]
  return counts


def unigram_loss(train_counts: np.ndarray, eval_counts: np.ndarray) -> float:
  """Cross-entropy (nats/token) on eval targets of add-one-smoothed training unigram frequencies."""
  logp = np.log((train_counts + 1.0) / (train_counts.sum() + len(train_counts)))
  return float(-(eval_counts * logp).sum() / max(eval_counts.sum(), 1.0))
