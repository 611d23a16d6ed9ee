"""TaskConfig: what a run trains on (sources, objective, tokenizer, input pipeline), and its iterators."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import jax
import numpy as np

from t_jax.data.objectives import CausalLM, Objective, PrefixLM
from t_jax.data.pipeline import make_iterator
from t_jax.data.tokenizer import Tokenizer

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """What to train on: sources, objective, tokenizer and input-pipeline settings."""

  objective: Optional[Objective] = None  # e.g. CausalLM(seq_len=128)
  train_source: Optional[Sequence] = None  # e.g. PydocSource("train")
  eval_source: Optional[Sequence] = None  # None: no evaluation
  tokenizer: Optional[str] = None  # an existing SentencePiece model; None: train DIR/tokenizer.model
  vocab_size: Optional[int] = None  # tokenizer size incl. extra ids; None = ModelConfig.vocab_size
  num_extra_ids: int = 0  # T5 sentinels
  tokenizer_type: str = "unigram"  # or 'bpe'
  tokenizer_sentences: int = 100_000  # sentences sampled to train the tokenizer
  tokenizer_character_coverage: float = 0.9995
  tokenizer_byte_fallback: bool = False  # unknown characters as UTF-8 bytes instead of <unk>
  packing_bins: Optional[int] = None  # None = batch size
  data_threads: int = 2
  prefetch: int = 64

  def __post_init__(self) -> None:
    """Names what is missing or unknown."""
    if self.objective is None or self.train_source is None:
      raise ValueError("TaskConfig.objective and TaskConfig.train_source must be set "
                       "(include one of configs/tasks/*.gin)")
    if not isinstance(self.objective, Objective) or not self.objective.architectures:
      raise ValueError(f"TaskConfig.objective={self.objective!r} is not a t_jax.data objective")

  @property
  def is_lm(self) -> bool:
    """Causal or prefix language modelling (perplexity, unigram baseline, continuations)."""
    return isinstance(self.objective, CausalLM | PrefixLM)

  @property
  def max_length(self) -> int:
    """Longest sequence the objective produces."""
    return max(self.objective.lengths().values())


def make_tokenizer(task: TaskConfig, model_vocab: int, workdir: str) -> Tokenizer:
  """Loads TaskConfig.tokenizer, or trains (first run) / reloads (resume) DIR/tokenizer.model."""
  if task.tokenizer is not None:
    if not os.path.exists(task.tokenizer):
      raise ValueError(f"TaskConfig.tokenizer={task.tokenizer!r} does not exist")
    tok = Tokenizer.load(task.tokenizer, task.num_extra_ids)
  else:
    tok = Tokenizer.train(task.train_source, os.path.join(workdir, "tokenizer.model"),
                          vocab_size=(task.vocab_size or model_vocab) - task.num_extra_ids,
                          model_type=task.tokenizer_type, num_extra_ids=task.num_extra_ids,
                          max_sentences=task.tokenizer_sentences,
                          character_coverage=task.tokenizer_character_coverage,
                          byte_fallback=task.tokenizer_byte_fallback)
  if tok.vocab_size > model_vocab:
    raise ValueError(f"tokenizer has {tok.vocab_size} ids but ModelConfig.vocab_size={model_vocab}")
  _check_same_on_all_processes(tok)
  return tok


def _check_same_on_all_processes(tok: Tokenizer) -> None:
  """Every process trains or loads its own tokenizer: make sure they all hold process 0's model."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  digest = np.frombuffer(hashlib.sha256(tok.model_proto).digest(), np.uint8)
  if not np.array_equal(multihost_utils.broadcast_one_to_all(digest), digest):
    raise ValueError(f"process {jax.process_index()}'s tokenizer differs from process 0's: give every process "
                     "the same TaskConfig.tokenizer file (or the same training data)")


def train_iterator(task: TaskConfig, tok: Tokenizer, batch_size: int, seed: int) -> Iterator[Batch]:
  """Shuffled, repeating, checkpointable iterator over this process's shard of the training data."""
  return make_iterator(task.train_source, tok, task.objective, batch_size=batch_size, train=True, seed=seed,
                       **_pipeline_kwargs(task))


def ordered_batches(task: TaskConfig, tok: Tokenizer, source: Sequence, batch_size: int,
                    limit: Optional[int]) -> Iterator[Batch]:
  """One ordered pass (at most `limit` batches; the last is padded with zero weights).

  With several processes each reads its own shard, and shards can run out at different batches: every
  process then yields exactly `limit` batches, the missing ones all zero (weight 0), so all of them run
  the same number of (collective) eval steps.
  """
  it = make_iterator(source, tok, task.objective, batch_size=batch_size, train=False, seed=0,
                     **_pipeline_kwargs(task))
  n, batch = 0, None
  for batch in it:
    if limit is not None and n >= limit:
      return
    yield batch
    n += 1
  if limit is not None and jax.process_count() > 1 and batch is not None:
    for _ in range(limit - n):
      yield {k: np.zeros_like(v) for k, v in batch.items()}


def _pipeline_kwargs(task: TaskConfig) -> dict:
  return dict(shard_index=jax.process_index(), shard_count=jax.process_count(), packing_bins=task.packing_bins,
              num_threads=task.data_threads, prefetch_buffer_size=task.prefetch)


def count_tokens(batch: Batch) -> int:
  """Non-padding tokens the model reads in a host batch (encoder + decoder for seq2seq)."""
  keys = ("encoder_segment_ids", "decoder_segment_ids") if "encoder_inputs" in batch else ("segment_ids",)
  return int(sum(np.count_nonzero(batch[k]) for k in keys))
