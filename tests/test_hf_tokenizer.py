"""Tokenizers of imported checkpoints (t_jax/data/hf_tokenizer.py) against transformers.

The tiny tokenizers beside one checkpoint per family in tests/fixtures/hf (made and saved by transformers in
tests/fixtures/make_hf_fixtures.py) come with tokenizer_reference.json: transformers' ids, decoded texts, BERT
sentence pairs and the greedy continuation of a string prompt. These tests need neither torch nor transformers;
test_live_* compare with the installed transformers and skip without it.
"""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import t_jax
from t_jax.data import Classification, Tokenizer
from t_jax.data.hf_tokenizer import HFTokenizer, load_tokenizer
from tests.fixtures import make_hf_fixtures as hf_fixtures

REPO = Path(__file__).resolve().parent.parent
FIXTURES = hf_fixtures.HF
TOKENIZERS = sorted(hf_fixtures.TOKENIZERS)
SPM = {"t5_v1_0_h3": "spiece.model", "llama_gqa3_tied": "tokenizer.model"}


def reference(fixture: str) -> dict:
  return json.loads((FIXTURES / fixture / "tokenizer_reference.json").read_text())


def without_tokenizer_json(fixture: str, path: Path) -> Path:
  """The fixture directory with only its SentencePiece model as the tokenizer (older checkpoints)."""
  shutil.copytree(FIXTURES / fixture, path, ignore=shutil.ignore_patterns("tokenizer.json"))
  return path


