"""Training objectives: one text example -> fixed-length numpy rows, then the batch contract's keys.

Each objective turns a document into one or more variable-length rows (`examples`), which the pipeline
packs (grain's FirstFitPackIterDataset) or pads to `lengths()`; `finalize` renames grain's
`<feature>_segment_ids` / `<feature>_positions` into the contract keys documented in t_jax.data.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, ClassVar

import numpy as np

from t_jax.data.sources import Counts, Example
from t_jax.data.tokenizer import Tokenizer

Row = dict[str, np.ndarray]


def _chunk(x: np.ndarray, size: int, overlap: int, overflow: str, counts: Counts) -> list[np.ndarray]:
  """Pieces of at most `size` tokens (consecutive pieces share `overlap`), or the first piece only."""
  if len(x) <= size:
    return [x]
  counts.add("split" if overflow == "split" else "truncated")
  if overflow == "truncate":
    return [x[:size]]
  return [x[i:i + size] for i in range(0, len(x) - overlap, size - overlap)]


def pad_row(row: Row, lengths: dict[str, int]) -> Row:
  """Pads one unpacked row to `lengths`, adding grain-style `<k>_segment_ids` (1/0) and `<k>_positions`."""
  out = {k: v for k, v in row.items() if k not in lengths}
  for k, length in lengths.items():
    v, idx = row[k], np.arange(length, dtype=np.int32)
    out[k] = np.pad(v, (0, length - len(v)))
    out[f"{k}_segment_ids"] = (idx < len(v)).astype(np.int32)
    out[f"{k}_positions"] = np.where(idx < len(v), idx, 0).astype(np.int32)
  return out


def span_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
  """(noise tokens, noise spans) for a sequence of `length` tokens, T5-style rounding."""
  if length < 2:
    return 0, 0
  noise = min(max(round(length * noise_density), 1), length - 1)
  spans = min(max(round(noise / mean_noise_span_length), 1), noise, length - noise)
  return noise, spans


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
  """Boolean noise mask (T5 paper): alternating random-length non-noise/noise spans, non-noise first."""
  noise, spans = span_counts(length, noise_density, mean_noise_span_length)
  if spans == 0:
    return np.zeros(length, bool)

  def segment(n: int) -> np.ndarray:
    cuts = np.sort(rng.choice(np.arange(1, n), spans - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [n]]))

  lengths = np.stack([segment(length - noise), segment(noise)], axis=1).reshape(-1)
  return np.repeat(np.tile([False, True], spans), lengths)


def span_corruption_raw_length(inputs_len: int, targets_len: int, noise_density: float,
                               mean_noise_span_length: float) -> int:
  """Longest raw token count whose corrupted encoder/decoder sequences (with eos) fit the lengths."""
  for n in itertools.count(1):
    noise, spans = span_counts(n, noise_density, mean_noise_span_length)
    if n - noise + spans + 1 > inputs_len or noise + spans + 1 > targets_len:
      return n - 1


def corrupt_spans(tokens: np.ndarray, mask: np.ndarray, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """T5 span corruption: (inputs with noise spans -> sentinels, targets = sentinel + span ...), eos-ended."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
  inputs, targets, prev = [], [], 0
  for i, (start, end) in enumerate(zip(edges[0::2], edges[1::2])):
    sentinel = np.array([tokenizer.sentinel(i)], np.int32)
    inputs += [tokens[prev:start], sentinel]
    targets += [sentinel, tokens[start:end]]
    prev = end
  eos = np.array([tokenizer.eos_id], np.int32)
  return np.concatenate(inputs + [tokens[prev:], eos]), np.concatenate(targets + [eos])


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, tokenizer: Tokenizer, rate: float = 0.15,
                mask_prob: float = 0.8, random_prob: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """BERT masking: selects max(1, round(rate * n)) regular tokens; of those mask_prob -> mask id,
  random_prob -> a random regular token, the rest unchanged. Returns (inputs, float32 weights)."""
  lo, hi = tokenizer.first_regular_id, tokenizer.sp_vocab_size
  candidates = np.flatnonzero((tokens >= lo) & (tokens < hi))
  count = max(1, round(rate * len(candidates))) if len(candidates) else 0
  selected = rng.choice(candidates, count, replace=False)
  u = rng.random(count)
  inputs = tokens.copy()
  inputs[selected[u < mask_prob]] = tokenizer.mask_id
  replaced = selected[(u >= mask_prob) & (u < mask_prob + random_prob)]
  inputs[replaced] = rng.integers(lo, hi, len(replaced))
  weights = np.zeros(len(tokens), np.float32)
  weights[selected] = 1.0
  return inputs, weights


