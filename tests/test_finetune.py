"""Fine-tuning: sequence heads and pooling, LoRA, frozen parameters, init_from, classification metrics, and a
tiny fine-tune on Multi30K word-order acceptability against a bag-of-words baseline."""

import dataclasses
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy import stats
from sklearn import metrics as skm

import t_jax
from launch import config
from t_jax import data, load
from t_jax.convert import from_hf
from t_jax.data import AcceptabilitySource, Classification, TaskConfig
from t_jax.data.hf_tokenizer import HFTokenizer, load_tokenizer
from t_jax.models import ModelConfig, build_model, init_params
from t_jax.models.heads import pool
from t_jax.models.lora import merge_lora
from t_jax.training import Experiment, OptimizerConfig, TrainConfig, finetune, train
from t_jax.training.optim import make_optimizer, make_schedule
from t_jax.training.step import make_init, make_train_step
from t_jax.workdir import write_params_workdir
from tests.fixtures import make_hf_fixtures as hf_fixtures

REPO = Path(__file__).resolve().parent.parent
HF_BERT = REPO / "tests" / "fixtures" / "hf" / "bert_h3_tied"


def _cfg(**changes):
  base = dict(architecture="encoder", vocab_size=64, d_model=32, num_heads=4, mlp_dim=64, num_layers=2,
              position="learned", max_len=16, num_classes=2)
  return ModelConfig(**{**base, **changes})


def _flat(params):
  return {k: np.asarray(v) for k, v in finetune.flat_paths(params).items()}


