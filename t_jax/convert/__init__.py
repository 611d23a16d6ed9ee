"""Hugging Face checkpoint import/export (GPT-2, BERT MLM, T5 v1.0/v1.1, Llama) and t_jax params workdirs."""

from t_jax.convert.api import check_exportable, from_hf, model_config_from_hf, to_hf
from t_jax.convert.common import ConversionError, stack_layers, unstack_layers
from t_jax.convert.families import FAMILIES, family_for_config, family_for_hf
from t_jax.workdir import config_to_gin, read_params_workdir, write_params_workdir