@dataclasses.dataclass
class Objective:
  """Base class: `examples` (document -> rows), `lengths` (packing lengths), `finalize` (contract keys)."""

  architectures: ClassVar[tuple[str, ...]] = ()  # ModelConfig.architecture values it can train
  label_key: ClassVar[str] = "targets"  # batch key of the prediction targets (weights: "weights")
  uses_tokenizer: ClassVar[bool] = True  # False: no tokenizer is trained or read (image classification)
  pack: bool = True
  counts: Counts = dataclasses.field(default_factory=Counts, repr=False, compare=False)

  def model_inputs(self, batch: Row) -> tuple[tuple, dict]:
    """(positional, keyword) arguments of `model.apply` for a batch of this objective."""
    raise NotImplementedError

  def lengths(self) -> dict[str, int]:
    """Fixed length of each sequence feature of a row."""
    raise NotImplementedError

  def check(self, tokenizer: Tokenizer) -> None:
    """Raises ValueError when the tokenizer or settings cannot serve this objective."""
    if min(self.lengths().values()) < 2:
      raise ValueError(f"{type(self).__name__}: sequence lengths must be >= 2, got {self.lengths()}")

  def for_stream(self, train: bool) -> Objective:
    """The objective as a training (True) or evaluation stream applies it (e.g. without train-time augmentation)."""
    del train
    return self

  def examples(self, example: Example, rng: np.random.Generator, tokenizer: Tokenizer) -> list[Row]:
    """Variable-length rows (at most `lengths()`) made from one source example."""
    raise NotImplementedError

  def finalize(self, row: Row) -> Row:
    """Packed/padded grain row -> the batch contract's keys."""
    raise NotImplementedError

  def spec_row(self, **extra: Any) -> Row:
    """One finalized row of zeros: the keys, shapes and dtypes of a batch row (ahead-of-time compilation)."""
    lengths = self.lengths()
    row = pad_row({k: np.zeros(1, np.float32 if k == "weights" else np.int32) for k in lengths}, lengths)
    return self.finalize({**row, **extra})

  @property
  def stats(self) -> dict[str, int]:
    """Documents split or truncated so far (token-level overflow)."""
    return self.counts.as_dict()


@dataclasses.dataclass
class _DecoderOnly(Objective):
  """Shared settings and finalize of decoder-only objectives."""

  seq_len: int = 512
  overflow: str = "split"  # documents longer than seq_len: 'split' into several rows or 'truncate'
  text_key: str = "text"

  def lengths(self) -> dict[str, int]:
    """inputs/targets/weights all of seq_len."""
    return {"inputs": self.seq_len, "targets": self.seq_len, "weights": self.seq_len}

  def check(self, tokenizer: Tokenizer) -> None:
    """Validates the overflow mode and lengths."""
    if self.overflow not in ("split", "truncate"):
      raise ValueError(f"overflow must be 'split' or 'truncate', got {self.overflow!r}")
    super().check(tokenizer)

  def finalize(self, row: Row) -> Row:
    """inputs, targets, weights, segment_ids, positions (+ prefix_len when present)."""
    out = {k: row[k] for k in ("inputs", "targets", "weights")}
    out["segment_ids"], out["positions"] = row["inputs_segment_ids"], row["inputs_positions"]
    if "prefix_len" in row:
      out["prefix_len"] = row["prefix_len"]
    return out

  def model_inputs(self, batch: Row) -> tuple[tuple, dict]:
    """Token ids with their positions, segment ids (and prefix_len)."""
    kw = {"prefix_len": batch["prefix_len"]} if "prefix_len" in batch else {}
    return (batch["inputs"],), dict(positions=batch["positions"], segment_ids=batch["segment_ids"], **kw)

  def _windows(self, example: Example, tokenizer: Tokenizer) -> list[np.ndarray]:
    """[bos] + tokens + [eos], cut into windows of seq_len + 1 that overlap by one token."""
    tokens = [tokenizer.bos_id, *tokenizer.encode(example[self.text_key]), tokenizer.eos_id]
    return _chunk(np.asarray(tokens, np.int32), self.seq_len + 1, 1, self.overflow, self.counts)