def _batch(n=8, length=12, vocab=64, seed=0):
  """Classification rows with right padding of varying length."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(4, length + 1, n)
  seg = (np.arange(length) < lengths[:, None]).astype(np.int32)
  return {"inputs": jnp.asarray(rng.integers(4, vocab, (n, length)) * seg, jnp.int32),
          "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(np.where(seg, np.arange(length), 0), jnp.int32),
          "label": jnp.asarray(rng.integers(0, 2, n), jnp.int32), "weights": jnp.ones(n, jnp.float32)}


@pytest.fixture(autouse=True)
def _clean_gin():
  yield
  gin.clear_config()


# ---------------------------------------------------------------- heads and pooling


def test_pooling_picks_the_right_token_with_padding():
  x = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(pool(x, mask, "cls"), x[:, 0])
  np.testing.assert_array_equal(pool(x, mask, "last"), jnp.stack([x[0, 2], x[1, 4]]))
  np.testing.assert_allclose(pool(x, mask, "mean"), jnp.stack([x[0, :3].mean(0), x[1].mean(0)]))

  ids = jnp.asarray([[5, 6, 7, 8]])
  padded, pad_mask = jnp.asarray([[5, 6, 7, 8, 9, 9]]), jnp.asarray([[1, 1, 1, 1, 0, 0]])
  for architecture, pooling in (("decoder", "last"), ("encoder", "mean")):
    cfg = _cfg(architecture=architecture, pooling=pooling, position="rope", num_classes=3)
    model = build_model(cfg)
    params = init_params(model, jax.random.key(0))
    alone = model.apply({"params": params}, ids)
    assert alone.shape == (1, 3)
    np.testing.assert_allclose(model.apply({"params": params}, padded, padding_mask=pad_mask), alone, atol=1e-5)
    # without the mask the padding is read: the comparison above can fail
    assert not np.allclose(model.apply({"params": params}, padded), alone, atol=1e-3)


def test_head_off_keeps_the_parameter_tree():
  for architecture in ("decoder", "encoder"):
    plain = _flat(init_params(build_model(_cfg(architecture=architecture, num_classes=None)), jax.random.key(0)))
    head = _flat(init_params(build_model(_cfg(architecture=architecture)), jax.random.key(0)))
    assert not any(k.startswith("classifier/") for k in plain)
    assert {k for k in head if not k.startswith("classifier/")} <= set(plain)
    assert {k for k in plain if k not in head} <= {"mlm_dense/kernel", "mlm_dense/bias", "mlm_norm/scale",
                                                   "mlm_norm/bias"}


# ---------------------------------------------------------------- LoRA


def test_lora_starts_at_the_base_model_and_merges_exactly():
  ids, mask = _batch()["inputs"], _batch()["segment_ids"]
  base_cfg = _cfg(num_classes=3, dropout_rate=0.0)
  base_params = init_params(build_model(base_cfg), jax.random.key(0))
  cfg = base_cfg.replace(lora_rank=4, lora_alpha=8.0, lora_targets="query|value|out|wi")
  model = build_model(cfg)
  lora = _flat(init_params(model, jax.random.key(1)))
  adapters = {k for k in lora if "lora_" in k}
  assert adapters and {k for k in lora if k not in adapters} == set(_flat(base_params))
  assert "encoder/layer_0/self_attention/out/lora_a" in adapters  # 2 contracted axes (heads, head_dim)
  params = traverse_util.unflatten_dict(finetune.flat_paths(base_params) | {k: lora[k] for k in adapters}, sep="/")
  base = build_model(base_cfg).apply({"params": base_params}, ids, padding_mask=mask)
  np.testing.assert_array_equal(model.apply({"params": params}, ids, padding_mask=mask), base)  # B = 0

  rng = np.random.default_rng(0)
  trained = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.3 * rng.standard_normal(x.shape) if "lora_b" in finetune.path_of(p) else x, params)
  unmerged = model.apply({"params": trained}, ids, padding_mask=mask)
  assert not np.allclose(unmerged, base, atol=1e-3)
  merged_cfg, merged = merge_lora(cfg, trained)
  assert merged_cfg == base_cfg and set(_flat(merged)) == set(_flat(base_params))
  np.testing.assert_allclose(build_model(merged_cfg).apply({"params": merged}, ids, padding_mask=mask), unmerged,
                             atol=1e-5)


def test_exported_lora_workdir_is_the_merged_model(tmp_path):
  cfg = _cfg(num_classes=3, lora_rank=2)
  params = jax.tree_util.tree_map_with_path(  # adapters as if trained
      lambda p, x: x + 0.3 if "lora_b" in finetune.path_of(p) else x, init_params(build_model(cfg), jax.random.key(0)))
  write_params_workdir(tmp_path / "run", cfg, params)
  finetune.export_params(str(tmp_path / "run"), str(tmp_path / "out"))
  out_cfg, out_params, _ = load(str(tmp_path / "out"))
  assert out_cfg.lora_rank is None and not any("lora_" in k for k in finetune.flat_paths(out_params))
  ids = _batch()["inputs"]
  np.testing.assert_allclose(build_model(out_cfg).apply({"params": out_params}, ids),
                             build_model(cfg).apply({"params": params}, ids), atol=1e-5)


# ---------------------------------------------------------------- frozen parameters


def _frozen_steps(lora, trainable, accum=1):
  """(patterns, initial state, jitted step differentiating the trainable leaves only, the same step with full
  gradients: the optimizer alone freezing the rest, as before #20's second part)."""
  cfg = _cfg(lora_rank=4 if lora else None)
  model, train_cfg = build_model(cfg), TrainConfig(trainable=trainable)
  patterns = finetune.trainable_patterns(train_cfg, cfg)
  mask = finetune.trainable_mask(patterns)
  opt = OptimizerConfig(learning_rate=1e-2, weight_decay=0.1)
  tx = make_optimizer(opt, 10, mask)
  state = nn.meta.unbox(make_init(model, tx, 8)(jax.random.key(0)))
  steps = [jax.jit(make_train_step(model, tx, Classification(seq_len=12), train_cfg, make_schedule(opt, 10), accum,
                                   trainable=t)) for t in (mask, None)]
  return patterns, state, *steps


@pytest.mark.parametrize("lora, trainable", [(False, ("norm", "^classifier/")), (True, None)])
def test_only_the_trainable_leaves_change(lora, trainable):
  patterns, state, step, _ = _frozen_steps(lora, trainable)
  before = _flat(state["params"])
  for i in range(3):  # LoRA: A gets a gradient once B has left zero
    state, _ = step(state, _batch(seed=i))
  after = _flat(state["params"])
  chosen = {k for k in before if any(re.search(p, k) for p in patterns)}
  assert chosen and len(chosen) < len(before)
  for k in before:
    if k in chosen:
      assert not np.array_equal(before[k], after[k]), k
    else:
      assert np.array_equal(before[k], after[k]), k  # bitwise
  moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)  # adam's mu and nu
  assert moments == 2 * sum(before[k].size for k in chosen)
  assert re.search(r"trainable parameters: [\d,]+ of [\d,]+ \(\d+\.\d\d%\)", finetune.summarize_trainable(
      patterns, state["params"]))
  with pytest.raises(ValueError, match="matches no parameter"):
    finetune.summarize_trainable(("no_such_layer",), state["params"])


