"""The training loop around the pure train_step: data, checkpoints, metrics, eval, preemption.

One step: batch = next(data) -> Partitioner.global_batch -> jitted train_step(state, batch) (state donated)
-> every log_every steps metrics to tqdm/metrics.jsonl/TensorBoard -> every eval_every steps an eval pass
-> every checkpoint_every steps an async orbax save of (state, data-iterator position).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import numpy as np
from tqdm import tqdm

from t_jax.data import Seq2Seq, Tokenizer
from t_jax.models import ModelConfig, abstract_params, build_model, count_params
from t_jax.sharding import Partitioner
from t_jax.training import checkpoint as ckpt
from t_jax.training import sample
from t_jax.training.config import OptimizerConfig, TrainConfig
from t_jax.training.metrics import MetricWriter, log
from t_jax.training.optim import make_optimizer, make_schedule
from t_jax.training.step import make_eval_step, make_init, make_train_step
from t_jax.training.tasks import (
    LM_KINDS,
    TaskConfig,
    check_compatible,
    count_tokens,
    make_tokenizer,
    ordered_batches,
    train_iterator,
)


def setup_mesh(cfg: TrainConfig) -> tuple[Partitioner, int, int]:
  """The loop's only contact with the mesh: (partitioner, this process's batch size, accumulation steps)."""
  partitioner = Partitioner.from_config()
  shards = partitioner.data_shards
  if cfg.batch_size % shards or cfg.batch_size % jax.process_count():
    raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} is not divisible by the {shards} data shards "
                     f"(mesh data x fsdp) and {jax.process_count()} processes")
  if jax.process_count() > 1 and cfg.eval_batches is None:
    raise ValueError("TrainConfig.eval_batches=None (whole split) cannot keep processes in step; set a number")
  per_shard = cfg.batch_size // shards
  micro = cfg.per_device_batch_size or per_shard
  if per_shard % micro:
    raise ValueError(f"TrainConfig.per_device_batch_size={micro} does not divide the {per_shard} examples "
                     f"per data shard (batch_size={cfg.batch_size} over {shards} shards)")
  return partitioner, cfg.batch_size // jax.process_count(), per_shard // micro


@contextlib.contextmanager
def preemption_signals() -> Iterator[threading.Event]:
  """An Event set by SIGTERM/SIGINT while inside; the loop saves and exits cleanly when it is set.

  Single process only. With several processes SIGTERM is left to the jax.distributed preemption
  service (its notifier would be replaced by a Python handler), which makes all processes agree on
  the step to save at; see `_preempted`.
  """
  stop = threading.Event()
  if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
    yield stop
    return
  old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield stop
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)


def _preempted(stop: threading.Event, manager: Any, step: int) -> bool:
  if jax.process_count() > 1:  # all hosts agree on the step (jax.distributed preemption service)
    return manager.reached_preemption(step)
  return stop.is_set()


def write_config(workdir: str) -> None:
  """DIR/config.gin = the operative gin config; a different earlier one is kept as config.gin.N.

  Written by process 0 only (every process has the same config; they would race on a shared workdir).
  """
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.gin")
  text = gin.operative_config_str()
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    n = 1
    while os.path.exists(f"{path}.{n}"):
      n += 1
    os.replace(path, f"{path}.{n}")
    log(f"config changed since the last run; previous config kept as {path}.{n}")
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def _init_params(directory: str, target: Any) -> Any:
  """Params of a converted workdir (DIR/config.gin + DIR/params/), restored straight into target's shardings."""
  return ckpt.read_params(os.path.join(directory, "params"), target)


def evaluate(eval_fn: Any, params: Any, task: TaskConfig, tok: Tokenizer, batch_size: int,
             partitioner: Partitioner, limit: Optional[int], vocab_size: int) -> tuple[dict, np.ndarray]:
  """eval_loss / eval_accuracy (/ eval_perplexity) over the eval split, and its target histogram."""
  sums, counts = [], np.zeros(vocab_size)
  for batch in ordered_batches(task, tok, task.eval_source, batch_size, limit):
    sums.append(eval_fn(params, partitioner.global_batch(batch)))
    counts += sample.target_counts([batch], vocab_size)
  total = {k: sum(float(s[k]) for s in sums) for k in ("nll", "correct", "weight")}
  weight = max(total["weight"], 1.0)
  out = {"eval_loss": total["nll"] / weight, "eval_accuracy": total["correct"] / weight}
  if task.kind != "mlm":
    out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
  return out, counts


