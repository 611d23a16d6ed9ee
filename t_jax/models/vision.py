"""The image input stem (ViT, Dosovitskiy et al. 2021): images become a sequence for the ordinary encoder stack.

With ModelConfig.input_stem='patches', `Transformer` takes float images [batch, image_size, image_size,
num_channels] instead of token ids, and its `embedder` is a PatchEmbedder:

  patchify        the image cut into non-overlapping patch_size x patch_size patches, row-major over the grid
                  [batch, num_patches, patch_size, patch_size, channels]
  patch_embedding one dense layer over each flattened patch (kernel [p, p, channels, embed] + bias): the same
                  map as a convolution with kernel = stride = patch_size (HF ViT's Conv2d)
  class_token     a learned vector put before the patches (ModelConfig.class_token); pooling 'first' reads it
  positions       'learned': a [num_patches (+1), embed] table `position_embedding`; 'sinusoidal': 2-D
                  sinusoidal (half the channels encode the patch's row, half its column; the class token
                  gets zeros); any other scheme (rope, alibi, ...) acts in attention on the raster order
  embed_norm      optional LayerNorm after the embeddings (CLIP's ln_pre); then dropout

The rest is the encoder (or decoder) stack and the classification head of t_jax/models/heads.py, unchanged.
ModelConfig.max_len and vocab_size are unused by this stem (there is no token table).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from t_jax.models.config import ModelConfig
from t_jax.models.layers import dense, norm
from t_jax.models.positions import sinusoidal

Array = jnp.ndarray
P = nn.with_logical_partitioning


def patchify(images: Array, patch_size: int) -> Array:
  """[batch, H, W, C] -> [batch, (H/p) * (W/p), p, p, C]: non-overlapping patches, row-major over the grid."""
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"patch_size={p} does not divide the image size {h}x{w}")
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p, p, c)


def sincos_2d(grid: int, dim: int) -> Array:
  """[grid * grid, dim] fixed 2-D positions: the row's 1-D sinusoid (dim / 2 channels), then the column's."""
  rows, cols = jnp.meshgrid(jnp.arange(grid), jnp.arange(grid), indexing="ij")
  return jnp.concatenate([sinusoidal(rows.reshape(-1), dim // 2), sinusoidal(cols.reshape(-1), dim // 2)], -1)


def num_tokens(cfg: ModelConfig) -> int:
  """Sequence length the stem produces: the patches plus the class token."""
  return cfg.num_patches + int(cfg.class_token)


class PatchEmbedder(nn.Module):
  """Images -> [batch, num_patches (+1), embed]: patch projection, class token, positions, norm, dropout."""

  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """images [batch, image_size, image_size, num_channels] (any float or int dtype) -> [batch, seq, embed]."""
    cfg = self.cfg
    want = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      raise ValueError(f"the patch stem takes images [batch, {', '.join(map(str, want))}] (ModelConfig.image_size, "
                       f"num_channels), got shape {tuple(images.shape)}")
    patches = patchify(jnp.asarray(images, cfg.dtype), cfg.patch_size)
    x = dense(cfg, cfg.d_model, ("patch_height", "patch_width", "channels", "embed"), "patch_embedding",
              in_axes=3)(patches)
    if cfg.class_token:
      token = self.param("class_token", P(nn.initializers.zeros, ("embed",)), (cfg.d_model,), cfg.param_dtype)
      token = jnp.broadcast_to(jnp.asarray(token, x.dtype), (x.shape[0], 1, cfg.d_model))
      x = jnp.concatenate([token, x], axis=1)
    if cfg.position == "learned":
      table = self.param("position_embedding", P(nn.initializers.normal(cfg.init_std or 0.02), ("position", "embed")),
                         (num_tokens(cfg), cfg.d_model), cfg.param_dtype)
      x = x + jnp.asarray(table, x.dtype)
    elif cfg.position == "sinusoidal":
      table = sincos_2d(cfg.image_size // cfg.patch_size, cfg.d_model)
      if cfg.class_token:
        table = jnp.concatenate([jnp.zeros((1, cfg.d_model), table.dtype), table])
      x = x + table.astype(x.dtype)
    if cfg.embed_norm:
      x = norm(cfg, "embed_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))
