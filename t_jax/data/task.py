"""TaskConfig: what a run trains on (sources, objective, tokenizer, input pipeline), and its iterators."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import grain
import jax
import numpy as np

from t_jax.data.hf_tokenizer import load_tokenizer
from t_jax.data.objectives import CausalLM, Objective, PrefixLM
from t_jax.data.pipeline import make_dataset
from t_jax.data.tokenizer import Tokenizer, VocabularyTooSmall

Batch = dict[str, Any]
# Records read from each source at start-up to estimate how many are unusable.
SAMPLE_RECORDS = 1000


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """What to train on: sources, objective, tokenizer and input-pipeline settings."""

  objective: Optional[Objective] = None  # e.g. CausalLM(seq_len=128)
  train_source: Optional[Sequence] = None  # e.g. PydocSource("train")
  eval_source: Optional[Sequence] = None  # None: no evaluation
  # A SentencePiece model, or an HF checkpoint's tokenizer (its directory or tokenizer.json; hf_tokenizer.py);
  # None: train DIR/tokenizer.model.
  tokenizer: Optional[str] = None
  vocab_size: Optional[int] = None  # tokenizer size incl. extra ids; None = ModelConfig.vocab_size
  num_extra_ids: int = 0  # T5 sentinels
  tokenizer_type: str = "unigram"  # or 'bpe', 'word', 'char'; 'byte': one id per UTF-8 byte (no training)
  tokenizer_sentences: int = 100_000  # sentences sampled to train the tokenizer
  tokenizer_character_coverage: float = 0.9995
  tokenizer_byte_fallback: bool = False  # unknown characters as UTF-8 bytes instead of <unk>
  packing_bins: Optional[int] = None  # None = batch size
  data_threads: int = 2
  prefetch: int = 64
  # Refuse a source when more than this fraction of its records is undecodable (or, read lazily, empty).
  max_bad_fraction: float = 0.5

  def __post_init__(self) -> None:
    """Names what is missing or unknown."""
    if self.objective is None or self.train_source is None:
      raise ValueError("TaskConfig.objective and TaskConfig.train_source must be set "
                       "(include one of configs/tasks/*.gin)")
    if not isinstance(self.objective, Objective) or not self.objective.architectures:
      raise ValueError(f"TaskConfig.objective={self.objective!r} is not a t_jax.data objective")
    if not 0 <= self.max_bad_fraction <= 1:
      raise ValueError(f"TaskConfig.max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")

  @property
  def is_lm(self) -> bool:
    """Causal or prefix language modelling (perplexity, unigram baseline, continuations)."""
    return isinstance(self.objective, CausalLM | PrefixLM)

  @property
  def max_length(self) -> int:
    """Longest sequence the objective produces."""
    return max(self.objective.lengths().values(), default=0)  # 0: no sequence features (images)


def make_tokenizer(task: TaskConfig, model_vocab: int, workdir: str) -> Optional[Tokenizer]:
  """check_sources, then loads TaskConfig.tokenizer or trains (first run) / reloads DIR/tokenizer.model.

  None for objectives without text (Objective.uses_tokenizer False: image classification).
  """
  check_sources(task)
  if not task.objective.uses_tokenizer:
    return None
  if task.tokenizer is not None:
    if not os.path.exists(task.tokenizer):
      raise ValueError(f"TaskConfig.tokenizer={task.tokenizer!r} does not exist")
    tok = load_tokenizer(task.tokenizer, task.num_extra_ids)  # t_jax SentencePiece, or an HF checkpoint's
  else:
    tok = _train_tokenizer(task, model_vocab, os.path.join(workdir, "tokenizer.model"))
  if tok.vocab_size > model_vocab:
    raise ValueError(f"tokenizer has {tok.vocab_size} ids but ModelConfig.vocab_size={model_vocab}")
  _check_same_on_all_processes(tok)
  return tok


def _train_tokenizer(task: TaskConfig, model_vocab: int, path: str) -> Tokenizer:
  """Tokenizer.train with the task's settings; a vocabulary too small for the corpus names the binding."""
  size = task.vocab_size or model_vocab
  try:
    return Tokenizer.train(task.train_source, path, vocab_size=size - task.num_extra_ids,
                           model_type=task.tokenizer_type, num_extra_ids=task.num_extra_ids,
                           max_sentences=task.tokenizer_sentences,
                           character_coverage=task.tokenizer_character_coverage,
                           byte_fallback=task.tokenizer_byte_fallback)
  except VocabularyTooSmall as e:
    field = f"{'TaskConfig' if task.vocab_size else 'ModelConfig'}.vocab_size={size}"
    raise ValueError(f"{field} is too small: {e}; set it to at least {e.minimum + task.num_extra_ids} "
                     f"({e.minimum} pieces + num_extra_ids={task.num_extra_ids}), or lower "
                     f"TaskConfig.tokenizer_character_coverage={task.tokenizer_character_coverage}") from e


