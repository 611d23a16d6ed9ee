"""The training loop around the pure train_step: data, checkpoints, metrics, eval, preemption.

One step: batch = next(data) -> Partitioner.global_batch -> jitted train_step(state, batch) (state donated)
-> every log_every steps metrics to the progress bar (or one log line)/metrics.jsonl/TensorBoard -> every
eval_every steps an eval pass -> every checkpoint_every steps an async orbax save of (state, data position).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from t_jax import workdir as workdir_lib
from t_jax.data import MaskedLM, Seq2Seq, Tokenizer
from t_jax.data.classification import Classification, TextToText
from t_jax.data.task import TaskConfig, count_tokens, ordered_batches, train_iterator
from t_jax.models import build_model, count_params
from t_jax.sharding import Partitioner
from t_jax.training import checkpoint as ckpt
from t_jax.training import finetune, sample
from t_jax.training.config import Experiment, TrainConfig
from t_jax.training.metrics import MetricWriter, log
from t_jax.training.optim import make_optimizer, make_schedule
from t_jax.training.step import make_eval_step, make_init, make_train_step


def microbatches(cfg: TrainConfig, shards: int, processes: int = 1) -> int:
  """Gradient-accumulation steps for a batch split over `shards` data shards (and `processes`)."""
  if cfg.batch_size % shards or cfg.batch_size % processes:
    raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} is not divisible by the {shards} data shards "
                     f"(mesh data x fsdp) and {processes} processes")
  per_shard = cfg.batch_size // shards
  micro = cfg.per_device_batch_size or per_shard
  if per_shard % micro:
    raise ValueError(f"TrainConfig.per_device_batch_size={micro} does not divide the {per_shard} examples "
                     f"per data shard (batch_size={cfg.batch_size} over {shards} shards)")
  return per_shard // micro


@contextlib.contextmanager
def preemption_signals() -> Iterator[threading.Event]:
  """An Event set by SIGTERM/SIGINT while inside; the loop saves and exits cleanly when it is set.

  Single process only. With several processes SIGTERM is left to the jax.distributed preemption
  service (its notifier would be replaced by a Python handler), which makes all processes agree on
  the step to save at (see `_loop`).
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


def write_config(workdir: str, text: str) -> None:
  """DIR/config.gin = the run's config; a different earlier one is kept as config.gin.N (process 0 only)."""
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if jax.process_index() != 0 or (os.path.exists(path) and Path(path).read_text() == text):
    return
  if os.path.exists(path):
    n = next(n for n in itertools.count(1) if not os.path.exists(f"{path}.{n}"))
    os.replace(path, f"{path}.{n}")
    log(f"config changed since the last run; previous config kept as {path}.{n}")
  Path(path + ".tmp").write_text(text)
  os.replace(path + ".tmp", path)


def _log(writer: MetricWriter, step: int, pending: list, tokens: int, since: float) -> dict:
  """Averages the device metrics since the last log (waiting for them) and writes one row."""
  host = jax.device_get(pending)
  row = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  for k in ("skipped_steps", "consecutive_skips"):  # counters: the latest value, not the mean
    row[k] = float(host[-1][k])
  row["tokens_per_sec"] = tokens * jax.process_count() / max(time.time() - since, 1e-9)  # all read as many
  writer.write(step, row)
  return row


def _progress(bar: tqdm, cfg: TrainConfig, step: int, row: dict, seconds_per_step: float) -> None:
  """Rate and ETA from completed steps (the time between logs): the bar on a terminal, else one line."""
  eta = time.strftime("%H:%M:%S", time.gmtime((cfg.num_steps - step) * seconds_per_step))
  if bar.disable:
    log(f"step {step}/{cfg.num_steps}: loss {row['loss']:.4f}, {row['tokens_per_sec']:,.0f} tokens/s, "
        f"{1000 * seconds_per_step:.0f} ms/step, eta {eta}")
    return
  bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:.0f}", eta=eta, refresh=False)
  bar.update(step - bar.n)


def _check_finite(cfg: TrainConfig, consecutive: int, step: int) -> None:
  limit = 1 if cfg.on_nonfinite == "stop" else cfg.max_consecutive_nonfinite
  if limit and consecutive >= limit:
    raise FloatingPointError(f"non-finite loss or gradient in {consecutive} consecutive step(s) up to step {step}; "
                             f"stopping (TrainConfig.on_nonfinite={cfg.on_nonfinite!r}, "
                             f"max_consecutive_nonfinite={cfg.max_consecutive_nonfinite})")


