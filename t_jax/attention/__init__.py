"""One attention entry point: `attention(q, k, v, ...)` dispatching to XLA, Pallas or cuDNN."""

from t_jax.attention.api import IMPLEMENTATIONS, attention
from t_jax.attention.masks import make_mask
from t_jax.attention.xla import xla_attention

__all__ = ["IMPLEMENTATIONS", "attention", "make_mask", "xla_attention"]