def check_sources(task: TaskConfig) -> None:
  """Prints one line of counts per source; ValueError when the fraction of None records in an evenly spaced
  sample (plus those dropped at load time) is above TaskConfig.max_bad_fraction."""
  for role, source in (("train", task.train_source), ("eval", task.eval_source)):
    if source is None:
      continue
    name = getattr(source, "name", type(source).__name__)
    sample = np.unique(np.linspace(0, len(source) - 1, min(len(source), SAMPLE_RECORDS)).astype(int))
    none = sum(source[int(i)] is None for i in sample)
    dropped = getattr(source, "load_counts", {}).get("undecodable", 0)
    bad = (none / len(sample) * len(source) + dropped) / (len(source) + dropped)
    stats = getattr(source, "stats", {"documents": len(source)})
    counts = ", ".join(f"{k} {v:,}" for k, v in stats.items())
    if jax.process_index() == 0:
      print(f"data: {role} {name}: {counts}; {none} of {len(sample)} sampled records unusable", flush=True)
    if bad > task.max_bad_fraction:
      raise ValueError(f"{role} source {name} is mostly unusable: {bad:.1%} of its records are undecodable "
                       f"or empty ({counts}; {none} of {len(sample)} sampled records unusable), above "
                       f"TaskConfig.max_bad_fraction={task.max_bad_fraction}")


def _check_same_on_all_processes(tok: Tokenizer) -> None:
  """Every process trains or loads its own tokenizer: make sure they all hold process 0's model."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  digest = np.frombuffer(hashlib.sha256(tok.model_proto).digest(), np.uint8)
  if not np.array_equal(multihost_utils.broadcast_one_to_all(digest), digest):
    raise ValueError(f"process {jax.process_index()}'s tokenizer differs from process 0's: give every process "
                     "the same TaskConfig.tokenizer file (or the same training data)")


def _sliced(task: TaskConfig, tok: Tokenizer, source: Sequence, batch_size: int, train: bool,
            seed: int) -> grain.DatasetIterator:
  """This process's rows of a global batch stream (checkpointable, the same state on every process): every
  process runs the whole pipeline, so the batches of every step do not depend on the process count."""
  index, count = jax.process_index(), jax.process_count()
  if batch_size % count:
    raise ValueError(f"batch size {batch_size} is not divisible by the {count} processes")
  ds = make_dataset(source, tok, task.objective, batch_size=batch_size, train=train, seed=seed,
                    packing_bins=task.packing_bins, num_threads=task.data_threads,
                    prefetch_buffer_size=task.prefetch)
  n = batch_size // count
  return iter(ds.map(lambda batch: {k: v[index * n:(index + 1) * n] for k, v in batch.items()}))


def train_iterator(task: TaskConfig, tok: Tokenizer, batch_size: int, seed: int) -> grain.DatasetIterator:
  """Shuffled, repeating, checkpointable iterator over this process's rows of global batches of batch_size."""
  return _sliced(task, tok, task.train_source, batch_size, True, seed)


def ordered_batches(task: TaskConfig, tok: Tokenizer, source: Sequence, batch_size: int,
                    limit: Optional[int]) -> Iterator[Batch]:
  """One ordered pass (at most `limit` global batches; the last is padded with zero weights), this process's rows.

  Every process reads the same global pass, so all run the same number of (collective) eval steps.
  """
  return itertools.islice(_sliced(task, tok, source, batch_size, False, 0), limit)


def count_tokens(batch: Batch) -> int:
  """Non-padding tokens the model reads in a host batch (encoder + decoder for seq2seq; images: real rows)."""
  if "image" in batch:
    return int(np.count_nonzero(batch["weights"]))
  keys = ("encoder_segment_ids", "decoder_segment_ids") if "encoder_inputs" in batch else ("segment_ids",)
  return int(sum(np.count_nonzero(batch[k]) for k in keys))
