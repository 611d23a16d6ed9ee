"""SentencePiece tokenizer with T5 special ids (pad=0, eos=1, unk=2), a mask token and sentinel ids."""

from __future__ import annotations

import io
import itertools
import os
import re
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
MASK_PIECE = "<mask>"
# SentencePiece's complaint when the corpus has more distinct characters than the vocabulary has room for.
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


class VocabularyTooSmall(ValueError):
  """The vocabulary cannot hold the corpus's required characters; `minimum` is SentencePiece's need."""

  def __init__(self, vocab_size: int, minimum: int, source_name: str) -> None:
    self.vocab_size, self.minimum = vocab_size, minimum
    super().__init__(f"SentencePiece needs at least {minimum} pieces for the characters of {source_name}, "
                     f"got vocab_size={vocab_size}")


def _pieces(line: str, max_chars: int) -> Iterator[str]:
  """A line cut into pieces of at most max_chars characters, at the last space before the limit if any."""
  while len(line) > max_chars:
    cut = line.rfind(" ", 1, max_chars + 1)
    cut = cut if cut > 0 else max_chars
    yield line[:cut]
    line = line[cut:].lstrip(" ")
  if line:
    yield line


def _training_sentences(source: Sequence, max_sentences: int, max_chars: int) -> Iterator[str]:
  """Up to max_sentences non-empty lines (long ones cut in max_chars pieces) from a strided sample; a record's
  values that are not text (audio samples) are left out."""
  stride = max(1, len(source) // max_sentences)
  pieces = (piece for i in range(0, len(source), stride) for text in (source[i] or {}).values()
            if isinstance(text, str) for line in text.splitlines() if line.strip() for piece in _pieces(line, max_chars))
  return itertools.islice(pieces, max_sentences)


def byte_model() -> bytes:
  """A SentencePiece model of the 256 UTF-8 bytes and nothing else (model_type='byte' in Tokenizer.train):
  byte b is id 4 + b after pad, eos, unk and mask; no normalisation, whitespace kept as it is."""
  from sentencepiece import sentencepiece_model_pb2 as pb

  model, piece = pb.ModelProto(), pb.ModelProto.SentencePiece
  for name, kind in (("<pad>", piece.CONTROL), ("</s>", piece.CONTROL), ("<unk>", piece.UNKNOWN),
                     (MASK_PIECE, piece.USER_DEFINED)):
    model.pieces.add(piece=name, score=0.0, type=kind)
  for b in range(256):
    model.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=piece.BYTE)
  spec = model.trainer_spec
  spec.model_type, spec.byte_fallback, spec.vocab_size = pb.TrainerSpec.CHAR, True, len(model.pieces)
  spec.pad_id, spec.eos_id, spec.unk_id, spec.bos_id = PAD_ID, EOS_ID, UNK_ID, -1
  norm = model.normalizer_spec
  norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = "identity", False, False, False
  return model.SerializeToString()


