"""Random-access text sources: TFDS, text files, parallel text files and CPython's pydoc topics.

Every source has `__len__` and `__getitem__(i) -> dict[str, str] | None` (grain's RandomAccessDataSource
protocol), a `name` and `stats` (documents kept, lines skipped as empty/undecodable, documents truncated).
`None` marks a record that was skipped lazily (only TfdsSource does that); grain filters it out.
"""

from __future__ import annotations

import collections
import glob
import gzip
import importlib
import threading
import zlib
from collections.abc import Mapping, Sequence

Example = dict[str, str]


class Counts:
  """Thread-safe named counters (documents skipped, truncated, split ...)."""

  def __init__(self) -> None:
    self._counts: collections.Counter[str] = collections.Counter()
    self._lock = threading.Lock()

  def add(self, key: str, n: int = 1) -> None:
    """Adds n to counter `key`."""
    with self._lock:
      self._counts[key] += n

  def as_dict(self) -> dict[str, int]:
    """A plain-dict snapshot of the counters."""
    with self._lock:
      return dict(self._counts)

  def __getstate__(self) -> dict[str, int]:
    return self.as_dict()

  def __setstate__(self, state: dict[str, int]) -> None:
    self.__init__()
    self._counts.update(state)


def _decode(raw: bytes | str, counts: Counts, max_chars: int | None) -> str | None:
  """UTF-8 text of one document, or None (counted) when undecodable or empty."""
  if isinstance(raw, bytes):
    try:
      raw = raw.decode("utf-8")
    except UnicodeDecodeError:
      counts.add("undecodable")
      return None
  text = raw.strip()
  if not text:
    counts.add("empty")
    return None
  if max_chars is not None and len(text) > max_chars:
    counts.add("truncated")
    text = text[:max_chars]
  return text


def _read_bytes(path: str) -> bytes:
  """File contents; `.gz` files are decompressed."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    return f.read()


def _expand(patterns: str | Sequence[str], name: str) -> list[str]:
  """Sorted files matching glob patterns; ValueError naming the patterns when nothing matches."""
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  files = sorted({f for p in patterns for f in glob.glob(p)})
  if not files:
    raise ValueError(f"{name}: no files match {patterns}")
  return files


class InMemorySource:
  """A list of examples held in memory, with the counts gathered while building it."""

  def __init__(self, examples: list[Example], name: str, counts: Counts | None = None) -> None:
    self.name = name
    self.counts = counts or Counts()
    if not examples:
      raise ValueError(f"{name}: no documents (skipped: {self.counts.as_dict() or 'none'})")
    self._examples = examples

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> Example:
    return self._examples[index]

  @property
  def stats(self) -> dict[str, int]:
    """Documents kept plus skip/truncation counters."""
    return {"documents": len(self._examples), **self.counts.as_dict()}

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r}, {len(self)} documents)"


class TextFileSource(InMemorySource):
  """Plain text files (glob patterns, `.gz` allowed): one document per line, or one per file."""

  def __init__(self, patterns: str | Sequence[str], *, per_line: bool = True, key: str = "text",
               max_chars: int | None = None) -> None:
    name = f"TextFileSource({patterns!r})"
    counts = Counts()
    examples = []
    for path in _expand(patterns, name):
      data = _read_bytes(path)
      for raw in (data.splitlines() if per_line else [data]):
        if (text := _decode(raw, counts, max_chars)) is not None:
          examples.append({key: text})
    super().__init__(examples, name, counts)


class ParallelTextSource(InMemorySource):
  """Line-aligned parallel files (`.gz` allowed) -> {inputs_key: source line, targets_key: target line}.

  A pair is skipped (and counted) when either side is empty or not valid UTF-8.
  """

  def __init__(self, source_path: str, target_path: str, *, inputs_key: str = "inputs",
               targets_key: str = "targets", max_chars: int | None = None) -> None:
    name = f"ParallelTextSource({source_path!r}, {target_path!r})"
    src, tgt = _read_bytes(source_path).splitlines(), _read_bytes(target_path).splitlines()
    if len(src) != len(tgt):
      raise ValueError(f"Parallel files differ in line count: {source_path} has {len(src)} lines, "
                       f"{target_path} has {len(tgt)} lines")
    counts, examples = Counts(), []
    for s, t in zip(src, tgt):
      s, t = _decode(s, counts, max_chars), _decode(t, counts, max_chars)
      if s is not None and t is not None:
        examples.append({inputs_key: s, targets_key: t})
    super().__init__(examples, name, counts)

  @classmethod
  def from_prefix(cls, prefix: str, source_lang: str, target_lang: str, **kwargs: object
                  ) -> ParallelTextSource:
    """Files `{prefix}.{lang}` or `{prefix}.{lang}.gz`, e.g. ('multi30k/train', 'en', 'de')."""
    paths = []
    for lang in (source_lang, target_lang):
      found = [p for p in (f"{prefix}.{lang}", f"{prefix}.{lang}.gz") if glob.glob(p)]
      if not found:
        raise ValueError(f"ParallelTextSource: neither {prefix}.{lang} nor {prefix}.{lang}.gz exists")
      paths.append(found[0])
    return cls(*paths, **kwargs)


class PydocSource(InMemorySource):
  """CPython's English documentation topics (`pydoc_data.topics`): a built-in corpus needing no download.

  Documents are paragraphs (`unit='paragraph'`) or whole topics (`unit='topic'`). A document is in the
  validation split when crc32(text) % validation_every == 0: deterministic, and repeated paragraphs
  always land in the same split.
  """

  def __init__(self, split: str = "train", *, unit: str = "paragraph", validation_every: int = 10,
               key: str = "text", max_chars: int | None = None) -> None:
    from pydoc_data.topics import topics

    if split not in ("train", "validation") or unit not in ("paragraph", "topic"):
      raise ValueError(f"PydocSource: bad split={split!r} or unit={unit!r}")
    counts, examples = Counts(), []
    for name in sorted(topics):
      for raw in (topics[name].split("\n\n") if unit == "paragraph" else [topics[name]]):
        text = _decode(raw, counts, None)
        if text is not None and (zlib.crc32(text.encode()) % validation_every == 0) == (split == "validation"):
          examples.append({key: text[:max_chars]})
    super().__init__(examples, f"PydocSource({split!r}, unit={unit!r})", counts)


# TFDS registers most text datasets lazily; importing these modules registers them without TensorFlow.
_TFDS_TEXT_MODULES = ("text", "translate", "summarization", "question_answering")


def _tfds_data_source(name: str, split: str, data_dir: str | None) -> object:
  """`tfds.data_source`, retried once after importing TFDS's lazily-registered text modules."""
  import tensorflow_datasets as tfds

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    for module in _TFDS_TEXT_MODULES:
      importlib.import_module(f"tensorflow_datasets.{module}")
    return tfds.data_source(name, split=split, data_dir=data_dir)