@pytest.mark.slow
@pytest.mark.parametrize("lora, trainable, accum", [(False, ("^classifier/",), 1), (False, ("norm", "^classifier/"), 2),
                                                   (True, None, 1)])
def test_frozen_leaves_cost_no_backward_and_train_as_before(lora, trainable, accum):
  """Only the trainable leaves are differentiated: fewer flops (a frozen encoder under a new head is not
  back-propagated through), and the same training as full gradients masked by the optimizer."""
  patterns, init, partial, full = _frozen_steps(lora, trainable, accum)
  flops = [step.lower(init, _batch()).compile().cost_analysis()["flops"] for step in (partial, full)]
  assert flops[0] < (0.5 if trainable == ("^classifier/",) else 0.9) * flops[1], flops
  a = b = init
  for i in range(3):
    (a, metrics_a), (b, metrics_b) = partial(a, _batch(seed=i)), full(b, _batch(seed=i))
    assert float(metrics_a["loss"]) == pytest.approx(float(metrics_b["loss"]), rel=1e-6)
    assert float(metrics_a["grad_norm"]) < float(metrics_b["grad_norm"])  # the trainable gradients' norm only
  got, want, start = _flat(a["params"]), _flat(b["params"]), _flat(init["params"])
  for k in start:
    if any(re.search(p, k) for p in patterns):
      np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    else:
      assert np.array_equal(got[k], start[k]) and np.array_equal(want[k], start[k]), k  # bitwise
  for x, y in zip(jax.tree.leaves(a["opt_state"]), jax.tree.leaves(b["opt_state"]), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- init_from


def test_init_from_restores_the_body_and_initialises_the_head(tmp_path):
  pre_cfg = _cfg(num_classes=None, embed_norm=True)
  pre = init_params(build_model(pre_cfg), jax.random.key(1))
  write_params_workdir(tmp_path / "pre", pre_cfg, pre)
  cfg = pre_cfg.replace(num_classes=2)
  fresh = init_params(build_model(cfg), jax.random.key(2))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), fresh)
  out = _flat(finetune.restore_into(fresh, target, finetune.read_init_from(str(tmp_path / "pre"), cfg), "pre"))
  pre_flat, fresh_flat = _flat(pre), _flat(fresh)
  assert set(out) == set(fresh_flat)
  for k, v in out.items():
    np.testing.assert_array_equal(v, fresh_flat[k] if k.startswith("classifier/") else pre_flat[k])
  with pytest.raises(ValueError, match=r"does not match the configured ModelConfig.*mlp/wi/kernel"):
    finetune.read_init_from(str(tmp_path / "pre"), cfg.replace(mlp_dim=48))

  # a Hugging Face checkpoint directory (the committed tiny BERT fixture): everything but the MLM head restored
  hf_model, hf_params = from_hf(str(HF_BERT))
  source = finetune.read_init_from(str(HF_BERT), hf_model.cfg.replace(num_classes=3))
  hf_flat = _flat(hf_params)
  assert set(source) == {k for k in hf_flat if not re.match(r"(head|mlm_dense|mlm_norm)/", k)}
  assert all(np.array_equal(source[k], hf_flat[k]) for k in source)


def test_init_from_skip_puts_a_text_models_layers_under_an_image_stem(tmp_path):
  """A decoder LM's layers restored into a patch-stem classifier (Lu et al. 2021): the skipped stems start fresh;
  without the skip the token table and the patch projection are refused as a mismatch."""
  lm_cfg = _cfg(architecture="decoder", num_classes=None, tie_embeddings=True)
  lm = init_params(build_model(lm_cfg), jax.random.key(1))
  write_params_workdir(tmp_path / "lm", lm_cfg, lm)
  cfg = lm_cfg.replace(input_stem="patches", image_size=4, patch_size=2, num_channels=1, num_classes=3,
                       pooling="last", tie_embeddings=False)
  fresh = _flat(init_params(build_model(cfg), jax.random.key(2)))
  skip = TrainConfig(init_from_skip="token_embedding/|embedder/").init_from_skip
  source = finetune.read_init_from(str(tmp_path / "lm"), cfg, skip)
  lm_flat = _flat(lm)
  assert set(source) == {k for k in fresh if k.startswith("decoder/")} == {k for k in lm_flat if k.startswith("decoder/")}
  assert all(np.array_equal(v, lm_flat[k]) for k, v in source.items())
  with pytest.raises(ValueError, match=r"missing \[[^]]*patch_embedding.*unexpected \[[^]]*token_embedding"):
    finetune.read_init_from(str(tmp_path / "lm"), cfg)
  with pytest.raises(ValueError, match=r"TrainConfig.init_from_skip pattern '\(' is not a regex"):
    TrainConfig(init_from_skip=["("])