class Tokenizer:
  """SentencePiece wrapper: `encode(str) -> list[int]`, `decode(ids) -> str`, T5-style special ids.

  Ids: pad=0, eos=1 (also bos for decoder-only models), unk=2, mask=3 when trained here ('<mask>'),
  then SentencePiece pieces, then `num_extra_ids` sentinels: sentinel(i) = vocab_size - 1 - i.
  """

  pad_id = PAD_ID  # also the decoder start token for encoder-decoder models
  eos_id = bos_id = EOS_ID  # eos is also the bos of decoder-only models
  unk_id = UNK_ID

  def __init__(self, model: str | bytes, num_extra_ids: int = 0) -> None:
    """Loads a model from a path (str) or serialized proto (bytes)."""
    if isinstance(model, str):
      with open(model, "rb") as f:
        model = f.read()
    self.model_proto = model  # the serialized SentencePiece model (what a model file holds)
    self._sp = spm.SentencePieceProcessor(model_proto=model)
    if (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()) != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(f"SentencePiece model must use pad=0, eos=1, unk=2; got pad={self._sp.pad_id()}, "
                       f"eos={self._sp.eos_id()}, unk={self._sp.unk_id()}")
    self.num_extra_ids = num_extra_ids
    self.sp_vocab_size = self._sp.get_piece_size()
    mask = self._sp.piece_to_id(MASK_PIECE)
    self._mask_id = mask if mask != self._sp.unk_id() else None
    self.first_regular_id = max(PAD_ID, EOS_ID, UNK_ID, self._mask_id or 0) + 1

  @classmethod
  def load(cls, path: str, num_extra_ids: int = 0) -> Tokenizer:
    """Loads a SentencePiece model file."""
    return cls(path, num_extra_ids)

  @classmethod
  def train(cls, source: Sequence, path: str, *, vocab_size: int = 8000, model_type: str = "unigram",
            num_extra_ids: int = 0, max_sentences: int = 100_000, character_coverage: float = 0.9995,
            byte_fallback: bool = False, num_threads: int = 4, max_sentence_chars: int = 4096,
            overwrite: bool = False) -> Tokenizer:
    """Trains on a source's texts and saves to `path`; reuses the model at `path` if it already exists.

    model_type: SentencePiece's 'unigram', 'bpe', 'word' or 'char', or 'byte': `byte_model()`, no training.
    `vocab_size` is a soft limit for SentencePiece (hard_vocab_limit=False), excluding the extra ids; one
    below what the corpus's characters need raises VocabularyTooSmall, other SentencePiece failures
    ValueError. Lines longer than `max_sentence_chars` are cut into pieces (at spaces where possible).
    The model is written atomically, so concurrent processes never read a partial file.
    """
    if os.path.exists(path) and not overwrite:
      return cls(path, num_extra_ids)
    if model_type == "byte":
      return cls._write(path, byte_model(), num_extra_ids)
    name = getattr(source, "name", source)
    sentences = list(_training_sentences(source, max_sentences, max_sentence_chars))
    if not sentences:
      raise ValueError(f"Tokenizer.train: no text in {name!r}")
    buf = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(sentences), model_writer=buf,
          vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
          byte_fallback=byte_fallback, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
          user_defined_symbols=[MASK_PIECE], hard_vocab_limit=False, train_extremely_large_corpus=False,
          input_sentence_size=max_sentences, shuffle_input_sentence=True, num_threads=num_threads,
          max_sentence_length=4 * max_sentence_chars, minloglevel=2)  # bytes: no piece is dropped
    except RuntimeError as e:
      if m := _TOO_SMALL.search(str(e)):
        raise VocabularyTooSmall(vocab_size, int(m.group(2)), name) from e
      raise ValueError(f"SentencePiece could not train on {name}: {str(e).strip()}") from e
    return cls._write(path, buf.getvalue(), num_extra_ids)

  @classmethod
  def _write(cls, path: str, model: bytes, num_extra_ids: int) -> Tokenizer:
    """Saves a serialized model to `path` atomically (concurrent processes never read a partial file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, delete=False, suffix=".tmp") as f:
      f.write(model)
    os.replace(f.name, path)
    return cls(model, num_extra_ids)

  @property
  def vocab_size(self) -> int:
    """SentencePiece pieces plus extra (sentinel) ids: the embedding table size."""
    return self.sp_vocab_size + self.num_extra_ids

  @property
  def mask_id(self) -> int:
    """The '<mask>' id for masked LM (3 for models trained here)."""
    if self._mask_id is None:
      raise ValueError(f"This SentencePiece model has no {MASK_PIECE!r} piece; masked LM needs one")
    return self._mask_id

  def sentinel(self, i: int) -> int:
    """Id of sentinel i (T5's <extra_id_i>): vocab_size - 1 - i."""
    if not 0 <= i < self.num_extra_ids:
      raise ValueError(f"sentinel {i} out of range: the tokenizer has num_extra_ids={self.num_extra_ids}")
    return self.vocab_size - 1 - i

  def encode(self, text: str) -> list[int]:
    """Token ids of a string (no eos appended)."""
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of ids up to the first eos, pad and out-of-vocabulary ids dropped; sentinels as '<extra_id_i>'."""
    pieces, run = [], []
    for t in (int(t) for t in ids):
      if t == EOS_ID:
        break
      if t == PAD_ID or not 0 <= t < self.vocab_size:
        continue
      if t < self.sp_vocab_size:
        run.append(t)
        continue
      pieces += [self._sp.decode(run), f"<extra_id_{self.vocab_size - 1 - t}>"]
      run = []
    return "".join(pieces + [self._sp.decode(run)])

  def __getstate__(self) -> dict:
    return {"model": self.model_proto, "num_extra_ids": self.num_extra_ids}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["model"], state["num_extra_ids"])

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size}, num_extra_ids={self.num_extra_ids})"