@dataclasses.dataclass
class CausalLM(_DecoderOnly):
  """Decoder-only next-token prediction; targets = inputs shifted left by one within each segment."""

  architectures: ClassVar[tuple[str, ...]] = ("decoder", "prefix_lm")

  def examples(self, example: Example, rng: np.random.Generator, tokenizer: Tokenizer) -> list[Row]:
    """One row per window: inputs = w[:-1], targets = w[1:], weights = 1."""
    return [{"inputs": w[:-1], "targets": w[1:], "weights": np.ones(len(w) - 1, np.float32)}
            for w in self._windows(example, tokenizer)]


@dataclasses.dataclass
class PrefixLM(_DecoderOnly):
  """Prefix LM (never packed): the first `prefix_len` input positions attend bidirectionally.

  Loss weights are 1 from position prefix_len - 1 on (its target is the first suffix token).
  `prefix_fraction=None` draws prefix_len uniformly in [1, n]; otherwise round(fraction * n).
  """

  architectures: ClassVar[tuple[str, ...]] = ("prefix_lm",)
  pack: bool = False
  prefix_fraction: float | None = None

  def check(self, tokenizer: Tokenizer) -> None:
    """Prefix LM rows carry a per-row prefix_len, so they cannot be packed."""
    if self.pack:
      raise ValueError("PrefixLM does not support packing (pack=False)")
    super().check(tokenizer)

  def spec_row(self, **extra: Any) -> Row:
    """With a prefix_len."""
    return super().spec_row(prefix_len=np.int32(1), **extra)

  def examples(self, example: Example, rng: np.random.Generator, tokenizer: Tokenizer) -> list[Row]:
    """Causal rows plus a prefix length and suffix-only weights."""
    rows = []
    for w in self._windows(example, tokenizer):
      n = len(w) - 1
      if self.prefix_fraction is None:
        prefix = int(rng.integers(1, n, endpoint=True))
      else:
        prefix = min(max(round(self.prefix_fraction * n), 1), n)
      weights = (np.arange(n) >= prefix - 1).astype(np.float32)
      rows.append({"inputs": w[:-1], "targets": w[1:], "weights": weights, "prefix_len": np.int32(prefix)})
    return rows


@dataclasses.dataclass
class MaskedLM(_DecoderOnly):
  """BERT masked LM: inputs corrupted (80% mask, 10% random, 10% kept), targets = original ids."""

  architectures: ClassVar[tuple[str, ...]] = ("encoder",)
  mask_rate: float = 0.15
  mask_prob: float = 0.8
  random_prob: float = 0.1

  def check(self, tokenizer: Tokenizer) -> None:
    """Needs the tokenizer's mask id."""
    _ = tokenizer.mask_id
    super().check(tokenizer)

  def examples(self, example: Example, rng: np.random.Generator, tokenizer: Tokenizer) -> list[Row]:
    """tokens + [eos] in windows of seq_len, each masked independently."""
    tokens = np.asarray([*tokenizer.encode(example[self.text_key]), tokenizer.eos_id], np.int32)
    rows = []
    for w in _chunk(tokens, self.seq_len, 0, self.overflow, self.counts):
      inputs, weights = mask_tokens(w, rng, tokenizer, self.mask_rate, self.mask_prob, self.random_prob)
      rows.append({"inputs": inputs, "targets": w, "weights": weights})
    return rows


def _seq2seq_row(encoder_inputs: np.ndarray, decoder_targets: np.ndarray) -> Row:
  """Encoder inputs, decoder targets and decoder inputs (targets shifted right, starting with pad=0)."""
  decoder_inputs = np.concatenate([[0], decoder_targets[:-1]]).astype(np.int32)
  return {"encoder_inputs": encoder_inputs, "decoder_inputs": decoder_inputs,
          "decoder_targets": decoder_targets}


