"""Tasks: data source + objective + tokenizer (TaskConfig), and how each objective calls the model.

configs/tasks/*.gin wire t_jax.data classes with gin references, e.g.

  TaskConfig.objective = @CausalLM()
  CausalLM.seq_len = 128
  TaskConfig.train_source = @train/PydocSource()
  TaskConfig.eval_source = @validation/PydocSource()
  validation/PydocSource.split = 'validation'
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import numpy as np

from t_jax import data
from t_jax.models import ModelConfig

Batch = dict[str, Any]

# Objective class -> batch layout ("kind") and the model architectures that can train on it.
KINDS = {data.CausalLM: "causal_lm", data.PrefixLM: "prefix_lm", data.MaskedLM: "mlm",
         data.SpanCorruption: "seq2seq", data.Seq2Seq: "seq2seq"}
ARCHITECTURES = {"causal_lm": ("decoder", "prefix_lm"), "prefix_lm": ("prefix_lm",), "mlm": ("encoder",),
                 "seq2seq": ("encoder_decoder",)}
LM_KINDS = ("causal_lm", "prefix_lm")


def _register(obj: Any, name: str) -> None:
  """Makes a t_jax.data class bindable from gin, unless t_jax.data already registered it."""
  if not gin.config._REGISTRY.matching_selectors(name):  # noqa: SLF001 - gin has no public lookup
    gin.external_configurable(obj, name=name, module="t_jax.data")


for _cls in (data.PydocSource, data.TextFileSource, data.ParallelTextSource, data.TfdsSource, data.CausalLM,
             data.PrefixLM, data.MaskedLM, data.SpanCorruption, data.Seq2Seq):
  _register(_cls, _cls.__name__)
_register(data.ParallelTextSource.from_prefix, "ParallelTextPrefix")  # {prefix}.{lang}[.gz] pairs


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """What to train on: sources, objective, tokenizer and input-pipeline settings."""

  objective: Optional[data.Objective] = None  # e.g. @CausalLM()
  train_source: Optional[Sequence] = None  # e.g. @train/PydocSource()
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
    if not any(isinstance(self.objective, c) for c in KINDS):
      raise ValueError(f"TaskConfig.objective={self.objective!r} is not one of {[c.__name__ for c in KINDS]}")

  @property
  def kind(self) -> str:
    """Batch layout: causal_lm, prefix_lm, mlm or seq2seq."""
    return next(k for c, k in KINDS.items() if isinstance(self.objective, c))

  @property
  def max_length(self) -> int:
    """Longest sequence the objective produces."""
    return max(self.objective.lengths().values())


def check_compatible(task: TaskConfig, model_cfg: ModelConfig) -> None:
  """The objective's batches must suit the model's architecture, vocabulary and position table."""
  if model_cfg.architecture not in ARCHITECTURES[task.kind]:
    raise ValueError(f"objective {type(task.objective).__name__} needs ModelConfig.architecture in "
                     f"{ARCHITECTURES[task.kind]}, got {model_cfg.architecture!r}")
  if task.vocab_size is not None and task.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"TaskConfig.vocab_size={task.vocab_size} exceeds ModelConfig.vocab_size={model_cfg.vocab_size}")
  if model_cfg.position == "learned" and task.max_length > model_cfg.max_len:
    raise ValueError(f"sequence length {task.max_length} exceeds ModelConfig.max_len={model_cfg.max_len} "
                     "(learned positions)")


def make_tokenizer(task: TaskConfig, model_cfg: ModelConfig, workdir: str) -> data.Tokenizer:
  """Loads TaskConfig.tokenizer, or trains (first run) / reloads (resume) DIR/tokenizer.model."""
  if task.tokenizer is not None:
    if not os.path.exists(task.tokenizer):
      raise ValueError(f"TaskConfig.tokenizer={task.tokenizer!r} does not exist")
    tok = data.Tokenizer.load(task.tokenizer, task.num_extra_ids)
  else:
    vocab = (task.vocab_size or model_cfg.vocab_size) - task.num_extra_ids
    tok = data.Tokenizer.train(task.train_source, os.path.join(workdir, "tokenizer.model"), vocab_size=vocab,
                               model_type=task.tokenizer_type, num_extra_ids=task.num_extra_ids,
                               max_sentences=task.tokenizer_sentences,
                               character_coverage=task.tokenizer_character_coverage,
                               byte_fallback=task.tokenizer_byte_fallback)
  if tok.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"tokenizer has {tok.vocab_size} ids but ModelConfig.vocab_size={model_cfg.vocab_size}")
  _check_same_on_all_processes(tok)
  return tok


def _check_same_on_all_processes(tok: data.Tokenizer) -> None:
  """Every process trains or loads its own tokenizer: make sure they all hold process 0's model."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils
  digest = np.frombuffer(hashlib.sha256(tok.model_proto).digest(), np.uint8)
  if not np.array_equal(multihost_utils.broadcast_one_to_all(digest), digest):
    raise ValueError(f"process {jax.process_index()}'s tokenizer differs from process 0's: give every process "
                     "the same TaskConfig.tokenizer file (or the same training data)")


def train_iterator(task: TaskConfig, tok: data.Tokenizer, batch_size: int, seed: int) -> Iterator[Batch]:
  """Shuffled, repeating, checkpointable iterator over this process's shard of the training data."""
  return data.make_iterator(task.train_source, tok, task.objective, batch_size=batch_size, train=True,
                            seed=seed, **_pipeline_kwargs(task))


def ordered_batches(task: TaskConfig, tok: data.Tokenizer, source: Sequence, batch_size: int,
                    limit: Optional[int]) -> Iterator[Batch]:
  """One ordered pass (at most `limit` batches; the last is padded with zero weights).

  With several processes each reads its own shard, and shards can run out at different batches: every
  process then yields exactly `limit` batches, the missing ones all zero (weight 0), so all of them run
  the same number of (collective) eval steps.
  """
  it = data.make_iterator(source, tok, task.objective, batch_size=batch_size, train=False, seed=0,
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


def forward(model: nn.Module, params: Any, batch: Batch, kind: str, rngs: Optional[dict] = None
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(logits, targets, weights) of one batch, calling the model the way its objective needs."""
  variables = {"params": params}
  if kind == "seq2seq":
    logits = model.apply(variables, batch["encoder_inputs"], batch["decoder_inputs"],
                         encoder_segment_ids=batch["encoder_segment_ids"], encoder_positions=batch["encoder_positions"],
                         decoder_segment_ids=batch["decoder_segment_ids"], decoder_positions=batch["decoder_positions"],
                         rngs=rngs)
    return logits, batch["decoder_targets"], batch["weights"]
  kw = {"prefix_len": batch["prefix_len"]} if kind == "prefix_lm" else {}
  logits = model.apply(variables, batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                       rngs=rngs, **kw)
  return logits, batch["targets"], batch["weights"]


def count_tokens(batch: Batch) -> int:
  """Non-padding tokens the model reads in a host batch (encoder + decoder for seq2seq)."""
  keys = ("encoder_segment_ids", "decoder_segment_ids") if "encoder_inputs" in batch else ("segment_ids",)
  return int(sum(np.count_nonzero(batch[k]) for k in keys))
