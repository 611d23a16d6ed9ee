"""One model behind a uniform prefill / step interface (decoder-only, prefix-LM, encoder-decoder)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from t_jax.inference import cache as cache_lib
from t_jax.inference import paged as paged_lib
from t_jax.models import ModelConfig, build_model

Array = jax.Array
PyTree = Any
State = dict  # {"cache": ..., "enc_mask": [batch, src] (encoder-decoder only)}


def model_config(model_or_cfg: Any) -> ModelConfig:
  """The ModelConfig of a config or a t_jax model; encoder-only models do not generate."""
  cfg = model_or_cfg if isinstance(model_or_cfg, ModelConfig) else getattr(model_or_cfg, "cfg", None)
  if not isinstance(cfg, ModelConfig):
    raise ValueError(f"expected a ModelConfig or a t_jax model, got {type(model_or_cfg).__name__}")
  if cfg.architecture == "encoder":
    raise ValueError("encoder-only models do not generate; use a decoder, prefix_lm or encoder_decoder model")
  return cfg


def left_pad_positions(lengths: Array, width: int) -> Array:
  """Positions of left-padded rows: -1 on padding, then 0..length-1, shape [batch, width]."""
  pos = jnp.arange(width, dtype=jnp.int32)[None, :] - (width - lengths[:, None])
  return jnp.where(pos < 0, -1, pos).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Runner:
  """`prefill` runs a prompt in one parallel pass; `step` feeds new tokens against the KV cache.

  Decoder-only prompts are LEFT-padded (the last column is every row's last prompt token);
  encoder-decoder sources are RIGHT-padded and the decoder starts from `start_id`.
  `slots` is the self-attention cache length (a ring buffer for sliding-window models). With page_size > 0
  the cache is paged instead (t_jax.inference.paged): a pool of num_pages pages, max_pages per row.
  """

  cfg: ModelConfig
  slots: int
  start_id: int = 0
  page_size: int = 0
  num_pages: int = 0
  max_pages: int = 0

  @property
  def model(self) -> Any:
    """The decode-mode Flax module."""
    return build_model(self.cfg, decode=True)

  @property
  def seq2seq(self) -> bool:
    """Whether prompts are encoder inputs."""
    return self.cfg.architecture == "encoder_decoder"

  def _clip(self, positions: Array) -> Array:
    """Learned tables have max_len rows; overrun tokens are only ever speculative drafts past the end."""
    if self.cfg.position != "learned":
      return positions
    return jnp.where(positions >= 0, jnp.minimum(positions, self.cfg.max_len - 1), positions)

  def empty_pages(self, params: PyTree, batch: int, src_len: int = 1) -> PyTree:
    """A paged cache: an all-zero page pool and unmapped page tables for `batch` rows (encoder-decoder: and
    zero cross-attention keys/values for sources of src_len, filled by prefill)."""
    one = jnp.zeros((batch, 1), jnp.int32)
    if self.seq2seq:
      encoded = jnp.zeros((batch, src_len, self.cfg.d_model), self.cfg.dtype)
      kw = dict(encoded=encoded, encoder_padding_mask=jnp.ones((batch, src_len), jnp.int32), decoder_positions=one)
      call = lambda p: self._apply(p, None, None, one, **kw)[1]
    else:
      call = lambda p: self._apply(p, None, one, positions=one)[1]
    return paged_lib.allocate(jax.eval_shape(call, params), self.num_pages, self.page_size, self.max_pages, batch)

  def _apply(self, params: PyTree, cache: Optional[PyTree], *args: Any, **kw: Any) -> tuple[Array, PyTree]:
    """The decode-mode model on a cache (None: its init): (logits, new cache)."""
    variables = {"params": params} if cache is None else {"params": params, "cache": cache}
    logits, out = self.model.apply(variables, *args, mutable=["cache"], **kw)
    return logits, out["cache"]

  def _apply_fresh(self, params: PyTree, batch: int, *args: Any, **kw: Any) -> tuple[Array, PyTree]:
    """`_apply` on an empty contiguous cache of `slots` slots per row."""
    shapes = jax.eval_shape(lambda p: self._apply(p, None, *args, **kw)[1], params)
    return self._apply(params, cache_lib.allocate(shapes, batch, self.slots), *args, **kw)

  def prefill(self, params: PyTree, ids: Array, lengths: Array,
              paged: dict | None = None) -> tuple[Array, State, Array]:
    """(next-token logits [batch, vocab], state, position of the next fed token [batch]).

    paged: {cache: a paged cache, table: page tables [batch, max_pages], start: [batch]}; the rows' first
    `start` positions are in the pages already (a shared prefix), and ids hold the tokens after them.
    """
    if self.seq2seq:
      return self._prefill_seq2seq(params, ids, lengths, paged)
    b = ids.shape[0]
    pos = left_pad_positions(lengths, ids.shape[1])
    start = jnp.zeros((b,), jnp.int32) if paged is None else paged["start"].astype(jnp.int32)
    pos = self._clip(jnp.where(pos >= 0, pos + start[:, None], -1))
    prefix = lengths if self.cfg.architecture == "prefix_lm" else None
    # Causal models cache all but the last token (their unused logits are compiled away), then feed
    # it alone: no [batch, prompt, vocab] logits. A prefix-LM prompt must be one bidirectional pass.
    split = prefix is None and ids.shape[1] > 1
    head, head_pos = (ids[:, :-1], pos[:, :-1]) if split else (ids, pos)
    if paged is None:
      logits, cache = self._apply_fresh(params, b, head, positions=head_pos, prefix_len=prefix)
    else:
      cache = paged_lib.set_tables(paged["cache"], paged["table"])
      logits, cache = self._apply(params, cache, head, positions=head_pos, prefix_len=prefix)
    state = {"cache": cache}
    if split:
      logits, state = self.step(params, state, ids[:, -1:], pos[:, -1:])
    return logits[:, -1], state, (start + lengths).astype(jnp.int32)

  def _prefill_seq2seq(self, params: PyTree, src: Array, lengths: Array,
                       paged: dict | None = None) -> tuple[Array, State, Array]:
    b = src.shape[0]
    mask = (jnp.arange(src.shape[1])[None, :] < lengths[:, None]).astype(jnp.int32)
    encoded = self.model.apply({"params": params}, src, encoder_padding_mask=mask, method="encode")
    start = jnp.full((b, 1), self.start_id, jnp.int32)
    kw = dict(encoded=encoded, encoder_padding_mask=mask, decoder_positions=jnp.zeros((b, 1), jnp.int32))
    if paged is None:
      logits, cache = self._apply_fresh(params, b, None, start, **kw)
    else:  # the decoder's self-attention in pages (its positions start at 0: no shared prefix)
      logits, cache = self._apply(params, paged_lib.set_tables(paged["cache"], paged["table"]), None, start, **kw)
    return logits[:, -1], {"cache": cache, "enc_mask": mask}, jnp.ones((b,), jnp.int32)

  def step(self, params: PyTree, state: State, tokens: Array, positions: Array) -> tuple[Array, State]:
    """Feeds tokens [batch, t] at positions [batch, t]: (logits [batch, t, vocab], new state)."""
    pos = self._clip(positions.astype(jnp.int32))
    if self.seq2seq:
      logits, cache = self._apply(params, state["cache"], None, tokens, decoder_positions=pos,
                                  encoder_padding_mask=state["enc_mask"])
    else:
      logits, cache = self._apply(params, state["cache"], tokens, positions=pos)
    return logits, dict(state, cache=cache)


def repeat_state(state: State, n: int, paged: bool = False) -> State:
  """Every row repeated n times in a row (beams share one prefill). paged: only the per-row leaves of a paged
  cache (cross-attention); its pages are mapped to beams by paged.beam_reorder."""
  cache = state["cache"]
  if paged:
    cross = lambda path, x: jnp.repeat(x, n, axis=-4) if cache_lib._name(path) in ("cross_k", "cross_v") else x
    cache = jax.tree_util.tree_map_with_path(cross, cache)
  out = dict(state, cache=cache if paged else cache_lib.repeat(cache, n))
  if "enc_mask" in state:
    out["enc_mask"] = jnp.repeat(state["enc_mask"], n, axis=0)
  return out


def gather_state(state: State, rows: Array) -> State:
  """Rows reordered by flat batch indices (beam parents); encoder masks agree within a beam group."""
  return dict(state, cache=cache_lib.gather(state["cache"], rows))
