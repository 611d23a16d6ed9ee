"""Tests for t_jax.data: sources, tokenizer, objectives, packing and checkpointable iterators."""

import dataclasses
import glob
import gzip
import inspect
import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from t_jax import data
from t_jax.data import objectives, sources, tokenizer
from t_jax.data.task import TaskConfig, check_sources, make_tokenizer

MULTI30K = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "multi30k")

SENTENCES = [
    "the cat sat on the mat", "a dog ran in the park", "birds sing in the morning",
    "the river flows to the sea", "children play with a red ball", "my friend reads a long book",
    "rain falls on the old roof", "she writes code every day", "the train leaves at noon",
    "a small boat sails on the lake", "we eat bread and cheese", "the sun rises in the east",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  """A small unigram tokenizer trained on the pydoc corpus, with 100 sentinels."""
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return data.Tokenizer.train(data.PydocSource("train"), str(path), vocab_size=1000, num_extra_ids=100)


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
  """A text-file source of short distinct sentences."""
  path = tmp_path_factory.mktemp("txt") / "sentences.txt"
  path.write_text("\n".join(SENTENCES) + "\n")
  return data.TextFileSource(str(path))


def _write_gz(path, text):
  with gzip.open(path, "wb") as f:
    f.write(text.encode() if isinstance(text, str) else text)


def _segments(row_tokens, segment_ids):
  """{segment id: tokens} of one packed row."""
  return {s: row_tokens[segment_ids == s] for s in np.unique(segment_ids) if s > 0}


def _check_packing(seg, pos):
  """Segment ids are 1, 2, ... in order with padding (0) last; positions restart at 0 in each segment."""
  for s_row, p_row in zip(seg, pos):
    real = s_row[s_row > 0]
    assert (np.diff(real) >= 0).all() and (s_row[len(real):] == 0).all()
    assert np.array_equal(np.unique(real), np.arange(1, len(np.unique(real)) + 1))
    for s in np.unique(real):
      assert np.array_equal(p_row[s_row == s], np.arange((s_row == s).sum()))


# ---------------------------------------------------------------- sources


def test_text_file_source_lines_files_and_gz(tmp_path):
  (tmp_path / "a.txt").write_text("first doc\n\n  \nsecond doc\n")
  _write_gz(tmp_path / "b.txt.gz", "third doc\nfourth doc")
  src = data.TextFileSource(str(tmp_path / "*.txt*"))
  assert [src[i]["text"] for i in range(len(src))] == ["first doc", "second doc", "third doc", "fourth doc"]
  assert src.stats == {"documents": 4, "empty": 2}
  whole = data.TextFileSource([str(tmp_path / "a.txt"), str(tmp_path / "b.txt.gz")], per_line=False)
  assert len(whole) == 2 and whole[1]["text"] == "third doc\nfourth doc"


def test_undecodable_lines_skipped_and_counted(tmp_path):
  (tmp_path / "bad.txt").write_bytes(b"good line\n\xff\xfe broken\nalso good\n\xc3\x28\n")
  src = data.TextFileSource(str(tmp_path / "bad.txt"), max_chars=4)  # indexed: lines decoded when read
  assert [src[i] and src[i]["text"] for i in range(len(src))] == ["good", None, "also", None]
  assert src.stats == {"documents": 4, "undecodable": 2, "truncated": 2}
  _write_gz(tmp_path / "bad.txt.gz", (tmp_path / "bad.txt").read_bytes())
  gz = data.TextFileSource(str(tmp_path / "bad.txt.gz"), max_chars=4)  # in memory: decoded up front
  assert [gz[i]["text"] for i in range(len(gz))] == ["good", "also"]
  assert gz.stats == {"documents": 2, "undecodable": 2, "truncated": 2}


# Blank, whitespace-only (ASCII and U+2003), CRLF, invalid UTF-8, long and unterminated lines, empty files.
LINE_FILES = {
    "a.txt": b"first line\n\n\n   \n\t\r\nwindows line\r\n\r\n\xff\xfe broken\n" + b"long " * 30 + b"\n"
             + "caf\u00e9 \u00fcber\n\u2003\nno newline at the end".encode(),
    "b.txt": b"\n\nsecond file\n\xc3\x28\nend\n\n",
    "c.txt": b"",
    "d.txt": b"   ",
}


def _line_files(tmp_path, files=None):
  for name, content in (files or LINE_FILES).items():
    (tmp_path / name).write_bytes(content)
  return str(tmp_path / "*.txt")


def _reference_lines(pattern, max_chars=None):
  """Documents of `pattern`'s files read the straightforward way: decode, strip, skip blank or bad lines."""
  out = []
  for path in sorted(glob.glob(pattern)):
    with open(path, "rb") as f:
      raw_lines = f.read().splitlines()
    for raw in raw_lines:
      try:
        text = raw.decode().strip()
      except UnicodeDecodeError:
        continue
      if text:
        out.append(text[:max_chars])
  return out


def _documents(src):
  return [ex["text"] for i in range(len(src)) if (ex := src[i]) is not None]


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_indexed_text_source_matches_reference(tmp_path, monkeypatch, chunk):
  monkeypatch.setattr(sources, "READ_CHUNK_BYTES", chunk)
  pattern = _line_files(tmp_path)
  src = data.TextFileSource(pattern, max_chars=20)
  assert isinstance(src._examples, sources._FileLines)
  docs = _documents(src)
  assert docs == _reference_lines(pattern, max_chars=20)
  assert docs[-3:] == ["no newline at the en", "second file", "end"] and "windows line" in docs
  assert src.stats == {"documents": 10, "empty": 10, "undecodable": 2, "truncated": 2}
  assert _documents(src) == docs and src.stats["truncated"] == 2  # rereading counts nothing twice
  assert src[-1] == {"text": "end"} and repr(src).endswith("10 documents)")
  with pytest.raises(IndexError):
    src[len(src)]
  for name, content in LINE_FILES.items():  # the same files gzipped are read into memory, counted up front
    _write_gz(tmp_path / f"{name}.gz", content)
  gz = data.TextFileSource(str(tmp_path / "*.gz"), max_chars=20)
  assert _documents(gz) == docs and gz.stats == {"documents": 7, "empty": 10, "undecodable": 2, "truncated": 2}


def test_indexed_text_source_threads_and_pickle(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "OPEN_FILES_PER_THREAD", 2)  # threads keep switching files
  files = {f"{k}.txt": "".join(f"file {k} line {i}\n" + "\n" * (i % 3) for i in range(50)).encode()
           for k in range(5)}
  src = data.TextFileSource(_line_files(tmp_path, {**files, "x.txt": b"ok\n\xff\n"}))
  sequential = [src[i] for i in range(len(src))]
  order = np.random.default_rng(0).permutation(len(src)).tolist() * 2
  with ThreadPoolExecutor(8) as pool:
    threaded = list(pool.map(src.__getitem__, order))
  assert threaded == [sequential[i] for i in order]
  assert sequential.count(None) == 1 and src.stats == {"documents": 252, "empty": 245, "undecodable": 1}
  copy = pickle.loads(pickle.dumps(src))  # after reads: open handles are not pickled
  assert [copy[i] for i in range(len(copy))] == sequential and copy.stats == src.stats


def test_indexed_text_source_holds_no_text(tmp_path):
  line = "a fairly long line of text that the source must not keep in memory " * 4
  (tmp_path / "big.txt").write_text(f"{line}\n" * 3000)
  src = data.TextFileSource(str(tmp_path / "big.txt"))
  assert len(src) == 3000 and src[1234] == {"text": line.strip()}
  size = (tmp_path / "big.txt").stat().st_size
  arrays = [v for v in vars(src._examples).values() if isinstance(v, np.ndarray)]
  assert sum(a.nbytes for a in arrays) <= 17 * len(src) + 64  # per line, not per byte of text
  assert len(pickle.dumps(src)) < 17 * len(src) + 2000 < size / 10


def test_indexed_text_source_pipeline_and_tokenizer(tok, tmp_path):
  lines = [s.encode() for s in SENTENCES]
  (tmp_path / "a.txt").write_bytes(b"\n".join(lines[:6] + [b"\xff", "\u2003".encode(), b""]))
  (tmp_path / "b.txt").write_bytes(b"\r\n".join([b"\xc3\x28", *lines[6:]]))
  src = data.TextFileSource(str(tmp_path / "*.txt"))
  assert len(src) == 15 and sum(src[i] is None for i in range(15)) == 3
  batches = list(data.make_iterator(src, tok, data.CausalLM(seq_len=24, pack=False), batch_size=4,
                                    train=False, num_threads=4))
  rows = [r[w > 0] for b in batches for r, w in zip(b["targets"], b["weights"]) if w.any()]
  assert sorted(tok.decode(r) for r in rows) == sorted(SENTENCES)
  it = data.make_iterator(src, tok, data.CausalLM(seq_len=32), batch_size=4, seed=0)
  assert all(next(it)["inputs"].shape == (4, 32) for _ in range(5))
  small = data.Tokenizer.train(src, str(tmp_path / "t.model"), vocab_size=60)  # skips the None lines
  assert small.decode(small.encode(SENTENCES[0])) == SENTENCES[0]


def test_empty_sources_raise(tmp_path):
  (tmp_path / "blank.txt").write_text("\n  \n\n")
  with pytest.raises(ValueError, match=r"TextFileSource.*blank\.txt.*no documents"):
    data.TextFileSource(str(tmp_path / "blank.txt"))
  with pytest.raises(ValueError, match="no files match"):
    data.TextFileSource(str(tmp_path / "missing*.txt"))
  (tmp_path / "e.en").write_text("")
  (tmp_path / "e.de").write_text("")
  with pytest.raises(ValueError, match=r"ParallelTextSource.*e\.en.*no documents"):
    data.ParallelTextSource(str(tmp_path / "e.en"), str(tmp_path / "e.de"))


def test_directory_in_sources_is_named(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "a.txt").write_text("x\n")
  with pytest.raises(ValueError, match=r"TextFileSource.*sub is a directory, not a file"):
    data.TextFileSource(str(tmp_path / "*"))
  with pytest.raises(ValueError, match=r"ParallelTextSource.*sub is a directory, not a file"):
    data.ParallelTextSource(str(tmp_path / "sub"), str(tmp_path / "a.txt"))


class _ReadSpy:
  """A file whose read sizes are recorded."""

  def __init__(self, f, reads):
    self.f, self.reads = f, reads

  def seek(self, offset):
    return self.f.seek(offset)

  def read(self, size):
    self.reads.append(size)
    return self.f.read(size)

  def close(self):
    self.f.close()


def test_long_records_capped_by_default_and_read_bounded(tmp_path, monkeypatch):
  """A 2 MB line is cut at MAX_CHARS by default (counted); an indexed line is read only as far as needed."""
  for cls in (data.TextFileSource, data.ParallelTextSource, data.TfdsSource, data.PydocSource):
    assert inspect.signature(cls).parameters["max_chars"].default == sources.MAX_CHARS == 1_000_000
  (tmp_path / "long.txt").write_bytes(b"word " * 400_000 + b"\nshort\n")
  src = data.TextFileSource(str(tmp_path / "long.txt"))
  assert len(src[0]["text"]) == sources.MAX_CHARS and src[1]["text"] == "short"
  assert src.stats == {"documents": 2, "truncated": 1}
  (tmp_path / "euro.txt").write_text("\u20ac" * 1000 + "\n")  # 3-byte characters: a bounded read cuts one
  euro, reads = data.TextFileSource(str(tmp_path / "euro.txt"), max_chars=10), []
  monkeypatch.setattr(sources, "open", lambda path, mode: _ReadSpy(open(path, mode), reads), raising=False)
  assert euro[0]["text"] == "\u20ac" * 10 and euro.stats == {"documents": 1, "truncated": 1}
  assert reads == [44]  # 4 * max_chars + 4 bytes, not the line's 3000


def test_parallel_text_gz_skips_and_mismatch(tmp_path):
  _write_gz(tmp_path / "x.en.gz", "a house\n\nthe dog\nbad\n")
  _write_gz(tmp_path / "x.de.gz", b"ein Haus\nleer\nder Hund\n\xff\n")
  src = data.ParallelTextSource.from_prefix(str(tmp_path / "x"), "en", "de")
  assert [src[i] for i in range(len(src))] == [{"inputs": "a house", "targets": "ein Haus"},
                                               {"inputs": "the dog", "targets": "der Hund"}]
  assert src.stats == {"documents": 2, "empty": 1, "undecodable": 1}
  (tmp_path / "short.de").write_text("eins\nzwei\n")
  with pytest.raises(ValueError, match=r"x\.en\.gz has 4 lines.*short\.de has 2 lines"):
    data.ParallelTextSource(str(tmp_path / "x.en.gz"), str(tmp_path / "short.de"))


@pytest.mark.skipif(not os.path.isdir(MULTI30K), reason="shared Multi30K corpus not found at ../shared/data")
def test_multi30k_parallel_source():
  src = data.ParallelTextSource.from_prefix(os.path.join(MULTI30K, "val"), "en", "de")
  assert len(src) + sum(v for k, v in src.stats.items() if k != "documents") == 1014
  assert src[0]["inputs"] and src[0]["targets"] and src[0]["inputs"] != src[0]["targets"]


def test_tfds_source_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=9, policy=tfds.testing.MockPolicy.USE_CODE):
    lm1b = data.TfdsSource("lm1b", split="train")
    wmt = data.TfdsSource("wmt14_translate/de-en", split="validation", keys={"inputs": "en", "targets": "de"})
    assert len(lm1b) == 9 and isinstance(lm1b[3]["text"], str)
    assert set(wmt[0]) == {"inputs", "targets"} and all(isinstance(v, str) for v in wmt[0].values())


