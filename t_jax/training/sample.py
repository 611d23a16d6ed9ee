"""End-of-run extras: greedy/temperature samples (t_jax.inference.generate) and the unigram baseline."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import numpy as np

from t_jax.data import Tokenizer
from t_jax.inference import generate


def continue_tokens(model: nn.Module, params: Any, prompts: list[list[int]], n: int, temperature: float,
                    seed: int) -> np.ndarray:
  """[B, n] greedy (temperature 0) or sampled tokens after each prompt (encoder-decoder: translations)."""
  if model.cfg.position == "learned" and model.cfg.architecture != "encoder_decoder":
    n = max(1, min(n, model.cfg.max_len - max(map(len, prompts))))
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
    targets = b["decoder_targets"] if "decoder_targets" in b else b.get("targets")
    if targets is None:  # classification batches carry labels, not tokens
      continue
    counts += np.bincount(targets.ravel(), b["weights"].ravel(), minlength=vocab_size)[:vocab_size]
  return counts


def unigram_loss(train_counts: np.ndarray, eval_counts: np.ndarray) -> float:
  """Cross-entropy (nats/token) on eval targets of add-one-smoothed training unigram frequencies."""
  logp = np.log((train_counts + 1.0) / (train_counts.sum() + len(train_counts)))
  return float(-(eval_counts * logp).sum() / max(eval_counts.sum(), 1.0))