@pytest.mark.slow
def test_fine_tune_an_hf_bert_from_strings(tmp_path):
  """init_from a BERT directory saved by transformers (random weights, its own WordPiece tokenizer): the run
  reads text with that tokenizer, trains the head and the layer norms, and leaves every other pretrained leaf
  as it was, bit for bit."""
  texts = hf_fixtures.TOKENIZER_CORPUS
  rows = [{"text": t, "text_pair": texts[(i + 1) % len(texts)], "label": str(i % 2)} for i, t in enumerate(texts)]
  exp = Experiment(
      model=from_hf(str(HF_BERT))[0].cfg.replace(num_classes=2, dropout_rate=0.0, attention_dropout_rate=0.0),
      task=TaskConfig(objective=Classification(seq_len=32, text_pair_key="text_pair"), train_source=rows * 4,
                      eval_source=rows, data_threads=1, prefetch=2),
      train=TrainConfig(num_steps=4, batch_size=4, eval_every=0, checkpoint_every=4, num_samples=0,
                        progress_bar=False, init_from=str(HF_BERT), trainable=("norm", "^classifier/")),
      optimizer=OptimizerConfig(learning_rate=1e-2))
  out = train(str(tmp_path / "run"), exp)
  assert {"eval_accuracy", "eval_mcc"} <= set(out)
  cfg, params, tok = load(str(tmp_path / "run"))
  assert isinstance(tok, HFTokenizer) and tok.model_proto == load_tokenizer(HF_BERT).model_proto
  before, after = _flat(from_hf(str(HF_BERT))[1]), _flat(params)
  changed = {k for k in after if k in before and not np.array_equal(after[k], before[k])}
  assert changed == {k for k in after if k in before and "norm" in k}  # the pretrained norms train, nothing else


def test_cli_init_from_mismatch_is_one_error_line(tmp_path):
  pre_cfg = _cfg(num_classes=None)
  write_params_workdir(tmp_path / "pre", pre_cfg, init_params(build_model(pre_cfg), jax.random.key(0)))
  p = subprocess.run([sys.executable, "-m", "launch.train", "--gin_file=experiments/quickstart_tiny.gin",
                      f"--gin_bindings=TrainConfig.init_from='{tmp_path / 'pre'}'", f"--workdir={tmp_path / 'run'}"],
                     cwd=REPO, capture_output=True, text=True, timeout=300)
  errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
  assert p.returncode == 2 and len(errors) == 1 and "does not match the configured ModelConfig" in errors[0]
  assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- metrics


