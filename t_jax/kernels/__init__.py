"""Pallas kernels. `flash_attention` / `supports` are what `t_jax.attention` dispatches to."""

from t_jax.kernels.flash_attention import default_blocks, flash_attention, supports