def _samples(cfg: TrainConfig, task: TaskConfig, model: nn.Module, params: Any, tok: Tokenizer) -> list:
  """A few LM continuations or seq2seq outputs from eval (or train) documents spread over the split."""
  if not cfg.num_samples or not (task.is_lm or isinstance(task.objective, Seq2Seq)):
    return []
  source = task.eval_source if task.eval_source is not None else task.train_source
  key = task.objective.text_key if task.is_lm else task.objective.inputs_key
  spread = [source[i * len(source) // (4 * cfg.num_samples)] for i in range(4 * cfg.num_samples)]
  spread = [d[key] for d in spread if d is not None]  # None: a record skipped when read
  if task.is_lm:  # prompts with room to go on
    spread = [t for t in spread if len(t) > 8 * cfg.sample_prompt_len] or spread[:1]
  texts = spread[:cfg.num_samples]
  if not texts:
    return []
  if task.is_lm:  # prompts: the first sample_prompt_len tokens; seq2seq: whole sources up to inputs_len
    samples, prompt_len = sample.lm_samples, cfg.sample_prompt_len
  else:
    samples, prompt_len = sample.seq2seq_samples, task.objective.inputs_len
  return samples(model, params, tok, texts, prompt_len, cfg.sample_len, cfg.temperature, cfg.seed)


@dataclasses.dataclass
class _Run:
  """What the loop needs, built once from the config."""

  cfg: TrainConfig
  task: TaskConfig
  model: nn.Module  # deterministic (eval) model, for samples
  tok: Optional[Tokenizer]  # None for objectives without text (images)
  partitioner: Partitioner
  manager: Any
  data_it: Any
  step_fn: Any
  eval_fn: Any
  vocab_size: int
  fingerprint: dict  # saved with every checkpoint

  def evaluate(self, params: Any) -> tuple[dict, np.ndarray]:
    """eval_loss / eval_accuracy (/ eval_perplexity) over the eval split, and its target histogram."""
    sums, counts = [], np.zeros(self.vocab_size)
    for batch in ordered_batches(self.task, self.tok, self.task.eval_source, self.cfg.batch_size,
                                 self.cfg.eval_batches):
      sums.append(self.eval_fn(params, self.partitioner.global_batch(batch)))
      counts += sample.target_counts([batch], self.vocab_size)
    total = {k: sum(float(s[k]) for s in sums) for k in ("nll", "correct", "weight")}
    weight = max(total["weight"], 1.0)
    out = {"eval_loss": total["nll"] / weight, "eval_accuracy": total["correct"] / weight}
    nsp = {k: sum(float(s[k]) for s in sums) for k in ("nsp_nll", "nsp_correct", "nsp_weight") if sums and k in sums[0]}
    out.update({k: float(v) for k, v in finetune.extra_metrics(nsp, "eval_").items()})  # BERT's next sentence
    if isinstance(self.task.objective, Classification):  # accuracy, F1, MCC or Pearson/Spearman
      out = finetune.classification_metrics(sums, self.task.objective, out)
    if isinstance(self.task.objective, TextToText):  # generated strings: exact match (and class metrics)
      out = {**out, "eval_token_accuracy": out.pop("eval_accuracy"), **finetune.text_to_text_metrics(
          self.model, params, self.tok, self.task.objective, self.task.eval_source, self.cfg.batch_size,
          self.cfg.eval_batches)}
    elif not isinstance(self.task.objective, (MaskedLM, Classification)):
      out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
    return out, counts


def train(workdir: str, exp: Experiment, *, config_text: Optional[str] = None, force_unlock: bool = False,
          allow_config_change: bool = False) -> dict:
  """Trains `exp` in workdir, resuming from its latest checkpoint; returns a summary.

  `config_text` is written to DIR/config.gin once the run is accepted (launchers pass the gin config;
  default: one line per config field). A finished run returns at once. Resuming with a model or task
  that changes what the parameters mean is refused unless `allow_config_change`.
  """
  model_cfg, cfg, task = exp.model, exp.train, exp.task
  partitioner = Partitioner.from_config(exp.mesh)
  accum = microbatches(cfg, partitioner.data_shards, jax.process_count())
  train_model, eval_model = build_model(model_cfg, deterministic=False), build_model(model_cfg)
  tuning = finetune.prepare(cfg, model_cfg)  # trainable patterns checked, init_from read: before any write
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.lock(workdir, force=force_unlock), contextlib.ExitStack() as closing:
    tok = tuning.make_tokenizer(task, model_cfg.vocab_size, workdir)  # init_from's tokenizer when it has one
    tx = make_optimizer(exp.optimizer, cfg.num_steps, tuning.trainable)
    schedule = make_schedule(exp.optimizer, cfg.num_steps)
    init, key = make_init(eval_model, tx, length=8), jax.random.key(cfg.seed)
    abstract = jax.eval_shape(init, key)
    shardings, target = partitioner.shardings(abstract), partitioner.abstract(abstract)
    manager = closing.enter_context(ckpt.make_manager(workdir, cfg))  # closed = its saves finished
    data_it = train_iterator(task, tok, cfg.batch_size, cfg.seed)
    meaning = ckpt.fingerprint(model_cfg, task)
    state = ckpt.restore_latest(manager, target, data_it, meaning, allow_config_change)  # or refuses
    write_config(workdir, config_text or workdir_lib.config_to_gin(model_cfg, task, cfg, exp.optimizer, exp.mesh))
    if state is not None and int(state["step"]) >= cfg.num_steps:
      log(f"run already finished at step {int(state['step'])} (TrainConfig.num_steps={cfg.num_steps}); "
          "nothing to do")
      return {"step": int(state["step"]), "finished": True}
    if state is None:
      state, _ = partitioner.init(init, key)
      state["params"] = tuning.init_params(state["params"], target["params"])  # init_from, when set
    log(f"model: {type(eval_model).__name__} ({model_cfg.architecture}), {count_params(state['params']):,} "
        f"parameters; objective {type(task.objective).__name__}; vocab {tok.vocab_size if tok else '-'}; devices "
        f"{jax.device_count()}; batch {cfg.batch_size} rows{' (packed)' if task.objective.pack else ''}, "
        f"{cfg.batch_size * task.max_length:,} token slots, {accum} microbatch(es); workdir {workdir}")
    with partitioner.context():
      step_fn = jax.jit(make_train_step(train_model, tx, task.objective, cfg, schedule, accum, shardings["params"],
                                        tuning.trainable),
                        in_shardings=(shardings, partitioner.batch_sharding),
                        out_shardings=(shardings, partitioner.replicated), donate_argnums=0)
      eval_fn = jax.jit(make_eval_step(eval_model, task.objective),
                        in_shardings=(shardings["params"], partitioner.batch_sharding),
                        out_shardings=partitioner.replicated)
      run = _Run(cfg, task, eval_model, tok, partitioner, manager, data_it, step_fn, eval_fn,
                 model_cfg.vocab_size, meaning)
      writer = MetricWriter(workdir, start_step=int(state["step"]))
      try:
        return _loop(run, state, writer)
      finally:
        writer.close()


def _loop(run: _Run, state: Any, writer: MetricWriter) -> dict:
  """Steps from the state's step to num_steps, then the final eval, checkpoint, baseline and samples."""
  cfg, start = run.cfg, int(state["step"])
  interactive = cfg.progress_bar and jax.process_index() == 0 and sys.stderr.isatty()
  bar = tqdm(total=cfg.num_steps, initial=start, desc="train", dynamic_ncols=True, disable=not interactive)
  pending, tokens, t_log, logged, summary = [], 0, time.time(), start, {}
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
        summary.update(_log(writer, step, pending, tokens, t_log))
        _progress(bar, cfg, step, summary, (time.time() - t_log) / (step - logged))
        if summary["skipped_steps"] > skipped:
          log(f"step {step}: skipped {int(summary['skipped_steps'] - skipped)} update(s) with a non-finite "
              f"loss or gradient ({int(summary['skipped_steps'])} in all)")
        _check_finite(cfg, int(summary["consecutive_skips"]), step)
        pending, tokens, t_log, logged = [], 0, time.time(), step
      eval_metrics = None
      if run.task.eval_source is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
        eval_metrics = run.evaluate(state["params"])[0]
        writer.write(step, eval_metrics)
        log(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in eval_metrics.items()))
        t_log = time.time()  # the rate counts training steps only
      if step % cfg.checkpoint_every == 0:
        ckpt.save(run.manager, step, state, run.data_it, run.fingerprint, eval_metrics)
      # With several processes, all agree on the step to stop at (jax.distributed preemption service).
      if run.manager.reached_preemption(step) if jax.process_count() > 1 else stop.is_set():
        ckpt.save(run.manager, step, state, run.data_it, run.fingerprint)
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
    if run.task.is_lm and run.cfg.unigram_baseline_batches:
      train_counts = sample.target_counts(ordered_batches(run.task, run.tok, run.task.train_source,
                                                          run.cfg.batch_size, run.cfg.unigram_baseline_batches),
                                          run.vocab_size)
      out["unigram_perplexity"] = math.exp(sample.unigram_loss(train_counts, eval_counts))
      eval_metrics = {**eval_metrics, "unigram_perplexity": out["unigram_perplexity"]}
    writer.write(step, eval_metrics)
    log(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in eval_metrics.items()))
    if "unigram_perplexity" in out:
      log(f"validation perplexity {out['eval_perplexity']:.2f} vs unigram baseline "
            f"{out['unigram_perplexity']:.2f}")
  ckpt.save(run.manager, step, state, run.data_it, run.fingerprint,
            eval_metrics and {"eval_loss": eval_metrics["eval_loss"]})
  out["samples"] = _samples(run.cfg, run.task, run.model, state["params"], run.tok)
  for prompt, text in out["samples"]:
    log(f"sample: {prompt!r} -> {text!r}")
  log(f"checkpoint: {run.manager.directory / str(step)}")
  return out
