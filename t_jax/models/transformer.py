"""Blocks, layer stacks and the three model classes: DecoderOnly, EncoderOnly, EncoderDecoder."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from t_jax.models import positions as pos_lib
from t_jax.models.attention import MultiHeadAttention
from t_jax.models.config import ModelConfig
from t_jax.models.layers import MLP, Embed, PositionEmbed, activation, dense, norm, remat_policy

Array = jnp.ndarray
ACT = ("batch", "length", "embed")


class Block(nn.Module):
  """One layer: self-attention, optional cross-attention, feed-forward; pre- or post-LN residuals."""

  cfg: ModelConfig
  causal: bool
  cross: bool = False
  deterministic: bool = True
  decode: bool = False

  def _residual(self, x: Array, sublayer: Any, name: str) -> Array:
    drop = nn.Dropout(self.cfg.dropout_rate)
    if self.cfg.pre_norm:
      return x + drop(sublayer(norm(self.cfg, f"{name}_norm")(x)), deterministic=self.deterministic)
    return norm(self.cfg, f"{name}_norm")(x + drop(sublayer(x), deterministic=self.deterministic))

  @nn.compact
  def __call__(self, x: Array, aux: dict) -> tuple[Array, None]:
    """(x, aux) -> (x, None); aux holds positions, segment ids, encoder outputs (scan-friendly)."""
    cfg, det = self.cfg, self.deterministic
    self_attn = MultiHeadAttention(cfg, causal=self.causal, deterministic=det, decode=self.decode,
                                   name="self_attention")
    x = self._residual(x, lambda h: self_attn(
        h, None, q_positions=aux["positions"], kv_positions=None, q_segment_ids=aux.get("segment_ids"),
        kv_segment_ids=aux.get("segment_ids"), prefix_len=aux.get("prefix_len"),
        rel_table=aux.get("rel_table")), "self_attention")
    if self.cross:
      cross_attn = MultiHeadAttention(cfg, cross=True, deterministic=det, decode=self.decode,
                                      name="cross_attention")
      x = self._residual(x, lambda h: cross_attn(
          h, aux.get("encoded"), q_positions=aux["positions"], kv_positions=None,
          q_segment_ids=aux.get("cross_q_segment_ids"), kv_segment_ids=aux.get("encoder_segment_ids")),
          "cross_attention")
    x = self._residual(x, MLP(cfg, deterministic=det, name="mlp"), "mlp")
    return nn.with_logical_constraint(x, ACT), None


class Stack(nn.Module):
  """`num_layers` Blocks (unrolled or nn.scan, optionally rematerialised) plus the final pre-LN norm."""

  cfg: ModelConfig
  num_layers: int
  causal: bool
  cross: bool = False
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, aux: dict) -> Array:
    """Runs the layers over x [batch, seq, embed]."""
    cfg = self.cfg
    if cfg.position == "t5_relative":  # one bucket table per stack, shared by its layers (as in T5)
      aux = dict(aux, rel_table=self.param(
          "relative_bias", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("relpos_buckets", "heads")),
          (cfg.relative_buckets, cfg.num_heads), cfg.weight_dtype))
    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(Block, policy=remat_policy(cfg.remat_policy), prevent_cse=not cfg.scan_layers)
    kw = dict(cfg=cfg, causal=self.causal, cross=self.cross, deterministic=self.deterministic,
              decode=self.decode)
    if cfg.scan_layers:
      scanned = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                        split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,),
                        length=self.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(**kw, name="layers")(x, aux)
    else:
      for i in range(self.num_layers):
        x, _ = block(**kw, name=f"layer_{i}")(x, aux)
    return norm(cfg, "final_norm")(x) if cfg.pre_norm else x


class Embedder(nn.Module):
  """Token (+ token-type) embeddings, absolute positions when configured, optional norm and dropout."""

  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, embed: Embed, ids: Array, positions: Array, token_type_ids: Optional[Array]) -> Array:
    """ids [batch, seq] -> [batch, seq, embed]."""
    cfg = self.cfg
    x = embed(ids)
    if cfg.position == "sinusoidal":
      x = x + pos_lib.sinusoidal(positions, cfg.d_model).astype(x.dtype)
    elif cfg.position == "learned":
      x = x + PositionEmbed(cfg, name="position_embedding")(positions)
    if cfg.num_token_types:
      table = self.param("token_type_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(cfg.init_std or 0.02), ("token_types", "embed")),
          (cfg.num_token_types, cfg.d_model), cfg.weight_dtype)
      tt = jnp.zeros_like(ids) if token_type_ids is None else token_type_ids
      x = x + jnp.take(jnp.asarray(table, cfg.compute_dtype), tt, axis=0)
    if cfg.embed_norm:
      x = norm(cfg, "embed_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)
    return nn.with_logical_constraint(x, ACT)


def _segments(ids: Array, segment_ids: Optional[Array], padding_mask: Optional[Array]) -> Optional[Array]:
  """Segment ids from either packing ids or a padding mask (1 = real token); None = no masking."""
  if segment_ids is not None:
    return segment_ids.astype(jnp.int32)
  if padding_mask is not None:
    return padding_mask.astype(jnp.int32)
  return None


def _positions(ids: Array, positions: Optional[Array]) -> Array:
  if positions is not None:
    return positions.astype(jnp.int32)
  return jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)


class _LogitsHead(nn.Module):
  """Un-embedding: tied to the token table or a separate [embed, vocab] projection."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array, embed: Embed) -> Array:
    """[batch, seq, embed] -> float32 logits [batch, seq, vocab]."""
    cfg = self.cfg
    if cfg.tie_embeddings:
      if cfg.scale_tied_logits:
        x = x * cfg.d_model ** -0.5
      logits = embed.attend(x)
      if cfg.logits_bias:
        logits = logits + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                                     (cfg.vocab_size,), cfg.weight_dtype)
    else:
      logits = dense(cfg, cfg.vocab_size, ("embed", "vocab"), "logits", use_bias=cfg.logits_bias)(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class DecoderOnly(nn.Module):
  """GPT-style causal LM; with architecture='prefix_lm', bidirectional over `prefix_len` tokens."""

  cfg: ModelConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, input_ids: Array, *, positions: Optional[Array] = None,
               segment_ids: Optional[Array] = None, padding_mask: Optional[Array] = None,
               prefix_len: Optional[Array] = None, token_type_ids: Optional[Array] = None) -> Array:
    """input_ids [batch, seq] -> logits [batch, seq, vocab]."""
    cfg = self.cfg
    if prefix_len is not None and cfg.architecture != "prefix_lm":
      raise ValueError(f"prefix_len needs architecture='prefix_lm', not {cfg.architecture!r}")
    if self.decode and positions is None:
      raise ValueError("decoding needs explicit positions (-1 marks padding)")
    embed = Embed(cfg, name="token_embedding")
    pos = _positions(input_ids, positions)
    x = Embedder(cfg, self.deterministic, name="embedder")(embed, input_ids, pos, token_type_ids)
    aux = {"positions": pos, "segment_ids": None if self.decode else _segments(input_ids, segment_ids, padding_mask),
           "prefix_len": prefix_len}
    x = Stack(cfg, cfg.num_layers, causal=True, deterministic=self.deterministic, decode=self.decode,
              name="decoder")(x, aux)
    return _LogitsHead(cfg, name="head")(x, embed)


