"""One attention entry point: `attention(q, k, v, mask=Mask(...))` dispatching to XLA, Pallas or cuDNN.

The dispatcher (api) loads on first use, so t_jax.kernels can import `Mask` without it: no import circle.
"""

from t_jax.attention.masks import Mask, check_shapes
from t_jax.attention.xla import xla_attention

__all__ = ["IMPLEMENTATIONS", "Mask", "attention", "check_shapes", "xla_attention"]


def __getattr__(name: str) -> object:
  """`attention` and `IMPLEMENTATIONS`, from t_jax.attention.api."""
  if name in ("attention", "IMPLEMENTATIONS"):
    from t_jax.attention import api
    return getattr(api, name)
  raise AttributeError(f"module 't_jax.attention' has no attribute {name!r}")
