"""The model body: attention, block and stack, and the two models built from them.

  Transformer      one stack over one sequence; its mask mode follows cfg.architecture:
                   decoder (causal, GPT), prefix_lm (bidirectional prefix), encoder (bidirectional, BERT MLM);
                   input_stem='patches' reads images instead of token ids (ViT: t_jax/models/vision.py).
  EncoderDecoder   an encoder stack and a decoder stack with cross-attention (Vaswani et al., T5);
                   input_stem='audio' reads log-mel frames into the encoder (Whisper: t_jax/models/speech.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from t_jax.attention import Mask, attention, variants
from t_jax.models import kv_cache
from t_jax.models import positions as pos_lib
from t_jax.models.config import ModelConfig
from t_jax.models.heads import ClassificationHead
from t_jax.models.layers import MLP, Embed, PositionEmbed, activation, dense, norm, remat_policy
from t_jax.models.reversible import reversible
from t_jax.models.speech import AudioEmbedder, stem_mask
from t_jax.models.vision import PatchEmbedder

Array = jnp.ndarray
ACT = ("batch", "length", "embed")
MASK_MODES = {"decoder": "causal", "prefix_lm": "prefix", "encoder": "bidirectional"}


class Inputs(NamedTuple):
  """What every layer of a stack reads besides x (broadcast over the layers under nn.scan)."""

  positions: Array  # [batch, seq]
  segment_ids: Optional[Array] = None  # packing / padding (0 = padding); None = nothing masked
  prefix_len: Optional[Array] = None  # prefix-LM
  encoded: Optional[Array] = None  # encoder outputs for cross-attention (None on cached decode steps)
  encoder_segment_ids: Optional[Array] = None
  rel_table: Optional[Array] = None  # the stack's T5 relative-bias table


class Attention(nn.Module):
  """Query/key/value projections (MHA, GQA, MQA), positions, `t_jax.attention`, output projection.

  mode: 'causal' | 'prefix' | 'bidirectional' self-attention, or 'cross' (keys/values from the encoder).
  With decode=True the layer keeps a KV cache (t_jax.models.kv_cache).
  """

  cfg: ModelConfig
  mode: str
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, inputs: Inputs) -> Array:
    """x [batch, q, embed] -> [batch, q, embed]."""
    cfg, cross = self.cfg, self.mode == "cross"
    kv_shape, kv_axes = (cfg.num_kv_heads, cfg.head_dim), ("embed", "kv", "head_dim")
    project = lambda h: (dense(cfg, kv_shape, kv_axes, "key")(h), dense(cfg, kv_shape, kv_axes, "value")(h))
    q = dense(cfg, (cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"), "query")(x)
    q_pos = kv_pos = inputs.positions
    spec, state = variants.Spec() if cross else variants.Spec.of(cfg), None  # cross-attention stays softmax
    if cross:
      k, v = kv_cache.cross(self, inputs.encoded, project)
    else:
      k, v = project(x)
      q, k = pos_lib.rotate(cfg.position, q, k, q_pos, cfg.rope_theta)
      k = q if spec.kind == "lsh" else k  # Reformer's shared-QK: the queries are the keys
      if self.decode and spec.recurrent:  # performer/rfa decode from a recurrent state, not a KV cache
        state = kv_cache.recurrent(self, variants.state_shapes(spec, q.shape[0], cfg.num_heads, v.shape[-1]))
      elif self.decode:
        paged = None if spec.kind != "softmax" else kv_cache.paged_decode(  # other kinds: their own step
            self, q, k, v, q_pos, scale=None if cfg.scale_attention else 1.0)
        if paged is not None:  # a Pallas paged decode step (cfg.paged_attention_impl)
          return dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), "out", in_axes=2)(paged)
        k, v, kv_pos = kv_cache.append(self, k, v, q_pos, cfg.window or cfg.max_len)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
    bias = None if cross else pos_lib.bias(
        cfg.position, q_pos, kv_pos, num_heads=cfg.num_heads, table=inputs.rel_table,
        bidirectional=self.mode == "bidirectional", max_distance=cfg.relative_max_distance)
    dropout = 0.0 if self.deterministic else cfg.attention_dropout_rate
    q_seg, kv_seg = self._segments(inputs, q)
    explicit = self.decode and not cross  # cache slots carry absolute positions
    mask = Mask(causal=self.mode in ("causal", "prefix"), window=None if cross else cfg.window,
                q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                prefix_len=inputs.prefix_len if self.mode == "prefix" else None,
                q_positions=q_pos if explicit else None, kv_positions=kv_pos if explicit else None)
    redraw = cfg.attention_redraw and not self.deterministic and spec.kind in ("performer", "rfa", "lsh")
    aft_bias = self.param("aft_bias", nn.with_logical_partitioning(nn.initializers.zeros, (
        "heads", "relpos_buckets")), (cfg.num_heads, 2 * cfg.attention_aft_window - 1), cfg.param_dtype
    ) if spec.kind == "aft" and cfg.attention_aft_window else None
    out = attention(
        q, k, v, kind=spec, mask=mask, bias=bias, scale=None if cfg.scale_attention else 1.0,
        rng=self.make_rng("dropout") if redraw else None, aft_bias=aft_bias,
        state=None if state is None else (state["lin_s"].value, state["lin_z"].value),
        implementation=cfg.attention_impl, kernel_options=cfg.attention_kernel_options,
        dropout_rate=dropout, dropout_rng=self.make_rng("dropout") if dropout > 0 else None)
    if state is not None:  # performer/rfa decoding: (out, the updated recurrent state)
      out, (state["lin_s"].value, state["lin_z"].value) = out
    out = checkpoint_name(out, "attention_out")
    return dense(cfg, cfg.d_model, ("heads", "head_dim", "embed"), "out", in_axes=2)(out)

  def _segments(self, inputs: Inputs, q: Array) -> tuple[Optional[Array], Optional[Array]]:
    """(query, key) segment ids; cross-attention masks padded encoder positions even for unsegmented queries."""
    if self.mode != "cross":
      return inputs.segment_ids, inputs.segment_ids
    if inputs.encoder_segment_ids is None:
      return None, None
    q_seg = inputs.segment_ids if inputs.segment_ids is not None else jnp.ones(q.shape[:2], jnp.int32)
    return q_seg, inputs.encoder_segment_ids


class Block(nn.Module):
  """One layer: self-attention, optional cross-attention, feed-forward; pre- or post-LN residuals."""

  cfg: ModelConfig
  mode: str
  cross: bool = False
  deterministic: bool = True
  decode: bool = False

  def _residual(self, x: Array, sublayer: Any, name: str) -> Array:
    drop = nn.Dropout(self.cfg.dropout_rate)
    if self.cfg.pre_norm:
      return x + drop(sublayer(norm(self.cfg, f"{name}_norm")(x)), deterministic=self.deterministic)
    return norm(self.cfg, f"{name}_norm")(x + drop(sublayer(x), deterministic=self.deterministic))

  @nn.compact
  def __call__(self, x: Array, inputs: Inputs) -> tuple[Array, None]:
    """(x, inputs) -> (x, None), the nn.scan carry signature."""
    kw = dict(cfg=self.cfg, deterministic=self.deterministic, decode=self.decode)
    x = self._residual(x, lambda h: Attention(mode=self.mode, name="self_attention", **kw)(h, inputs),
                       "self_attention")
    if self.cross:
      x = self._residual(x, lambda h: Attention(mode="cross", name="cross_attention", **kw)(h, inputs),
                         "cross_attention")
    x = self._residual(x, MLP(self.cfg, deterministic=self.deterministic, name="mlp"), "mlp")
    return nn.with_logical_constraint(x, ACT), None


class _Half(nn.Module):
  """One half of a reversible layer: normed self-attention or normed feed-forward, without the residual."""

  cfg: ModelConfig
  mode: str
  part: str
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, inputs: Inputs) -> Array:
    """f(x) or g(x) of t_jax.models.reversible."""
    h = norm(self.cfg, f"{self.part}_norm")(x)
    if self.part == "mlp":
      return MLP(self.cfg, deterministic=self.deterministic, name="mlp")(h)
    return Attention(self.cfg, self.mode, self.deterministic, name="self_attention")(h, inputs)


class Stack(nn.Module):
  """`num_layers` Blocks (unrolled or nn.scan, optionally rematerialised) plus the final pre-LN norm."""

  cfg: ModelConfig
  num_layers: int
  mode: str
  cross: bool = False
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, inputs: Inputs) -> Array:
    """Runs the layers over x [batch, seq, embed]."""
    cfg = self.cfg
    if cfg.position == "t5_relative":  # one bucket table per stack, shared by its layers (as in T5)
      inputs = inputs._replace(rel_table=self.param("relative_bias", nn.with_logical_partitioning(
          nn.initializers.normal(1.0), ("relpos_buckets", "heads")), (cfg.relative_buckets, cfg.num_heads),
          cfg.param_dtype))
    if cfg.reversible:  # RevNet layers on two copies of x; their mean goes on (t_jax/models/reversible.py)
      halves = [_Half(cfg, self.mode, part, self.deterministic) for part in ("self_attention", "mlp")]
      params = [tuple(self.param(f"layer_{i}_{h.part}", lambda rng, h=h: h.init(rng, x, inputs)["params"])
                      for h in halves) for i in range(self.num_layers)]
      f, g = (lambda p, y, aux, h=h: h.apply({"params": p}, y, aux) for h in halves)
      x1, x2 = reversible(f, g, params, x, x, inputs)
      return norm(cfg, "final_norm")((x1 + x2) / 2)
    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(Block, policy=remat_policy(cfg.remat_policy), prevent_cse=not cfg.scan_layers)
    kw = dict(cfg=cfg, mode=self.mode, cross=self.cross, deterministic=self.deterministic, decode=self.decode)
    if cfg.scan_layers:
      scanned = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                        split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,),
                        length=self.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(**kw, name="layers")(x, inputs)
    else:
      for i in range(self.num_layers):
        x, _ = block(**kw, name=f"layer_{i}")(x, inputs)
    return norm(cfg, "final_norm")(x) if cfg.pre_norm else x


class Embedder(nn.Module):
  """Token (+ token-type) embeddings, absolute positions, optional norm and dropout."""

  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, embed: Embed, ids: Array, positions: Array, token_type_ids: Optional[Array]) -> Array:
    """ids [batch, seq] -> [batch, seq, embed]."""
    cfg = self.cfg
    x = embed(ids)
    table = PositionEmbed(cfg, name="position_embedding")() if cfg.position == "learned" else None
    absolute = pos_lib.absolute(cfg.position, positions, cfg.d_model, table)
    if absolute is not None:
      x = x + absolute.astype(x.dtype)
    if cfg.num_token_types:
      types = self.param("token_type_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(cfg.init_std or 0.02), ("token_types", "embed")),
          (cfg.num_token_types, cfg.d_model), cfg.param_dtype)
      tt = jnp.zeros_like(ids) if token_type_ids is None else token_type_ids
      x = x + jnp.take(jnp.asarray(types, cfg.dtype), tt, axis=0)
    if cfg.embed_norm:
      x = norm(cfg, "embed_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)
    return nn.with_logical_constraint(x, ACT)


class Head(nn.Module):
  """Un-embedding: tied to the token table or a separate [embed, vocab] projection; float32 logits."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array, embed: Embed) -> Array:
    """[batch, seq, embed] -> [batch, seq, vocab]."""
    cfg = self.cfg
    if cfg.tie_embeddings:
      logits = embed.attend(x * cfg.d_model ** -0.5 if cfg.scale_tied_logits else x)
      if cfg.logits_bias:
        logits = logits + self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                                     (cfg.vocab_size,), cfg.param_dtype)
    else:
      logits = dense(cfg, cfg.vocab_size, ("embed", "vocab"), "logits", use_bias=cfg.logits_bias)(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


def _inputs(ids: Array, positions: Optional[Array], segment_ids: Optional[Array],
            padding_mask: Optional[Array]) -> tuple[Array, Optional[Array]]:
  """Positions (default 0..len-1) and segment ids (packing ids, else a padding mask: 1 = real token)."""
  pos = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape) if positions is None else positions
  seg = segment_ids if segment_ids is not None else padding_mask
  return pos.astype(jnp.int32), None if seg is None else seg.astype(jnp.int32)


