"""Tests for t_jax.training and launch.train: losses, optimizers, steps, the loop, checkpoints, resume, load."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import gin
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from launch import config
from launch.config import ConfigError
from t_jax import data, load
from t_jax.data import TaskConfig
from t_jax.models import ModelConfig, build_model
from t_jax.training import (
    OptimizerConfig,
    TrainConfig,
    make_init,
    make_optimizer,
    make_schedule,
    make_train_step,
    token_losses,
    train,
)
from t_jax.training import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent
MULTI30K = REPO.parent / "shared" / "data" / "multi30k"
TINY = {"causal_lm": "quickstart_tiny", "prefix_lm": "prefix_lm_tiny", "mlm": "bert_mlm_tiny",
        "span_corruption": "t5_span_corruption_tiny", "translation": "translation_tiny"}
EN = ["a man rides a red bike", "two dogs play in the snow", "a child eats an apple", "the woman reads a book",
      "people walk along the beach", "a cat sleeps on the sofa", "the boy kicks a ball", "an old man sings"]
DE = ["ein mann fährt ein rotes fahrrad", "zwei hunde spielen im schnee", "ein kind isst einen apfel",
      "die frau liest ein buch", "leute gehen am strand", "eine katze schläft auf dem sofa",
      "der junge tritt einen ball", "ein alter mann singt"]


def _translation_bindings(tmp_path):
  """Multi30k when ../shared has it, else a small synthetic en-de corpus written to tmp_path."""
  if (MULTI30K / "train.en.gz").exists():
    return []
  for split, n in (("train", 40), ("val", 4)):
    (tmp_path / f"{split}.en").write_text("\n".join(EN[i % 8] for i in range(n)) + "\n")
    (tmp_path / f"{split}.de").write_text("\n".join(DE[i % 8] for i in range(n)) + "\n")
  return [f"train/ParallelTextPrefix.prefix = '{tmp_path}/train'",
          f"validation/ParallelTextPrefix.prefix = '{tmp_path}/val'"]


def _train(workdir, experiment, *bindings):
  """Runs training in-process from a tiny experiment config; returns the summary."""
  config.parse([f"experiments/{experiment}.gin"], list(bindings))
  return train(str(workdir), config.experiment())


def _rows(workdir):
  return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _cli(workdir, experiment, *bindings, env=None):
  args = [sys.executable, "-m", "launch.train", f"--gin_file=experiments/{experiment}.gin",
          f"--workdir={workdir}", *(f"--gin_bindings={b}" for b in bindings)]
  return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, **(env or {})})


def _state_leaves(workdir, step):
  """Every array of the saved train state (params, optimizer state, step, rng) at a step, in order."""
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(Path(workdir, "checkpoints", str(step), "state").resolve())
  return jax.tree_util.tree_flatten_with_path(tree)[0]


def _assert_identical(a, b):
  assert [p for p, _ in a] == [p for p, _ in b]
  for (path, x), (_, y) in zip(a, b):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


@pytest.fixture(autouse=True)
def _clean_gin():
  yield
  gin.clear_config()


# ---------------------------------------------------------------- losses, schedules, optimizers, step


def test_label_smoothing_and_z_loss_match_definitions():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 11)) * 3
  targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
  weights = jnp.asarray(np.random.default_rng(0).integers(0, 2, (2, 5)), jnp.float32)
  eps, z = 0.1, 1e-3

  @jax.jit
  def both(logits, targets, weights):
    got = token_losses(logits, targets, weights, label_smoothing=eps, z_loss=z)
    smoothed = optax.smooth_labels(jax.nn.one_hot(targets, 11), eps)
    lse = jax.nn.logsumexp(logits, -1)
    want = {"loss": ((optax.softmax_cross_entropy(logits, smoothed) + z * lse**2) * weights).sum(),
            "nll": (optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights).sum(),
            "weight": weights.sum(), "correct": ((jnp.argmax(logits, -1) == targets) * weights).sum()}
    return got, want, token_losses(logits, targets, weights)["loss"]

  got, want, plain = both(logits, targets, weights)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
  assert plain == got["nll"] and abs(float(got["loss"]) - float(got["nll"])) > 1e-3


@pytest.mark.parametrize("schedule", ["rsqrt", "cosine", "linear", "constant"])
def test_schedules_warm_up_then_decay(schedule):
  cfg = OptimizerConfig(learning_rate=1.0, schedule=schedule, warmup_steps=10, final_lr_fraction=0.1)
  lr = make_schedule(cfg, num_steps=100)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  want_end = {"rsqrt": (10 / 100) ** 0.5, "cosine": 0.1, "linear": 0.1, "constant": 1.0}[schedule]
  assert float(lr(100)) == pytest.approx(want_end, rel=1e-4)


def _tiny_lm(**changes):
  cfg = ModelConfig(vocab_size=64, d_model=16, num_heads=2, mlp_dim=32, num_layers=1, max_len=16, **changes)
  return cfg, build_model(cfg)


def _batch(n=8, length=8, vocab=64, seed=0):
  rng = np.random.default_rng(seed)
  return {"inputs": rng.integers(0, vocab, (n, length), dtype=np.int32),
          "targets": rng.integers(0, vocab, (n, length), dtype=np.int32),
          "weights": rng.integers(0, 2, (n, length)).astype(np.float32),
          "segment_ids": np.ones((n, length), np.int32),
          "positions": np.tile(np.arange(length, dtype=np.int32), (n, 1))}


def _state_and_step(opt=None, accum=1):
  _, model = _tiny_lm()
  opt = opt or OptimizerConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant")
  tx = make_optimizer(opt, 10)
  state = jax.jit(lambda k: nn.meta.unbox(make_init(model, tx, 8)(k)))(jax.random.key(0))
  step = jax.jit(make_train_step(model, tx, data.CausalLM(), TrainConfig(), make_schedule(opt, 10), accum))
  return state, step


@pytest.fixture(scope="module")
def adamw_step():
  """(initial state, jitted adamw train_step) of a tiny LM, compiled once for the module."""
  return _state_and_step()


def test_gradient_accumulation_matches_one_big_batch(adamw_step):
  batch = _batch(n=8)
  state, full = adamw_step
  _, micro = _state_and_step(accum=4)
  a, ma = full(state, batch)
  b, mb = micro(state, batch)
  np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd"])
def test_each_optimizer_reduces_the_loss(name, adamw_step):
  opt = OptimizerConfig(optimizer=name, learning_rate={"adamw": 1e-2, "adafactor": 1e-2, "sgd": 0.5}[name],
                        schedule="constant", adafactor_min_dim_to_factor=8)
  state, step = adamw_step if name == "adamw" else _state_and_step(opt)
  batch = _batch()
  first = None
  for _ in range(10):
    state, m = step(state, batch)
    first = float(m["loss"]) if first is None else first
  assert float(m["loss"]) < first - 0.1 and int(state["step"]) == 10


def test_nonfinite_step_is_skipped_and_counted(adamw_step):
  state, step = adamw_step
  bad = {**_batch(), "weights": np.full((8, 8), np.nan, np.float32)}
  before = jax.tree.map(np.asarray, state["params"])
  state, m = step(state, bad)
  assert not np.isfinite(float(m["loss"])) and int(m["skipped_steps"]) == 1 and int(m["consecutive_skips"]) == 1
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"])):
    assert np.array_equal(x, y)
  state, m = step(state, _batch())
  assert int(m["skipped_steps"]) == 1 and int(m["consecutive_skips"]) == 0 and int(state["step"]) == 2
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"])))


def extend(logits_fn: Callable[[jax.Array], jax.Array], tokens: jax.Array, lengths: jax.Array,
           key: jax.Array, temperature: float) -> jax.Array:
  """Fills tokens[b, lengths[b]:] one position at a time from logits_fn(tokens) [B, L, V] (no cache)."""

  def body(i: jax.Array, carry: tuple) -> tuple:
    tokens, key = carry
    key, sub = jax.random.split(key)
    logits = jax.lax.dynamic_index_in_dim(logits_fn(tokens), i - 1, axis=1, keepdims=False)
    if temperature > 0:
      new = jax.random.categorical(sub, logits / temperature)
    else:
      new = jnp.argmax(logits, -1)
    return tokens.at[:, i].set(jnp.where(i < lengths, tokens[:, i], new).astype(tokens.dtype)), key

  return jax.lax.fori_loop(jnp.min(lengths), tokens.shape[1], body, (tokens, key))[0]


def full_pass_decode(model: nn.Module, params: Any, prompts: list[list[int]], n: int, temperature: float,
                      seed: int) -> np.ndarray:
  """[B, n] new tokens by full forward passes (no cache): the oracle for the sampler."""
  width = max(map(len, prompts))
  padded = np.zeros((len(prompts), width), np.int32)
  for row, p in zip(padded, prompts):
    row[:len(p)] = p
  key = jax.random.key(seed)
  if model.cfg.architecture == "encoder_decoder":
    enc, enc_seg = jnp.asarray(padded), jnp.asarray(padded > 0, jnp.int32)
    fn = lambda p, x: model.apply({"params": p}, enc, x, encoder_segment_ids=enc_seg)
    starts = jnp.ones((len(prompts),), jnp.int32)  # position 0 holds the start token (pad = 0)
    out = jax.jit(lambda p: extend(lambda x: fn(p, x), jnp.zeros((len(prompts), n + 1), jnp.int32), starts, key,
                                   temperature))(params)
    return np.asarray(out)[:, 1:]
  lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
  kw = {"prefix_len": lengths} if model.cfg.architecture == "prefix_lm" else {}
  tokens = jnp.asarray(np.pad(padded, ((0, 0), (0, n))))
  out = np.asarray(jax.jit(lambda p: extend(lambda x: model.apply({"params": p}, x, **kw), tokens, lengths, key,
                                            temperature))(params))
  return np.stack([row[len(p):len(p) + n] for p, row in zip(prompts, out)])


def test_full_pass_sampler_matches_the_inference_engine(adamw_step):
  from t_jax.training import sample

  state, _ = adamw_step
  prompts = [[1, 5, 9, 12], [1, 7]]
  got = sample.continue_tokens(_tiny_lm()[1], state["params"], prompts, 6, 0.0, 0)
  want = full_pass_decode(_tiny_lm()[1], state["params"], prompts, 6, 0.0, 0)
  for g, w in zip(got, want):
    n = list(w).index(1) + 1 if 1 in w else len(w)  # the engine pads after eos
    assert list(g[:n]) == list(w[:n])


# ---------------------------------------------------------------- end-to-end tiny runs


@pytest.mark.parametrize("objective", sorted(TINY))
def test_tiny_run_of_every_objective(objective, tmp_path):
  # translation: samples must not depend on the LM prompt filter (sources longer than 8 x prompt length)
  bindings = _translation_bindings(tmp_path) + ["TrainConfig.sample_prompt_len = 1000"] \
      if objective == "translation" else []
  out = _train(tmp_path / "run", TINY[objective], *bindings)
  run = tmp_path / "run"
  rows = _rows(run)
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
  for r in train_rows:
    assert {"loss", "learning_rate", "tokens_per_sec", "accuracy", "skipped_steps"} <= set(r)
    assert np.isfinite(r["loss"]) and r["tokens_per_sec"] > 0 and r["skipped_steps"] == 0
  evals = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in evals] == [4, 8] and all(np.isfinite(r["eval_loss"]) for r in evals)
  assert ("eval_perplexity" in evals[-1]) == (objective != "mlm")
  assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [4, 8]
  assert "ModelConfig.d_model" in (run / "config.gin").read_text()
  assert (run / "tokenizer.model").exists() and list(run.glob("events.out.tfevents.*"))
  if objective in ("causal_lm", "prefix_lm"):
    assert out["unigram_perplexity"] > 1 and len(out["samples"]) == 2
  if objective == "translation":
    assert len(out["samples"]) == 2


def test_gradient_accumulation_in_the_loop(tmp_path):
  out = _train(tmp_path, "quickstart_tiny", "TrainConfig.per_device_batch_size = 2", "TrainConfig.num_steps = 2",
               "TrainConfig.num_samples = 0")
  assert out["step"] == 2 and np.isfinite(out["loss"])


def test_train_closes_its_checkpoint_manager_also_when_already_finished(tmp_path, monkeypatch):
  # An unclosed CheckpointManager can leave Orbax's threads running after train() returns (seen: a
  # multiprocessing QueueFeederThread and an asyncio worker thread).
  made, closed, make, close = [], [], ckpt.make_manager, ocp.CheckpointManager.close
  monkeypatch.setattr(ckpt, "make_manager", lambda *a: made.append(make(*a)) or made[-1])
  monkeypatch.setattr(ocp.CheckpointManager, "close", lambda self: closed.append(self) or close(self))
  bindings = ("TrainConfig.num_steps = 2", "TrainConfig.num_samples = 0")
  assert _train(tmp_path, "quickstart_tiny", *bindings)["step"] == 2
  assert _train(tmp_path, "quickstart_tiny", *bindings)["finished"]  # the early return
  assert len(made) == 2 and all(any(m is c for c in closed) for m in made)


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize("bindings, message", [
    (["TrainConfig.num_stepz = 3"], "num_stepz"),
    (["ModelConfig.num_heads = 3"], "num_heads=3"),
    (["TrainConfig.per_device_batch_size = 3"], "per_device_batch_size=3"),
    (["OptimizerConfig.schedule = 'cosin'"], "cosin"),
    (["ModelConfig.architecture = 'encoder'"], "architecture"),
])
def test_bad_config_fails_before_writing_anything(bindings, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    _train(tmp_path / "run", "quickstart_tiny", *bindings)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("experiment", ["quickstart", "bert_mlm", "t5_span_corruption", "prefix_lm", "translation"])
def test_full_size_experiment_configs_are_consistent(experiment):
  if experiment == "translation" and not (MULTI30K / "train.en.gz").exists():
    pytest.skip("Multi30k is not in ../shared")
  config.parse([f"experiments/{experiment}.gin"])
  exp = config.experiment()  # checks the parts against each other
  model_cfg, task = exp.model, exp.task
  assert (task.vocab_size or model_cfg.vocab_size) <= model_cfg.vocab_size


def test_missing_gin_file_is_named():
  with pytest.raises(ConfigError, match="experiments/nope.gin"):
    config.parse(["experiments/nope.gin"])


def test_cli_unknown_binding_exits_2_and_keeps_the_workdir(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.gin").write_text("keep me")
  p = _cli(run, "quickstart_tiny", "TrainConfig.num_stepz = 3")
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 2 and "num_stepz" in out and out.count("error:") == 1
  assert sorted(os.listdir(run)) == ["config.gin"] and (run / "config.gin").read_text() == "keep me"


# ---------------------------------------------------------------- checkpoints, resume, preemption


def test_kill_9_then_resume_is_bit_identical(tmp_path):
  bindings = ["TrainConfig.num_steps = 40", "TrainConfig.checkpoint_every = 10", "TrainConfig.log_every = 1",
              "TrainConfig.eval_every = 0", "TrainConfig.num_samples = 0", "ModelConfig.dropout_rate = 0.1"]
  env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  straight = _cli(tmp_path / "a", "quickstart_tiny", *bindings, env=env)
  killed = _cli(tmp_path / "b", "quickstart_tiny", *bindings, env=env)
  deadline = time.time() + 240
  while not (tmp_path / "b" / "checkpoints" / "10").exists():
    assert killed.poll() is None and time.time() < deadline, killed.communicate()[0]
    time.sleep(0.02)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert killed.returncode == -signal.SIGKILL
  assert not (tmp_path / "b" / "checkpoints" / "40").exists(), "the run finished before it was killed"
  assert straight.wait(timeout=240) == 0, straight.communicate()[0]
  resumed = _cli(tmp_path / "b", "quickstart_tiny", *bindings, env=env)
  out, _ = resumed.communicate(timeout=240)
  assert resumed.returncode == 0, out
  assert "resuming from step" in out
  _assert_identical(_state_leaves(tmp_path / "a", 40), _state_leaves(tmp_path / "b", 40))
  # metrics.jsonl reads as one uninterrupted run: steps replayed after the kill are not logged twice.
  steps = lambda d: [row["step"] for row in _rows(d) if "loss" in row]
  assert steps(tmp_path / "b") == steps(tmp_path / "a") == sorted(set(steps(tmp_path / "a")))


def test_sigterm_saves_and_exits_0(tmp_path):
  p = _cli(tmp_path, "quickstart_tiny", "TrainConfig.num_steps = 100000", "TrainConfig.log_every = 1",
           "TrainConfig.eval_every = 0", "TrainConfig.checkpoint_every = 100000")
  deadline = time.time() + 240
  while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
    assert p.poll() is None and time.time() < deadline, p.communicate()[0]
    time.sleep(0.05)
  p.send_signal(signal.SIGTERM)
  out, _ = p.communicate(timeout=120)
  assert p.returncode == 0, out
  step = int(out.split("saved a checkpoint at step ")[1].split(";")[0])
  assert 1 <= step < 100000
  assert [int(s.name) for s in (tmp_path / "checkpoints").iterdir()] == [step]


def test_sigterm_during_an_async_save_keeps_it_and_resumes_bit_identically(tmp_path, monkeypatch, capsys):
  """SIGTERM lands right after the periodic save of step 4 has started writing in the background: the
  preemption save at the same step is a no-op, not a second write; the run exits with step 4 complete and a
  resumed run ends exactly where an uninterrupted one does."""
  _train(tmp_path / "a", "quickstart_tiny", "TrainConfig.num_samples = 0")
  real, saved = ckpt.save, []

  def save_then_signal(manager, step, *args, **kwargs):
    real(manager, step, *args, **kwargs)
    saved.append((step, manager.latest_step()))
    if step == 4 and len(saved) == 1:
      os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler sets its stop event

  monkeypatch.setattr(ckpt, "save", save_then_signal)
  out = _train(tmp_path / "b", "quickstart_tiny", "TrainConfig.num_samples = 0")
  assert out["preempted"] and out["step"] == 4 and saved == [(4, 4), (4, 4)]
  assert sorted(c.name for c in (tmp_path / "b" / "checkpoints").iterdir()) == ["4"]
  monkeypatch.setattr(ckpt, "save", real)
  capsys.readouterr()
  assert _train(tmp_path / "b", "quickstart_tiny", "TrainConfig.num_samples = 0")["step"] == 8
  assert "resuming from step 4" in capsys.readouterr().out
  _assert_identical(_state_leaves(tmp_path / "a", 8), _state_leaves(tmp_path / "b", 8))


def test_checkpoints_keep_the_latest_and_the_best(tmp_path):
  cfg = TrainConfig(keep_checkpoints=1, keep_best=1, async_checkpoints=False)
  data_it = iter(grain.MapDataset.range(10).to_iter_dataset())
  losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 4.0}
  with ckpt.make_manager(str(tmp_path), cfg) as manager:
    for step, loss in losses.items():
      next(data_it)
      ckpt.save(manager, step, {"x": np.full(3, step)}, data_it, {}, {"eval_loss": loss})
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 4]  # the best eval_loss and the latest


def test_half_written_checkpoint_is_never_restored(tmp_path, capsys):
  _train(tmp_path, "quickstart_tiny", "TrainConfig.num_samples = 0")
  want = _state_leaves(tmp_path, 8)
  # A save killed half-way leaves only orbax's temporary directory (renamed to `8` on completion).
  ckpts = tmp_path / "checkpoints"
  (ckpts / "8").rename(ckpts / "8.orbax-checkpoint-tmp")
  shutil.rmtree(ckpts / "8.orbax-checkpoint-tmp" / "state")
  capsys.readouterr()
  _train(tmp_path, "quickstart_tiny", "TrainConfig.num_samples = 0")
  out = capsys.readouterr().out
  assert "ignoring incomplete checkpoint" in out and "8.orbax-checkpoint-tmp" in out
  assert "resuming from step 4" in out
  _assert_identical(want, _state_leaves(tmp_path, 8))  # steps 5-8 replayed exactly


def test_nonfinite_steps_are_skipped_and_logged_or_stop(tmp_path):
  blow_up = ["OptimizerConfig.learning_rate = 1e30", "OptimizerConfig.clip_norm = None",
             "TrainConfig.num_samples = 0"]
  out = _train(tmp_path / "skip", "quickstart_tiny", *blow_up, "TrainConfig.max_consecutive_nonfinite = 0")
  assert out["skipped_steps"] > 0
  assert max(r.get("skipped_steps", 0) for r in _rows(tmp_path / "skip")) == out["skipped_steps"]
  with pytest.raises(FloatingPointError, match="on_nonfinite='stop'"):
    _train(tmp_path / "stop", "quickstart_tiny", *blow_up, "TrainConfig.on_nonfinite = 'stop'")


# ---------------------------------------------------------------- load and init_from


def test_load_round_trip_and_init_from(tmp_path):
  _train(tmp_path / "run", "quickstart_tiny", "TrainConfig.num_samples = 0")
  cfg, params, tok = load(str(tmp_path / "run"))
  config.parse(["experiments/quickstart_tiny.gin"])
  assert cfg == config.build(ModelConfig) and cfg.d_model == 32
  saved = _state_leaves(tmp_path / "run", 8)
  saved_params = [(p[1:], x) for p, x in saved if p[0].key == "params"]
  _assert_identical(saved_params, jax.tree_util.tree_flatten_with_path(params)[0])
  assert tok.decode(tok.encode("def f(x): return x")) == "def f(x): return x"
  ids = jnp.asarray([[tok.bos_id, *tok.encode("import os")]])
  assert np.isfinite(np.asarray(build_model(cfg).apply({"params": params}, ids))).all()

  # A converted workdir: config.gin with the ModelConfig + params/ from orbax's StandardCheckpointer.
  conv = tmp_path / "converted"
  conv.mkdir()
  (conv / "config.gin").write_text("\n".join(line for line in (tmp_path / "run" / "config.gin").read_text()
                                             .splitlines() if line.startswith("ModelConfig.")))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save((conv / "params").resolve(), params)
  tiny_lr = ["OptimizerConfig.learning_rate = 1e-12", "TrainConfig.num_steps = 1", "TrainConfig.num_samples = 0"]
  _train(tmp_path / "ft", "quickstart_tiny", f"TrainConfig.init_from = '{conv}'",
         f"TaskConfig.tokenizer = '{tmp_path / 'run' / 'tokenizer.model'}'", *tiny_lr)
  _, ft, _ = load(str(tmp_path / "ft"))
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ft)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  assert load(str(conv))[0] == cfg
  with pytest.raises(ValueError, match="does not match the configured ModelConfig"):
    _train(tmp_path / "bad", "quickstart_tiny", f"TrainConfig.init_from = '{conv}'", "ModelConfig.mlp_dim = 48",
           *tiny_lr)


def test_metric_writer_writes_tensorboard_events_without_importing_torch(tmp_path):
  """A fresh process writes a real TensorBoard scalar; tensorboardX's optional torch import (seconds) is skipped."""
  import struct

  from tensorboardX.proto.event_pb2 import Event
  code = ("import sys; from t_jax.training.metrics import MetricWriter; w = MetricWriter(sys.argv[1]); "
          "w.write(3, {'loss': 2.5}); w.close(); print('torch' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
  assert out.stdout.split()[-1] == "False"
  data, i, scalars = next(tmp_path.glob("events.out.tfevents.*")).read_bytes(), 0, []
  while i < len(data):  # TFRecord framing: length (8 bytes), its CRC (4), the Event, its CRC (4)
    n = struct.unpack("<Q", data[i:i + 8])[0]
    event = Event.FromString(data[i + 12:i + 12 + n])
    scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    i += 16 + n
  assert scalars == [(3, "loss", 2.5)]


def test_metric_writer_drops_rows_past_the_restored_step(tmp_path, monkeypatch):
  from t_jax.training.metrics import MetricWriter
  monkeypatch.setattr("tensorboardX.SummaryWriter", lambda *a, **k: type("TB", (), {
      "add_scalar": lambda *a: None, "flush": lambda *a: None, "close": lambda *a: None})())
  w = MetricWriter(str(tmp_path))
  for step in range(1, 6):
    w.write(step, {"loss": step})
  w.close()
  w = MetricWriter(str(tmp_path), start_step=3)
  w.write(4, {"loss": 40.0})
  w.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_log_prints_on_process_0_only(monkeypatch, capsys):
  from t_jax.training import metrics
  metrics.log("hello from 0")
  monkeypatch.setattr(metrics.jax, "process_index", lambda: 1)
  metrics.log("hello from 1")
  assert capsys.readouterr().out == "hello from 0\n"


def _small_corpus(tmp_path):
  """18 short documents and a SentencePiece model trained on them."""
  from t_jax import data
  sentences = [{"text": f"the {w} sat on the mat number {i}"} for i, w in enumerate(["cat", "dog", "cow"] * 6)]
  return sentences, data.Tokenizer.train(sentences, str(tmp_path / "t.model"), vocab_size=40)


def test_every_process_count_reads_the_same_global_batches(tmp_path, monkeypatch):
  """Training and eval streams: the rows of 2 (or 4) processes, put together, are the 1-process batches, and every
  process sees the same number of eval batches (so all run the same number of collective eval steps)."""
  from t_jax.data import task as tasks
  sentences, tok = _small_corpus(tmp_path)
  task = TaskConfig(objective=data.CausalLM(seq_len=8), train_source=sentences, eval_source=sentences[:5])

  def read(count, index, training):
    monkeypatch.setattr(tasks.jax, "process_count", lambda: count)
    monkeypatch.setattr(tasks.jax, "process_index", lambda: index)
    if training:
      it = tasks.train_iterator(task, tok, 4, seed=0)
      return [next(it) for _ in range(5)]
    return list(tasks.ordered_batches(task, tok, task.eval_source, 4, limit=None))

  for training in (True, False):
    whole = read(1, 0, training)
    for count in (2, 4):
      parts = [read(count, i, training) for i in range(count)]
      assert all(len(p) == len(whole) for p in parts)
      for step, batch in enumerate(whole):
        for k in batch:
          assert np.array_equal(np.concatenate([p[step][k] for p in parts]), batch[k]), (training, count, step, k)


def test_processes_with_different_tokenizers_are_stopped(tmp_path, monkeypatch):
  """Multi-process: a tokenizer that differs from process 0's is an error naming the problem."""
  from jax.experimental import multihost_utils

  from t_jax.data import task as tasks
  _, tok = _small_corpus(tmp_path)
  monkeypatch.setattr(tasks.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: x)     # process 0 agrees
  tasks._check_same_on_all_processes(tok)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: x[::-1])
  with pytest.raises(ValueError, match="tokenizer differs from process 0"):
    tasks._check_same_on_all_processes(tok)
