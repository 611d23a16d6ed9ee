"""Random-access text sources: TFDS, text files, parallel text files and CPython's pydoc topics.

Every source has `__len__` and `__getitem__(i) -> dict[str, str] | None` (grain's RandomAccessDataSource
protocol), a `name` and `stats` (documents kept, lines skipped as empty/undecodable, documents truncated).
`None` marks a record that was skipped lazily (TfdsSource and indexed TextFileSource lines); grain filters
it out. Records longer than `max_chars` (default MAX_CHARS; None: no limit) are truncated and counted.
"""

from __future__ import annotations

import codecs
import collections
import glob
import gzip
import importlib
import os
import threading
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

Example = dict[str, str]
# Default cap on a record's characters: one pathological line (a 50 MB minified file) cannot blow up memory.
MAX_CHARS = 1_000_000
# Uncompressed line files are indexed reading this many bytes at a time (tests shrink it).
READ_CHUNK_BYTES = 32 << 20
# Each reading thread keeps at most this many files open.
OPEN_FILES_PER_THREAD = 16
# False for the ASCII bytes str.strip() removes: lines of only these are blank, dropped at index time.
_NOT_BLANK = np.ones(256, bool)
_NOT_BLANK[list(b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f")] = False


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


def _decode(raw: bytes | str, counts: Counts, max_chars: int | None, cut: bool = False) -> str | None:
  """UTF-8 text of one document, or None (counted) when undecodable or empty.

  `cut`: raw is the first bytes of a longer record, so a character split at its end is dropped, not an error.
  """
  if isinstance(raw, bytes):
    try:
      raw = codecs.getincrementaldecoder("utf-8")().decode(raw, final=not cut)
    except UnicodeDecodeError:
      counts.add("undecodable")
      return None
  text = raw.strip()
  if not text:
    counts.add("empty")
    return None
  if max_chars is not None and (cut or len(text) > max_chars):
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
  _check_files(files, name)
  return files


def _check_files(paths: Sequence[str], name: str) -> None:
  """ValueError naming the first path that is a directory or does not exist."""
  for path in paths:
    if os.path.isdir(path):
      raise ValueError(f"{name}: {path} is a directory, not a file (give a glob such as '{path}/*.txt')")
    if not os.path.exists(path):
      raise ValueError(f"{name}: {path} does not exist")


def _index_lines(path: str, counts: Counts) -> tuple[np.ndarray, np.ndarray]:
  """Start/end byte offsets of an uncompressed file's lines, in one chunked pass; ends exclude the b"\\n".

  Blank lines (only ASCII whitespace: b"", b"\\r", b"  ") are dropped and counted "empty".
  """
  starts, ends = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
  offset = line_start = blank = 0
  pending = False  # whether the unfinished line since line_start has a non-blank byte yet
  with open(path, "rb") as f:
    while chunk := f.read(READ_CHUNK_BYTES):
      data = np.frombuffer(chunk, np.uint8)
      newlines = np.flatnonzero(data == ord("\n"))
      cuts = np.concatenate([[0], newlines + 1])
      pieces = cuts[cuts < len(data)]  # where this chunk's lines start; no tail after a final b"\n"
      # content[j]: the j-th line's bytes in this chunk are not blank; content[-1]: the unfinished tail's
      content = np.zeros(len(cuts), bool)
      content[:len(pieces)] = np.logical_or.reduceat(_NOT_BLANK[data], pieces)
      content[0] |= pending
      bounds = np.concatenate([[line_start], offset + newlines + 1])
      keep = content[:-1]
      starts.append(bounds[:-1][keep])
      ends.append(offset + newlines[keep])
      blank += len(keep) - int(keep.sum())
      offset, line_start, pending = offset + len(data), int(bounds[-1]), bool(content[-1])
  if line_start < offset and pending:  # a last line without b"\n"
    starts.append(np.array([line_start], np.int64))
    ends.append(np.array([offset], np.int64))
  blank += line_start < offset and not pending
  if blank:
    counts.add("empty", blank)
  return np.concatenate(starts), np.concatenate(ends)


class _Handles(dict):
  """One thread's open files by file id, closed when the thread or the source goes."""

  def __del__(self) -> None:
    for f in self.values():
      f.close()


class _FileLines:
  """Lines of uncompressed files read on demand through a byte-offset index (see TextFileSource), each
  thread through its own file handles."""

  def __init__(self, files: list[str], key: str, max_chars: int | None, counts: Counts) -> None:
    self.files, self.key, self.max_chars, self.counts = files, key, max_chars, counts
    offsets = [_index_lines(path, counts) for path in files]
    self._starts = np.concatenate([s for s, _ in offsets])
    self._ends = np.concatenate([e for _, e in offsets])
    self._file_ends = np.cumsum([len(s) for s, _ in offsets])  # line i is in the first file ending past i
    self._counted = np.zeros(len(self._starts), bool)
    self.__setstate__({})  # the thread-local file handles and the lock

  def __getstate__(self) -> dict:
    return {k: v for k, v in vars(self).items() if k not in ("_local", "_lock")}  # no file handles

  def __setstate__(self, state: dict) -> None:
    vars(self).update(state)
    self._local, self._lock = threading.local(), threading.Lock()

  def __len__(self) -> int:
    return len(self._starts)

  def _read(self, index: int) -> tuple[bytes, bool]:
    """Line `index`'s bytes, read through this thread's handle, and whether they were cut at max_chars."""
    size = int(self._ends[index] - self._starts[index])
    limit = size if self.max_chars is None else min(size, 4 * self.max_chars + 4)  # max_chars + 1 of UTF-8
    file = int(np.searchsorted(self._file_ends, index, side="right"))
    handles = vars(self._local).setdefault("handles", _Handles())
    if file not in handles:
      if len(handles) >= OPEN_FILES_PER_THREAD:
        handles.pop(next(iter(handles))).close()
      handles[file] = open(self.files[file], "rb")
    handles[file].seek(int(self._starts[index]))
    return handles[file].read(limit), limit < size

  def __getitem__(self, index: int) -> Example | None:
    index = range(len(self))[index]  # negative indices; IndexError past the end
    found = Counts()
    raw, cut = self._read(index)
    text = _decode(raw, found, self.max_chars, cut)
    reasons = found.as_dict()
    if reasons:  # counted once per line, however often it is read
      with self._lock:
        first, self._counted[index] = not self._counted[index], True
      if first:
        for reason, n in reasons.items():
          self.counts.add(reason, n)
    return None if text is None else {self.key: text}


class InMemorySource:
  """A sequence of examples (a list in memory, or file lines read on demand) and its counts.

  `load_counts`: the counts at construction; records skipped then (undecodable, blank) are not in len().
  """

  def __init__(self, examples: Sequence[Example | None], name: str, counts: Counts | None = None) -> None:
    self.name = name
    self.counts = counts or Counts()
    self.load_counts = self.counts.as_dict()
    if not examples:
      raise ValueError(f"{name}: no documents (skipped: {self.counts.as_dict() or 'none'})")
    self._examples = examples

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> Example | None:
    return self._examples[index]

  @property
  def stats(self) -> dict[str, int]:
    """Documents kept plus skip/truncation counters."""
    return {"documents": len(self._examples), **self.counts.as_dict()}

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r}, {len(self)} documents)"


