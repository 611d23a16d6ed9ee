"""t_jax: Transformer research code in JAX/Flax.

Stable API: `attention`, `ModelConfig`, `build_model`, `Transformer`, `EncoderDecoder`, `init_params`,
`logical_axes`, `count_params`, and (imported on first use) `load`, `generate`, `from_hf`, `to_hf`.
"""

import importlib

from t_jax.attention import attention
from t_jax.models import (
  EncoderDecoder,
  ModelConfig,
  Transformer,
  build_model,
  count_params,
  init_params,
  logical_axes,
)

__version__ = "0.1.0"

# Heavier entry points (orbax, grain, safetensors) load lazily, so `import t_jax` stays light.
_LAZY = {"load": "t_jax.workdir", "generate": "t_jax.inference", "from_hf": "t_jax.convert",
         "to_hf": "t_jax.convert"}


def __getattr__(name: str) -> object:
  """Resolves the lazily imported entry points."""
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 't_jax' has no attribute {name!r}")
