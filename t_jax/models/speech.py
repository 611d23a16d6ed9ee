"""The audio input stem (Whisper, Radford et al. 2022): log-mel frames become the encoder's sequence.

With ModelConfig.input_stem='audio' (architecture 'encoder_decoder'), `EncoderDecoder` takes float frames
[batch, frames, num_mel_bins] (t_jax.data.audio.log_mel) as its encoder input, and its `encoder_embedder` is an
AudioEmbedder:

  conv1      a 1-D convolution over time, kernel 3, stride 1, 'same' padding, num_mel_bins -> d_model, then the
             activation (GELU in Whisper)
  conv2      kernel 3, stride 2, padding 1, d_model -> d_model, then the activation: frames -> stem_length(frames)
             = ceil(frames / 2) tokens (Whisper: 3000 frames of 30 s -> 1500)
  positions  fixed sinusoids over the token index (t_jax.models.positions.sinusoidal), whatever
             ModelConfig.position says: that field is the decoder's (Whisper: 'learned')
  embed_norm optional LayerNorm after the embeddings; then dropout

Each convolution is the `dense` layer over windows of 3 frames (kernel [3, in, out] + bias, the map of a Conv1d
with the same weights), so LoRA and the sharding rules see an ordinary dense layer. Padding frames (mask 0) are
zeroed before each convolution, so a padded utterance's real tokens equal those of the utterance alone; the
token mask is the frame mask at the centre of each stride-2 window, stem_mask(mask) = mask[:, ::2]. The encoder
stack, decoder stack (with cross-attention), head and decoding (t_jax.inference's greedy / beam search through
`t_jax.inference.transcribe`) are the ordinary encoder-decoder's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from t_jax.models.config import ModelConfig
from t_jax.models.layers import activation, dense, norm
from t_jax.models.positions import sinusoidal

Array = jnp.ndarray
KERNEL = 3  # both convolutions (Whisper)


def stem_length(frames: int | np.ndarray) -> int | np.ndarray:
  """Tokens the stem makes of `frames` frames: conv1 keeps the length, conv2 (stride 2, padding 1) halves it
  rounding up, (frames + 2 - 3) // 2 + 1."""
  return (frames + 2 * (KERNEL // 2) - KERNEL) // 2 + 1


def stem_mask(mask: Array) -> Array:
  """Frame mask [batch, frames] -> token mask [batch, stem_length(frames)]: the mask at each window's centre."""
  return mask[:, ::2]


def windows(x: Array, stride: int) -> Array:
  """[batch, t, c] -> [batch, t_out, KERNEL, c]: the zero-padded length-3 windows a conv with this stride reads."""
  pad = KERNEL // 2
  t_out = x.shape[1] if stride == 1 else stem_length(x.shape[1])
  xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
  return jnp.stack([xp[:, i:i + stride * (t_out - 1) + 1:stride] for i in range(KERNEL)], axis=2)


class AudioEmbedder(nn.Module):
  """Frames [batch, frames, num_mel_bins] (+ frame mask) -> (tokens [batch, tokens, embed], positions, token mask)."""

  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, frames: Array, mask: Optional[Array]) -> tuple[Array, Array, Optional[Array]]:
    """Two convolutions with the activation, sinusoidal positions; mask None = no padding."""
    cfg = self.cfg
    if frames.ndim != 3 or frames.shape[-1] != cfg.num_mel_bins:
      raise ValueError(f"the audio stem takes log-mel frames [batch, frames, {cfg.num_mel_bins}] "
                       f"(ModelConfig.num_mel_bins), got shape {tuple(frames.shape)}")
    act = activation(cfg.activation)
    keep = (lambda h: h) if mask is None else (lambda h: h * (mask > 0)[..., None].astype(h.dtype))
    x = keep(jnp.asarray(frames, cfg.dtype))
    x = keep(act(dense(cfg, cfg.d_model, ("conv_width", "mel", "embed"), "conv1", in_axes=2)(windows(x, 1))))
    x = act(dense(cfg, cfg.d_model, ("conv_width", "embed", "embed_out"), "conv2", in_axes=2)(windows(x, 2)))
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    x = x + sinusoidal(positions, cfg.d_model).astype(x.dtype)
    if cfg.embed_norm:
      x = norm(cfg, "embed_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)
    seg = None if mask is None else stem_mask(mask).astype(jnp.int32)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), positions, seg


def pad_frames(features: Sequence[np.ndarray], multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Utterances [frames_i, n_mels] -> (right-padded [batch, width, n_mels] float32, lengths [batch]);
  width = the longest, rounded up to `multiple` (fewer shapes to compile)."""
  if not len(features):
    raise ValueError("no utterances")
  lengths = np.asarray([len(f) for f in features], np.int32)
  if lengths.min() < 1:
    raise ValueError("an utterance has no frames")
  width = -(-int(lengths.max()) // multiple) * multiple
  out = np.zeros((len(features), width, np.shape(features[0])[-1]), np.float32)
  for i, f in enumerate(features):
    out[i, :len(f)] = f
  return out, lengths
