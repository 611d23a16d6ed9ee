"""Sequence heads for fine-tuning: one vector per sequence, then class logits (or one regression output).

With ModelConfig.num_classes set, `Transformer` ends in a ClassificationHead (module `classifier`) instead of
the LM head, and returns [batch, num_classes] float32 logits. ModelConfig.pooling picks the vector:

  'cls'   the first token ([CLS]; t_jax puts BOS there) through BERT's pooler, dense + tanh   (encoders)
  'first' the first token as it is: ViT's class token (the final norm is the stack's), no pooler
  'mean'  the mean of the non-padding tokens
  'last'  the last non-padding token: in a causal decoder the only one that has read the whole row

None picks 'cls' for encoders ('first', or 'mean' without a class token, for image encoders) and 'last' for
decoder and prefix-LM models. Padding is where the padding mask / segment ids are 0.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from t_jax.models.config import ModelConfig
from t_jax.models.layers import dense

Array = jnp.ndarray


def pooling_of(cfg: ModelConfig) -> str:
  """The configured pooling, or the architecture's default."""
  if cfg.pooling or cfg.architecture != "encoder":
    return cfg.pooling or "last"
  if cfg.input_stem == "patches":  # ViT: the class token as it is, or the mean of the patches
    return "first" if cfg.class_token else "mean"
  return "cls"


def pool(x: Array, mask: Optional[Array], pooling: str) -> Array:
  """[batch, seq, embed] -> [batch, embed]: the first token, the mean of real tokens, or the last real one."""
  if pooling in ("cls", "first"):
    return x[:, 0]
  real = jnp.ones(x.shape[:2], bool) if mask is None else mask > 0
  if pooling == "mean":
    w = real.astype(x.dtype)[..., None]
    return (x * w).sum(1) / jnp.maximum(w.sum(1), 1)
  last = jnp.max(jnp.where(real, jnp.arange(x.shape[1]), 0), axis=1)
  return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]


class ClassificationHead(nn.Module):
  """pool -> (BERT pooler: dense + tanh, for 'cls') -> dropout -> dense to num_classes (float32 logits; no
  bias after 'last' pooling): the parameters of HF's Bert/GPT2/LlamaForSequenceClassification heads."""

  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array]) -> Array:
    """x [batch, seq, embed], mask [batch, seq] (0 = padding) or None -> [batch, num_classes]."""
    cfg, pooling = self.cfg, pooling_of(self.cfg)
    h = pool(x, mask, pooling)
    if pooling == "cls":
      h = jnp.tanh(dense(cfg, cfg.d_model, ("embed", "embed_out"), "pooler")(h))
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
    # 'last' (decoders): a bias-free score layer, as in GPT-2's and Llama's *ForSequenceClassification
    bias = False if pooling == "last" else None
    logits = dense(cfg, cfg.num_classes, ("embed", "classes"), "logits", use_bias=bias)(h)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "classes"))
