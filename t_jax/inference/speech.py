"""Speech recognition with the decoding loops: `transcribe` log-mel utterances (Whisper-style models)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t_jax.inference.api import Plan, _decode
from t_jax.inference.runner import Runner, model_config
from t_jax.inference.sampling import Sampler
from t_jax.models.speech import pad_frames


def transcribe(model_or_cfg: Any, params: Any, features: Sequence[np.ndarray], max_new_tokens: int = 64,
               method: str = "greedy", *, tokenizer: Any = None, num_beams: Optional[int] = None,
               length_penalty: Optional[float] = None, eos_id: Optional[int] = None, pad_id: int = 0,
               decoder_start_id: int = 0, pad_multiple: int = 64) -> Any:
  """Decodes utterances (log-mel frames [frames_i, num_mel_bins] each) with t_jax.inference's loops.

  method 'greedy' or 'beam' (num_beams, default 4; length_penalty = GNMT alpha, default 0.6), the same
  prefill + while_loop as `t_jax.inference.generate` on a right-padded frame batch. Returns token ids
  [batch, max_new_tokens] (pad_id after eos), or with tokenizer= the decoded texts (cut at eos; its eos_id
  is the default). A padded batch gives each utterance the tokens it gets alone.
  """
  cfg = model_config(model_or_cfg)
  if cfg.input_stem != "audio":
    raise ValueError(f"transcribe needs ModelConfig.input_stem='audio', not {cfg.input_stem!r}")
  if method not in ("greedy", "beam"):
    raise ValueError(f"transcribe decodes with method 'greedy' or 'beam', not {method!r}")
  if method == "greedy" and (num_beams not in (None, 1) or length_penalty is not None):
    raise ValueError("num_beams / length_penalty only apply to method='beam'")
  if not 1 <= max_new_tokens <= (cfg.max_len if cfg.position == "learned" else max_new_tokens):
    raise ValueError(f"max_new_tokens must be in [1, max_len={cfg.max_len}], got {max_new_tokens}")
  if tokenizer is not None and eos_id is None:
    eos_id = tokenizer.eos_id
  frames, lengths = pad_frames(features, pad_multiple)
  plan = Plan(method=method, target=Runner(cfg, slots=1 + max_new_tokens, start_id=decoder_start_id), draft=None,
              sampler=Sampler(), max_new_tokens=int(max_new_tokens), num_beams=4 if num_beams is None else int(num_beams),
              length_penalty=0.6 if length_penalty is None else float(length_penalty), num_draft=4, eos_id=eos_id,
              pad_id=pad_id)
  tokens, _, _ = _decode(plan, nn.meta.unbox(params), None, jnp.asarray(frames), jnp.asarray(lengths),
                         jax.random.key(0))
  tokens = np.asarray(tokens)
  if tokenizer is None:
    return tokens
  rows = [r.tolist() for r in tokens]
  return [tokenizer.decode(r[:r.index(eos_id)] if eos_id in r else r) for r in rows]