def test_eval_metrics_are_scikit_learns_on_the_real_rows():
  rng = np.random.default_rng(0)
  logits, labels = rng.normal(size=(3, 8, 3)).astype(np.float32), rng.integers(0, 3, (3, 8))
  weights = np.ones((3, 8), np.float32)
  weights[2, 5:] = 0  # the rows padding the last eval batch
  labels[2, 5:], logits[2, 5:, 0] = 1, 10.0  # wrong on purpose: counting them changes every metric
  real = weights.ravel() > 0
  for num_classes in (3, 2):
    obj = Classification(num_classes=num_classes)
    lg = logits[..., :num_classes]
    y = np.minimum(labels, num_classes - 1)
    outputs = [finetune.eval_outputs(obj, jnp.asarray(lg[i]), {"label": jnp.asarray(y[i]),
                                                                "weights": jnp.asarray(weights[i])}) for i in range(3)]
    got = finetune.classification_metrics(outputs, obj, {"eval_loss": 1.0, "eval_accuracy": 0.0})
    pred, y = lg.argmax(-1).ravel(), y.ravel()
    average = "binary" if num_classes == 2 else "macro"
    assert got["eval_mcc"] == pytest.approx(skm.matthews_corrcoef(y[real], pred[real]), abs=1e-12)
    assert got["eval_f1"] == pytest.approx(skm.f1_score(y[real], pred[real], average=average), abs=1e-12)
    assert got["eval_accuracy"] == pytest.approx(np.mean(y[real] == pred[real]), abs=1e-12)
    assert got["eval_mcc"] != pytest.approx(skm.matthews_corrcoef(y, pred))

  obj = Classification(num_classes=1)
  values = rng.normal(size=(2, 8)).astype(np.float32)
  predictions = values + rng.normal(size=(2, 8)).astype(np.float32)
  outputs = [finetune.eval_outputs(obj, jnp.asarray(predictions[i, :, None]),
                                   {"label": jnp.asarray(values[i]), "weights": jnp.asarray(weights[i])})
             for i in range(2)]
  got = finetune.classification_metrics(outputs, obj, {"eval_loss": 1.0, "eval_accuracy": 0.0})
  real = weights[:2].ravel() > 0
  assert "eval_accuracy" not in got
  assert got["eval_pearson"] == pytest.approx(stats.pearsonr(predictions.ravel()[real], values.ravel()[real])[0])
  assert got["eval_spearman"] == pytest.approx(stats.spearmanr(predictions.ravel()[real], values.ravel()[real])[0])
  sums = finetune.regression_losses(jnp.asarray(predictions[0, :, None]), jnp.asarray(values[0]),
                                    jnp.asarray(weights[0]))
  assert float(sums["loss"]) == pytest.approx(float(np.sum((predictions[0] - values[0]) ** 2)), rel=1e-5)


# ---------------------------------------------------------------- gin experiments


def test_head_and_objective_must_agree():
  task = TaskConfig(objective=Classification(num_classes=3), train_source=[{"text": "a b", "label": "1"}])
  with pytest.raises(ValueError, match="needs ModelConfig.num_classes=3"):
    Experiment(model=_cfg(num_classes=2), task=task)
  with pytest.raises(ValueError, match="needs the Classification objective"):
    Experiment(model=_cfg(architecture="decoder"), task=TaskConfig(objective=data.CausalLM(), train_source=[]))
  with pytest.raises(ValueError, match="pooling"):
    _cfg(pooling="max")


