"""End-of-run extras: greedy/temperature samples (t_jax.inference.generate, or full forward passes) and the
unigram baseline."""

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


def _full_pass_decode(model: nn.Module, params: Any, prompts: list[list[int]], n: int, temperature: float,
                      seed: int) -> np.ndarray:
  """[B, n] new tokens by full forward passes (fallback when t_jax.inference is unavailable)."""
  width = max(map(len, prompts))
  padded = np.zeros((len(prompts), width), np.int32)
  for row, p in zip(padded, prompts):
    row[:len(p)] = p
  key = jax.random.key(seed)
  if model.cfg.architecture == "encoder_decoder":
    enc, enc_seg = jnp.asarray(padded), jnp.asarray(padded > 0, jnp.int32)
    fn = lambda p, x: model.apply({"params": p}, enc, x, encoder_segment_ids=enc_seg)
    starts = jnp.ones((len(prompts),), jnp.int32)  # position 0 holds the start token (pad = 0)
    out = jax.jit(lambda p: extend(lambda x: fn(p, x), jnp.zeros((len(prompts), n + 1), jnp.int32), starts, key,
                                   temperature))(params)
    return np.asarray(out)[:, 1:]
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  kw = {"prefix_len": lengths} if model.cfg.architecture == "prefix_lm" else {}
  tokens = jnp.asarray(np.pad(padded, ((0, 0), (0, n))))
  out = np.asarray(jax.jit(lambda p: extend(lambda x: model.apply({"params": p}, x, **kw), tokens, lengths, key,
                                            temperature))(params))
  return np.stack([row[len(p):len(p) + n] for p, row in zip(prompts, out)])


def continue_tokens(model: nn.Module, params: Any, prompts: list[list[int]], n: int, temperature: float,
                    seed: int) -> np.ndarray:
  """[B, n] greedy (temperature 0) or sampled tokens after each prompt (encoder-decoder: translations)."""
  if model.cfg.position == "learned" and model.cfg.architecture != "encoder_decoder":
    n = max(1, min(n, model.cfg.max_len - max(map(len, prompts))))
  try:
    from t_jax.inference import generate
  except ImportError:
    return _full_pass_decode(model, params, prompts, n, temperature, seed)
  if temperature > 0:
    return generate(model.cfg, params, prompts, n, "sample", seed=seed, temperature=temperature)
  return generate(model.cfg, params, prompts, n, "greedy", seed=seed)


def lm_samples(model: nn.Module, params: Any, tok: Tokenizer, texts: Sequence[str], prompt_len: int,
               sample_len: int, temperature: float, seed: int) -> list[tuple[str, str]]:
  """(prompt, continuation) pairs: the first prompt_len tokens of each text, continued by the model."""
  prompts = [[tok.bos_id, *tok.encode(t)[:prompt_len]] for t in texts]
  out = continue_tokens(model, params, prompts, sample_len, temperature, seed)
  return [(tok.decode(p[1:]), tok.decode(row)) for p, row in zip(prompts, out)]


def seq2seq_samples(model: nn.Module, params: Any, tok: Tokenizer, sources: Sequence[str], inputs_len: int,
                    sample_len: int, temperature: float, seed: int) -> list[tuple[str, str]]:
  """(source, output) pairs: each source (eos-terminated, truncated to inputs_len) decoded by the model."""
  prompts = [[*tok.encode(s)[:inputs_len - 1], tok.eos_id] for s in sources]
  out = continue_tokens(model, params, prompts, sample_len, temperature, seed)
  return [(s, tok.decode(row)) for s, row in zip(sources, out)]


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