@dataclasses.dataclass
class _EncoderDecoder(Objective):
  """Shared lengths and finalize of encoder-decoder objectives."""

  architectures: ClassVar[tuple[str, ...]] = ("encoder_decoder",)
  label_key: ClassVar[str] = "decoder_targets"
  inputs_len: int = 512
  targets_len: int = 128

  def model_inputs(self, batch: Row) -> tuple[tuple, dict]:
    """Encoder and decoder ids with their segment ids and positions."""
    return (batch["encoder_inputs"], batch["decoder_inputs"]), {
        k: batch[k] for k in ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids",
                              "decoder_positions")}

  def lengths(self) -> dict[str, int]:
    """Encoder features of inputs_len, decoder features of targets_len."""
    return {"encoder_inputs": self.inputs_len, "decoder_inputs": self.targets_len,
            "decoder_targets": self.targets_len}

  def finalize(self, row: Row) -> Row:
    """encoder_*/decoder_* keys and weights = 1 on real decoder tokens."""
    seg = row["decoder_targets_segment_ids"]
    return dict(encoder_inputs=row["encoder_inputs"], encoder_segment_ids=row["encoder_inputs_segment_ids"],
                encoder_positions=row["encoder_inputs_positions"], decoder_inputs=row["decoder_inputs"],
                decoder_targets=row["decoder_targets"], decoder_segment_ids=seg,
                decoder_positions=row["decoder_targets_positions"], weights=(seg > 0).astype(np.float32))


@dataclasses.dataclass
class SpanCorruption(_EncoderDecoder):
  """T5 span corruption; documents are cut into raw pieces whose corrupted forms fit the lengths."""

  targets_len: int = 114
  noise_density: float = 0.15
  mean_noise_span_length: float = 3.0
  overflow: str = "split"
  text_key: str = "text"

  def raw_length(self) -> int:
    """Raw tokens per piece (568 for the T5 defaults 512/114)."""
    return span_corruption_raw_length(self.inputs_len, self.targets_len, self.noise_density,
                                      self.mean_noise_span_length)

  def check(self, tokenizer: Tokenizer) -> None:
    """Needs enough sentinel ids for the largest number of spans."""
    super().check(tokenizer)
    if self.overflow not in ("split", "truncate"):
      raise ValueError(f"overflow must be 'split' or 'truncate', got {self.overflow!r}")
    raw = self.raw_length()
    spans = span_counts(raw, self.noise_density, self.mean_noise_span_length)[1]
    if raw < 1 or spans > tokenizer.num_extra_ids:
      raise ValueError(f"SpanCorruption needs {spans} sentinel ids (raw length {raw}); "
                       f"the tokenizer has num_extra_ids={tokenizer.num_extra_ids}")

  def examples(self, example: Example, rng: np.random.Generator, tokenizer: Tokenizer) -> list[Row]:
    """One corrupted row per raw piece of the document."""
    tokens = np.asarray(tokenizer.encode(example[self.text_key]), np.int32)
    rows = []
    for piece in _chunk(tokens, self.raw_length(), 0, self.overflow, self.counts):
      if len(piece):
        mask = random_spans_noise_mask(len(piece), self.noise_density, self.mean_noise_span_length, rng)
        rows.append(_seq2seq_row(*corrupt_spans(piece, mask, tokenizer)))
    return rows


@dataclasses.dataclass
class Seq2Seq(_EncoderDecoder):
  """Supervised sequence-to-sequence (translation): inputs_key -> targets_key, eos-ended, truncated."""

  targets_len: int = 512
  inputs_key: str = "inputs"
  targets_key: str = "targets"

  def examples(self, example: Example, rng: np.random.Generator, tokenizer: Tokenizer) -> list[Row]:
    """One row; over-long sides keep their first len - 1 tokens plus eos (counted as truncated)."""
    sides = []
    for key, length in ((self.inputs_key, self.inputs_len), (self.targets_key, self.targets_len)):
      ids = tokenizer.encode(example[key])
      if len(ids) > length - 1:
        self.counts.add(f"truncated_{key}")
      sides.append(np.asarray([*ids[:length - 1], tokenizer.eos_id], np.int32))
    return [_seq2seq_row(*sides)]
