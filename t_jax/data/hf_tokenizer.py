"""The tokenizers that come with Hugging Face checkpoints, behind t_jax's Tokenizer interface.

`t_jax.from_hf` converts weights only; the checkpoint's own tokenizer is read here, so an imported GPT-2, BERT,
T5 or Llama reads and writes text exactly as `transformers` does:

  tok = load_tokenizer("path/to/hf_checkpoint")   # tokenizer.json (the `tokenizers` library), else its
                                                   # SentencePiece model (spiece.model / tokenizer.model)
  model, params = t_jax.from_hf("path/to/hf_checkpoint")
  t_jax.generate(model, params, "Once upon a time", tokenizer=tok)

`HFTokenizer` has what the data pipeline and `generate` use from `t_jax.data.Tokenizer`: encode (ids of the
text alone, as transformers' `add_special_tokens=False`), decode (up to the first eos, special tokens dropped,
transformers' clean-up of spaces when the checkpoint asks for it), bos_id / eos_id / pad_id / unk_id /
mask_id, vocab_size, sentinel(i) (T5's <extra_id_i>), model_proto (bytes that identify it). t_jax's objectives
add the special tokens themselves, and HF's roles map onto theirs:

  bos_id   [CLS] (BERT), else the bos token (<s>, <|endoftext|>), else eos        (t_jax: row start)
  eos_id   [SEP] (BERT), else the eos token (</s>, <|endoftext|>)                 (t_jax: row / pair end)
  pad_id   the pad token, else eos (GPT-2 has none)

so a Classification pair row, [bos] a [eos] b [eos] with token types 0 then 1, is BERT's
[CLS] a [SEP] b [SEP], what transformers' `tokenizer(a, b)` gives.

`load_tokenizer(path)` also takes t_jax's own SentencePiece models (pad 0, eos 1, unk 2): TaskConfig.tokenizer
and `t_jax.load` go through it. Special tokens come from tokenizer_config.json / special_tokens_map.json, else
the model's config.json ids, else the usual spellings ([CLS], </s>, <|endoftext|>, ...).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

# The files of an HF tokenizer (what save_pretrained writes, old and new), copied with it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "vocab.txt", "vocab.json",
                   "merges.txt")
HF_TOKENIZER_DIR = "hf_tokenizer"  # where a t_jax workdir keeps an HF checkpoint's tokenizer files
SPM_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.bpe.model")
TOKEN_IDS = "token_ids.json"  # the model config.json's bos/eos/pad ids, kept with the tokenizer files
ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# Usual spellings, for a tokenizer.json with no config beside it.
KNOWN = {"cls": ("[CLS]", "<cls>"), "sep": ("[SEP]", "<sep>"), "pad": ("[PAD]", "<pad>"), "mask": ("[MASK]", "<mask>"),
         "unk": ("[UNK]", "<unk>"), "bos": ("<s>", "<|begin_of_text|>", "<|endoftext|>"),
         "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>")}


def is_hf_tokenizer_dir(path: Union[str, Path]) -> bool:
  """Whether `path` is a directory holding an HF tokenizer (tokenizer.json or a SentencePiece model)."""
  p = Path(path)
  return p.is_dir() and any((p / n).is_file() for n in ("tokenizer.json", *SPM_FILES))


def load_tokenizer(path: Union[str, Path], num_extra_ids: int = 0) -> Any:
  """An `HFTokenizer` for an HF tokenizer directory, a tokenizer.json, a SentencePiece model with HF's
  tokenizer_config.json beside it or with other special ids than t_jax's; else t_jax's own SentencePiece
  `Tokenizer` (with num_extra_ids sentinels)."""
  from t_jax.data.tokenizer import Tokenizer

  p = Path(path)
  if p.is_dir() or p.suffix == ".json" or (p.parent / "tokenizer_config.json").is_file():  # HF's files
    return HFTokenizer.load(p)
  try:
    return Tokenizer.load(str(p), num_extra_ids)
  except ValueError as e:  # not t_jax's special ids: an HF SentencePiece model (Llama: unk 0, bos 1, eos 2)
    if "must use pad=0" not in str(e):
      raise
    return HFTokenizer.load(p)


def _content(value: Any) -> Optional[str]:
  """A special-token entry of tokenizer_config.json: a string, {'content': ...}, or None."""
  return value.get("content") if isinstance(value, dict) else value


class _Tokenizers:
  """tokenizer.json through the `tokenizers` library."""

  def __init__(self, data: bytes) -> None:
    try:
      import tokenizers
    except ImportError as e:  # a locked install has it; this names the missing piece otherwise
      raise ImportError("loading a Hugging Face tokenizer.json needs the `tokenizers` package "
                        "(pip install tokenizers)") from e
    self.tok = tokenizers.Tokenizer.from_str(data.decode())
    self.size = self.tok.get_vocab_size(with_added_tokens=True)
    self.special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
    self.is_bpe = type(self.tok.model).__name__ == "BPE"  # transformers never cleans up BPE spaces

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self.tok.decode(ids, skip_special_tokens=True)

  def token_to_id(self, token: str) -> Optional[int]:
    return self.tok.token_to_id(token)


class _SentencePiece:
  """A SentencePiece model with HF's added tokens (T5's extra_ids: <extra_id_0> is the last id)."""

  is_bpe = False

  def __init__(self, data: bytes, extra_ids: int) -> None:
    import sentencepiece as spm

    self.sp = spm.SentencePieceProcessor(model_proto=data)
    n = self.sp.get_piece_size()
    self.added = {f"<extra_id_{i}>": n + extra_ids - 1 - i for i in range(extra_ids)}
    self.size = n + extra_ids
    self.special = {i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)} | set(self.added.values())

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text, out_type=int)

  def decode(self, ids: list[int]) -> str:
    return self.sp.decode([i for i in ids if i not in self.special])

  def token_to_id(self, token: str) -> Optional[int]:
    if token in self.added:
      return self.added[token]
    i = self.sp.piece_to_id(token)
    return None if self.sp.is_unknown(i) and self.sp.id_to_piece(i) != token else i


class HFTokenizer:
  """An HF checkpoint's tokenizer with t_jax's Tokenizer interface (see the module docstring).

  Made from the tokenizer files (name -> bytes) of an HF directory, so it pickles, saves (`save(dir)` writes
  them back) and fingerprints (`model_proto`) by those bytes.
  """

  def __init__(self, files: dict[str, bytes], name: str = "HFTokenizer") -> None:
    self.files, self.name = dict(files), name
    config = self._json("tokenizer_config.json")
    if "tokenizer.json" in files:
      self._backend: Any = _Tokenizers(files["tokenizer.json"])
    else:
      spm_file = next((n for n in SPM_FILES if n in files), None)
      if spm_file is None:
        raise ValueError(f"{name}: no tokenizer.json or SentencePiece model ({', '.join(SPM_FILES)})")
      self._backend = _SentencePiece(files[spm_file], int(config.get("extra_ids", 0) or 0))
    self.vocab_size = self._backend.size
    self.model_proto = b"".join(n.encode() + b"\0" + files[n] for n in sorted(files))
    self.clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and not self._backend.is_bpe
    ids = self._special_ids(config)
    self.bos_id = ids.get("cls", ids.get("bos", ids.get("eos", ids.get("sep"))))
    self.eos_id = ids.get("sep", ids.get("eos"))
    if self.eos_id is None or self.bos_id is None:
      raise ValueError(f"{name}: no eos / [SEP] token found (tokenizer_config.json, special_tokens_map.json, "
                       f"config.json); t_jax rows need one")
    self.pad_id = ids.get("pad", self.eos_id)
    self.unk_id = ids.get("unk")
    self._mask_id = ids.get("mask")
    self._sentinels = {}
    for i in itertools.count():  # T5's <extra_id_0>, <extra_id_1>, ...
      if (t := self._backend.token_to_id(f"<extra_id_{i}>")) is None:
        break
      self._sentinels[i] = t
    self.num_extra_ids = len(self._sentinels)
    # Regular (text) ids for masked LM: between the special ids at the start and those at the end of the table.
    special = self._backend.special | set(ids.values()) | set(self._sentinels.values())
    self.first_regular_id = max((i + 1 for i in special if i < self.vocab_size // 2), default=0)
    self.sp_vocab_size = min((i for i in special if i >= self.vocab_size // 2), default=self.vocab_size)

  def _json(self, file: str) -> dict:
    return json.loads(self.files[file]) if file in self.files else {}

  def _special_ids(self, config: dict) -> dict[str, int]:
    """Role -> id, from the tokenizer configs, else the model's config.json ids, else the usual spellings."""
    tokens = {}
    for source in (self._json("special_tokens_map.json"), config):
      for role in ROLES:
        if f"{role}_token" in source:
          tokens[role] = _content(source[f"{role}_token"])
    ids = {role: self._backend.token_to_id(t) for role, t in tokens.items() if t is not None}
    model = self._json(TOKEN_IDS)
    for role in ("bos", "eos", "pad"):
      value = model.get(f"{role}_token_id")
      if role not in tokens and isinstance(value, int) and 0 <= value < self.vocab_size:
        ids[role] = value
    if not tokens and not model:  # a bare tokenizer.json
      for role, spellings in KNOWN.items():
        found = [i for i in map(self._backend.token_to_id, spellings) if i is not None]
        if found and role not in ids:
          ids[role] = found[0]
    return {role: i for role, i in ids.items() if i is not None}

  @classmethod
  def load(cls, path: Union[str, Path]) -> HFTokenizer:
    """From an HF checkpoint directory, a tokenizer.json, or a SentencePiece model file (with the configs beside)."""
    p = Path(path)
    directory = p if p.is_dir() else p.parent
    if not p.exists():
      raise ValueError(f"{p} does not exist")
    files = {n: (directory / n).read_bytes() for n in TOKENIZER_FILES + (TOKEN_IDS,) if (directory / n).is_file()}
    if TOKEN_IDS not in files and (directory / "config.json").is_file():  # the model's special ids, as a fallback
      model = json.loads((directory / "config.json").read_text())
      ids = {k: model[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if isinstance(model.get(k), int)}
      files[TOKEN_IDS] = json.dumps(ids, sort_keys=True).encode()
    if p.is_file():  # that file is the tokenizer, whatever else is beside it
      files = {k: v for k, v in files.items() if k not in ("tokenizer.json", *SPM_FILES)}
      files["tokenizer.json" if p.suffix == ".json" else "tokenizer.model"] = p.read_bytes()
    if not any(n in files for n in ("tokenizer.json", *SPM_FILES)):
      raise ValueError(f"{p} holds no Hugging Face tokenizer (tokenizer.json, {', '.join(SPM_FILES)})")
    return cls(files, f"HFTokenizer({str(p)!r})")

  def save(self, directory: Union[str, Path]) -> Path:
    """Writes the tokenizer's files (loadable by `load` and by transformers' AutoTokenizer) into `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in self.files.items():
      (out / name).write_bytes(data)
    return out

  @property
  def mask_id(self) -> int:
    """The mask token's id (masked LM)."""
    if self._mask_id is None:
      raise ValueError(f"{self.name} has no mask token; masked LM needs one")
    return self._mask_id

  def sentinel(self, i: int) -> int:
    """Id of T5's <extra_id_i>."""
    if i not in self._sentinels:
      raise ValueError(f"sentinel {i} out of range: {self.name} has {self.num_extra_ids} <extra_id_*> tokens")
    return self._sentinels[i]

  def encode(self, text: str) -> list[int]:
    """Token ids of a string, without special tokens (transformers' add_special_tokens=False)."""
    return self._backend.encode(text)

  def decode(self, ids: Union[Sequence[int], np.ndarray]) -> str:
    """Text of ids up to the first eos; pad, special and out-of-vocabulary ids dropped."""
    kept = []
    for t in (int(t) for t in ids):
      if t == self.eos_id:
        break
      if t != self.pad_id and 0 <= t < self.vocab_size:
        kept.append(t)
    text = self._backend.decode(kept)
    if self.clean_up:  # transformers' clean_up_tokenization
      for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                   (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text

  def __getstate__(self) -> dict:
    return {"files": self.files, "name": self.name}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["files"], state["name"])

  def __repr__(self) -> str:
    return f"{self.name[:-1]}, vocab_size={self.vocab_size})" if self.name.endswith(")") else self.name
