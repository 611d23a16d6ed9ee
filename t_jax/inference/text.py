"""String prompts: encoded as in training, continuations decoded up to EOS."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np


def is_text(prompts: Any) -> bool:
  """Whether prompts are a string or a non-empty sequence of strings."""
  if isinstance(prompts, str):
    return True
  return isinstance(prompts, Sequence) and bool(prompts) and all(isinstance(p, str) for p in prompts)


def encode_prompt(tokenizer: Any, text: str, seq2seq: bool) -> list[int]:
  """Encoder-decoder sources end with EOS (as in training); other prompts start with BOS (= EOS in t_jax)."""
  ids = list(tokenizer.encode(text))
  if seq2seq:
    return ids + [tokenizer.eos_id]
  return [getattr(tokenizer, "bos_id", tokenizer.eos_id)] + ids


def detokenize(tokenizer: Any, row: np.ndarray, eos_id: Optional[int]) -> str:
  """Text of generated ids up to (excluding) the first eos_id."""
  ids = np.asarray(row).tolist()
  if eos_id in ids:
    ids = ids[:ids.index(eos_id)]
  return tokenizer.decode(ids)
