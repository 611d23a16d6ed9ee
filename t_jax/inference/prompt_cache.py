"""Prompt caches on disk: a prompt's KV computed once, saved (numpy .npz) and continued from later.

The file holds the prompt's token ids, k and v [layers, prompt_len, kv_heads, head_dim] and a fingerprint:
the model config without its run-time fields (models.config.RUNTIME_FIELDS), a hash of the parameter
shapes and the tokenizer's id. A cache whose fingerprint differs from the model it is loaded for is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t_jax.inference import paged as paged_lib
from t_jax.inference.runner import Runner, model_config
from t_jax.models import ModelConfig
from t_jax.models.config import RUNTIME_FIELDS

FORMAT = 1


@dataclasses.dataclass(frozen=True)
class PromptCache:
  """A prompt and its keys/values, k and v [layers, len(tokens), kv_heads, head_dim]."""

  tokens: tuple[int, ...]
  k: np.ndarray
  v: np.ndarray


def _tokenizer_id(tokenizer: Any) -> Optional[str]:
  """A string as it is; a t_jax Tokenizer by a hash of its SentencePiece model."""
  if tokenizer is None or isinstance(tokenizer, str):
    return tokenizer
  proto = hashlib.sha256(tokenizer.model_proto).hexdigest()[:16]
  return f"sentencepiece:{proto}+{getattr(tokenizer, 'num_extra_ids', 0)}"


def fingerprint(cfg: ModelConfig, params: Any, tokenizer: Any = None) -> dict:
  """What a cache must agree on with the model that reads it (JSON-normalised)."""
  model = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}
  leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]
  shapes = sorted((jax.tree_util.keystr(path), tuple(np.shape(x))) for path, x in leaves)
  digest = hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]
  fp = dict(format=FORMAT, model=model, param_shapes=digest, tokenizer=_tokenizer_id(tokenizer))
  return json.loads(json.dumps(fp))


@functools.partial(jax.jit, static_argnums=0)
def _prefill(runner: Runner, params: Any, ids: jax.Array) -> Any:
  return runner.prefill(params, ids, jnp.asarray([ids.shape[1]], jnp.int32))[1]["cache"]


def prompt_kv(cfg: ModelConfig, params: Any, prompt_ids: list[int]) -> PromptCache:
  """The prompt's keys/values, from one prefill into a contiguous cache with a slot per token."""
  if cfg.architecture != "decoder":
    raise ValueError(f"prompt caches need a decoder-only model (causal prompts), not {cfg.architecture!r}")
  tokens = tuple(int(t) for t in prompt_ids)
  if not tokens:
    raise ValueError("empty prompt")
  cache = _prefill(Runner(cfg, len(tokens)), nn.meta.unbox(params), jnp.asarray([tokens], jnp.int32))
  k, v = (np.stack([np.asarray(x[0]) for x in paged_lib.stack_layers(cache, n)]) for n in ("k", "v"))
  return PromptCache(tokens, k, v)


def save_prompt_cache(model_or_cfg: Any, params: Any, prompt_ids: list[int], path: str,
                      tokenizer: Any = None) -> PromptCache:
  """Computes the prompt's KV and writes it with the model's fingerprint to `path` (an .npz file)."""
  cfg = model_config(model_or_cfg)
  pc = prompt_kv(cfg, params, prompt_ids)
  meta = json.dumps(fingerprint(cfg, params, tokenizer))
  with open(path, "wb") as f:
    np.savez(f, tokens=np.asarray(pc.tokens, np.int32), k=pc.k, v=pc.v, meta=np.asarray(meta))
  return pc


def load_prompt_cache(path: str, model_or_cfg: Any, params: Any, tokenizer: Any = None) -> PromptCache:
  """The cache at `path`; ValueError naming the difference if it was made for another model or tokenizer."""
  cfg = model_config(model_or_cfg)
  with np.load(path, allow_pickle=False) as f:
    meta, tokens, k, v = json.loads(str(f["meta"])), f["tokens"], f["k"], f["v"]
  want = fingerprint(cfg, params, tokenizer)
  if meta != want:
    diff = [f"{name}: cache {meta['model'].get(name)!r} vs model {value!r}"
            for name, value in want["model"].items() if meta.get("model", {}).get(name) != value]
    diff += [f"{key}: cache {meta.get(key)!r} vs model {want[key]!r}"
             for key in ("format", "param_shapes", "tokenizer") if meta.get(key) != want[key]]
    raise ValueError(f"prompt cache {path} was made for a different model; refusing it ({'; '.join(diff)})")
  return PromptCache(tuple(tokens.tolist()), k, v)