def test_tfds_source_decodes_bytes_and_counts(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  records = [{"text": b"caf\xc3\xa9"}, {"text": b"\xff\xfe"}, {"text": b"  "}, {"text": "plain"}]
  monkeypatch.setattr(tfds, "data_source", lambda name, split, data_dir: records)
  src = data.TfdsSource("fake", keys="text")
  assert [src[i] for i in range(4)] == [{"text": "café"}, None, None, {"text": "plain"}]
  src[1]  # counted once per record
  assert src.stats == {"documents": 4, "undecodable": 1, "empty": 1}
  monkeypatch.setattr(tfds, "data_source", lambda name, split, data_dir: [])
  with pytest.raises(ValueError, match="TfdsSource.*empty_ds.*no documents"):
    data.TfdsSource("empty_ds")


def test_pydoc_source_split():
  train, val = data.PydocSource("train"), data.PydocSource("validation")
  assert len(train) > 1000 and 50 < len(val) < len(train) / 4
  assert not {train[i]["text"] for i in range(len(train))} & {val[i]["text"] for i in range(len(val))}
  assert data.PydocSource("validation")[5] == val[5]
  topics = data.PydocSource("train", unit="topic")
  assert len(topics) < 100 and all(len(topics[i]["text"]) > 0 for i in range(len(topics)))


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids_and_round_trip(tok):
  assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id, tok.bos_id) == (0, 1, 2, 3, 1)
  assert tok.vocab_size == tok.sp_vocab_size + 100
  assert tok.sentinel(0) == tok.vocab_size - 1 and tok.sentinel(99) == tok.sp_vocab_size
  with pytest.raises(ValueError):
    tok.sentinel(100)
  text = "The following methods can be defined to customize attribute access."
  ids = tok.encode(text)
  assert ids and all(tok.first_regular_id <= i < tok.sp_vocab_size for i in ids)
  assert tok.decode(ids) == text
  assert tok.decode([*ids, tok.eos_id, *ids]) == text  # stops at eos
  assert tok.decode([0, *ids, 0, 0]) == text  # skips pad
  assert tok.decode([*ids, tok.vocab_size + 5, -1]) == text  # drops out-of-range ids
  assert tok.decode([tok.sentinel(0), *ids, tok.sentinel(7)]) == f"<extra_id_0>{text}<extra_id_7>"


