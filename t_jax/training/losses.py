"""Weighted token cross-entropy (label smoothing, z-loss) and accuracy, returned as sums over tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def token_losses(logits: Array, targets: Array, weights: Array, label_smoothing: float = 0.0,
                 z_loss: float = 0.0) -> dict[str, Array]:
  """Sums over weighted tokens: loss (what is optimised), nll, z_loss, correct, weight.

  Label smoothing eps is optax.smooth_labels' target (1 - eps) * onehot + eps / V, computed without the
  [batch, length, vocab] one-hot: CE = (1 - eps) * nll + eps * (logsumexp - mean(logits)).
  """
  logits = logits.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  loss = nll
  lse = jax.nn.logsumexp(logits, axis=-1)
  if label_smoothing:
    loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - logits.mean(-1))
  if z_loss:
    loss = loss + z_loss * jnp.square(lse)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  w = weights.astype(jnp.float32)
  return {"loss": (loss * w).sum(), "nll": (nll * w).sum(), "z_loss": (jnp.square(lse) * w).sum(),
          "correct": (correct * w).sum(), "weight": w.sum()}
