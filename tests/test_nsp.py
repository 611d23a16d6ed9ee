"""BERT next-sentence prediction (t_jax/data/nsp.py): pairs from the CPython documentation, the MLM + NSP
objective and model head, a short pre-training run, and its [CLS] pooler reused by fine-tuning."""

import json
import re

import jax
import numpy as np
import pytest

from t_jax.data import MaskedLM, PydocSource, Tokenizer
from t_jax.data.nsp import BertPretraining, NextSentenceSource, split_sentences
from t_jax.data.task import TaskConfig
from t_jax.models import ModelConfig, build_model, init_params
from t_jax.training import Experiment, OptimizerConfig, TrainConfig, finetune, train

RULE = set("*=-~^")


def test_sentences_of_a_documentation_topic():
  assert split_sentences('He said "Yes." Then he left. See e.g. the dog (here). Next one here.\n\n'
                         '   code = 1  # not prose. Not a sentence.\n\nA heading line\n**************\n') == [
      'He said "Yes."', "Then he left.", "See e.g. the dog (here).", "Next one here.", "A heading line"]
  assert split_sentences("Two words. Yes.\n\nthree words here") == ["three words here"]  # min_words=3


def _pattern(sentence: str) -> re.Pattern:
  """A sentence as it stands in a topic's raw text, whose line breaks and indentation it has lost."""
  return re.compile(r"\s+".join(map(re.escape, sentence.split())))


def _follows(topic: str, first: str, second: str) -> bool:
  """Whether `second` comes right after an occurrence of `first` in the topic: between them only whitespace,
  code blocks (indented), heading rules, or dropped paragraphs of fewer than 3 words (signature lines)."""
  for m in _pattern(first).finditer(topic):
    after = _pattern(second).search(topic, m.end())
    if after is None:
      continue
    paragraphs = [p for p in re.split(r"\n\s*\n", topic[m.end():after.start()])
                  if p.strip() and not p.strip("\n").startswith((" ", "\t"))]
    words = [sum(len(line.split()) for line in p.splitlines() if not set(line.strip()) <= RULE) for p in paragraphs]
    if all(n < 3 for n in words):
      return True
  return False


@pytest.mark.parametrize("split", ["train", "validation"])
def test_next_sentence_labels_are_balanced_and_label_1_pairs_are_consecutive(split):
  source = NextSentenceSource(split, seed=3)
  raw = PydocSource(split, unit="topic")
  records = [source[i] for i in range(len(source))]
  assert records == [source[i] for i in range(len(source))]  # seeded per pair
  labels = np.asarray([r["next_sentence"] == "1" for r in records])
  assert len(records) > 70 and abs(labels.mean() - 0.5) < (0.05 if split == "train" else 0.15)
  text_of = {i: raw[j]["text"] for i, j in enumerate(source.document_index)}
  for index, record in enumerate(records):
    d, j = source.pairs[index]
    assert record["text"] == source.documents[d][j]
    assert _pattern(record["text"]).search(text_of[d])
    if record["next_sentence"] == "1":  # the very next sentence of the same topic
      assert _follows(text_of[d], record["text"], record["text_pair"]), record
    else:  # a sentence of another topic
      assert any(record["text_pair"] in sentences for k, sentences in enumerate(source.documents) if k != d)
  assert NextSentenceSource(split, seed=4)[0] != records[0] or NextSentenceSource(split, seed=5)[0] != records[0]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return Tokenizer.train(PydocSource("train"), str(path), vocab_size=600, max_sentences=3000)


def test_pretraining_rows(tokenizer):
  obj = BertPretraining(seq_len=48)
  source = NextSentenceSource("validation")
  for i in range(20):
    example = source[i]
    row = obj.finalize({**(r := obj.examples(example, np.random.default_rng(i), tokenizer)[0]),
                        "inputs_segment_ids": np.ones(len(r["inputs"]), np.int32),
                        "inputs_positions": np.arange(len(r["inputs"]), dtype=np.int32)})
    ids, types = row["targets"], row["token_type_ids"]
    eos = np.flatnonzero(ids[1:] == tokenizer.eos_id) + 1  # (t_jax's bos is eos too)
    assert ids[0] == tokenizer.bos_id and len(eos) == 2 and eos[1] == len(ids) - 1 and len(ids) <= 48
    assert types.tolist() == [0] * (eos[0] + 1) + [1] * (len(ids) - eos[0] - 1)
    assert int(row["next_sentence"]) == int(example["next_sentence"])
    masked = row["weights"] > 0
    assert masked.any() and not masked[[0, *eos]].any()  # special tokens are never selected
    assert np.array_equal(row["inputs"][~masked], ids[~masked])
    if len(ids) < 48:  # untruncated: the pair's tokens, in order
      assert ids[1:eos[0]].tolist() == tokenizer.encode(example["text"])


