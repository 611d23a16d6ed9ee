"""Long Range Arena (Tay et al. 2020) tasks that run offline: ListOps, and byte-level text classification.

ListOpsSource(split, seed=0, max_depth=10, max_args=10, min_length=500, max_length=2000)
    Nangia & Bowman 2018, as LRA generates it: nested prefix expressions over the digits 0-9, e.g.
    "[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]" -> label "8" (the value, 0-9). Operators: MAX, MIN, MED
    (the median, rounded down) and SM (the sum mod 10), each with 2..max_args arguments; the root is an
    operator and every argument below it is one (probability op_prob, LRA's 0.25) or a digit; operators nest
    at most max_depth deep. Expressions with fewer than min_length or more than max_length symbols are
    drawn again. Example i of a split comes from PRNG (seed, split, i) alone: random access, nothing
    generated up front, deterministic, and the splits differ. Space-separated symbols: a word-level
    tokenizer (TaskConfig.tokenizer_type = 'word') gives one token per symbol, as LRA's.
LanguageIdSource(paths, lines_per_example=1, seed=0, max_examples=None)
    {'text': lines_per_example consecutive lines of paths[i], 'label': str(i)}: which file (one language per
    file) the text comes from, e.g. Multi30K's train.en.gz vs train.de.gz, shuffled by seed. Read as bytes
    (TaskConfig.tokenizer_type = 'byte': one token per UTF-8 byte), as LRA's byte-level text task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np

from t_jax.data.sources import Counts, Example, InMemorySource, TextFileSource

OPS = ("[MAX", "[MIN", "[MED", "[SM")
END = "]"
SPLITS = ("train", "validation", "test")
LRA_SIZES = {"train": 96_000, "validation": 2_000, "test": 2_000}  # LRA's ListOps split sizes
MAX_TRIES = 10_000  # draws per example before the length bounds are declared unreachable


class _TooLong(Exception):
  """The expression being drawn has passed max_length symbols."""


def apply(op: str, values: Sequence[int]) -> int:
  """The value of one operator over its arguments' values."""
  if op == "[MAX":
    return max(values)
  if op == "[MIN":
    return min(values)
  if op == "[MED":
    s = sorted(values)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) // 2  # LRA: int(np.median(values))
  return sum(values) % 10


class _Uniforms:
  """Uniform [0, 1) draws from a numpy Generator, fetched in blocks (one call per draw is slow)."""

  def __init__(self, rng: np.random.Generator, block: int = 4096) -> None:
    self.rng, self.block, self.draws = rng, block, iter(())

  def __call__(self) -> float:
    try:
      return next(self.draws)
    except StopIteration:
      self.draws = iter(self.rng.random(self.block).tolist())
      return next(self.draws)


def expression(uniform: _Uniforms, *, max_depth: int, max_args: int, max_length: int,
               op_prob: float = 0.25) -> tuple[list[str], int]:
  """One random expression (its symbols) and its value; _TooLong once it passes max_length symbols."""
  symbols: list[str] = []

  def node(level: int) -> int:  # level: operators around this node
    if len(symbols) >= max_length:
      raise _TooLong
    if level and (level >= max_depth or uniform() >= op_prob):
      value = int(uniform() * 10)
      symbols.append(str(value))
      return value
    op = OPS[int(uniform() * len(OPS))]
    symbols.append(op)
    values = [node(level + 1) for _ in range(2 + int(uniform() * (max_args - 1)))]
    symbols.append(END)
    if len(symbols) > max_length:
      raise _TooLong
    return apply(op, values)

  value = node(0)
  return symbols, value


class ListOpsSource:
  """ListOps examples {'text': expression, 'label': str(value)}, drawn on demand (module docstring)."""

  def __init__(self, split: str = "train", *, seed: int = 0, num_examples: Optional[int] = None,
               max_depth: int = 10, max_args: int = 10, min_length: int = 500, max_length: int = 2000,
               op_prob: float = 0.25) -> None:
    if split not in SPLITS:
      raise ValueError(f"ListOpsSource: split={split!r} is not one of {SPLITS}")
    if not (max_depth >= 1 and max_args >= 2 and 3 <= max_length and min_length <= max_length and 0 < op_prob < 1):
      raise ValueError(f"ListOpsSource: bad bounds max_depth={max_depth}, max_args={max_args}, "
                       f"min_length={min_length}, max_length={max_length}, op_prob={op_prob}")
    self.split, self.seed = split, seed
    self.num_examples = LRA_SIZES[split] if num_examples is None else num_examples
    self.bounds = dict(max_depth=max_depth, max_args=max_args, max_length=max_length, op_prob=op_prob)
    self.min_length = min_length
    self.name = (f"ListOpsSource({split!r}, seed={seed}, depth<={max_depth}, args<={max_args}, "
                 f"length {min_length}..{max_length})")
    self[0]  # unreachable bounds fail here, not in the middle of training

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> Example:
    index = range(self.num_examples)[index]  # negative indices; IndexError past the end
    uniform = _Uniforms(np.random.default_rng([self.seed, SPLITS.index(self.split), index]))
    for _ in range(MAX_TRIES):
      try:
        symbols, value = expression(uniform, **self.bounds)
      except _TooLong:
        continue
      if len(symbols) >= self.min_length:
        return {"text": " ".join(symbols), "label": str(value)}
    raise ValueError(f"{self.name}: no expression within the length bounds in {MAX_TRIES} draws")

  @property
  def stats(self) -> dict[str, int]:
    """The split's size (examples are drawn on demand; none is skipped)."""
    return {"documents": self.num_examples}

  def __repr__(self) -> str:
    return f"{self.name} ({self.num_examples} examples)"


class LanguageIdSource(InMemorySource):
  """Text labelled by the file it comes from: {'text': k lines of paths[i] joined by spaces, 'label': str(i)}."""

  def __init__(self, paths: Sequence[str], *, lines_per_example: int = 1, seed: int = 0,
               max_examples: Optional[int] = None) -> None:
    if len(paths) < 2 or lines_per_example < 1:
      raise ValueError(f"LanguageIdSource: want two or more paths and lines_per_example >= 1, got {list(paths)}, "
                       f"{lines_per_example}")
    counts, examples = Counts(), []
    for label, path in enumerate(paths):
      lines = TextFileSource(path)
      texts = [r["text"] for i in range(len(lines)) if (r := lines[i]) is not None]
      for k, v in lines.counts.as_dict().items():
        counts.add(k, v)
      k = lines_per_example
      examples += [{"text": " ".join(texts[i:i + k]), "label": str(label)} for i in range(0, len(texts) - k + 1, k)]
    examples = [examples[i] for i in np.random.default_rng(seed).permutation(len(examples))][:max_examples]
    super().__init__(examples, f"LanguageIdSource({list(paths)!r}, lines_per_example={k}, seed={seed})", counts)