class Transformer(nn.Module):
  """Decoder-only (GPT), prefix-LM or encoder-only (BERT, with its MLM transform) over one sequence."""

  cfg: ModelConfig
  deterministic: bool = True
  decode: bool = False

  def setup(self) -> None:
    """Token table, embedder, one stack named by its role, the MLM transform (encoder) and the head."""
    cfg = self.cfg
    if cfg.architecture not in MASK_MODES:
      raise ValueError(f"Transformer runs {tuple(MASK_MODES)}, not {cfg.architecture!r}")
    if self.decode and (cfg.architecture == "encoder" or cfg.num_classes):
      raise ValueError("encoder-only models and sequence classifiers do not decode")
    if self.decode and cfg.reversible:
      raise ValueError("reversible models train and score; they do not decode (no KV cache inside the layers)")
    if cfg.input_stem == "patches":  # images: no token table (t_jax/models/vision.py)
      self.embedder = PatchEmbedder(cfg, self.deterministic)
    else:
      self.token_embedding = Embed(cfg)
      self.embedder = Embedder(cfg, self.deterministic)
    stack = Stack(cfg, cfg.num_layers, MASK_MODES[cfg.architecture], deterministic=self.deterministic,
                  decode=self.decode)
    if cfg.architecture == "encoder":
      self.encoder = stack
      if cfg.mlm_transform and not cfg.num_classes:
        self.mlm_dense = dense(cfg, cfg.d_model, ("embed", "embed_out"))
        self.mlm_norm = norm(cfg)
    else:
      self.decoder = stack
    if cfg.num_classes:  # fine-tuning: a sequence head (t_jax/models/heads.py) instead of the LM head
      self.classifier = ClassificationHead(cfg, self.deterministic)
    else:
      self.head = Head(cfg)
    if cfg.next_sentence:  # BERT pre-training's second head, on [CLS]
      nsp = cfg.replace(num_classes=2, pooling="cls", next_sentence=False)
      self.next_sentence = ClassificationHead(nsp, self.deterministic)

  def __call__(self, input_ids: Array, *, positions: Optional[Array] = None,
               segment_ids: Optional[Array] = None, padding_mask: Optional[Array] = None,
               prefix_len: Optional[Array] = None, token_type_ids: Optional[Array] = None) -> Array:
    """input_ids [batch, seq] -> logits [batch, seq, vocab] ([batch, num_classes] with a sequence head).

    With input_stem='patches' input_ids are images [batch, image_size, image_size, num_channels] (no padding).
    Decoding needs explicit positions.
    """
    cfg = self.cfg
    if prefix_len is not None and cfg.architecture != "prefix_lm":
      raise ValueError(f"prefix_len needs architecture='prefix_lm', not {cfg.architecture!r}")
    if self.decode and positions is None:
      raise ValueError("decoding needs explicit positions (-1 marks padding)")
    if cfg.input_stem == "patches":
      x = self.embedder(input_ids)
      pos, seg = _inputs(x[..., 0], positions, None, None)
    else:
      pos, seg = _inputs(input_ids, positions, segment_ids, padding_mask)
      x = self.embedder(self.token_embedding, input_ids, pos, token_type_ids)
    inputs = Inputs(pos, None if self.decode else seg, prefix_len)
    x = self.encoder(x, inputs) if cfg.architecture == "encoder" else self.decoder(x, inputs)
    if cfg.num_classes:
      return self.classifier(x, seg)
    nsp = self.next_sentence(x, seg) if cfg.next_sentence else None
    if cfg.architecture == "encoder" and cfg.mlm_transform:
      x = self.mlm_norm(activation(cfg.activation)(self.mlm_dense(x)))
    return self.head(x, self.token_embedding) if nsp is None else (self.head(x, self.token_embedding), nsp)


