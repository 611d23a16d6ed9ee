"""Prompt caches on disk: a prompt's KV computed once, saved with Orbax and continued from later.

A cache is a directory (an Orbax composite checkpoint): item `kv` holds the prompt's token ids and k, v
[layers, prompt_len, kv_heads, head_dim]; item `meta` (JSON) the fingerprint: the model config without its
run-time fields (models.config.RUNTIME_FIELDS), a hash of the parameter shapes and the tokenizer's id. A cache
whose fingerprint differs from the model it is loaded for is refused before its arrays are read.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t_jax.inference import paged as paged_lib
from t_jax.inference.runner import Runner, model_config
from t_jax.models import ModelConfig
from t_jax.models.config import RUNTIME_FIELDS

FORMAT = 2  # 1: a numpy .npz file
ITEMS = ("kv", "meta")


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


def _orbax() -> tuple[Any, Any]:
  """(orbax.checkpoint, a composite Checkpointer); imported here so that `generate` alone stays light."""
  import orbax.checkpoint as ocp
  return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _restore(path: str, item: str) -> Any:
  """One item ('kv' or 'meta') of the cache at `path`; ValueError when it is missing or damaged."""
  if not os.path.isdir(path):
    raise ValueError(f"no prompt cache directory at {path} (save_prompt_cache writes one; .npz caches from "
                     "before format 2 must be saved again)")
  ocp, ckptr = _orbax()
  args = ocp.args.JsonRestore() if item == "meta" else ocp.args.StandardRestore()
  try:
    with ckptr:
      return ckptr.restore(os.path.abspath(path), args=ocp.args.Composite(**{item: args}))[item]
  except (OSError, KeyError, ValueError) as e:
    cause = " ".join(str(e).split()).split(" [tensorstore_spec=")[0][:300]  # tensorstore appends its whole spec
    raise ValueError(f"prompt cache {path} is damaged or not a save_prompt_cache directory: {cause}") from e


def save_prompt_cache(model_or_cfg: Any, params: Any, prompt_ids: list[int], path: str,
                      tokenizer: Any = None) -> PromptCache:
  """Computes the prompt's KV and writes it with the model's fingerprint to the directory `path` (Orbax).

  An existing prompt cache or empty directory at `path` is replaced; anything else there is refused.
  """
  cfg = model_config(model_or_cfg)
  replaceable = not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path)) or all(
      os.path.isdir(os.path.join(path, item)) for item in ITEMS)
  if not replaceable:
    raise ValueError(f"{path} exists and is not a prompt cache; refusing to overwrite it")
  pc = prompt_kv(cfg, params, prompt_ids)
  kv = dict(tokens=np.asarray(pc.tokens, np.int32), k=pc.k, v=pc.v)
  ocp, ckptr = _orbax()
  with ckptr:
    ckptr.save(os.path.abspath(path), force=True, args=ocp.args.Composite(
        kv=ocp.args.StandardSave(kv), meta=ocp.args.JsonSave(fingerprint(cfg, params, tokenizer))))
  return pc


def load_prompt_cache(path: str, model_or_cfg: Any, params: Any, tokenizer: Any = None) -> PromptCache:
  """The cache in directory `path`; ValueError naming the difference if it was made for another model or
  tokenizer, or saying what is wrong when the directory is missing or damaged."""
  cfg = model_config(model_or_cfg)
  meta, want = _restore(path, "meta"), fingerprint(cfg, params, tokenizer)
  meta = meta if isinstance(meta, dict) else {}
  if meta != want:
    diff = [f"{name}: cache {meta.get('model', {}).get(name)!r} vs model {value!r}"
            for name, value in want["model"].items() if meta.get("model", {}).get(name) != value]
    diff += [f"{key}: cache {meta.get(key)!r} vs model {want[key]!r}"
             for key in ("format", "param_shapes", "tokenizer") if meta.get(key) != want[key]]
    raise ValueError(f"prompt cache {path} was made for a different model; refusing it ({'; '.join(diff)})")
  kv = _restore(path, "kv")
  return PromptCache(tuple(np.asarray(kv["tokens"]).tolist()), np.asarray(kv["k"]), np.asarray(kv["v"]))
