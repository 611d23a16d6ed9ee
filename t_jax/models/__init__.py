"""The Transformer family as functional Flax (linen) modules."""

from t_jax.models.builder import (
                                  abstract_params,
                                  build_model,
                                  count_params,
                                  init_boxed,
                                  init_params,
                                  logical_axes,
                                  param_table,
)
from t_jax.models.config import ModelConfig
from t_jax.models.transformer import EncoderDecoder, Transformer