class EncoderDecoder(nn.Module):
  """Vaswani et al. / T5 encoder-decoder; `encode` runs alone too (generation feeds `encoded` back)."""

  cfg: ModelConfig
  deterministic: bool = True
  decode: bool = False

  def setup(self) -> None:
    """Shared token table, one embedder per side, two stacks, one head."""
    cfg = self.cfg
    self.token_embedding = Embed(cfg)
    if cfg.input_stem == "audio":  # log-mel frames (t_jax/models/speech.py)
      self.encoder_embedder = AudioEmbedder(cfg, self.deterministic)
    else:
      self.encoder_embedder = Embedder(cfg, self.deterministic)
    self.decoder_embedder = Embedder(cfg, self.deterministic)
    self.encoder = Stack(cfg, cfg.encoder_layers, "bidirectional", deterministic=self.deterministic)
    self.decoder = Stack(cfg, cfg.num_layers, "causal", cross=True, deterministic=self.deterministic,
                         decode=self.decode)
    self.head = Head(cfg)

  def encode(self, encoder_input_ids: Array, *, encoder_positions: Optional[Array] = None,
             encoder_segment_ids: Optional[Array] = None, encoder_padding_mask: Optional[Array] = None) -> Array:
    """Encoder outputs [batch, src, embed] (audio: [batch, stem_length(frames), embed] of frames [batch, frames,
    num_mel_bins], whose mask is per frame and whose positions the stem makes)."""
    if self.cfg.input_stem == "audio":
      mask = encoder_segment_ids if encoder_segment_ids is not None else encoder_padding_mask
      x, pos, seg = self.encoder_embedder(encoder_input_ids, mask)
      return self.encoder(x, Inputs(pos, seg))
    pos, seg = _inputs(encoder_input_ids, encoder_positions, encoder_segment_ids, encoder_padding_mask)
    return self.encoder(self.encoder_embedder(self.token_embedding, encoder_input_ids, pos, None), Inputs(pos, seg))

  def __call__(self, encoder_input_ids: Optional[Array], decoder_input_ids: Array, *,
               encoded: Optional[Array] = None, encoder_positions: Optional[Array] = None,
               encoder_segment_ids: Optional[Array] = None, encoder_padding_mask: Optional[Array] = None,
               decoder_positions: Optional[Array] = None, decoder_segment_ids: Optional[Array] = None,
               decoder_padding_mask: Optional[Array] = None) -> Array:
    """(source ids, target-input ids) -> logits [batch, tgt, vocab].

    Generation passes `encoded` (from `encode`) instead of source ids, or neither on cached decode steps.
    """
    if encoded is None and encoder_input_ids is not None:
      encoded = self.encode(encoder_input_ids, encoder_positions=encoder_positions,
                            encoder_segment_ids=encoder_segment_ids, encoder_padding_mask=encoder_padding_mask)
    if self.decode and decoder_positions is None:
      raise ValueError("decoding needs explicit decoder_positions")
    pos, seg = _inputs(decoder_input_ids, decoder_positions, decoder_segment_ids, decoder_padding_mask)
    enc_seg = _inputs(decoder_input_ids, None, encoder_segment_ids, encoder_padding_mask)[1]
    if self.cfg.input_stem == "audio" and enc_seg is not None:  # frame mask -> token mask
      enc_seg = stem_mask(enc_seg)
    x = self.decoder_embedder(self.token_embedding, decoder_input_ids, pos, None)
    x = self.decoder(x, Inputs(pos, None if self.decode else seg, encoded=encoded, encoder_segment_ids=enc_seg))
    return self.head(x, self.token_embedding)
