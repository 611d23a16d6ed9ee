"""Autoregressive generation: prefill + jitted while_loop decoding with a KV cache.

`generate(model_or_cfg, params, prompts, max_new_tokens, method=...)` with method 'greedy',
'sample' (temperature / top-k / top-p), 'beam' (GNMT length penalty) or 'speculative' (draft model),
token ids or (with tokenizer=) strings in; repetition_penalty / no_repeat_ngram_size as in Hugging Face.
`generate_sharded` runs the same program under a jax.sharding.Mesh. `generate(..., cache='paged')` keeps
the KV cache in pages (paged.py), `prompt_cache=` continues from a save_prompt_cache file, and `Engine`
serves requests with continuous batching over one page pool.
"""

from t_jax.inference.api import CACHES, METHODS, Plan, generate, generate_sharded, prepare
from t_jax.inference.engine import Engine
from t_jax.inference.paged import PageAllocator, PoolExhausted
from t_jax.inference.penalties import Penalty, ngram_bans, seen_tokens
from t_jax.inference.prompt_cache import PromptCache, load_prompt_cache, save_prompt_cache
from t_jax.inference.runner import Runner, left_pad_positions
from t_jax.inference.sampling import Sampler, process_logits
from t_jax.inference.search import beam_search, length_penalty, sample_loop
from t_jax.inference.speculative import speculative_loop

__all__ = ["CACHES", "METHODS", "Engine", "PageAllocator", "Penalty", "Plan", "PoolExhausted", "PromptCache",
           "Runner", "Sampler", "beam_search", "generate", "generate_sharded", "left_pad_positions",
           "length_penalty", "load_prompt_cache", "ngram_bans", "prepare", "process_logits", "sample_loop",
           "save_prompt_cache", "seen_tokens", "speculative_loop"]
