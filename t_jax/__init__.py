"""t_jax: Transformer research code in JAX/Flax.

Stable API: `attention`, `ModelConfig`, `build_model`, `DecoderOnly`, `EncoderOnly`,
`EncoderDecoder`, `init_params`, `logical_axes`, `count_params`.
"""

from t_jax.attention import attention
from t_jax.models import (
                          DecoderOnly,
                          EncoderDecoder,
                          EncoderOnly,
                          ModelConfig,
                          build_model,
                          count_params,
                          init_params,
                          logical_axes,
)
from t_jax.training.load import load

__version__ = "0.1.0"