@pytest.fixture
def glue_records(monkeypatch):
  """tfds.data_source returns three glue/cola-shaped records, the last from a test split (label -1)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  records = [{"sentence": b"The cat sat.", "label": np.int64(1)}, {"sentence": b"Cat the sat.", "label": np.int64(0)},
             {"sentence": b"Unlabelled.", "label": np.int64(-1)}]
  monkeypatch.setattr(tfds, "data_source", lambda name, split, data_dir: records)


def test_glue_experiment_reads_tfds_records(glue_records):
  config.parse(["experiments/bert_finetune_glue.gin"])
  exp = config.experiment()
  assert exp.model.num_classes == 2 and exp.train.init_from == "workdirs/bert_mlm"
  source = exp.task.train_source
  assert [source[i] for i in range(3)] == [{"text": "The cat sat.", "label": "1"},
                                           {"text": "Cat the sat.", "label": "0"}, None]


@pytest.mark.slow
def test_glue_through_tfds_mock_data(tmp_path):
  """The GLUE path with TFDS's own mock data (random records shaped like glue/cola and glue/mrpc; no download):
  sentence pairs read through TfdsClassificationSource, and a few steps of a tiny classifier with its metrics."""
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE):
    mrpc = data.TfdsClassificationSource("glue/mrpc", "validation", text_key="sentence1", text_pair_key="sentence2")
    record = mrpc[0]
    assert set(record) == {"text", "text_pair", "label"} and record["label"] in ("0", "1")
    config.parse(["experiments/bert_finetune_glue.gin"])
    task = config.experiment().task
    exp = Experiment(model=_cfg(vocab_size=128, max_len=32, num_token_types=2),
                     task=dataclasses.replace(task, objective=Classification(seq_len=32), tokenizer=None,
                                              tokenizer_sentences=1000, data_threads=1, prefetch=2),
                     train=TrainConfig(num_steps=4, batch_size=8, eval_every=0, checkpoint_every=4, num_samples=0,
                                       progress_bar=False))
    out = train(str(tmp_path), exp)
  assert {"eval_accuracy", "eval_f1", "eval_mcc"} <= set(out) and len(task.train_source) == 48


def test_acceptability_source_and_experiment(shared_dir):
  if not (shared_dir / "data" / "multi30k" / "train.en.gz").exists():
    pytest.skip("no Multi30K English captions in ../shared")
  config.parse(["experiments/acceptability_cpu.gin"])
  source = config.experiment().task.eval_source
  rows = [source[i] for i in range(len(source))]
  assert 0.45 < np.mean([r["label"] == "1" for r in rows]) < 0.55
  lines = gzip.open(shared_dir / "data" / "multi30k" / "val.en.gz", "rt").read().splitlines()
  assert len(rows) == len(lines)
  for line, row in zip(lines, rows):  # no caption is dropped; corrupted ones keep their words
    assert sorted(row["text"].split()) == sorted(line.split()) and (row["text"] == line) == (row["label"] == "1")


# ---------------------------------------------------------------- a tiny fine-tune


def _bag_of_words_accuracy(train_source, eval_source):
  """scikit-learn LogisticRegression on word counts: blind to word order, so near chance on this task."""
  from sklearn.feature_extraction.text import CountVectorizer
  from sklearn.linear_model import LogisticRegression

  texts = lambda s: [s[i]["text"] for i in range(len(s))]
  labels = lambda s: [int(s[i]["label"]) for i in range(len(s))]
  vectorizer = CountVectorizer()
  clf = LogisticRegression(max_iter=1000).fit(vectorizer.fit_transform(texts(train_source)), labels(train_source))
  return clf.score(vectorizer.transform(texts(eval_source)), labels(eval_source))


def test_tiny_finetune_beats_bag_of_words(shared_dir, tmp_path):
  multi30k = shared_dir / "data" / "multi30k"
  if not (multi30k / "train.en.gz").exists():
    pytest.skip(f"{multi30k} has no Multi30K English captions")
  train_source = AcceptabilitySource(str(multi30k / "train.en.gz"), max_examples=3000)
  eval_source = AcceptabilitySource(str(multi30k / "val.en.gz"))
  bow = _bag_of_words_accuracy(train_source, eval_source)
  exp = Experiment(
      model=ModelConfig(architecture="encoder", vocab_size=512, d_model=64, num_heads=4, mlp_dim=128, num_layers=2,
                        position="learned", max_len=48, pre_norm=False, embed_norm=True, init_std=0.02,
                        num_classes=2),  # a tiny BERT ([CLS] pooler), trained from scratch
      task=TaskConfig(objective=Classification(seq_len=40), train_source=train_source, eval_source=eval_source,
                      tokenizer_sentences=2000, data_threads=1, prefetch=8),
      train=TrainConfig(num_steps=100, batch_size=32, log_every=50, eval_every=0, eval_batches=None,
                        checkpoint_every=100, num_samples=0, progress_bar=False),
      optimizer=OptimizerConfig(learning_rate=2e-3, schedule="linear", warmup_steps=20))
  out = train(str(tmp_path), exp)
  final = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
  assert {"eval_loss", "eval_accuracy", "eval_f1", "eval_mcc"} <= set(final)
  print(f"acceptability: fine-tuned eval_accuracy {out['eval_accuracy']:.4f}, bag of words {bow:.4f}")
  assert bow < 0.56 and out["eval_accuracy"] > bow + 0.1


# ---------------------------------------------------------------- T5 text-to-text


def test_text_to_text_sources_and_the_glue_config(glue_records):
  config.parse(["experiments/t5_finetune_glue.gin"])
  exp = config.experiment()
  assert exp.model.architecture == "encoder_decoder" and exp.train.init_from == "checkpoints/t5-v1_1-small"
  source = exp.task.train_source
  assert [source[i] for i in range(3)] == [{"inputs": "cola sentence: The cat sat.", "targets": "acceptable"},
                                           {"inputs": "cola sentence: Cat the sat.", "targets": "unacceptable"}, None]
  assert exp.task.objective.label_names == ("unacceptable", "acceptable")
  pairs = data.TextToTextSource([{"s1": "a b", "s2": "c d", "label": "0"}], ("not_equivalent", "equivalent"),
                                prefix="mrpc sentence1: ", pair_prefix=" sentence2: ", text_key="s1", text_pair_key="s2")
  assert pairs[0] == {"inputs": "mrpc sentence1: a b sentence2: c d", "targets": "not_equivalent"}
  with pytest.raises(ValueError, match="label 2 has no name"):
    data.TextToTextSource([{"text": "x", "label": "2"}], ("no", "yes"))[0]


@pytest.mark.slow
def test_text_to_text_refuses_labels_longer_than_targets_len():
  """Training would cut such a label's tokens, so no generated answer could ever match it."""
  class Chars:  # one token per character
    def encode(self, text: str) -> list[int]:
      return [ord(c) for c in text]

  data.TextToText(targets_len=4, label_names=("no", "yes")).check(Chars())  # 3 tokens + eos fit
  with pytest.raises(ValueError, match=r"targets_len=4 cannot hold the label 'maybe': 6 tokens with eos"):
    data.TextToText(targets_len=4, label_names=("no", "maybe")).check(Chars())