class TextFileSource(InMemorySource):
  """Plain text files (glob patterns, `.gz` allowed): one document per line, or one per file.

  Uncompressed files read one document per line are not held in memory: one chunked pass indexes each
  line's byte offsets (17 bytes a line) and `source[i]` reads line i from disk. Lines end at "\\n" (a
  "\\r" before it is stripped); blank lines are dropped and counted "empty" at index time, so
  stats["documents"] counts the indexed lines; a line that turns out undecodable or (Unicode)
  whitespace-only gives None and, like truncations, is counted once when first read (as TfdsSource).
  If any matched file is `.gz` (no random access), or per_line=False (one document per file), the whole
  source is read into memory (lines split with bytes.splitlines).
  Documents are cut at `max_chars` characters (counted "truncated"); an indexed line is read only that far
  (so a line whose first 4 * max_chars bytes are blank reads as empty). A matched directory is an error.
  """

  def __init__(self, patterns: str | Sequence[str], *, per_line: bool = True, key: str = "text",
               max_chars: int | None = MAX_CHARS) -> None:
    name = f"TextFileSource({patterns!r})"
    files, counts = _expand(patterns, name), Counts()
    if per_line and not any(path.endswith(".gz") for path in files):
      examples = _FileLines(files, key, max_chars, counts)
    else:
      read = lambda path: _read_bytes(path).splitlines() if per_line else [_read_bytes(path)]
      examples = [{key: text} for path in files for raw in read(path)
                  if (text := _decode(raw, counts, max_chars)) is not None]
    super().__init__(examples, name, counts)


