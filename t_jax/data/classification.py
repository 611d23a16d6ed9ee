"""Sequence classification and regression: the Classification objective and labelled sources.

Classification(seq_len=128, num_classes=2, text_key="text", text_pair_key=None, label_field="label")
    One row per example, never packed (B = batch size, L = seq_len):
      inputs [B, L]          [bos] text [eos]  (a pair: [bos] text [eos] pair [eos]; bos is the [CLS] slot)
      segment_ids [B, L]     1 on tokens, 0 on padding;  positions [B, L]
      token_type_ids [B, L]  pairs only: 0 up to the first eos, then 1 (BERT segments A/B)
      label [B]              int32 class in [0, num_classes), or float32 for num_classes=1 (regression)
      weights [B]            float32, 1 (0 on the rows padding a final eval batch)
    Over-long rows lose tokens from the longer text (counted "truncated"). The model needs
    ModelConfig.num_classes = num_classes (checked by Experiment).

Sources (records {text, [text_pair,] label}, all strings like every source's records):
  AcceptabilitySource(path, seed=0)  word-order acceptability from one sentence per line (e.g. Multi30K's
      English captions): each line becomes one example, the sentence itself (label 1) or, with probability
      1/2, the same words corrupted (label 0): all shuffled or, as often, two different words swapped.
      Seeded per line, so a file always gives the same examples.
  TfdsClassificationSource(name, split, text_key="sentence", ...)  e.g. glue/cola; records whose label is
      negative (GLUE's unlabelled test splits) are skipped.

Text-to-text (T5, Raffel et al. 2019): every task is Seq2Seq from a prefixed input string to a target string.
  TextToTextSource(source, label_names=("unacceptable", "acceptable"), prefix="cola sentence: ",
      pair_prefix=None)  a labelled source's records as {'inputs': prefix + text [+ pair_prefix + text_pair],
      'targets': label_names[label]} (MRPC: prefix "mrpc sentence1: ", pair_prefix " sentence2: ").
  TextToText(inputs_len=128, targets_len=8, label_names=(...))  Seq2Seq (same rows and batch keys) whose eval
      also generates: greedy decoding of every eval input, eval_exact_match = decoded text == target string,
      and with label_names eval_accuracy / eval_f1 / eval_mcc over the class each string names (a string that
      names none is wrong). eval_loss / eval_token_accuracy stay teacher-forced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Optional

import numpy as np

from t_jax.data.objectives import Objective, Row, Seq2Seq
from t_jax.data.sources import Counts, Example, InMemorySource, TextFileSource, TfdsRecords, _decode
from t_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass
class Classification(Objective):
  """One label per sequence (or sentence pair): cross-entropy over num_classes, squared error for 1."""

  architectures: ClassVar[tuple[str, ...]] = ("encoder", "decoder", "prefix_lm")
  label_key: ClassVar[str] = "label"
  pack: bool = False
  seq_len: int = 128
  num_classes: int = 2  # 1 = regression
  text_key: str = "text"
  text_pair_key: Optional[str] = None  # sentence pairs: the second text, token type 1
  label_field: str = "label"  # the example's label key

  @property
  def regression(self) -> bool:
    """One output, trained with squared error; eval reports Pearson/Spearman."""
    return self.num_classes == 1

  def lengths(self) -> dict[str, int]:
    """inputs (and token_type_ids for pairs) of seq_len."""
    return {"inputs": self.seq_len, **({"token_type_ids": self.seq_len} if self.text_pair_key else {})}

  def check(self, tokenizer: Tokenizer) -> None:
    """One example per row (the head pools one sequence), at least one class."""
    if self.pack:
      raise ValueError("Classification rows hold one example each (pack=False)")
    if self.num_classes < 1:
      raise ValueError(f"Classification.num_classes must be >= 1, got {self.num_classes}")
    if self.seq_len < 3 + bool(self.text_pair_key):
      raise ValueError(f"Classification.seq_len={self.seq_len} leaves no room for text")
    super().check(tokenizer)

  def label(self, example: Example) -> np.ndarray:
    """The example's label as int32 (a class, checked) or float32 (regression)."""
    if self.regression:
      return np.float32(example[self.label_field])
    label = int(example[self.label_field])
    if not 0 <= label < self.num_classes:
      raise ValueError(f"label {label} of {example} is not in [0, Classification.num_classes={self.num_classes})")
    return np.int32(label)

  def examples(self, example: Example, rng: np.random.Generator, tokenizer: Tokenizer) -> list[Row]:
    """One row: [bos] a [eos] (b [eos]); the longer text loses its last tokens until the row fits."""
    texts = [list(tokenizer.encode(example[self.text_key]))]
    if self.text_pair_key:
      texts.append(list(tokenizer.encode(example[self.text_pair_key])))
    budget = self.seq_len - 1 - len(texts)  # bos and one eos per text
    if sum(map(len, texts)) > budget:
      self.counts.add("truncated")
      while sum(map(len, texts)) > budget:
        max(texts, key=len).pop()
    first = [tokenizer.bos_id, *texts[0], tokenizer.eos_id]
    ids = first + ([*texts[1], tokenizer.eos_id] if self.text_pair_key else [])
    row = {"inputs": np.asarray(ids, np.int32), "label": self.label(example), "weights": np.float32(1.0)}
    if self.text_pair_key:
      row["token_type_ids"] = (np.arange(len(ids)) >= len(first)).astype(np.int32)
    return [row]

  def finalize(self, row: Row) -> Row:
    """inputs, segment_ids, positions, (token_type_ids,) label, weights."""
    out = {"inputs": row["inputs"], "segment_ids": row["inputs_segment_ids"],
           "positions": row["inputs_positions"], "label": row["label"], "weights": row["weights"]}
    if self.text_pair_key:
      out["token_type_ids"] = row["token_type_ids"]
    return out

  def spec_row(self, **extra: Any) -> Row:
    """Rows of zeros with label 0 (0.0 for regression) and weight 1."""
    label = np.float32(0) if self.regression else np.int32(0)
    return super().spec_row(label=label, weights=np.float32(1.0), **extra)

  def model_inputs(self, batch: Row) -> tuple[tuple, dict]:
    """Token ids, positions, segment ids (padding: the head pools real tokens only) and token types."""
    kw = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
    return (batch["inputs"],), dict(positions=batch["positions"], segment_ids=batch["segment_ids"], **kw)


