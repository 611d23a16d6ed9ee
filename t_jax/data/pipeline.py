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
  missing = batch_size - len(rows)
  return {k: np.stack([r[k] for r in rows] + [np.zeros_like(rows[0][k])] * missing) for k in rows[0]}


def make_dataset(source: Sequence, tokenizer: Tokenizer, objective: Objective, *, batch_size: int,
                 train: bool = True, seed: int = 0, num_epochs: int | None = None, shard_index: int = 0,
                 shard_count: int = 1, packing_bins: int | None = None, num_threads: int = 4,
                 prefetch_buffer_size: int = 128) -> grain.IterDataset:
  """The grain IterDataset of fixed-shape batches (see t_jax.data for the keys).

  train=True shuffles each epoch (seeded) and repeats `num_epochs` times (None = forever);
  train=False is one ordered pass whose last batch is padded with zero-weight rows.
  This process reads only elements shard_index, shard_index + shard_count, ... of the source.
  """
  objective = objective.for_stream(train)
  objective.check(tokenizer)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  ds = grain.MapDataset.source(source)[shard_index::shard_count]
  if len(ds) == 0:
    raise ValueError(f"{getattr(source, 'name', source)!r}: shard {shard_index}/{shard_count} is empty")
  if train:
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
  # Objective rows of each example; random_map seeds its rng from (seed, element index).
  ds = ds.random_map(functools.partial(objective.examples, tokenizer=tokenizer), seed=seed)
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
  """`make_dataset`'s checkpointable iterator: `next(it)`, `it.get_state()` (JSON-able), `it.set_state(s)`."""
  return iter(make_dataset(source, tokenizer, objective, batch_size=batch_size, **kwargs))