@pytest.mark.slow
def test_next_sentence_head_beside_mlm():
  cfg = ModelConfig(architecture="encoder", vocab_size=64, d_model=32, num_heads=4, mlp_dim=64, num_layers=2,
                    position="learned", max_len=16, num_token_types=2, next_sentence=True)
  model = build_model(cfg)
  params = init_params(model, jax.random.key(0))
  assert {"next_sentence", "mlm_dense", "mlm_norm"} <= set(params)
  tokens, nsp = model.apply({"params": params}, np.ones((3, 10), np.int32), token_type_ids=np.zeros((3, 10), int))
  assert tokens.shape == (3, 10, 64) and nsp.shape == (3, 2)
  with pytest.raises(ValueError, match="next_sentence needs architecture='encoder'"):
    cfg.replace(architecture="decoder")
  with pytest.raises(ValueError, match="needs a model with ModelConfig.next_sentence=True"):
    finetune.objective_losses(BertPretraining())(tokens, {})
  with pytest.raises(ValueError, match="needs next_sentence=True and num_token_types >= 2"):
    Experiment(model=cfg.replace(next_sentence=False), task=TaskConfig(objective=BertPretraining(), train_source=[]))
  with pytest.raises(ValueError, match="other objectives next_sentence=False"):
    Experiment(model=cfg, task=TaskConfig(objective=MaskedLM(), train_source=[]))


@pytest.mark.slow
def test_mlm_and_next_sentence_pretraining_then_fine_tuning(tokenizer, tmp_path):
  """A tiny BERT learns MLM + NSP on the documentation pairs (both losses fall); a classifier initialised
  from it starts its [CLS] pooler from the next-sentence head's."""
  model = ModelConfig(architecture="encoder", vocab_size=tokenizer.vocab_size, d_model=64, num_heads=4,
                      mlp_dim=128, num_layers=2, position="learned", max_len=64, num_token_types=2,
                      pre_norm=False, embed_norm=True, init_std=0.02, dropout_rate=0.0, attention_dropout_rate=0.0,
                      next_sentence=True)
  exp = Experiment(
      model=model,
      task=TaskConfig(objective=BertPretraining(seq_len=64), train_source=NextSentenceSource("train"),
                      eval_source=NextSentenceSource("validation"), tokenizer=tokenizer_path(tokenizer, tmp_path),
                      data_threads=1, prefetch=8),
      train=TrainConfig(num_steps=60, batch_size=16, log_every=20, eval_every=0, eval_batches=None,
                        checkpoint_every=60, num_samples=0, progress_bar=False),
      optimizer=OptimizerConfig(learning_rate=2e-3, schedule="linear", warmup_steps=10))
  out = train(str(tmp_path / "pre"), exp)
  rows = [json.loads(line) for line in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "nsp_loss" in r]
  assert len(train_rows) == 3 and train_rows[-1]["nll"] < train_rows[0]["nll"]
  assert train_rows[-1]["loss"] == pytest.approx(train_rows[-1]["nll"] + train_rows[-1]["nsp_loss"], rel=0.05)
  assert {"eval_loss", "eval_nsp_loss", "eval_nsp_accuracy"} <= set(out)
  # fine-tuning from it: the classifier's pooler is the pre-trained next-sentence pooler
  cls_cfg = model.replace(next_sentence=False, num_classes=2)
  source = finetune.read_init_from(str(tmp_path / "pre"), cls_cfg)
  assert not any(k.startswith(("next_sentence/", "head/", "mlm_")) for k in source)
  pre = finetune.flat_paths(finetune.read_init_from(str(tmp_path / "pre"), model))
  np.testing.assert_array_equal(source["classifier/pooler/kernel"], pre["next_sentence/pooler/kernel"])
  assert "classifier/logits/kernel" not in source  # new


def tokenizer_path(tok: Tokenizer, tmp_path) -> str:
  path = tmp_path / "tokenizer.model"
  path.write_bytes(tok.model_proto)
  return str(path)