class ParallelTextSource(InMemorySource):
  """Line-aligned parallel files (`.gz` allowed) -> {inputs_key: source line, targets_key: target line}.

  A pair is skipped (and counted) when either side is empty or not valid UTF-8; sides are cut at max_chars.
  """

  def __init__(self, source_path: str, target_path: str, *, inputs_key: str = "inputs",
               targets_key: str = "targets", max_chars: int | None = MAX_CHARS) -> None:
    name = f"ParallelTextSource({source_path!r}, {target_path!r})"
    _check_files([source_path, target_path], name)
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
               key: str = "text", max_chars: int | None = MAX_CHARS) -> None:
    from pydoc_data.topics import topics

    if split not in ("train", "validation") or unit not in ("paragraph", "topic"):
      raise ValueError(f"PydocSource: bad split={split!r} or unit={unit!r}")
    counts, examples = Counts(), []
    for name in sorted(topics):
      for raw in (topics[name].split("\n\n") if unit == "paragraph" else [topics[name]]):
        text = _decode(raw, counts, None)
        if text is not None and (zlib.crc32(text.encode()) % validation_every == 0) == (split == "validation"):
          examples.append({key: _decode(text, counts, max_chars)})  # split by the whole text, then truncated
    super().__init__(examples, f"PydocSource({split!r}, unit={unit!r})", counts)


TEXT_MODULES = ("text", "translate", "summarization", "question_answering")


def _tfds_data_source(name: str, split: str, data_dir: str | None, modules: Sequence[str] = TEXT_MODULES) -> object:
  """`tfds.data_source`, retried once after importing TFDS's lazily-registered `modules` (text ones by default)."""
  import tensorflow_datasets as tfds

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:  # importing these registers them, without TensorFlow
    for module in modules:
      importlib.import_module(f"tensorflow_datasets.{module}")
    return tfds.data_source(name, split=split, data_dir=data_dir)


class TfdsRecords:
  """Base of the TFDS sources: `name`/`split` opened with `_tfds_data_source`, an empty split refused."""

  modules: Sequence[str] = TEXT_MODULES  # the TFDS modules whose import registers the dataset on a miss
  empty: str = "no records"

  def __init__(self, name: str, split: str, data_dir: str | None) -> None:
    self.name = f"{type(self).__name__}({name!r}, split={split!r})"
    self._source = _tfds_data_source(name, split, data_dir, self.modules)
    if len(self._source) == 0:
      raise ValueError(f"{self.name}: {self.empty}")
    self.counts = Counts()

  def __len__(self) -> int:
    return len(self._source)

  @property
  def stats(self) -> dict[str, int]:
    """Records, plus those found empty or undecodable so far."""
    return {"documents": len(self), **self.counts.as_dict()}


class TfdsSource(TfdsRecords):
  """A TFDS dataset read through `tfds.data_source` (ArrayRecord, random access, no TensorFlow).

  `keys` maps output keys to TFDS feature keys: 'text' -> {'text': ex['text']};
  {'inputs': 'en', 'targets': 'de'} for wmt14_translate/de-en. Bytes are decoded as UTF-8; a record with
  an empty or undecodable feature yields None (counted once per record).
  """

  empty = "no documents"

  def __init__(self, name: str, split: str = "train", *, keys: str | Sequence[str] | Mapping[str, str] = "text",
               data_dir: str | None = None, max_chars: int | None = MAX_CHARS) -> None:
    super().__init__(name, split, data_dir)
    keys = [keys] if isinstance(keys, str) else keys
    self.keys = dict(keys) if isinstance(keys, Mapping) else {k: k for k in keys}
    self.max_chars = max_chars
    self._seen: dict[str, set[int]] = {"empty": set(), "undecodable": set(), "truncated": set()}  # indices
    self._lock = threading.Lock()

  def __getitem__(self, index: int) -> Example | None:
    record, counts, out = self._source[index], Counts(), {}
    for out_key, feature in self.keys.items():
      if (text := _decode(record[feature], counts, self.max_chars)) is None:
        break
      out[out_key] = text
    with self._lock:
      for reason in counts.as_dict():
        self._seen[reason].add(index)
    return out if len(out) == len(self.keys) else None

  @property
  def stats(self) -> dict[str, int]:
    """Records seen so far that were skipped (empty/undecodable) or truncated; `documents` = records."""
    with self._lock:
      out = {k: len(v) for k, v in self._seen.items() if v}
    return {"documents": len(self), **out}

  def __repr__(self) -> str:
    return f"{self.name} ({len(self)} records)"