class TfdsSource:
  """A TFDS dataset read through `tfds.data_source` (ArrayRecord, random access, no TensorFlow).

  `keys` maps output keys to TFDS feature keys: 'text' -> {'text': ex['text']};
  {'inputs': 'en', 'targets': 'de'} for wmt14_translate/de-en. Bytes are decoded as UTF-8; a record with
  an empty or undecodable feature yields None (counted once per record).
  """

  def __init__(self, name: str, split: str = "train", *, keys: str | Sequence[str] | Mapping[str, str] = "text",
               data_dir: str | None = None, max_chars: int | None = None) -> None:
    self.name = f"TfdsSource({name!r}, split={split!r})"
    if isinstance(keys, str):
      keys = {keys: keys}
    self.keys = dict(keys) if isinstance(keys, Mapping) else {k: k for k in keys}
    self.max_chars = max_chars
    self._source = _tfds_data_source(name, split, data_dir)
    if len(self._source) == 0:
      raise ValueError(f"{self.name}: no documents")
    self._skipped: dict[str, set[int]] = {"empty": set(), "undecodable": set()}
    self._truncated: set[int] = set()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Example | None:
    record, counts, out = self._source[index], Counts(), {}
    for out_key, feature in self.keys.items():
      if (text := _decode(record[feature], counts, self.max_chars)) is None:
        break
      out[out_key] = text
    with self._lock:
      for reason in counts.as_dict():
        (self._truncated if reason == "truncated" else self._skipped[reason]).add(index)
    return out if len(out) == len(self.keys) else None

  @property
  def stats(self) -> dict[str, int]:
    """Records seen so far that were skipped (empty/undecodable) or truncated; `documents` = records."""
    with self._lock:
      out = {k: len(v) for k, v in self._skipped.items() if v}
      if self._truncated:
        out["truncated"] = len(self._truncated)
    return {"documents": len(self), **out}

  def __repr__(self) -> str:
    return f"{self.name} ({len(self)} records)"
