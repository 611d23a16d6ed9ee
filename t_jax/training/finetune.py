"""Fine-tuning: what trains (TrainConfig.trainable, LoRA), where it starts (init_from), and its eval metrics.

  trainable   regexes searched in '/'-joined parameter paths ('encoder/layer_0/mlp_norm/scale',
              'classifier/logits/kernel'); the other leaves get no update and no optimizer state
              (optax.multi_transform with set_to_zero). With ModelConfig.lora_rank and no patterns: the
              adapters and the classification head (DEFAULT_LORA_TRAINABLE).
  init_from   a t_jax workdir (a training run's latest checkpoint, or a converted params/ workdir) or a
              Hugging Face checkpoint directory (config.json: read through t_jax.from_hf). Every parameter
              the two models share is restored; the new head and LoRA adapters keep their initialisation;
              a pretraining head (LM / MLM transform) the model no longer has is dropped. Anything else
              that differs (a missing layer, another shape) is refused before the run writes anything.
  metrics     classification: eval_accuracy, eval_f1 (binary: of class 1; else macro), eval_mcc (Matthews);
              regression (num_classes=1): eval_loss is the MSE, eval_pearson, eval_spearman; computed
              with scikit-learn / scipy on every evaluated example.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t_jax import workdir as workdir_lib
from t_jax.data.classification import Classification
from t_jax.models import ModelConfig, abstract_params, build_model
from t_jax.training.config import TrainConfig
from t_jax.training.losses import token_losses
from t_jax.training.metrics import log

PyTree = Any
DEFAULT_LORA_TRAINABLE = (r"/lora_[ab]$", r"^classifier/")
NEW_LEAVES = re.compile(r"^classifier/|/lora_[ab]$")  # initialised, not restored, by init_from
PRETRAINING_HEAD = re.compile(r"^(head|mlm_dense|mlm_norm)/")  # dropped by init_from into a classifier


def path_of(path: tuple) -> str:
  """'/'-joined names of a jax key path."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def flat_paths(params: PyTree) -> dict[str, Any]:
  """{'/'-joined path: leaf} of a (boxed or plain) parameter tree."""
  return {path_of(p): x for p, x in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]}


def trainable_patterns(cfg: TrainConfig, model: ModelConfig) -> Optional[tuple[str, ...]]:
  """TrainConfig.trainable, else DEFAULT_LORA_TRAINABLE for LoRA models, else None (everything trains)."""
  if cfg.trainable is not None:
    return tuple(cfg.trainable)
  return DEFAULT_LORA_TRAINABLE if model.lora_rank is not None else None


def trainable_mask(patterns: Sequence[str]) -> Callable[[PyTree], PyTree]:
  """params -> a tree of bools: True where some pattern is found in the leaf's path."""
  compiled = [re.compile(p) for p in patterns]
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda p, _: any(c.search(path_of(p)) for c in compiled), params)


def summarize_trainable(patterns: Sequence[str], params: PyTree) -> str:
  """'trainable parameters: N of M (x%)'; ValueError when a pattern matches nothing or nothing trains."""
  flat = flat_paths(params)
  for pattern in patterns:
    if not any(re.search(pattern, k) for k in flat):
      raise ValueError(f"TrainConfig.trainable pattern {pattern!r} matches no parameter (paths look like "
                       f"{sorted(flat)[:3]})")
  sizes = {k: int(np.prod(x.shape)) for k, x in flat.items()}
  chosen = [k for k in flat if any(re.search(p, k) for p in patterns)]
  n, total = sum(sizes[k] for k in chosen), sum(sizes.values())
  return (f"trainable parameters: {n:,} of {total:,} ({100 * n / total:.2f}%) in {len(chosen)} of {len(flat)} "
          f"arrays (patterns {list(patterns)}); the rest is frozen")


# ---------------------------------------------------------------- init_from


def _is_hf_dir(path: Path) -> bool:
  return (path / "config.json").is_file() and not (path / workdir_lib.CONFIG_FILE).is_file()


