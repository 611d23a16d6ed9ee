"""grain pipeline: source -> shard -> shuffle/repeat -> objective -> pack or pad -> fixed-shape batches."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import grain
import numpy as np

from t_jax.data.objectives import Objective, Row, pad_row
from t_jax.data.tokenizer import Tokenizer


class _Flatten(grain.experimental.FlatMapTransform):
  """Each upstream element is a list of rows; emit them one by one."""

  max_fan_out = 1 << 20

  def flat_map(self, element: list[Row]) -> list[Row]:
    """Returns the list itself."""
    return element


def _stack(rows: Sequence[Row], batch_size: int) -> Row:
  """Stacks rows into a batch, padding a short final batch with all-zero rows (weights 0)."""
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  missing = batch_size - len(rows)
  if missing:
    batch = {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
  return batch


def _preprocess(example: dict, rng: np.random.Generator, objective: Objective, tokenizer: Tokenizer
                ) -> list[Row]:
  """Objective rows of one example (grain's random_map seeds rng from the seed and element index)."""
  return objective.examples(example, rng, tokenizer)


def make_dataset(source: Sequence, tokenizer: Tokenizer, objective: Objective, *, batch_size: int,
                 train: bool = True, seed: int = 0, num_epochs: int | None = None, shard_index: int = 0,
                 shard_count: int = 1, packing_bins: int | None = None, num_threads: int = 4,
                 prefetch_buffer_size: int = 128) -> grain.IterDataset:
  """The grain IterDataset of fixed-shape batches (see t_jax.data for the keys).

  train=True shuffles each epoch (seeded) and repeats `num_epochs` times (None = forever);
  train=False is one ordered pass whose last batch is padded with zero-weight rows.
  This process reads only elements shard_index, shard_index + shard_count, ... of the source.
  """
  objective.check(tokenizer)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if len(ds) == 0:
    raise ValueError(f"{getattr(source, 'name', source)!r}: shard {shard_index}/{shard_count} is empty")
  if train:
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
  ds = ds.random_map(functools.partial(_preprocess, objective=objective, tokenizer=tokenizer), seed=seed)
  read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
  it = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(read), _Flatten())
  if objective.pack:
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct=objective.lengths(), num_packing_bins=packing_bins or batch_size, seed=seed,
        shuffle_bins=train)
  else:
    it = it.map(functools.partial(pad_row, lengths=objective.lengths()))
  it = it.map(objective.finalize)
  return it.batch(batch_size, batch_fn=functools.partial(_stack, batch_size=batch_size))


def make_iterator(source: Sequence, tokenizer: Tokenizer, objective: Objective, *, batch_size: int,
                  **kwargs: object) -> grain.DatasetIterator:
  """Checkpointable batch iterator: `next(it)`, `it.get_state()` (JSON-able dict), `it.set_state(s)`.

  Keyword arguments are those of `make_dataset`.
  """
  return iter(make_dataset(source, tokenizer, objective, batch_size=batch_size, **kwargs))
