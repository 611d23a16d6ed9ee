"""Experiment = ModelConfig + TaskConfig + TrainConfig + OptimizerConfig + MeshConfig: one whole run.

Plain frozen dataclasses: launchers fill them from gin (launch/config.py), notebooks construct them directly.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from t_jax.data.audio import SpeechToText
from t_jax.data.classification import Classification
from t_jax.data.images import ImageClassification
from t_jax.data.nsp import BertPretraining
from t_jax.data.task import TaskConfig
from t_jax.models import ModelConfig
from t_jax.sharding import MeshConfig

OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("rsqrt", "cosine", "linear", "constant")
ON_NONFINITE = ("skip", "stop")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop: length, batch, logging, eval, checkpoints, loss extras, samples."""

  num_steps: int = 1000
  batch_size: int = 32  # global examples per optimizer step
  per_device_batch_size: Optional[int] = None  # microbatch per data shard; smaller = gradient accumulation
  seed: int = 0
  log_every: int = 10
  eval_every: int = 500  # 0: evaluate only at the end
  eval_batches: Optional[int] = 20  # None: the whole validation split
  checkpoint_every: int = 500
  keep_checkpoints: int = 3  # the most recent K
  keep_best: int = 0  # additionally keep the K checkpoints with the lowest eval_loss
  async_checkpoints: bool = True
  init_from: Optional[str] = None  # a t_jax workdir (training run or converted params) or an HF checkpoint dir
  # Regexes over parameter paths init_from does not restore: matching model leaves start fresh, matching saved
  # leaves are dropped (e.g. ('token_embedding/', 'embedder/') to put a text model's layers under a new stem).
  init_from_skip: tuple[str, ...] = ()
  # Regexes over '/'-joined parameter paths; only matching leaves train (t_jax/training/finetune.py).
  # None: everything (with ModelConfig.lora_rank: the LoRA adapters and the classification head).
  trainable: Optional[tuple[str, ...]] = None
  label_smoothing: float = 0.0
  z_loss: float = 0.0  # weight of log(Z)^2 (PaLM's z-loss)
  on_nonfinite: str = "skip"  # a non-finite loss/gradient: 'skip' the update (counted) or 'stop'
  max_consecutive_nonfinite: int = 20  # with 'skip': stop after this many skipped steps in a row (0: never)
  num_samples: int = 3  # LM continuations (or translations) printed at the end
  sample_prompt_len: int = 12
  sample_len: int = 40
  temperature: float = 0.0  # 0 = greedy
  unigram_baseline_batches: int = 200  # training batches counted for the unigram baseline (LMs); 0 = off
  progress_bar: bool = True

  def __post_init__(self) -> None:
    """Rejects impossible values early, naming the field."""
    for name in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.per_device_batch_size is not None and self.per_device_batch_size < 1:
      raise ValueError(f"TrainConfig.per_device_batch_size must be >= 1 or None, got {self.per_device_batch_size}")
    if self.eval_every < 0 or self.keep_best < 0 or self.max_consecutive_nonfinite < 0:
      raise ValueError("TrainConfig.eval_every, keep_best and max_consecutive_nonfinite must be >= 0")
    if not 0.0 <= self.label_smoothing < 1.0 or self.z_loss < 0.0:
      raise ValueError(f"TrainConfig.label_smoothing must be in [0, 1) and z_loss >= 0, got "
                       f"{self.label_smoothing}, {self.z_loss}")
    if self.on_nonfinite not in ON_NONFINITE:
      raise ValueError(f"TrainConfig.on_nonfinite={self.on_nonfinite!r} is not one of {ON_NONFINITE}")
    for name in ("trainable", "init_from_skip"):
      if (patterns := getattr(self, name)) is not None:
        patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
        object.__setattr__(self, name, patterns)
        for pattern in patterns:
          try:
            re.compile(pattern)
          except (re.error, TypeError) as e:
            raise ValueError(f"TrainConfig.{name} pattern {pattern!r} is not a regex: {e}") from e


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer, learning-rate schedule and gradient clipping (built with optax)."""

  optimizer: str = "adamw"
  learning_rate: float = 1e-3  # peak, reached after warmup
  schedule: str = "cosine"  # rsqrt (Vaswani 2017) | cosine | linear | constant, all after linear warmup
  warmup_steps: int = 0
  decay_steps: Optional[int] = None  # cosine/linear decay horizon incl. warmup; None = TrainConfig.num_steps
  final_lr_fraction: float = 0.0  # cosine/linear: final learning rate = fraction * peak
  clip_norm: Optional[float] = 1.0  # global-norm clipping; None = off
  weight_decay: float = 0.0  # decoupled; applied to matrices only (ndim >= 2)
  b1: float = 0.9  # adamw
  b2: float = 0.999  # adamw
  eps: float = 1e-8  # adamw
  momentum: float = 0.9  # sgd
  nesterov: bool = False  # sgd
  adafactor_decay_rate: float = 0.8
  adafactor_clipping_threshold: Optional[float] = 1.0
  adafactor_parameter_scale: bool = True  # learning rate relative to parameter RMS (T5)
  adafactor_momentum: Optional[float] = None
  adafactor_min_dim_to_factor: int = 128

  def __post_init__(self) -> None:
    """Rejects unknown names and impossible values, naming the field."""
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"OptimizerConfig.optimizer={self.optimizer!r} is not one of {OPTIMIZERS}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"OptimizerConfig.schedule={self.schedule!r} is not one of {SCHEDULES}")
    if self.learning_rate <= 0 or self.warmup_steps < 0:
      raise ValueError(f"OptimizerConfig.learning_rate must be > 0 and warmup_steps >= 0, got "
                       f"{self.learning_rate}, {self.warmup_steps}")
    if self.schedule == "rsqrt" and self.warmup_steps < 1:
      raise ValueError("OptimizerConfig.schedule='rsqrt' needs warmup_steps >= 1")
    if self.clip_norm is not None and self.clip_norm <= 0:
      raise ValueError(f"OptimizerConfig.clip_norm must be > 0 or None, got {self.clip_norm}")


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything `t_jax.training.train` needs, checked for consistency once."""

  model: ModelConfig
  task: TaskConfig
  train: TrainConfig = TrainConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  mesh: MeshConfig = MeshConfig()

  def __post_init__(self) -> None:
    """The objective's batches must suit the model's architecture, vocabulary and position table."""
    model, task = self.model, self.task
    classify = isinstance(task.objective, Classification)
    if classify and task.objective.num_classes != model.num_classes:
      raise ValueError(f"objective Classification(num_classes={task.objective.num_classes}) needs "
                       f"ModelConfig.num_classes={task.objective.num_classes}, got {model.num_classes}")
    if not classify and model.num_classes is not None:
      raise ValueError(f"ModelConfig.num_classes={model.num_classes} (a sequence head) needs the Classification "
                       f"objective, not {type(task.objective).__name__}")
    nsp = isinstance(task.objective, BertPretraining)
    if nsp != model.next_sentence or (nsp and model.num_token_types < 2):
      raise ValueError(f"objective {type(task.objective).__name__} and ModelConfig.next_sentence="
                       f"{model.next_sentence}, num_token_types={model.num_token_types} do not fit: BERT pre-training "
                       "(BertPretraining) "
                       "needs next_sentence=True and num_token_types >= 2, other objectives next_sentence=False")
    if model.architecture not in task.objective.architectures:
      raise ValueError(f"objective {type(task.objective).__name__} needs ModelConfig.architecture in "
                       f"{task.objective.architectures}, got {model.architecture!r}")
    if task.vocab_size is not None and task.vocab_size > model.vocab_size:
      raise ValueError(f"TaskConfig.vocab_size={task.vocab_size} exceeds ModelConfig.vocab_size={model.vocab_size}")
    if model.position == "learned" and task.max_length > model.max_len:
      raise ValueError(f"sequence length {task.max_length} exceeds ModelConfig.max_len={model.max_len} "
                       "(learned positions)")
    images = isinstance(task.objective, ImageClassification)
    if images != (model.input_stem == "patches"):
      raise ValueError(f"objective {type(task.objective).__name__} and ModelConfig.input_stem={model.input_stem!r} "
                       "do not fit: images need input_stem='patches' and ImageClassification, both")
    size = images and (task.objective.image_size, task.objective.num_channels)
    if images and size != (model.image_size, model.num_channels):
      raise ValueError(f"ImageClassification(image_size, num_channels)={size} and ModelConfig (image_size, "
                       f"num_channels)={(model.image_size, model.num_channels)} differ")
    speech = isinstance(task.objective, SpeechToText)
    if speech != (model.input_stem == "audio") or (speech and task.objective.n_mels != model.num_mel_bins):
      raise ValueError(f"objective {type(task.objective).__name__} and ModelConfig.input_stem={model.input_stem!r}, "
                       f"num_mel_bins={model.num_mel_bins} do not fit: audio needs input_stem='audio' and "
                       "SpeechToText, both, with SpeechToText.n_mels = ModelConfig.num_mel_bins")