def test_text_to_text_fine_tune_reports_exact_match_of_generated_labels(tmp_path):
  """A tiny T5 trained text-to-text: eval generates each answer; eval_exact_match and the class metrics are
  those of t_jax.generate's strings for the eval inputs."""
  words = "a cat a dog the sun the sea two men a woman the park".split()
  rng = np.random.default_rng(0)
  rows = [{"text": " ".join(rng.choice(words, 5)), "label": str(i % 2)} for i in range(64)]
  rows = [{**r, "text": r["text"] + (" red" if r["label"] == "1" else " blue")} for r in rows]
  source = data.TextToTextSource(rows, ("no", "yes"), prefix="red: ")
  objective = data.TextToText(inputs_len=48, targets_len=4, label_names=("no", "yes"))  # no input is cut
  exp = Experiment(
      model=ModelConfig(architecture="encoder_decoder", vocab_size=128, d_model=32, num_heads=4, head_dim=8,
                        mlp_dim=64, num_layers=2, position="t5_relative", norm="rmsnorm", pre_norm=True,
                        use_bias=False, scale_attention=False, dropout_rate=0.0),
      task=TaskConfig(objective=objective, train_source=source, eval_source=source, data_threads=1, prefetch=2),
      train=TrainConfig(num_steps=40, batch_size=16, eval_every=0, eval_batches=None, checkpoint_every=40,
                        num_samples=0, progress_bar=False),
      optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant", warmup_steps=0))
  out = train(str(tmp_path), exp)
  assert {"eval_exact_match", "eval_accuracy", "eval_f1", "eval_mcc", "eval_token_accuracy"} <= set(out)
  cfg, params, tok = load(str(tmp_path))
  predicted = t_jax.generate(cfg, params, [source[i]["inputs"] for i in range(len(source))], max_new_tokens=4,
                             tokenizer=tok)
  exact = np.mean([p.strip() == source[i]["targets"] for i, p in enumerate(predicted)])
  assert out["eval_exact_match"] == pytest.approx(exact) and out["eval_accuracy"] == pytest.approx(exact)
  y = [int(r["label"]) for r in rows]
  pred = [{"no": 0, "yes": 1}.get(p.strip(), -1) for p in predicted]
  assert out["eval_mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))


@pytest.mark.parametrize("gin_file", ["bert_pretrain_cpu", "bert_pretrain_nsp_cpu", "acceptability_finetune_cpu",
                                      "t5_span_corruption_cpu", "t5_finetune_acceptability_cpu"])
def test_offline_pretrain_then_fine_tune_configs(gin_file, shared_dir):
  """The CPU pretrain-then-fine-tune experiments build (the Multi30K ones need ../shared)."""
  if "pretrain" not in gin_file and not (shared_dir / "data" / "multi30k" / "train.en.gz").exists():
    pytest.skip("no Multi30K English captions in ../shared")
  config.parse([f"experiments/{gin_file}.gin"])
  exp = config.experiment()
  if gin_file.startswith("bert_pretrain"):
    assert exp.model.next_sentence == ("nsp" in gin_file) and exp.model.max_len == 64
  elif "finetune" in gin_file:
    assert exp.train.init_from.startswith("workdirs/") and exp.task.tokenizer is None  # init_from's tokenizer
    source = exp.task.eval_source
    assert len(source) == 1014 and (gin_file.startswith("acceptability") or source[0]["targets"] in (
        "acceptable", "unacceptable"))