def test_tokenizer_save_reload_reuse_and_bpe(tok, sentences, tmp_path):
  path = str(tmp_path / "bpe" / "tokenizer.model")
  bpe = data.Tokenizer.train(data.PydocSource("validation"), path, vocab_size=400, model_type="bpe")
  assert os.path.exists(path) and bpe.num_extra_ids == 0
  mtime = os.path.getmtime(path)
  again = data.Tokenizer.train(sentences, path, vocab_size=50, num_extra_ids=3)  # reuses the file
  assert os.path.getmtime(path) == mtime and again.sp_vocab_size == bpe.sp_vocab_size
  loaded = data.Tokenizer.load(path, num_extra_ids=3)
  text = "Assignment statements bind names to values"
  assert loaded.encode(text) == bpe.encode(text) and loaded.decode(loaded.encode(text)) == text
  assert loaded.vocab_size == bpe.vocab_size + 3
  assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)


def test_tokenizer_trains_on_one_long_line(tmp_path):
  """A 2 MB single line (SentencePiece drops sentences over max_sentence_length) is cut at spaces."""
  words = np.random.default_rng(0).choice(["alpha", "beta", "gamma", "delta", "kappa", "omega"], 350_000)
  (tmp_path / "one.txt").write_text(" ".join(words) + "\n")
  src = data.TextFileSource(str(tmp_path / "one.txt"), max_chars=200_000)
  tok = data.Tokenizer.train(src, str(tmp_path / "tok.model"), vocab_size=40, max_sentences=200)
  assert tok.decode(tok.encode("gamma delta")) == "gamma delta"
  pieces = list(tokenizer._pieces("ab cd efgh " * 3 + "x" * 25, 10))  # at the last space, else hard
  assert pieces == ["ab cd efgh"] * 3 + ["x" * 10] * 2 + ["x" * 5]