def read_init_from(path: str, model: ModelConfig) -> dict[str, np.ndarray]:
  """The parameters of TrainConfig.init_from (flat, host), checked against `model`'s parameter tree."""
  root = Path(path)
  if _is_hf_dir(root):
    from t_jax.convert import from_hf  # only for Hugging Face starting points

    runtime = {k: getattr(model, k) for k in ("scan_layers", "param_dtype")}
    source = flat_paths(from_hf(str(root), overrides=runtime)[1])
  elif (root / workdir_lib.CONFIG_FILE).is_file():
    source_cfg, _ = workdir_lib.read_config(root)
    source = flat_paths(workdir_lib.read_params(root, workdir_lib.params_target(source_cfg)))
  else:
    raise ValueError(f"TrainConfig.init_from={path!r} is neither a t_jax workdir ({workdir_lib.CONFIG_FILE}) nor a "
                     "Hugging Face checkpoint directory (config.json)")
  expected = flat_paths(abstract_params(build_model(model)))
  _check_compatible(path, {k: tuple(v.shape) for k, v in source.items()},
                    {k: tuple(v.shape) for k, v in expected.items()}, model)
  return {k: np.asarray(v) for k, v in source.items() if k in expected}


def _check_compatible(path: str, saved: dict, expected: dict, model: ModelConfig) -> None:
  """ValueError naming what differs, except new heads/adapters and a pretraining head a classifier drops."""
  missing = sorted(k for k in expected if k not in saved and not NEW_LEAVES.search(k))
  extra = sorted(k for k in saved if k not in expected and not (model.num_classes and PRETRAINING_HEAD.search(k)))
  shapes = [f"{k}: saved {saved[k]} vs model {v}" for k, v in expected.items() if k in saved and saved[k] != v]
  if missing or extra or shapes:
    raise ValueError(f"TrainConfig.init_from={path!r} does not match the configured ModelConfig: missing {missing[:3]}, "
                     f"unexpected {extra[:3]}, different shapes {shapes[:3]}"
                     + (" (scan_layers differs?)" if any("layers/" in k for k in missing + extra) else ""))


def restore_into(params: PyTree, target: PyTree, source: dict[str, np.ndarray], path: str) -> PyTree:
  """`params` (freshly initialised) with every leaf `source` has replaced, placed like `target`."""
  def take(p: tuple, fresh: jax.Array, spec: jax.ShapeDtypeStruct) -> jax.Array:
    value = source.get(path_of(p))
    if value is None:
      return fresh
    value = np.asarray(value, spec.dtype)
    return jax.make_array_from_callback(spec.shape, spec.sharding, lambda index: value[index])

  out = jax.tree_util.tree_map_with_path(take, params, target)
  new = [k for k in flat_paths(params) if k not in source]
  log(f"initialised parameters from {path}: {len(source)} arrays restored"
      + (f", {len(new)} new ones initialised ({', '.join(new[:4])}{' ...' if len(new) > 4 else ''})" if new else ""))
  return out


@dataclasses.dataclass
class FineTuning:
  """What `train` needs from this module, prepared before anything is written."""

  patterns: Optional[tuple[str, ...]]
  source: Optional[dict[str, np.ndarray]]
  init_from: Optional[str]

  @property
  def trainable(self) -> Optional[Callable[[PyTree], PyTree]]:
    """The optimizer's mask function (None: everything trains)."""
    return None if self.patterns is None else trainable_mask(self.patterns)

  def init_params(self, params: PyTree, target: PyTree) -> PyTree:
    """Fresh params with the init_from ones restored (unchanged without init_from)."""
    return params if self.source is None else restore_into(params, target, self.source, self.init_from)


def prepare(cfg: TrainConfig, model: ModelConfig) -> FineTuning:
  """Checks the trainable patterns (and prints the trainable count) and reads init_from; errors name the binding."""
  patterns = trainable_patterns(cfg, model)
  if patterns is not None:
    log(summarize_trainable(patterns, abstract_params(build_model(model))))
  source = None if cfg.init_from is None else read_init_from(cfg.init_from, model)
  return FineTuning(patterns, source, cfg.init_from)


