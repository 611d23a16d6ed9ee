"""Autoregressive generation: prefill + jitted while_loop decoding with a KV cache.

`generate` (greedy, sample, beam or speculative; token ids, or strings with tokenizer=; a contiguous or
paged cache, or a saved prompt cache: see its docstring), `generate_sharded` (the same under a Mesh),
`Engine` (continuous batching over one page pool) and `transcribe` (speech models' utterances).
"""

from t_jax.inference.api import CACHES, METHODS, Plan, generate, generate_sharded, prepare
from t_jax.inference.engine import Engine
from t_jax.inference.paged import PageAllocator, PagedCacheConfig, PoolExhausted
from t_jax.inference.penalties import Penalty, ngram_bans, seen_tokens
from t_jax.inference.prompt_cache import PromptCache, load_prompt_cache, save_prompt_cache
from t_jax.inference.runner import Runner, left_pad_positions
from t_jax.inference.sampling import Sampler, process_logits
from t_jax.inference.search import beam_search, length_penalty, sample_loop
from t_jax.inference.speculative import speculative_loop
from t_jax.inference.speech import transcribe