@pytest.mark.parametrize("fixture", TOKENIZERS)
def test_tokenizer_json_gives_transformers_ids(fixture, tmp_path):
  ref, tok = reference(fixture), load_tokenizer(FIXTURES / fixture)
  assert isinstance(tok, HFTokenizer) and tok.vocab_size <= hf_fixtures.VOCAB
  assert [tok.encode(t) for t in ref["texts"]] == ref["ids"]
  assert [tok.decode(ids) for ids in ref["ids_with_special_tokens"]] == ref["decoded"]
  # transformers' special tokens are t_jax's row start / end: [CLS] a [SEP] (BERT), a </s> (T5), <s> a (Llama)
  for ids, with_special in zip(ref["ids"], ref["ids_with_special_tokens"]):
    assert with_special in ([tok.bos_id, *ids, tok.eos_id], [*ids, tok.eos_id], [tok.bos_id, *ids], ids)
  again = pickle.loads(pickle.dumps(tok))  # grain may copy it; the files travel with it
  saved = load_tokenizer(tok.save(tmp_path / "saved"))
  for other in (again, saved):
    assert other.model_proto == tok.model_proto and other.encode(ref["texts"][1]) == ref["ids"][1]
    assert (other.bos_id, other.eos_id, other.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_special_ids_follow_each_family():
  bert, gpt2, t5, llama = (load_tokenizer(FIXTURES / f) for f in ("bert_h3_tied", "gpt2_h3_tied", "t5_v1_0_h3",
                                                                  "llama_gqa3_tied"))
  token = lambda tok, i: tok._backend.tok.id_to_token(i)
  assert [token(bert, i) for i in (bert.bos_id, bert.eos_id, bert.pad_id, bert.mask_id)] == ["[CLS]", "[SEP]",
                                                                                             "[PAD]", "[MASK]"]
  assert {token(gpt2, i) for i in (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id)} == {"<|endoftext|>"}  # no pad: eos
  assert (token(t5, t5.eos_id), token(t5, t5.pad_id), t5.num_extra_ids) == ("</s>", "<pad>", 8)
  assert [token(t5, t5.sentinel(i)) for i in (0, 7)] == ["<extra_id_0>", "<extra_id_7>"]
  assert t5.sentinel(0) == t5.vocab_size - 1  # as t_jax's own sentinels
  assert (token(llama, llama.bos_id), token(llama, llama.eos_id)) == ("<s>", "</s>")
  with pytest.raises(ValueError, match="no mask token"):
    _ = gpt2.mask_id
  # masked LM draws replacements from the regular ids, between the special ids at either end of the table
  assert bert.first_regular_id == 5 and t5.first_regular_id == 3 and t5.sp_vocab_size == t5.vocab_size - 8


@pytest.mark.parametrize("fixture", sorted(SPM))
def test_sentencepiece_model_gives_transformers_ids(fixture, tmp_path):
  """A checkpoint with only spiece.model / tokenizer.model: SentencePiece itself. transformers converts the
  model into a `tokenizers` pipeline, which agrees on ordinary text; runs of spaces and newlines (text 3 of
  the reference) may be cut differently."""
  ref = reference(fixture)
  for tok in (load_tokenizer(without_tokenizer_json(fixture, tmp_path / "dir")),
              load_tokenizer(tmp_path / "dir" / SPM[fixture])):  # the model file itself
    assert isinstance(tok, HFTokenizer) and type(tok._backend).__name__ == "_SentencePiece"
    json_tok = load_tokenizer(FIXTURES / fixture)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (json_tok.vocab_size, json_tok.bos_id,
                                                                    json_tok.eos_id, json_tok.pad_id)
    for i in (0, 1, 2, 4):
      assert tok.encode(ref["texts"][i]) == ref["ids"][i]
      assert tok.decode(ref["ids_with_special_tokens"][i]) == ref["decoded"][i]
    if fixture.startswith("t5"):
      assert tok.sentinel(0) == json_tok.sentinel(0)


def test_t_jax_sentencepiece_models_still_load_as_t_jax_tokenizers(tmp_path):
  source = [{"text": t} for t in hf_fixtures.TOKENIZER_CORPUS * 5]
  tok = Tokenizer.train(source, str(tmp_path / "tokenizer.model"), vocab_size=60)
  loaded = load_tokenizer(tmp_path / "tokenizer.model", num_extra_ids=3)
  assert type(loaded) is Tokenizer and loaded.model_proto == tok.model_proto and loaded.num_extra_ids == 3
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no Hugging Face tokenizer"):
    load_tokenizer(tmp_path / "empty")


def test_bert_sentence_pairs_are_transformers_rows():
  """A Classification pair row is transformers' tokenizer(a, b): [CLS] a [SEP] b [SEP] with token types."""
  ref, tok = reference("bert_h3_tied"), load_tokenizer(FIXTURES / "bert_h3_tied")
  obj = Classification(seq_len=32, text_pair_key="text_pair")
  for (a, b), ids, types in zip(ref["pairs"], ref["pair_ids"], ref["pair_token_types"]):
    row = obj.examples({"text": a, "text_pair": b, "label": "1"}, np.random.default_rng(0), tok)[0]
    assert row["inputs"].tolist() == ids and row["token_type_ids"].tolist() == types


@pytest.mark.slow
@pytest.mark.parametrize("fixture", [f for f in TOKENIZERS if not f.startswith("bert")])
def test_generation_from_strings_on_imported_models(fixture):
  """t_jax.generate(model, params, "text", tokenizer=...) on a from_hf model: transformers' greedy continuation."""
  ref = reference(fixture)
  model, params = t_jax.from_hf(FIXTURES / fixture)
  tok = load_tokenizer(FIXTURES / fixture)
  n = hf_fixtures.PROMPT_NEW_TOKENS
  text = t_jax.generate(model, params, ref["prompt"], max_new_tokens=n, tokenizer=tok, eos_id=None)
  assert text == ref["continuation"]
  ids = t_jax.generate(model, params, [ref["prompt_ids"]], max_new_tokens=n, eos_id=None)
  assert np.asarray(ids)[0].tolist() == ref["continuation_ids"]  # the prompt as t_jax encodes it, same tokens
  assert ref["prompt_ids"] in ([tok.bos_id, *tok.encode(ref["prompt"])], [*tok.encode(ref["prompt"]), tok.eos_id])


@pytest.mark.slow
def test_converted_workdir_keeps_the_tokenizer(tmp_path):
  """launch.convert --from_hf copies the tokenizer into the workdir: t_jax.load returns it, --to_hf writes it back."""
  run = lambda *a: subprocess.run([sys.executable, "-m", "launch.convert", *a], cwd=REPO, capture_output=True,
                                  text=True)
  r = run(f"--from_hf={FIXTURES / 'gpt2_h3_tied'}", f"--to_workdir={tmp_path / 'work'}")
  assert r.returncode == 0, r.stderr
  _, _, tok = t_jax.load(str(tmp_path / "work"))
  ref = reference("gpt2_h3_tied")
  assert isinstance(tok, HFTokenizer) and [tok.encode(t) for t in ref["texts"]] == ref["ids"]
  r = run(f"--from_workdir={tmp_path / 'work'}", f"--to_hf={tmp_path / 'hf'}")
  assert r.returncode == 0, r.stderr
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / "hf" / name).read_bytes() == (FIXTURES / "gpt2_h3_tied" / name).read_bytes()


# ---------------------------------------------------------------- live: need transformers


@pytest.fixture
def hf():
  transformers = pytest.importorskip("transformers", reason="live test: needs transformers")
  hf_fixtures.quiet()
  return transformers


def random_texts(seed: int, n: int = 30) -> list[str]:
  """Texts from the corpus's words and characters, with odd spacing and punctuation."""
  rng = np.random.default_rng(seed)
  words = " ".join(hf_fixtures.TOKENIZER_CORPUS).split() + ["?", "!", ",", "x", "Zq"]
  return [" ".join(rng.choice(words, rng.integers(1, 12))) + rng.choice(["", ".", " !", "  "]) for _ in range(n)]


@pytest.mark.parametrize("fixture", TOKENIZERS)
def test_live_same_ids_as_transformers(hf, fixture, tmp_path):
  """transformers' AutoTokenizer and t_jax, on the fixture and on a copy saved by transformers again."""
  theirs = hf.AutoTokenizer.from_pretrained(FIXTURES / fixture)
  theirs.save_pretrained(tmp_path)
  for path in (FIXTURES / fixture, tmp_path):
    ours = load_tokenizer(path)
    for text in random_texts(0):
      ids = theirs(text, add_special_tokens=False)["input_ids"]
      assert ours.encode(text) == ids, text
      assert ours.decode(theirs(text)["input_ids"]) == theirs.decode(theirs(text)["input_ids"],
                                                                      skip_special_tokens=True)
