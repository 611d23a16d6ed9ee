"""Autoregressive generation: prefill + jitted while_loop decoding with a KV cache.

`generate(model_or_cfg, params, prompts, max_new_tokens, method=...)` with method 'greedy',
'sample' (temperature / top-k / top-p), 'beam' (GNMT length penalty) or 'speculative' (draft model),
token ids or (with tokenizer=) strings in; repetition_penalty / no_repeat_ngram_size as in Hugging Face.
`generate_sharded` runs the same program under a jax.sharding.Mesh.
"""

from t_jax.inference.api import METHODS, Plan, generate, generate_sharded, prepare
from t_jax.inference.penalties import Penalty, ngram_bans, seen_tokens
from t_jax.inference.runner import Runner, left_pad_positions
from t_jax.inference.sampling import Sampler, process_logits
from t_jax.inference.search import beam_search, length_penalty, sample_loop
from t_jax.inference.speculative import speculative_loop

__all__ = ["METHODS", "Penalty", "Plan", "Runner", "Sampler", "beam_search", "generate", "generate_sharded",
           "left_pad_positions", "length_penalty", "ngram_bans", "prepare", "process_logits", "sample_loop",
           "seen_tokens", "speculative_loop"]