def test_vocabulary_too_small_names_the_minimum_and_binding(sentences, tmp_path):
  with pytest.raises(tokenizer.VocabularyTooSmall, match=r"needs at least \d+ pieces.*got vocab_size=5") as e:
    data.Tokenizer.train(sentences, str(tmp_path / "t.model"), vocab_size=5)
  assert data.Tokenizer.train(sentences, str(tmp_path / "t.model"), vocab_size=e.value.minimum)  # enough
  task = TaskConfig(objective=data.CausalLM(seq_len=16), train_source=sentences)
  least = e.value.minimum
  with pytest.raises(ValueError, match=rf"ModelConfig\.vocab_size=8 is too small.*at least {least} "):
    make_tokenizer(task, 8, str(tmp_path / "run"))
  task = dataclasses.replace(task, vocab_size=9, num_extra_ids=2)
  with pytest.raises(ValueError, match=rf"TaskConfig\.vocab_size=9 .*at least {least + 2} .*num_extra_ids=2"):
    make_tokenizer(task, 512, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # nothing written


def test_check_sources_reports_and_refuses_mostly_bad(tmp_path, sentences, capsys):
  (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(64 << 10))
  garbage = data.TextFileSource(str(tmp_path / "random.bin"))
  task = TaskConfig(objective=data.CausalLM(seq_len=16), train_source=sentences, eval_source=garbage)
  want = r"eval source .*random\.bin'\) is mostly unusable: 100\.0% .*undecodable 262.*max_bad_fraction=0\.5"
  with pytest.raises(ValueError, match=want):
    check_sources(task)
  out = capsys.readouterr().out.splitlines()
  assert out[0] == f"data: train {sentences.name}: documents 12; 0 of 12 sampled records unusable"
  assert out[1].startswith(f"data: eval {garbage.name}: documents ") and "undecodable" in out[1]
  check_sources(dataclasses.replace(task, max_bad_fraction=1.0))  # allowed when asked
  _write_gz(tmp_path / "bad.txt.gz", b"\xff\n" * 30 + b"ok\n" * 10)  # read into memory: dropped at load time
  with pytest.raises(ValueError, match=r"bad\.txt\.gz'\) is mostly unusable: 75\.0% .*undecodable 30"):
    check_sources(dataclasses.replace(task, eval_source=data.TextFileSource(str(tmp_path / "bad.txt.gz"))))
  with pytest.raises(ValueError, match=r"max_bad_fraction=1\.5 must be in \[0, 1\]"):
    dataclasses.replace(task, max_bad_fraction=1.5)


# ---------------------------------------------------------------- objectives


def _doc_windows(tok, src, size):
  """All token windows a CausalLM row segment may contain, as tuples of [bos] + tokens + [eos] slices."""
  out = set()
  for i in range(len(src)):
    x = [tok.bos_id, *tok.encode(src[i]["text"]), tok.eos_id]
    out.update(tuple(x[j:j + size]) for j in range(0, max(1, len(x) - 1), size - 1))
  return out


def test_causal_lm_packed_batches(tok, sentences):
  obj = data.CausalLM(seq_len=48)
  it = data.make_iterator(sentences, tok, obj, batch_size=4, seed=1)
  windows = _doc_windows(tok, sentences, 49)
  multi = 0
  for _ in range(6):
    b = next(it)
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        k: ((4, 48), np.float32 if k == "weights" else np.int32)
        for k in ("inputs", "targets", "weights", "segment_ids", "positions")}
    _check_packing(b["segment_ids"], b["positions"])
    assert np.array_equal(b["weights"], (b["segment_ids"] > 0).astype(np.float32))
    same = b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]
    assert np.array_equal(b["targets"][:, :-1][same], b["inputs"][:, 1:][same])
    for r in range(4):
      segs = _segments(b["inputs"][r], b["segment_ids"][r])
      multi += len(segs) > 1
      for s, ids in segs.items():
        full = (*ids, b["targets"][r][b["segment_ids"][r] == s][-1])
        assert full in windows  # each segment is one whole document: packing never mixes them
  assert multi > 0


