"""optax optimizers and learning-rate schedules from an OptimizerConfig."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from t_jax.training.config import OptimizerConfig

NEVER = 2**31 - 1  # apply_if_finite never gives up on skipping; the loop decides when to stop


def make_schedule(cfg: OptimizerConfig, num_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then rsqrt / cosine / linear decay or constant."""
  peak, warmup = cfg.learning_rate, cfg.warmup_steps
  decay = max((cfg.decay_steps or num_steps) - warmup, 1)
  end = peak * cfg.final_lr_fraction
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, warmup + decay, end)
  if cfg.schedule == "rsqrt":  # Vaswani et al. 2017: peak * min(step / warmup, sqrt(warmup / step))
    return lambda step: peak * jnp.minimum(step / warmup, jnp.sqrt(warmup / jnp.maximum(step, 1)))
  after = optax.linear_schedule(peak, end, decay) if cfg.schedule == "linear" else optax.constant_schedule(peak)
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(params: optax.Params) -> optax.Params:
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig, num_steps: int,
                   trainable: Optional[Callable[[optax.Params], optax.Params]] = None) -> optax.GradientTransformation:
  """clip -> optimizer, wrapped in apply_if_finite (non-finite gradients skip the update, counted).

  `trainable` (params -> tree of bools; t_jax.training.finetune) freezes the other leaves: zero updates and no
  optimizer state for them (the clipping norm is over the trainable gradients).
  """
  lr = make_schedule(cfg, num_steps)
  if cfg.optimizer == "adamw":
    base = optax.adamw(lr, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask)
  elif cfg.optimizer == "adafactor":
    base = optax.adafactor(lr, decay_rate=cfg.adafactor_decay_rate, clipping_threshold=cfg.adafactor_clipping_threshold,
                           multiply_by_parameter_scale=cfg.adafactor_parameter_scale,
                           momentum=cfg.adafactor_momentum,
                           min_dim_size_to_factor=cfg.adafactor_min_dim_to_factor, weight_decay_rate=cfg.weight_decay or None,
                           weight_decay_mask=_decay_mask)
  else:
    base = optax.chain(optax.add_decayed_weights(cfg.weight_decay, _decay_mask),
                       optax.sgd(lr, cfg.momentum or None, cfg.nesterov))
  if cfg.clip_norm is not None:
    base = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), base)
  if trainable is not None:
    labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable(params))
    base = optax.multi_transform({"train": base, "frozen": optax.set_to_zero()}, labels)
  return optax.apply_if_finite(base, max_consecutive_errors=NEVER)