def _log(writer: MetricWriter, bar: tqdm, step: int, pending: list, tokens: int, since: float) -> dict:
  """Averages the device metrics since the last log (waiting for them) and writes one row."""
  host = jax.device_get(pending)
  seconds = time.time() - since
  row = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  for k in ("skipped_steps", "consecutive_skips"):  # counters: the latest value, not the mean
    row[k] = float(host[-1][k])
  row["tokens_per_sec"] = tokens * jax.process_count() / max(seconds, 1e-9)  # every process reads as many
  writer.write(step, row)
  bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:.0f}", refresh=False)
  return row


def _check_finite(cfg: TrainConfig, consecutive: int, step: int) -> None:
  limit = 1 if cfg.on_nonfinite == "stop" else cfg.max_consecutive_nonfinite
  if limit and consecutive >= limit:
    raise FloatingPointError(f"non-finite loss or gradient in {consecutive} consecutive step(s) up to step {step}; "
                             f"stopping (TrainConfig.on_nonfinite={cfg.on_nonfinite!r}, "
                             f"max_consecutive_nonfinite={cfg.max_consecutive_nonfinite})")


def _samples(cfg: TrainConfig, task: TaskConfig, model: nn.Module, params: Any, tok: Tokenizer) -> list:
  """A few LM continuations or seq2seq outputs from the start of eval (or train) documents."""
  if not cfg.num_samples or not (task.kind in LM_KINDS or isinstance(task.objective, Seq2Seq)):
    return []
  source = task.eval_source if task.eval_source is not None else task.train_source
  key = task.objective.text_key if task.kind in LM_KINDS else task.objective.inputs_key
  spread = [source[i * len(source) // (4 * cfg.num_samples)] for i in range(4 * cfg.num_samples)]
  spread = [d[key] for d in spread if d is not None]  # None: a record skipped when read
  texts = [t for t in spread if len(t) > 8 * cfg.sample_prompt_len] or spread[:1]  # room to go on
  texts = texts[:cfg.num_samples]
  if not texts:
    return []
  if task.kind in LM_KINDS:
    return sample.lm_samples(model, params, tok, texts, cfg.sample_prompt_len, cfg.sample_len, cfg.temperature,
                             cfg.seed)
  return sample.seq2seq_samples(model, params, tok, texts, task.objective.inputs_len, cfg.sample_len,
                                cfg.temperature, cfg.seed)


@dataclasses.dataclass
class _Run:
  """What the loop needs, built once from the config."""

  workdir: str
  cfg: TrainConfig
  task: TaskConfig
  model: nn.Module  # deterministic (eval) model, for samples
  tok: Tokenizer
  partitioner: Partitioner
  manager: Any
  data_it: Any
  step_fn: Any
  eval_fn: Any
  local_batch: int
  vocab_size: int

  def evaluate(self, params: Any) -> tuple[dict, np.ndarray]:
    """Eval metrics and the target histogram."""
    return evaluate(self.eval_fn, params, self.task, self.tok, self.local_batch, self.partitioner,
                    self.cfg.eval_batches, self.vocab_size)


def train(workdir: str) -> dict:
  """Trains the gin-configured run in workdir, resuming from its latest checkpoint; returns a summary."""
  model_cfg, cfg, opt_cfg, task = ModelConfig(), TrainConfig(), OptimizerConfig(), TaskConfig()
  check_compatible(task, model_cfg)
  partitioner, local_batch, accum = setup_mesh(cfg)
  train_model, eval_model = build_model(model_cfg, deterministic=False), build_model(model_cfg)
  if cfg.init_from is not None:
    ckpt.check_converted(cfg.init_from, nn.meta.unbox(abstract_params(eval_model)))
  os.makedirs(workdir, exist_ok=True)
  tok = make_tokenizer(task, model_cfg, workdir)
  write_config(workdir)

  tx, schedule = make_optimizer(opt_cfg, cfg.num_steps), make_schedule(opt_cfg, cfg.num_steps)
  init, key = make_init(eval_model, tx, length=8), jax.random.key(cfg.seed)
  abstract = jax.eval_shape(init, key)
  shardings = partitioner.shardings(abstract)
  target = ckpt.abstract_like(nn.meta.unbox(abstract), shardings)
  manager = ckpt.make_manager(workdir, cfg)
  data_it = train_iterator(task, tok, local_batch, cfg.seed)
  state = ckpt.restore_latest(manager, target, data_it)
  if state is None:
    state, _ = partitioner.init(init, key)
    if cfg.init_from is not None:
      state["params"] = _init_params(cfg.init_from, target["params"])
      log(f"initialised parameters from {cfg.init_from}")
  log(f"model: {type(eval_model).__name__} ({model_cfg.architecture}), {count_params(state['params']):,} "
        f"parameters; objective {type(task.objective).__name__}; vocab {tok.vocab_size}; devices "
        f"{jax.device_count()}; batch {cfg.batch_size} ({accum} microbatches); workdir {workdir}")

  with partitioner.context():
    step_fn = jax.jit(make_train_step(train_model, tx, task.kind, cfg, schedule, accum, shardings["params"]),
                      in_shardings=(shardings, partitioner.batch_sharding),
                      out_shardings=(shardings, partitioner.replicated), donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(eval_model, task.kind),
                      in_shardings=(shardings["params"], partitioner.batch_sharding),
                      out_shardings=partitioner.replicated)
    run = _Run(workdir, cfg, task, eval_model, tok, partitioner, manager, data_it, step_fn, eval_fn, local_batch,
               model_cfg.vocab_size)
    writer = MetricWriter(workdir, start_step=int(state["step"]))
    try:
      return _loop(run, state, writer)
    finally:
      manager.wait_until_finished()
      writer.close()


def _loop(run: _Run, state: Any, writer: MetricWriter) -> dict:
  """Steps from the state's step to num_steps, then the final eval, checkpoint, baseline and samples."""
  cfg, start = run.cfg, int(state["step"])
  bar = tqdm(total=cfg.num_steps, initial=start, desc="train", dynamic_ncols=True,
             disable=not cfg.progress_bar or jax.process_index() != 0)
  pending, tokens, t_log, summary = [], 0, time.time(), {}
  with preemption_signals() as stop:
    for step in range(start + 1, cfg.num_steps + 1):
      batch = next(run.data_it)
      tokens += count_tokens(batch)
      state, metrics = run.step_fn(state, run.partitioner.global_batch(batch))
      pending.append(metrics)
      if cfg.on_nonfinite == "stop":
        _check_finite(cfg, int(metrics["consecutive_skips"]), step)
      if step % cfg.log_every == 0 or step == cfg.num_steps:
        skipped = summary.get("skipped_steps", 0)
        summary.update(_log(writer, bar, step, pending, tokens, t_log))
        if summary["skipped_steps"] > skipped:
          log(f"step {step}: skipped {int(summary['skipped_steps'] - skipped)} update(s) with a non-finite "
              f"loss or gradient ({int(summary['skipped_steps'])} in all)")
        _check_finite(cfg, int(summary["consecutive_skips"]), step)
        pending, tokens, t_log = [], 0, time.time()
      eval_metrics = None
      if run.task.eval_source is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
        eval_metrics = run.evaluate(state["params"])[0]
        writer.write(step, eval_metrics)
        log(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in eval_metrics.items()))
      if step % cfg.checkpoint_every == 0:
        ckpt.save(run.manager, step, state, run.data_it, eval_metrics)
      bar.update(1)
      if _preempted(stop, run.manager, step):
        ckpt.save(run.manager, step, state, run.data_it)
        bar.close()
        log(f"preempted: saved a checkpoint at step {step}; re-run the same command to resume")
        return {**summary, "step": step, "preempted": True}
    bar.close()
    return {**summary, **_finish(run, state, writer)}  # a signal now changes nothing: the run is ending


def _finish(run: _Run, state: Any, writer: MetricWriter) -> dict:
  """Final eval (+ unigram baseline for LMs), final checkpoint and samples."""
  step, out = int(state["step"]), {"step": int(state["step"])}
  eval_metrics = None
  if run.task.eval_source is not None:
    eval_metrics, eval_counts = run.evaluate(state["params"])
    out.update(eval_metrics)
    if run.task.kind in LM_KINDS and run.cfg.unigram_baseline_batches:
      train_counts = sample.target_counts(ordered_batches(run.task, run.tok, run.task.train_source,
                                                          run.local_batch, run.cfg.unigram_baseline_batches),
                                          run.vocab_size)
      out["unigram_perplexity"] = math.exp(sample.unigram_loss(train_counts, eval_counts))
      eval_metrics = {**eval_metrics, "unigram_perplexity": out["unigram_perplexity"]}
    writer.write(step, eval_metrics)
    log(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in eval_metrics.items()))
    if "unigram_perplexity" in out:
      log(f"validation perplexity {out['eval_perplexity']:.2f} vs unigram baseline "
            f"{out['unigram_perplexity']:.2f}")
  ckpt.save(run.manager, step, state, run.data_it, eval_metrics and {"eval_loss": eval_metrics["eval_loss"]})
  out["samples"] = _samples(run.cfg, run.task, run.model, state["params"], run.tok)
  for prompt, text in out["samples"]:
    log(f"sample: {prompt!r} -> {text!r}")
  log(f"checkpoint: {run.manager.directory / str(step)}")
  return out