def corrupt_word_order(words: list[str], rng: np.random.Generator) -> Optional[list[str]]:
  """The words shuffled (probability 1/2) or two different words swapped; None when no order differs."""
  if len(set(words)) < 2:
    return None
  if rng.random() < 0.5:
    for _ in range(10):
      shuffled = [words[i] for i in rng.permutation(len(words))]
      if shuffled != words:
        return shuffled
  while True:
    i, j = rng.choice(len(words), 2, replace=False)
    if words[i] != words[j]:
      out = list(words)
      out[i], out[j] = out[j], out[i]
      return out


class AcceptabilitySource(InMemorySource):
  """{'text': sentence, 'label': 1} or {'text': the sentence's words reordered, 'label': 0} per line of `path`."""

  def __init__(self, path: str, *, seed: int = 0, max_examples: Optional[int] = None, text_key: str = "text",
               label_key: str = "label") -> None:
    lines = TextFileSource(path)
    counts, examples = Counts(), []
    for i in range(len(lines) if max_examples is None else min(max_examples, len(lines))):
      line = lines[i]
      if line is None:
        continue
      words, rng = line["text"].split(), np.random.default_rng([seed, i])
      if len(set(words)) < 2:  # no other order
        counts.add("single_word")
        continue
      corrupted = corrupt_word_order(words, rng) if rng.random() < 0.5 else None
      text = line["text"] if corrupted is None else " ".join(corrupted)
      examples.append({text_key: text, label_key: str(int(corrupted is None))})  # records hold strings
    super().__init__(examples, f"AcceptabilitySource({path!r}, seed={seed})", counts)


class TfdsClassificationSource(TfdsRecords):
  """A labelled TFDS dataset (e.g. glue/cola, glue/sst2, glue/mrpc with text_pair_key) via tfds.data_source."""

  def __init__(self, name: str, split: str = "train", *, text_key: str = "sentence",
               text_pair_key: Optional[str] = None, label_key: str = "label", data_dir: Optional[str] = None) -> None:
    super().__init__(name, split, data_dir)
    self.keys = {"text": text_key, **({"text_pair": text_pair_key} if text_pair_key else {})}
    self.label_key = label_key

  def __getitem__(self, index: int) -> Optional[Example]:
    record = self._source[index]
    label = np.asarray(record[self.label_key]).item()
    if label < 0:  # GLUE test splits carry no labels
      return None
    out = {k: _decode(record[feature], self.counts, None) for k, feature in self.keys.items()}
    return None if None in out.values() else {**out, "label": str(label)}


class TextToTextSource:
  """A labelled source's records as text-to-text pairs {'inputs': ..., 'targets': a label name} (module docstring)."""

  def __init__(self, source: Sequence, label_names: Sequence[str], *, prefix: str = "",
               pair_prefix: Optional[str] = None, text_key: str = "text", text_pair_key: str = "text_pair",
               label_key: str = "label") -> None:
    if not label_names:
      raise ValueError("TextToTextSource.label_names: the target string of each class, e.g. ('negative', 'positive')")
    self.source, self.label_names = source, tuple(label_names)
    self.prefix, self.pair_prefix = prefix, pair_prefix
    self.text_key, self.text_pair_key, self.label_key = text_key, text_pair_key, label_key
    self.name = f"TextToTextSource({getattr(source, 'name', type(source).__name__)}, prefix={prefix!r})"

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> Optional[Example]:
    record = self.source[index]
    if record is None:
      return None
    label = int(record[self.label_key])
    if not 0 <= label < len(self.label_names):
      raise ValueError(f"{self.name}: label {label} has no name in label_names={self.label_names}")
    inputs = self.prefix + record[self.text_key]
    if self.pair_prefix is not None:
      inputs += self.pair_prefix + record[self.text_pair_key]
    return {"inputs": inputs, "targets": self.label_names[label]}

  @property
  def stats(self) -> dict[str, Any]:
    """The wrapped source's counts."""
    return getattr(self.source, "stats", {"documents": len(self)})


@dataclasses.dataclass
class TextToText(Seq2Seq):
  """Seq2Seq to target strings, evaluated by generation: exact match and, with label_names, class metrics."""

  inputs_len: int = 128
  targets_len: int = 8
  label_names: tuple[str, ...] = ()  # the target strings of the classes (class metrics); () = exact match only

  def __post_init__(self) -> None:
    self.label_names = tuple(self.label_names)

  def check(self, tokenizer: Tokenizer) -> None:
    """Every label string fits in targets_len with its eos (else training truncates the answers it is scored on)."""
    super().check(tokenizer)
    for name in self.label_names:
      if (n := len(tokenizer.encode(name)) + 1) > self.targets_len:
        raise ValueError(f"TextToText.targets_len={self.targets_len} cannot hold the label {name!r}: {n} tokens "
                         f"with eos under this tokenizer")

