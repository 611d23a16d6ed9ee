"""BERT's next-sentence prediction: sentence pairs from documents, and the MLM + NSP pre-training objective.

NextSentenceSource(split="train", seed=0)  sentence pairs from CPython's documentation topics (PydocSource
    unit='topic', or any `documents` with a "text" field): one record per sentence that has a successor in its
    document, {'text': s_i, 'text_pair': s_{i+1}, 'next_sentence': '1'} or, with probability 1/2,
    {'text': s_i, 'text_pair': a random sentence of another document, 'next_sentence': '0'} (Devlin et al.
    2019). Seeded per pair, so a source always gives the same pairs.

BertPretraining(seq_len=128, mask_rate=0.15, ...)  MaskedLM on the pair, plus next-sentence prediction from
    [CLS]; one pair per row (never packed):
      inputs [B, L]          [bos] a [eos] b [eos], masked as MaskedLM masks (specials never)
      targets, weights       the MLM targets and their weights (1 on the selected positions)
      token_type_ids [B, L]  0 up to the first eos, then 1;  segment_ids, positions [B, L]
      next_sentence [B]      int32, 1 = b follows a
    The model needs ModelConfig.next_sentence=True (it returns MLM and next-sentence logits) and
    num_token_types >= 2. The loss is BERT's sum of the two means: mean MLM loss + mean next-sentence loss;
    the logged nll/accuracy are the MLM's, nsp_loss/nsp_accuracy (eval_nsp_*) the next-sentence head's.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import ClassVar, Optional

import numpy as np

from t_jax.data.objectives import MaskedLM, Row, mask_tokens
from t_jax.data.sources import Counts, Example, InMemorySource, PydocSource
from t_jax.data.tokenizer import Tokenizer

# A sentence ends at . ! ? (a closing quote or bracket may follow) before a space and a capital, quote or bracket.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[A-Z\"'(])")


def split_sentences(text: str, min_words: int = 3) -> list[str]:
  """The prose sentences of a document: paragraphs that are not code (indented) or heading rules, joined
  across their line breaks, cut at sentence ends; sentences of fewer than min_words words are dropped."""
  sentences = []
  for paragraph in re.split(r"\n\s*\n", text):
    lines = paragraph.strip("\n").splitlines()
    if not lines or lines[0].startswith((" ", "\t")) or set(paragraph.strip()) <= set("*=-~^ \n"):
      continue
    prose = " ".join(line.strip() for line in lines if not set(line.strip()) <= set("*=-~^"))
    sentences += [s.strip() for s in _SENTENCE_END.split(prose) if len(s.split()) >= min_words]
  return sentences


class NextSentenceSource(InMemorySource):
  """Next-sentence pairs {'text', 'text_pair', 'next_sentence': '1' | '0'} (module docstring)."""

  def __init__(self, split: str = "train", *, seed: int = 0, documents: Optional[Sequence] = None,
               text_key: str = "text", min_words: int = 3, max_pairs: Optional[int] = None) -> None:
    docs_source = PydocSource(split, unit="topic") if documents is None else documents
    counts = Counts()
    docs, self.document_index = [], []
    for i in range(len(docs_source)):
      record = docs_source[i]
      sentences = split_sentences(record[text_key], min_words) if record else []
      if len(sentences) < 2:
        counts.add("documents_without_pairs")
        continue
      docs.append(sentences)
      self.document_index.append(i)  # where documents[d] came from
    if len(docs) < 2:
      raise ValueError(f"NextSentenceSource: {len(docs)} document(s) with two sentences or more; random "
                       "second sentences need another document")
    self.documents = docs  # sentences of each document
    self.pairs = [(d, j) for d, sentences in enumerate(docs) for j in range(len(sentences) - 1)]
    if max_pairs is not None:
      self.pairs = self.pairs[:max_pairs]
    self.seed = seed
    name = getattr(docs_source, "name", type(docs_source).__name__)
    super().__init__(self.pairs, f"NextSentenceSource({name!r}, seed={seed})", counts)

  def __getitem__(self, index: int) -> Example:
    d, j = self.pairs[index]
    rng = np.random.default_rng([self.seed, index])
    first = self.documents[d][j]
    if rng.random() < 0.5:
      return {"text": first, "text_pair": self.documents[d][j + 1], "next_sentence": "1"}
    other = int(rng.integers(len(self.documents) - 1))
    other += other >= d  # any document but this one
    sentences = self.documents[other]
    return {"text": first, "text_pair": sentences[int(rng.integers(len(sentences)))], "next_sentence": "0"}

  @property
  def stats(self) -> dict[str, int]:
    """Documents, sentences and pairs."""
    return {"documents": len(self.documents), "sentences": sum(map(len, self.documents)), "pairs": len(self),
            **self.counts.as_dict()}


@dataclasses.dataclass
class BertPretraining(MaskedLM):
  """MaskedLM over sentence pairs plus next-sentence prediction (module docstring)."""

  architectures: ClassVar[tuple[str, ...]] = ("encoder",)
  pack: bool = False
  text_pair_key: str = "text_pair"
  label_field: str = "next_sentence"

  def lengths(self) -> dict[str, int]:
    """inputs, targets, weights and token_type_ids of seq_len."""
    return {k: self.seq_len for k in ("inputs", "targets", "weights", "token_type_ids")}

  def check(self, tokenizer: Tokenizer) -> None:
    """One pair per row: the [CLS] slot is the row's first token."""
    if self.pack:
      raise ValueError("BertPretraining rows hold one sentence pair each (pack=False)")
    if self.seq_len < 5:
      raise ValueError(f"BertPretraining.seq_len={self.seq_len} leaves no room for two sentences")
    super().check(tokenizer)

  def examples(self, example: Example, rng: np.random.Generator, tokenizer: Tokenizer) -> list[Row]:
    """One row: [bos] a [eos] b [eos] (the longer text loses its last tokens until it fits), then masked."""
    texts = [list(tokenizer.encode(example[self.text_key])), list(tokenizer.encode(example[self.text_pair_key]))]
    if sum(map(len, texts)) > self.seq_len - 3:
      self.counts.add("truncated")
      while sum(map(len, texts)) > self.seq_len - 3:
        max(texts, key=len).pop()
    first = [tokenizer.bos_id, *texts[0], tokenizer.eos_id]
    ids = np.asarray(first + [*texts[1], tokenizer.eos_id], np.int32)
    inputs, weights = mask_tokens(ids, rng, tokenizer, self.mask_rate, self.mask_prob, self.random_prob)
    return [{"inputs": inputs, "targets": ids, "weights": weights,
             "token_type_ids": (np.arange(len(ids)) >= len(first)).astype(np.int32),
             "next_sentence": np.int32(int(example[self.label_field]))}]

  def finalize(self, row: Row) -> Row:
    """inputs, targets, weights, segment_ids, positions, token_type_ids, next_sentence."""
    return {"inputs": row["inputs"], "targets": row["targets"], "weights": row["weights"],
            "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"],
            "token_type_ids": row["token_type_ids"], "next_sentence": row["next_sentence"]}

  def model_inputs(self, batch: Row) -> tuple[tuple, dict]:
    """Token ids, positions, segment ids and token types."""
    return (batch["inputs"],), dict(positions=batch["positions"], segment_ids=batch["segment_ids"],
                                    token_type_ids=batch["token_type_ids"])