class EncoderOnly(nn.Module):
  """BERT-style bidirectional encoder with a masked-LM head."""

  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, input_ids: Array, *, positions: Optional[Array] = None,
               segment_ids: Optional[Array] = None, padding_mask: Optional[Array] = None,
               token_type_ids: Optional[Array] = None) -> Array:
    """input_ids [batch, seq] -> MLM logits [batch, seq, vocab]."""
    cfg = self.cfg
    embed = Embed(cfg, name="token_embedding")
    pos = _positions(input_ids, positions)
    x = Embedder(cfg, self.deterministic, name="embedder")(embed, input_ids, pos, token_type_ids)
    aux = {"positions": pos, "segment_ids": _segments(input_ids, segment_ids, padding_mask)}
    x = Stack(cfg, cfg.num_layers, causal=False, deterministic=self.deterministic, name="encoder")(x, aux)
    if cfg.mlm_transform:
      x = dense(cfg, cfg.d_model, ("embed", "embed_out"), "mlm_dense")(x)
      x = norm(cfg, "mlm_norm")(activation(cfg.activation)(x))
    return _LogitsHead(cfg, name="head")(x, embed)


class EncoderDecoder(nn.Module):
  """Vaswani et al. / T5 encoder-decoder. `encode` and `decode` are usable on their own (generation)."""

  cfg: ModelConfig
  deterministic: bool = True
  decode_mode: bool = False

  def setup(self) -> None:
    """Shared token table, one embedder per side, two stacks, one head."""
    cfg = self.cfg
    self.token_embedding = Embed(cfg)
    self.encoder_embedder = Embedder(cfg, self.deterministic)
    self.decoder_embedder = Embedder(cfg, self.deterministic)
    self.encoder = Stack(cfg, cfg.encoder_layers, causal=False, deterministic=self.deterministic)
    self.decoder = Stack(cfg, cfg.num_layers, causal=True, cross=True, deterministic=self.deterministic,
                         decode=self.decode_mode)
    self.head = _LogitsHead(cfg)

  def encode(self, encoder_input_ids: Array, *, encoder_positions: Optional[Array] = None,
             encoder_segment_ids: Optional[Array] = None, encoder_padding_mask: Optional[Array] = None) -> Array:
    """Encoder outputs [batch, src, embed]."""
    pos = _positions(encoder_input_ids, encoder_positions)
    x = self.encoder_embedder(self.token_embedding, encoder_input_ids, pos, None)
    seg = _segments(encoder_input_ids, encoder_segment_ids, encoder_padding_mask)
    return self.encoder(x, {"positions": pos, "segment_ids": seg})

  def decode(self, encoded: Optional[Array], decoder_input_ids: Array, *,
             encoder_segment_ids: Optional[Array] = None, encoder_padding_mask: Optional[Array] = None,
             decoder_positions: Optional[Array] = None, decoder_segment_ids: Optional[Array] = None,
             decoder_padding_mask: Optional[Array] = None) -> Array:
    """Decoder logits [batch, tgt, vocab]; `encoded` may be None on cached decode steps."""
    if self.decode_mode and decoder_positions is None:
      raise ValueError("decoding needs explicit decoder_positions")
    pos = _positions(decoder_input_ids, decoder_positions)
    x = self.decoder_embedder(self.token_embedding, decoder_input_ids, pos, None)
    dec_seg = None if self.decode_mode else _segments(decoder_input_ids, decoder_segment_ids, decoder_padding_mask)
    enc_seg = _segments(decoder_input_ids, encoder_segment_ids, encoder_padding_mask)
    cross_q = None  # cross-attention masks padded (or other-example) encoder positions
    if enc_seg is not None:
      cross_q = dec_seg if dec_seg is not None else jnp.ones(decoder_input_ids.shape, jnp.int32)
    aux = {"positions": pos, "segment_ids": dec_seg, "encoded": encoded, "encoder_segment_ids": enc_seg,
           "cross_q_segment_ids": cross_q}
    return self.head(self.decoder(x, aux), self.token_embedding)

  def __call__(self, encoder_input_ids: Array, decoder_input_ids: Array, *,
               encoder_positions: Optional[Array] = None, encoder_segment_ids: Optional[Array] = None,
               encoder_padding_mask: Optional[Array] = None, decoder_positions: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None, decoder_padding_mask: Optional[Array] = None) -> Array:
    """(source ids, target-input ids) -> logits [batch, tgt, vocab]."""
    encoded = self.encode(encoder_input_ids, encoder_positions=encoder_positions,
                          encoder_segment_ids=encoder_segment_ids, encoder_padding_mask=encoder_padding_mask)
    return self.decode(encoded, decoder_input_ids, encoder_segment_ids=encoder_segment_ids,
                       encoder_padding_mask=encoder_padding_mask, decoder_positions=decoder_positions,
                       decoder_segment_ids=decoder_segment_ids, decoder_padding_mask=decoder_padding_mask)
