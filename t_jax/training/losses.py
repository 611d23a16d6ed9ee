"""Weighted token cross-entropy (label smoothing, z-loss) and accuracy, returned as sums over tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def token_losses(logits: Array, targets: Array, weights: Array, label_smoothing: float = 0.0,
                 z_loss: float = 0.0) -> dict[str, Array]:
  """Sums over weighted tokens: loss (what is optimised), nll, z_loss, correct, weight.

  One logsumexp serves nll = lse - logit[target], label smoothing and z-loss. Label smoothing eps is
  optax.smooth_labels' target (1 - eps) * onehot + eps / V, computed without the [batch, length, vocab]
  one-hot: CE = (1 - eps) * nll + eps * (lse - mean(logits)). A token is correct when its target's logit is
  above every other logit (a tie counts as wrong): one fused max, where argmax is a slow variadic reduction
  on CPU (benchmarks/NOTES.md).
  """
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = loss = lse - target_logit
  if label_smoothing:
    loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - logits.mean(-1))
  if z_loss:
    loss = loss + z_loss * jnp.square(lse)
  others = jnp.where(jnp.arange(logits.shape[-1]) == targets[..., None], -jnp.inf, logits)
  correct = (target_logit > others.max(-1)).astype(jnp.float32)
  w = weights.astype(jnp.float32)
  return {"loss": (loss * w).sum(), "nll": (nll * w).sum(), "z_loss": (jnp.square(lse) * w).sum(),
          "correct": (correct * w).sum(), "weight": w.sum()}