# ---------------------------------------------------------------- losses and metrics


def regression_losses(predictions: jax.Array, targets: jax.Array, weights: jax.Array, label_smoothing: float = 0.0,
                      z_loss: float = 0.0) -> dict[str, jax.Array]:
  """token_losses' sums for one regression output: loss = nll = weighted squared error (smoothing/z-loss unused)."""
  del label_smoothing, z_loss
  w = weights.astype(jnp.float32)
  se = jnp.square(predictions[..., 0].astype(jnp.float32) - targets.astype(jnp.float32)) * w
  zero = jnp.zeros((), jnp.float32)
  return {"loss": se.sum(), "nll": se.sum(), "z_loss": zero, "correct": zero, "weight": w.sum()}


def objective_losses(objective: Any) -> Callable[..., dict]:
  """The loss-sums function of an objective: squared error for regression, else token_losses."""
  return regression_losses if isinstance(objective, Classification) and objective.regression else token_losses


def eval_outputs(objective: Any, logits: jax.Array, batch: dict) -> dict:
  """Per-row predictions, labels and weights of a classification eval batch (nothing for other objectives)."""
  if not isinstance(objective, Classification):
    return {}
  predictions = logits[..., 0] if objective.regression else jnp.argmax(logits, -1)
  return {"predictions": predictions, "labels": batch[objective.label_key], "row_weights": batch["weights"]}


def classification_metrics(outputs: Sequence[dict], objective: Classification, metrics: dict) -> dict:
  """`metrics` plus scikit-learn / scipy metrics over the real rows of eval_step outputs (padding rows dropped)."""
  from scipy import stats
  from sklearn import metrics as skm

  host = jax.device_get(list(outputs))
  w = np.concatenate([np.ravel(o["row_weights"]) for o in host]) > 0
  pred = np.concatenate([np.ravel(o["predictions"]) for o in host])[w]
  label = np.concatenate([np.ravel(o["labels"]) for o in host])[w]
  if objective.regression:
    with warnings.catch_warnings():  # constant predictions: nan, as scipy says
      warnings.simplefilter("ignore")
      out = {"eval_pearson": stats.pearsonr(pred, label)[0], "eval_spearman": stats.spearmanr(pred, label)[0]}
    return {**{k: v for k, v in metrics.items() if k != "eval_accuracy"}, **{k: float(v) for k, v in out.items()}}
  labels = list(range(objective.num_classes))
  f1 = (skm.f1_score(label, pred, zero_division=0) if objective.num_classes == 2
        else skm.f1_score(label, pred, labels=labels, average="macro", zero_division=0))
  return {**metrics, "eval_accuracy": float(skm.accuracy_score(label, pred)), "eval_f1": float(f1),
          "eval_mcc": float(skm.matthews_corrcoef(label, pred))}


# ---------------------------------------------------------------- export


def export_params(workdir: str, out_dir: str, *, step: Optional[int] = None, overwrite: bool = False) -> Path:
  """A training (or params) workdir -> a params workdir (config.gin + params/) with LoRA merged into the kernels.

  The run's tokenizer (TaskConfig.tokenizer, else DIR/tokenizer.model) is copied beside when there is one. `t_jax.load`, TrainConfig.init_from and
  launch.convert read the result like any converted workdir.
  """
  from t_jax.models.lora import merge_lora

  cfg, task = workdir_lib.read_config(workdir)
  params = workdir_lib.read_params(workdir, workdir_lib.params_target(cfg), step)
  cfg, params = merge_lora(cfg, params)
  root = workdir_lib.write_params_workdir(out_dir, cfg, params, overwrite=overwrite)
  tokenizer = Path(task.get("tokenizer") or Path(workdir) / "tokenizer.model")
  if tokenizer.is_file():
    (root / "tokenizer.model").write_bytes(tokenizer.read_bytes())
  return root