def test_overflow_split_and_truncate(tok, tmp_path):
  (tmp_path / "long.txt").write_text(" ".join(SENTENCES) + "\nshort one\n")
  src = data.TextFileSource(str(tmp_path / "long.txt"))
  n = len(tok.encode(src[0]["text"])) + 2
  for overflow, expect_rows in (("split", -(-(n - 1) // 10)), ("truncate", 1)):
    obj = data.CausalLM(seq_len=10, overflow=overflow)
    rows = obj.examples(src[0], np.random.default_rng(0), tok)
    assert len(rows) == expect_rows and all(len(r["inputs"]) <= 10 for r in rows)
    assert obj.stats == {overflow if overflow == "split" else "truncated": 1}
    if overflow == "split":  # every token is predicted exactly once across the pieces
      assert np.array_equal(np.concatenate([r["targets"] for r in rows]),
                            [*tok.encode(src[0]["text"]), tok.eos_id])


def test_prefix_lm_batches(tok, sentences):
  for fraction in (None, 0.5):
    it = data.make_iterator(sentences, tok, data.PrefixLM(seq_len=16, prefix_fraction=fraction),
                            batch_size=6, train=False)
    b = next(it)
    assert b["prefix_len"].shape == (6,) and b["prefix_len"].dtype == np.int32
    assert set(np.unique(b["segment_ids"])) <= {0, 1}
    for r in range(6):
      n, p = int(b["segment_ids"][r].sum()), int(b["prefix_len"][r])
      assert 1 <= p <= n
      if fraction is not None:
        assert p == max(1, round(fraction * n))
      expected = ((np.arange(16) >= p - 1) & (np.arange(16) < n)).astype(np.float32)
      assert np.array_equal(b["weights"][r], expected)
      assert np.array_equal(b["targets"][r, :n - 1], b["inputs"][r, 1:n])
  with pytest.raises(ValueError, match="packing"):
    data.make_iterator(sentences, tok, data.PrefixLM(seq_len=16, pack=True), batch_size=2)


def test_mlm_proportions_large_sample(tok):
  rng = np.random.default_rng(0)
  tokens = rng.integers(tok.first_regular_id, tok.sp_vocab_size, size=(2000, 100)).astype(np.int32)
  tokens[:, -1] = tok.eos_id
  outcomes = np.zeros(3)
  selected = 0
  for row in tokens:
    inputs, weights = objectives.mask_tokens(row, rng, tok)
    sel = weights > 0
    assert tok.eos_id not in row[:-1][sel[:-1]] and not sel[-1]  # specials are never selected
    assert np.array_equal(inputs[~sel], row[~sel])
    masked = inputs[sel] == tok.mask_id
    kept = inputs[sel] == row[sel]
    outcomes += [masked.sum(), (~masked & ~kept).sum(), kept.sum()]
    selected += sel.sum()
  assert selected == 2000 * round(0.15 * 99)
  frac = outcomes / outcomes.sum()
  # 10% random replacements keep the token with probability 1/vocab; tolerances are ~6 sigma.
  assert abs(frac[0] - 0.8) < 0.015 and abs(frac[1] - 0.1) < 0.012 and abs(frac[2] - 0.1) < 0.012


def test_mlm_packed_batches(tok, sentences):
  b = next(data.make_iterator(sentences, tok, data.MaskedLM(seq_len=32), batch_size=4, seed=3))
  assert set(b) == {"inputs", "targets", "weights", "segment_ids", "positions"}
  _check_packing(b["segment_ids"], b["positions"])
  sel = b["weights"] > 0
  assert sel.any() and (b["segment_ids"][sel] > 0).all()
  assert np.array_equal(b["inputs"][~sel], b["targets"][~sel])
  assert (b["inputs"][sel] == tok.mask_id).any()
  for r in range(4):  # targets are whole original sentences
    for ids in _segments(b["targets"][r], b["segment_ids"][r]).values():
      assert tok.decode(ids) in SENTENCES


def test_random_spans_noise_mask_density():
  rng = np.random.default_rng(0)
  total = noise = 0
  for length in rng.integers(20, 600, size=300):
    mask = objectives.random_spans_noise_mask(int(length), 0.15, 3.0, rng)
    n_noise, n_spans = objectives.span_counts(int(length), 0.15, 3.0)
    starts = np.flatnonzero(np.diff(mask.astype(int)) == 1)
    assert len(mask) == length and mask.sum() == n_noise and len(starts) == n_spans
    assert not mask[0] and mask[-1]
    total, noise = total + length, noise + mask.sum()
  assert abs(noise / total - 0.15) < 0.005
  assert objectives.span_corruption_raw_length(512, 114, 0.15, 3.0) == 568


def _reconstruct(enc, dec, tok):
  """Original tokens from span-corrupted inputs and targets (both eos-ended)."""
  spans, i = {}, 0
  while dec[i] != tok.eos_id:
    j = i + 1
    while dec[j] < tok.sp_vocab_size and dec[j] != tok.eos_id:
      j += 1
    spans[int(dec[i])] = list(dec[i + 1:j])
    i = j
  out = []
  for t in enc[:-1]:
    out += spans.pop(int(t)) if t >= tok.sp_vocab_size else [int(t)]
  assert not spans and enc[-1] == tok.eos_id
  return out


def test_span_corruption_reconstructs_and_packs(tok):
  src = data.PydocSource("validation")
  obj = data.SpanCorruption(inputs_len=64, targets_len=20)
  raw = obj.raw_length()
  pieces = set()
  for i in range(len(src)):
    ids = tok.encode(src[i]["text"])
    pieces.update(tuple(ids[j:j + raw]) for j in range(0, len(ids), raw))
  it = data.make_iterator(src, tok, obj, batch_size=8, seed=5)
  noise = total = 0
  for _ in range(3):
    b = next(it)
    assert b["encoder_inputs"].shape == (8, 64) and b["decoder_targets"].shape == (8, 20)
    _check_packing(b["encoder_segment_ids"], b["encoder_positions"])
    _check_packing(b["decoder_segment_ids"], b["decoder_positions"])
    assert np.array_equal(b["weights"], (b["decoder_segment_ids"] > 0).astype(np.float32))
    for r in range(8):
      enc = _segments(b["encoder_inputs"][r], b["encoder_segment_ids"][r])
      dec = _segments(b["decoder_targets"][r], b["decoder_segment_ids"][r])
      dec_in = _segments(b["decoder_inputs"][r], b["decoder_segment_ids"][r])
      assert enc.keys() == dec.keys()
      for s in enc:
        assert dec_in[s][0] == 0 and np.array_equal(dec_in[s][1:], dec[s][:-1])
        original = _reconstruct(enc[s], dec[s], tok)
        assert tuple(original) in pieces
        noise += len(dec[s]) - 1 - np.sum(dec[s] >= tok.sp_vocab_size)
        total += len(original)
  assert abs(noise / total - 0.15) < 0.03


def test_span_corruption_needs_sentinels(tmp_path, sentences):
  small = data.Tokenizer.train(sentences, str(tmp_path / "t.model"), vocab_size=60, num_extra_ids=2)
  with pytest.raises(ValueError, match="sentinel"):
    data.make_iterator(sentences, small, data.SpanCorruption(), batch_size=2)


def test_seq2seq_translation(tok, tmp_path):
  if os.path.isdir(MULTI30K):
    src = data.ParallelTextSource.from_prefix(os.path.join(MULTI30K, "val"), "en", "de")
  else:
    (tmp_path / "p.en").write_text("\n".join(SENTENCES))
    (tmp_path / "p.de").write_text("\n".join(s.upper() for s in SENTENCES))
    src = data.ParallelTextSource(str(tmp_path / "p.en"), str(tmp_path / "p.de"))
  obj = data.Seq2Seq(inputs_len=48, targets_len=40)
  b = next(data.make_iterator(src, tok, obj, batch_size=4, train=False))
  assert set(b) == {"encoder_inputs", "encoder_segment_ids", "encoder_positions", "decoder_inputs",
                    "decoder_targets", "decoder_segment_ids", "decoder_positions", "weights"}
  _check_packing(b["decoder_segment_ids"], b["decoder_positions"])
  pairs = {tuple(tok.encode(src[i]["inputs"])[:47]): tuple(tok.encode(src[i]["targets"])[:39])
           for i in range(len(src))}
  for r in range(4):
    enc = _segments(b["encoder_inputs"][r], b["encoder_segment_ids"][r])
    dec = _segments(b["decoder_targets"][r], b["decoder_segment_ids"][r])
    dec_in = _segments(b["decoder_inputs"][r], b["decoder_segment_ids"][r])
    assert enc.keys() == dec.keys() and len(enc) >= 1
    for s in enc:
      assert enc[s][-1] == tok.eos_id and dec[s][-1] == tok.eos_id
      assert pairs[tuple(enc[s][:-1])] == tuple(dec[s][:-1])  # aligned pair, never mixed
      assert dec_in[s][0] == 0 and np.array_equal(dec_in[s][1:], dec[s][:-1])


# ---------------------------------------------------------------- pipeline


@pytest.mark.parametrize("make_obj", [lambda: data.CausalLM(seq_len=32), lambda: data.MaskedLM(seq_len=32),
                                      lambda: data.SpanCorruption(inputs_len=32, targets_len=12),
                                      lambda: data.PrefixLM(seq_len=32)])
def test_iterator_resumes_bit_identically(tok, make_obj):
  src = data.PydocSource("validation")
  kwargs = dict(batch_size=4, seed=7, num_threads=2)
  it = data.make_iterator(src, tok, make_obj(), **kwargs)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert len(json.dumps(state)) < 2000
  expected = [next(it) for _ in range(4)]
  resumed = data.make_iterator(src, tok, make_obj(), **kwargs)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert all(np.array_equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
  first = next(data.make_iterator(src, tok, make_obj(), **kwargs))
  again = next(data.make_iterator(src, tok, make_obj(), **kwargs))
  other_seed = next(data.make_iterator(src, tok, make_obj(), **{**kwargs, "seed": 8}))
  key = next(iter(first))
  assert np.array_equal(first[key], again[key]) and not np.array_equal(first[key], other_seed[key])


def test_epochs_reshuffle_and_resume_across_epochs(tok, sentences):
  obj = data.CausalLM(seq_len=24, pack=False)
  it = data.make_iterator(sentences, tok, obj, batch_size=1, seed=0)
  n = len(sentences)
  rows = [tuple(next(it)["inputs"][0]) for _ in range(2 * n)]
  assert len(set(rows[:n])) == n and set(rows[:n]) == set(rows[n:])  # each epoch sees every document
  assert rows[:n] != rows[n:]  # in a different order
  it = data.make_iterator(sentences, tok, obj, batch_size=1, seed=0)
  for _ in range(n - 2):
    next(it)
  state = it.get_state()
  resumed = data.make_iterator(sentences, tok, obj, batch_size=1, seed=0)
  resumed.set_state(state)
  assert [tuple(next(resumed)["inputs"][0]) for _ in range(5)] == rows[n - 2:n + 3]


def test_eval_pass_is_finite_padded_and_sharded(tok, sentences):
  obj = data.CausalLM(seq_len=24, pack=False)
  shards = []
  for index in range(3):
    batches = list(data.make_iterator(sentences, tok, obj, batch_size=3, train=False,
                                      shard_index=index, shard_count=3))
    assert len(batches) == 2 and all(b["inputs"].shape == (3, 24) for b in batches)
    assert not batches[-1]["weights"][-1].any()  # 4 documents per shard: last batch has a padding row
    shards.append({tuple(r) for b in batches for r, w in zip(b["inputs"], b["weights"]) if w.any()})
  assert sum(map(len, shards)) == len(set().union(*shards)) == len(sentences)
  with pytest.raises(ValueError, match="shard_index"):
    data.make_iterator(sentences, tok, obj, batch_size=3, shard_index=3, shard_count=3)


def test_tfds_pipeline_end_to_end(tok):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    src = data.TfdsSource("wmt14_translate/de-en", keys={"inputs": "en", "targets": "de"})
    batches = list(data.make_iterator(src, tok, data.Seq2Seq(inputs_len=32, targets_len=32), batch_size=4,
                                      train=False))
  assert sum(len(np.unique(s[s > 0])) for b in batches for s in b["decoder_segment_ids"]) == 16
