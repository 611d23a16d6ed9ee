"""Logit processing (temperature, top-k, top-p) and token choice."""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["temperature", "top_p"],
                   meta_fields=["top_k", "greedy"])
@dataclasses.dataclass(frozen=True)
class Sampler:
  """How the next token is chosen: greedy (temperature 0) or sampled from the processed distribution.

  A pytree: temperature and top_p are traced under jit (changing them does not recompile), while
  top_k, greedy and whether top_p is set (None) are static.
  """

  temperature: float | Array = 0.0  # 0 = greedy (argmax of the raw logits)
  top_k: Optional[int] = None
  top_p: Optional[float | Array] = None
  greedy: Optional[bool] = None  # derived from temperature when not given

  def __post_init__(self) -> None:
    if self.greedy is None:
      object.__setattr__(self, "greedy", bool(self.temperature == 0.0))

  def logits(self, logits: Array) -> Array:
    """Processed float32 logits; excluded tokens get -inf."""
    return process_logits(logits, 1.0 if self.greedy else self.temperature, self.top_k, self.top_p)

  def probs(self, logits: Array) -> Array:
    """The distribution tokens are drawn from."""
    return jax.nn.softmax(self.logits(logits), axis=-1)

  def choose(self, rng: Array, logits: Array) -> Array:
    """Next token ids from logits [..., vocab]."""
    if self.greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, self.logits(logits), axis=-1).astype(jnp.int32)


def process_logits(logits: Array, temperature: float = 1.0, top_k: Optional[int] = None,
                   top_p: Optional[float] = None) -> Array:
  """logits / temperature, keeping only the top_k tokens and the smallest top_p nucleus (others -inf).

  Exactly top_k tokens survive even with ties; the nucleus is the shortest prefix of the
  probability-sorted vocabulary whose mass reaches top_p (it always holds the most likely token).
  """
  x = logits.astype(jnp.float32) / temperature
  if top_k is None and top_p is None:
    return x
  order = jnp.argsort(-x, axis=-1)
  sorted_x = jnp.take_along_axis(x, order, axis=-1)
  rank = jnp.arange(x.shape[-1])
  keep = jnp.ones(sorted_x.shape, bool)
  if top_k is not None:
    keep = keep & (rank < top_k)
  if top_p is not None:
    probs = jax.nn.softmax(jnp.where(keep, sorted_x, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = keep & (mass_before < top_p)
  kept = jnp.put_along_axis(jnp.zeros(x.shape, bool), order, keep, axis=-1, inplace=False)
  return jnp.where(kept, x, -jnp.inf)


def token_logprob(logits: Array, tokens: Array) -> Array:
  """log softmax(logits)[token] under the raw model (temperature 1)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
