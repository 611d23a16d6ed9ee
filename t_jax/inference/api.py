"""`generate`: validated requests -> one jitted prefill + while_loop decode (optionally under a Mesh)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t_jax.inference import paged as paged_lib
from t_jax.inference import prompt_cache as prompt_cache_lib
from t_jax.inference.penalties import NO_PENALTY, Penalty
from t_jax.inference.runner import Runner
from t_jax.inference.runner import model_config as _config
from t_jax.inference.sampling import Sampler
from t_jax.inference.search import beam_search, sample_loop
from t_jax.inference.speculative import speculative_loop
from t_jax.models import ModelConfig

PyTree = Any
METHODS = ("greedy", "sample", "beam", "speculative")
CACHES = ("contiguous", "paged")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["sampler", "length_penalty"], meta_fields=[
    "method", "target", "draft", "max_new_tokens", "num_beams", "num_draft", "eos_id", "pad_id", "penalty"])
@dataclasses.dataclass(frozen=True)
class Plan:
  """A validated request. A pytree: its meta fields are the jit cache key, while the sampler's temperature
  and top_p and the length penalty are traced, so changing them does not recompile."""

  method: str
  target: Runner
  draft: Optional[Runner]
  sampler: Sampler
  max_new_tokens: int
  num_beams: int
  length_penalty: float
  num_draft: int
  eos_id: Optional[int]
  pad_id: int
  penalty: Penalty = NO_PENALTY


@jax.jit
def _decode(plan: Plan, params: PyTree, draft_params: PyTree, ids: jax.Array, lengths: jax.Array,
            rng: jax.Array, pages: Optional[dict] = None) -> tuple[jax.Array, jax.Array, dict]:
  """The whole generation (prefill + loop) as one XLA program; `pages` (from _paged) for a paged cache."""
  common = dict(max_new_tokens=plan.max_new_tokens, eos_id=plan.eos_id, pad_id=plan.pad_id)
  paged = draft_paged = None
  if pages is not None:
    cache = plan.target.empty_pages(params, ids.shape[0], ids.shape[1])
    if pages["prefix_k"] is not None:  # a prompt cache: written once, its partial page copied per row
      cache = paged_lib.write_pages(cache, pages["prefix_pages"], pages["prefix_k"], pages["prefix_v"])
      cache = paged_lib.copy_pages(cache, pages["copy_src"], pages["copy_dst"])
    paged = dict(cache=cache, table=pages["table"], start=pages["start"], own=pages["own"])
    if plan.draft is not None:  # the draft's own pool, on the same page tables
      draft_paged = dict(paged, cache=plan.draft.empty_pages(draft_params, ids.shape[0], ids.shape[1]))
  if plan.method == "speculative":
    return speculative_loop(plan.target, plan.draft, params, draft_params, ids, lengths, rng,
                            sampler=plan.sampler, num_draft=plan.num_draft, paged=paged, draft_paged=draft_paged,
                            **common)
  if plan.method == "beam":
    return beam_search(plan.target, params, ids, lengths, num_beams=plan.num_beams, alpha=plan.length_penalty,
                       penalty=plan.penalty, paged=paged, **common)
  return sample_loop(plan.target, params, ids, lengths, rng, sampler=plan.sampler, penalty=plan.penalty,
                     paged=paged, **common)


def _is_text(prompts: Any) -> bool:
  """Whether prompts are a string or a non-empty sequence of strings."""
  return isinstance(prompts, str) or (isinstance(prompts, Sequence) and bool(prompts)
                                      and all(isinstance(p, str) for p in prompts))


def _rows(prompt_tokens: Any, pad_id: int) -> list[list[int]]:
  """Prompts as lists of ints. Arrays are padded with pad_id on either side (pad_id never inside)."""
  if isinstance(prompt_tokens, (np.ndarray, jax.Array)):
    arr = np.asarray(prompt_tokens)
    if arr.ndim == 1:
      arr = arr[None]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"prompt array must be integer [batch, length], got {arr.dtype} {arr.shape}")
    rows = []
    for r in arr:
      real = np.flatnonzero(r != pad_id)
      if real.size and real.size != real[-1] - real[0] + 1:
        raise ValueError(f"pad_id={pad_id} inside a prompt row; pass prompts as lists of token ids instead")
      rows.append(r[real].tolist())
    return rows
  if _is_text(prompt_tokens):
    raise ValueError("string prompts need tokenizer= (a t_jax.data.Tokenizer); or pass token ids")
  if not isinstance(prompt_tokens, Sequence):
    raise ValueError(f"prompt_tokens must be token ids (list of lists or an array), got {type(prompt_tokens)}")
  if prompt_tokens and all(isinstance(t, (int, np.integer)) for t in prompt_tokens):
    prompt_tokens = [prompt_tokens]
  return [[int(t) for t in row] for row in prompt_tokens]


def _check_sampling(method: str, temperature: Optional[float], top_k: Optional[int], top_p: Optional[float],
                    vocab: int) -> Sampler:
  """The Sampler for a method, rejecting parameters that make no sense for it."""
  if method in ("greedy", "beam"):
    if temperature is not None or top_k is not None or top_p is not None:
      raise ValueError(f"method={method!r} is deterministic: temperature/top_k/top_p only apply to "
                       "'sample' and 'speculative'")
    return Sampler()
  if method == "sample" and temperature is None:
    temperature = 1.0
  temperature = 0.0 if temperature is None else float(temperature)
  if temperature < 0 or (method == "sample" and temperature == 0):
    raise ValueError(f"temperature must be > 0 for sampling (use method='greedy' for argmax), got {temperature}")
  if temperature == 0 and (top_k is not None or top_p is not None):
    raise ValueError("greedy speculative decoding (temperature 0/None) takes no top_k/top_p")
  if top_k is not None and not 1 <= top_k <= vocab:
    raise ValueError(f"top_k must be in [1, vocab_size={vocab}], got {top_k}")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  return Sampler(temperature, top_k, top_p)


def _check_penalty(method: str, repetition_penalty: Optional[float], no_repeat_ngram_size: Optional[int]) -> Penalty:
  """The Penalty of a request (None = off); speculative decoding takes none."""
  rep = 1.0 if repetition_penalty is None else float(repetition_penalty)
  ngram = 0 if no_repeat_ngram_size is None else no_repeat_ngram_size
  if not 0.0 < rep < float("inf"):
    raise ValueError(f"repetition_penalty must be a positive number (1 = off), got {repetition_penalty}")
  if not isinstance(ngram, (int, np.integer)) or ngram < 0:
    raise ValueError(f"no_repeat_ngram_size must be an int >= 0 (0 = off), got {no_repeat_ngram_size!r}")
  penalty = Penalty(rep, int(ngram))
  if method == "speculative" and penalty.active:
    raise ValueError("repetition_penalty / no_repeat_ngram_size are not supported with method='speculative' "
                     "(use 'greedy', 'sample' or 'beam')")
  return penalty


def _slots(cfg: ModelConfig, fed: int, extra: int, cache_len: Optional[int]) -> int:
  """Self-attention cache slots for `fed` tokens (+ `extra` speculative overrun); a window bounds it."""
  need = fed + extra
  if cfg.window is not None:
    need = min(need, cfg.window + extra)
  if cache_len is None:
    return need
  if cache_len < need:
    raise ValueError(f"cache_len={cache_len} is too small: this request needs {need} cache slots")
  return cache_len


def _check_context(cfg: ModelConfig, rows: list[list[int]], max_new_tokens: int, what: str) -> None:
  """Prompt and output must fit max_len, except that sliding-window models without learned positions run on."""
  longest = max(len(r) for r in rows)
  if cfg.architecture == "encoder_decoder":
    if longest > cfg.max_len:
      raise ValueError(f"{what}: source of {longest} tokens is longer than the context max_len={cfg.max_len}")
    used, label = max_new_tokens, "max_new_tokens"
  else:
    used, label = longest + max_new_tokens, f"prompt ({longest} tokens) + max_new_tokens"
  bounded = cfg.window is None or cfg.position == "learned"
  if bounded and used > cfg.max_len:
    raise ValueError(f"{what}: {label} = {used} exceeds the context max_len={cfg.max_len}")


def prepare(model_or_cfg: Any, prompt_tokens: Any, max_new_tokens: int, method: str, *,
            temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
            num_beams: Optional[int] = None, length_penalty: Optional[float] = None,
            repetition_penalty: Optional[float] = None, no_repeat_ngram_size: Optional[int] = None,
            eos_id: Optional[int] = None, pad_id: int = 0, decoder_start_id: int = 0, draft: Any = None,
            num_draft_tokens: int = 4, cache_len: Optional[int] = None,
            pad_multiple: int = 1) -> tuple[Plan, np.ndarray, np.ndarray]:
  """Validates a request: (plan, padded prompt ids [batch, width], prompt lengths [batch])."""
  cfg = _config(model_or_cfg)
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
  if method == "speculative" and cfg.attention_kind in ("performer", "rfa"):
    raise ValueError(f"method='speculative' rewinds a KV cache; attention_kind={cfg.attention_kind!r} decodes "
                     "from a recurrent state that cannot rewind (use 'greedy', 'sample' or 'beam')")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  rows = _rows(prompt_tokens, pad_id)
  if not rows or any(len(r) == 0 for r in rows):
    raise ValueError("empty prompt: every prompt needs at least one token (e.g. a BOS id)")
  for name, tok in (("token", min(min(r) for r in rows)), ("token", max(max(r) for r in rows)),
                    ("eos_id", eos_id), ("pad_id", pad_id), ("decoder_start_id", decoder_start_id)):
    if tok is not None and not 0 <= tok < cfg.vocab_size:
      raise ValueError(f"{name} {tok} is outside the vocabulary [0, {cfg.vocab_size})")
  sampler = _check_sampling(method, temperature, top_k, top_p, cfg.vocab_size)
  penalty = _check_penalty(method, repetition_penalty, no_repeat_ngram_size)
  if method != "beam" and (num_beams not in (None, 1) or length_penalty is not None):
    raise ValueError(f"num_beams/length_penalty only apply to method='beam', not {method!r}")
  num_beams = 4 if num_beams is None else int(num_beams)
  if num_beams < 1:
    raise ValueError(f"num_beams must be >= 1, got {num_beams}")
  if (method == "speculative") != (draft is not None):
    raise ValueError("method='speculative' needs draft=(draft_model_or_cfg, draft_params), and only it takes one")
  if method == "speculative" and num_draft_tokens < 1:
    raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
  if pad_multiple < 1:
    raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
  _check_context(cfg, rows, max_new_tokens, "target")
  width = -(-max(len(r) for r in rows) // pad_multiple) * pad_multiple
  seq2seq = cfg.architecture == "encoder_decoder"
  fed = (1 if seq2seq else width) + max_new_tokens
  extra = num_draft_tokens + 1 if method == "speculative" else 0
  target = Runner(cfg, _slots(cfg, fed, extra, cache_len), decoder_start_id)
  draft_runner = None
  if draft is not None:
    dcfg = _config(draft[0])
    if dcfg.vocab_size != cfg.vocab_size or (dcfg.architecture == "encoder_decoder") != seq2seq:
      raise ValueError(f"draft model must share the target's vocabulary ({cfg.vocab_size}) and encoder-decoder "
                       f"layout; got vocab {dcfg.vocab_size}, architecture {dcfg.architecture!r}")
    _check_context(dcfg, rows, max_new_tokens, "draft")
    draft_runner = Runner(dcfg, _slots(dcfg, fed, extra, None), decoder_start_id)
  ids = np.full((len(rows), width), pad_id, np.int32)
  for i, r in enumerate(rows):  # encoder-decoder sources are right-padded, other prompts left-padded
    start = 0 if seq2seq else width - len(r)
    ids[i, start:start + len(r)] = r
  lengths = np.asarray([len(r) for r in rows], np.int32)
  plan = Plan(method, target, draft_runner, sampler, int(max_new_tokens), num_beams,
              0.6 if length_penalty is None else float(length_penalty), int(num_draft_tokens), eos_id, pad_id, penalty)
  return plan, ids, lengths


def _paged(plan: Plan, ids: np.ndarray, lengths: np.ndarray, params: PyTree, page_size: int,
           num_pages: Optional[int], prompt_cache: Optional[str], tokenizer: Any,
           paged_impl: Optional[str]) -> tuple:
  """A request moved onto a paged cache: (plan, ids and lengths of the tokens to compute, pages for _decode).

  Rows that share a prefix with the prompt cache read its full pages and copy its partial one. Decoder
  prompts are the rows; an encoder-decoder model pages its decoder (rows: the start token), not the source.
  """
  cfg = plan.target.cfg
  seq2seq = cfg.architecture == "encoder_decoder"
  if prompt_cache is not None and (plan.penalty.active or plan.method == "speculative" or seq2seq):
    raise ValueError("prompt_cache= continues decoder / prefix-LM models with method='greedy', 'sample' or "
                     "'beam', without repetition_penalty / no_repeat_ngram_size")
  if not isinstance(page_size, (int, np.integer)) or page_size < 1:
    raise ValueError(f"page_size must be a positive int, got {page_size!r}")
  if paged_impl is not None:
    target = dataclasses.replace(plan.target, cfg=cfg.replace(paged_attention_impl=paged_impl))
    draft = plan.draft and dataclasses.replace(plan.draft, cfg=plan.draft.cfg.replace(paged_attention_impl=paged_impl))
    plan = dataclasses.replace(plan, target=target, draft=draft)
  prefix = None if prompt_cache is None else prompt_cache_lib.load_prompt_cache(prompt_cache, cfg, params, tokenizer)
  width = ids.shape[1]
  rows = [[plan.target.start_id]] * len(lengths) if seq2seq else [r[width - n:].tolist() for r, n in zip(ids, lengths)]
  extra = plan.num_draft + 1 if plan.method == "speculative" else 0
  beams = plan.num_beams if plan.method == "beam" else 1
  p = paged_lib.plan_rows(rows, plan.max_new_tokens, page_size, num_pages, prefix.tokens if prefix else (),
                          extra=extra, beams=beams)
  if not seq2seq:  # the tokens after each row's shared prefix
    rest = [r[s:] for r, s in zip(rows, p["start"])]
    ids = np.full((len(rest), max(map(len, rest))), plan.pad_id, np.int32)
    for i, r in enumerate(rest):
      ids[i, ids.shape[1] - len(r):] = r
    lengths = np.asarray(list(map(len, rest)), np.int32)
  pages = {k: p[k] for k in ("table", "start", "prefix_pages", "copy_src", "copy_dst", "own")}
  pages["prefix_k"] = pages["prefix_v"] = None
  if prefix is not None:
    pad = ((0, 0), (0, len(p["prefix_pages"]) * page_size - len(prefix.tokens)), (0, 0), (0, 0))
    pages["prefix_k"], pages["prefix_v"] = np.pad(prefix.k, pad), np.pad(prefix.v, pad)
  on_pages = lambda r: r and dataclasses.replace(r, page_size=page_size, num_pages=p["num_pages"],
                                                 max_pages=p["table"].shape[1])
  return dataclasses.replace(plan, target=on_pages(plan.target), draft=on_pages(plan.draft)), ids, lengths, pages


def _encode(model_or_cfg: Any, prompts: Any, tokenizer: Any, options: dict) -> tuple[Any, dict, Any]:
  """(token-id prompts, options, decode: (tokens, scores) -> (texts, scores), or None). Strings are
  encoded with the tokenizer, whose eos_id / pad_id become the defaults; token ids pass through."""
  if tokenizer is None:
    return prompts, options, None
  options = {"eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id, **options}
  if not _is_text(prompts):
    return prompts, options, None
  single = isinstance(prompts, str)
  texts = [prompts] if single else prompts
  # Encoder-decoder sources end with EOS (as in training); other prompts start with BOS (= EOS in t_jax).
  seq2seq = _config(model_or_cfg).architecture == "encoder_decoder"
  bos, eos = ([], [tokenizer.eos_id]) if seq2seq else ([getattr(tokenizer, "bos_id", tokenizer.eos_id)], [])
  rows = [bos + list(tokenizer.encode(t)) + eos for t in texts]

  def decode(tokens: np.ndarray, scores: np.ndarray) -> tuple[Any, Any]:
    eos, ids = options["eos_id"], [row.tolist() for row in tokens]
    outs = [tokenizer.decode(r[:r.index(eos)] if eos in r else r) for r in ids]  # up to the first eos
    return (outs[0], float(scores[0])) if single else (outs, scores)

  return rows, options, decode


def _finish(outputs: tuple, batch: int, return_scores: bool, return_stats: bool, decode: Any = None) -> Any:
  tokens, scores, stats = outputs
  tokens, scores = np.asarray(tokens)[:batch], np.asarray(scores)[:batch]
  stats = {k: np.asarray(v) for k, v in stats.items()}
  if "drafted" in stats:
    stats["acceptance_rate"] = float(stats["accepted"]) / max(1, int(stats["drafted"]))
  if decode is not None:
    tokens, scores = decode(tokens, scores)
  out = (tokens,) + ((scores,) if return_scores else ()) + ((stats,) if return_stats else ())
  return out[0] if len(out) == 1 else out


def generate(model_or_cfg: Any, params: PyTree, prompt_tokens: Any, max_new_tokens: int = 32,
             method: str = "greedy", *, seed: int = 0, return_scores: bool = False, return_stats: bool = False,
             tokenizer: Any = None, cache: Optional[str] = None, page_size: int = 16,
             num_pages: Optional[int] = None, prompt_cache: Optional[str] = None, paged_impl: Optional[str] = None,
             **options: Any) -> Any:
  """Generates up to max_new_tokens per prompt: token ids [batch, max_new_tokens] (numpy), or text.

  prompt_tokens: a list of token-id lists (or one list), or a padded integer array (pad_id stripped);
  used as given (add BOS yourself). With tokenizer= (a t_jax.data.Tokenizer), also a string or a
  list of strings: each is encoded with BOS in front (encoder-decoder: EOS at the end, as in
  training), and the result is the decoded continuation (a str, or a list of str), cut at EOS.
  A tokenizer makes its eos_id / pad_id the defaults (eos_id=None: run to max_new_tokens).
  Decoder-only / prefix-LM models continue the prompt (a prefix-LM prompt is its bidirectional
  prefix); encoder-decoder models translate it, the decoder starting from decoder_start_id.
  method: 'greedy' | 'sample' (temperature, top_k, top_p) | 'beam' (num_beams, length_penalty = GNMT
  alpha, default 4 beams, 0.6) | 'speculative' (draft=(draft_model_or_cfg, draft_params),
  num_draft_tokens; temperature None/0 = greedy, > 0 = sampling with top_k/top_p).
  repetition_penalty (CTRL: logits of tokens already in the row's sequence, prompt included, / it
  if > 0, * it if < 0) and no_repeat_ngram_size (a token completing an n-gram already in the
  sequence is excluded) act as in Hugging Face on greedy, sample and beam (beam: on log-probs).
  Rows end with eos_id (None: never); later slots hold pad_id. Also: cache_len, pad_multiple
  (prompt width rounding, fewer recompilations). return_scores adds per-row scores (raw log-prob
  sum; beam: length-penalised score); return_stats adds a dict (steps, speculative acceptance).
  cache='paged' (every method and architecture) keeps the self-attention KV cache in pages of page_size
  positions, a pool of num_pages (default: exactly what the request needs; too few raise
  paged.PoolExhausted); beams share their prompt's pages. paged_impl ('auto' | 'xla' | 'pallas', default
  the config's paged_attention_impl) picks the decode-step attention: 'xla' gathers each row's pages,
  'pallas' runs t_jax/kernels/paged_attention.py ('auto': XLA on device kinds the kernel never ran on).
  prompt_cache= (a directory from save_prompt_cache, implies cache='paged'; decoder / prefix-LM models, not
  speculative) continues from its saved KV: rows that start with its prompt do not recompute it and share
  its full pages.
  """
  if (cache or "contiguous") not in CACHES:
    raise ValueError(f"unknown cache {cache!r}; choose from {CACHES}")
  if cache == "contiguous" and prompt_cache is not None:
    raise ValueError("prompt_cache= needs cache='paged' (or cache=None)")
  prompt_tokens, options, decode = _encode(model_or_cfg, prompt_tokens, tokenizer, options)
  plan, ids, lengths = prepare(model_or_cfg, prompt_tokens, max_new_tokens, method, **options)
  params, pages = nn.meta.unbox(params), None
  if (cache == "paged" or prompt_cache is not None) and plan.target.cfg.attention_kind in ("performer", "rfa"):
    raise ValueError(f"attention_kind={plan.target.cfg.attention_kind!r} decodes from a recurrent state, not a "
                     "KV cache: cache='paged' and prompt_cache= do not apply")
  if cache == "paged" or prompt_cache is not None:
    plan, ids, lengths, pages = _paged(plan, ids, lengths, params, page_size, num_pages, prompt_cache,
                                       tokenizer, paged_impl)
  elif paged_impl is not None:
    raise ValueError("paged_impl= applies to cache='paged'")
  draft_params = None if plan.draft is None else nn.meta.unbox(options["draft"][1])
  out = _decode(plan, params, draft_params, jnp.asarray(ids), jnp.asarray(lengths), jax.random.key(seed),
                pages)
  return _finish(out, len(lengths), return_scores, return_stats, decode)


def generate_sharded(model_or_cfg: Any, params: PyTree, prompt_tokens: Any, max_new_tokens: int = 32,
                     method: str = "greedy", *, mesh: Mesh, param_shardings: PyTree,
                     batch_axis: Optional[str | tuple[str, ...]] = "data", seed: int = 0,
                     return_scores: bool = False, return_stats: bool = False, tokenizer: Any = None,
                     **options: Any) -> Any:
  """`generate` under a Mesh: parameters placed with param_shardings (Shardings or PartitionSpecs),
  the batch split over `batch_axis` (None = replicated; the batch is padded to a multiple of it),
  draft parameters replicated. Same results (and prompt formats) as `generate`."""
  prompt_tokens, options, decode = _encode(model_or_cfg, prompt_tokens, tokenizer, options)
  plan, ids, lengths = prepare(model_or_cfg, prompt_tokens, max_new_tokens, method, **options)
  batch = len(lengths)
  shards = 1 if batch_axis is None else int(np.prod([mesh.shape[a] for a in np.atleast_1d(batch_axis)]))
  extra = -batch % shards
  ids = np.concatenate([ids, np.repeat(ids[-1:], extra, axis=0)])
  lengths = np.concatenate([lengths, np.repeat(lengths[-1:], extra)])
  as_sharding = lambda s: NamedSharding(mesh, s) if isinstance(s, PartitionSpec) else s
  shardings = jax.tree_util.tree_map(as_sharding, param_shardings,
                                     is_leaf=lambda x: isinstance(x, PartitionSpec))
  params = jax.device_put(nn.meta.unbox(params), shardings)
  rows = NamedSharding(mesh, PartitionSpec(batch_axis))
  draft_params = None
  if plan.draft is not None:  # replicated
    draft_params = jax.device_put(nn.meta.unbox(options["draft"][1]), NamedSharding(mesh, PartitionSpec()))
  with jax.set_mesh(mesh):
    out = _decode(plan, params, draft_params, jax.device_put(ids, rows), jax.device_put(lengths, rows),
                  jax.random.key(seed))
  return _finish(out, batch, return_scores, return_stats, decode)
