"""Fine-tuning: what trains (TrainConfig.trainable, LoRA), where it starts (init_from), and its eval metrics.

  trainable   regexes searched in '/'-joined parameter paths ('encoder/layer_0/mlp_norm/scale',
              'classifier/logits/kernel'); the other leaves get no update and no optimizer state
              (optax.multi_transform with set_to_zero), and no gradient: the train step differentiates the
              trainable leaves only (step.make_train_step(trainable=...)), so a frozen encoder under a new head
              costs a forward pass. With ModelConfig.lora_rank and no patterns: the adapters and the
              classification head (DEFAULT_LORA_TRAINABLE).
  init_from   a t_jax workdir (a training run's latest checkpoint, or a converted params/ workdir) or a
              Hugging Face checkpoint directory (config.json: read through t_jax.from_hf). Every parameter
              the two models share is restored; the new head and LoRA adapters keep their initialisation
              (a 'cls' classifier's pooler starts as a BERT next-sentence head's); a pretraining head (LM /
              MLM transform / next sentence) the model no longer has is dropped. Anything else that differs
              (a missing layer, another shape) is refused before the run writes anything, except paths
              matching TrainConfig.init_from_skip (neither restored nor checked: a new input stem). Without
              TaskConfig.tokenizer the run reads text with init_from's tokenizer (an HF checkpoint's own, a
              t_jax run's SentencePiece model) and keeps a copy in its workdir.
  metrics     classification: eval_accuracy, eval_f1 (binary: of class 1; else macro), eval_mcc (Matthews);
              regression (num_classes=1): eval_loss is the MSE, eval_pearson, eval_spearman; computed
              with scikit-learn / scipy on every evaluated example. Text-to-text (TextToText): generated
              answers, eval_exact_match and the class metrics of the label strings. BERT pre-training
              (BertPretraining): nsp_loss / nsp_accuracy beside the MLM metrics.
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
from t_jax.data.hf_tokenizer import HF_TOKENIZER_DIR, HFTokenizer, is_hf_tokenizer_dir, load_tokenizer
from t_jax.data.task import TaskConfig, make_tokenizer
from t_jax.models import ModelConfig, abstract_params, build_model
from t_jax.training.config import TrainConfig
from t_jax.training.losses import token_losses
from t_jax.training.metrics import log

PyTree = Any
DEFAULT_LORA_TRAINABLE = (r"/lora_[ab]$", r"^classifier/")
NEW_LEAVES = re.compile(r"^classifier/|/lora_[ab]$")  # initialised, not restored, by init_from
PRETRAINING_HEAD = re.compile(r"^(head|mlm_dense|mlm_norm|next_sentence)/")  # init_from into a classifier drops


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


def read_init_from(path: str, model: ModelConfig, skip: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """The parameters of TrainConfig.init_from (flat, host), checked against `model`'s parameter tree; paths
  matching a `skip` regex are neither restored nor checked."""
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
  source, expected = ({k: v for k, v in tree.items() if not any(re.search(p, k) for p in skip)}
                      for tree in (source, expected))
  for name in ("kernel", "bias"):  # BERT: the classifier's pooler starts as the next-sentence head's
    if f"next_sentence/pooler/{name}" in source and f"classifier/pooler/{name}" in expected:
      source[f"classifier/pooler/{name}"] = source[f"next_sentence/pooler/{name}"]
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

  def make_tokenizer(self, task: TaskConfig, model_vocab: int, workdir: str) -> Any:
    """data.make_tokenizer, reading init_from's tokenizer when TaskConfig.tokenizer is unset: a pretrained
    model keeps its vocabulary (an HF checkpoint's own tokenizer, a t_jax run's tokenizer.model). That one is
    copied into the workdir (tokenizer.model or hf_tokenizer/), where t_jax.load and export_params find it."""
    path = None if task.tokenizer is not None or self.init_from is None else tokenizer_of(self.init_from)
    tok = make_tokenizer(task if path is None else dataclasses.replace(task, tokenizer=path), model_vocab, workdir)
    if path is not None and tok is not None:  # (None: an objective without text)
      log(f"tokenizer: {tok!r} of TrainConfig.init_from ({path})")
      if isinstance(tok, HFTokenizer) and not (Path(workdir) / HF_TOKENIZER_DIR).exists():
        tok.save(Path(workdir) / HF_TOKENIZER_DIR)
      elif not isinstance(tok, HFTokenizer) and not (Path(workdir) / "tokenizer.model").exists():
        (Path(workdir) / "tokenizer.model").write_bytes(tok.model_proto)
    return tok


def tokenizer_of(path: str) -> Optional[str]:
  """The tokenizer that came with an init_from checkpoint: an HF directory's own, or a t_jax workdir's
  (TaskConfig.tokenizer of its config, tokenizer.model, hf_tokenizer/); None when it has none."""
  root = Path(path)
  if _is_hf_dir(root):
    return str(root) if is_hf_tokenizer_dir(root) else None
  if not (root / workdir_lib.CONFIG_FILE).is_file():
    return None
  _, task = workdir_lib.read_config(root)
  for candidate in (task.get("tokenizer"), root / "tokenizer.model", root / HF_TOKENIZER_DIR):
    if candidate and Path(candidate).exists():
      return str(candidate)
  return None


def prepare(cfg: TrainConfig, model: ModelConfig) -> FineTuning:
  """Checks the trainable patterns (and prints the trainable count) and reads init_from; errors name the binding."""
  patterns = trainable_patterns(cfg, model)
  if patterns is not None:
    log(summarize_trainable(patterns, abstract_params(build_model(model))))
  source = None if cfg.init_from is None else read_init_from(cfg.init_from, model, cfg.init_from_skip)
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


def next_sentence_losses(logits: tuple, batch: dict, label_smoothing: float = 0.0, z_loss: float = 0.0) -> dict:
  """BertPretraining's sums: token_losses' MLM sums, with `loss` = MLM sum + mean next-sentence loss x MLM
  weight (so loss / weight is BERT's sum of the two means), and the next-sentence head's nsp_nll / nsp_correct /
  nsp_weight over the real rows (with gradient accumulation each microbatch's mean counts by its MLM weight)."""
  if not isinstance(logits, tuple):
    raise ValueError("BertPretraining needs a model with ModelConfig.next_sentence=True")
  token_logits, nsp_logits = logits
  sums = token_losses(token_logits, batch["targets"], batch["weights"], label_smoothing, z_loss)
  rows = (batch["segment_ids"][:, 0] > 0).astype(jnp.float32)  # eval batches end in all-padding rows
  nsp = token_losses(nsp_logits, batch["next_sentence"], rows)
  mean = nsp["loss"] / jnp.maximum(nsp["weight"], 1.0)
  return {**sums, "loss": sums["loss"] + mean * sums["weight"], "nsp_nll": nsp["nll"], "nsp_correct": nsp["correct"],
          "nsp_weight": nsp["weight"]}


def objective_losses(objective: Any) -> Callable[..., dict]:
  """losses(logits, batch, label_smoothing, z_loss) -> sums of an objective: squared error for regression,
  MLM + next-sentence for BertPretraining, else token_losses of its label_key and weights."""
  from t_jax.data.nsp import BertPretraining

  if isinstance(objective, BertPretraining):
    return next_sentence_losses
  fn = regression_losses if isinstance(objective, Classification) and objective.regression else token_losses

  def losses(logits: Any, batch: dict, *args: float) -> dict:
    if isinstance(logits, tuple):
      raise ValueError(f"{type(objective).__name__} trains one head: this model also has a next-sentence head "
                       "(ModelConfig.next_sentence=True needs the BertPretraining objective)")
    return fn(logits, batch[objective.label_key], batch["weights"], *args)

  return losses


def extra_metrics(sums: dict, prefix: str = "") -> dict:
  """nsp_loss / nsp_accuracy (with `prefix`, e.g. 'eval_') from summed next-sentence sums; {} without them."""
  if "nsp_weight" not in sums:
    return {}
  weight = jnp.maximum(sums["nsp_weight"], 1.0)
  return {f"{prefix}nsp_loss": sums["nsp_nll"] / weight, f"{prefix}nsp_accuracy": sums["nsp_correct"] / weight}


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


def text_to_text_metrics(model: nn.Module, params: PyTree, tok: Any, objective: Any, source: Sequence,
                         batch_size: int, max_batches: Optional[int]) -> dict:
  """TextToText eval by generation: every eval input (as training encodes it: inputs_len - 1 tokens + eos) is
  decoded greedily for targets_len tokens; eval_exact_match (decoded == target string, spaces at the ends
  ignored) and, with label_names, eval_accuracy / eval_f1 / eval_mcc (scikit-learn) over the classes the strings
  name (-1 for a string that names none: always wrong). Runs where the params are (one process)."""
  from sklearn import metrics as skm

  from t_jax.inference import generate

  records = [r for r in (source[i] for i in range(len(source))) if r is not None]
  records = records[:max_batches * batch_size] if max_batches else records
  predictions = []
  for start in range(0, len(records), batch_size):
    chunk = records[start:start + batch_size]
    prompts = [[*tok.encode(r[objective.inputs_key])[:objective.inputs_len - 1], tok.eos_id] for r in chunk]
    prompts += [prompts[0]] * (batch_size - len(prompts))  # one shape for every batch: one compilation
    tokens = generate(model.cfg, params, prompts, max_new_tokens=objective.targets_len, eos_id=tok.eos_id,
                      pad_id=tok.pad_id, pad_multiple=objective.inputs_len)
    predictions += [tok.decode(row) for row in np.asarray(tokens)[:len(chunk)]]
  targets = [r[objective.targets_key].strip() for r in records]
  predictions = [p.strip() for p in predictions]
  out = {"eval_exact_match": float(np.mean([p == t for p, t in zip(predictions, targets)]))}
  if objective.label_names:
    index = {name: i for i, name in enumerate(objective.label_names)}
    y, pred = [index.get(t, -1) for t in targets], [index.get(p, -1) for p in predictions]
    labels = list(range(len(objective.label_names)))
    f1 = (skm.f1_score(y, pred, labels=[1], average="macro", zero_division=0) if len(labels) == 2
          else skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0))
    out.update(eval_accuracy=float(skm.accuracy_score(y, pred)), eval_f1=float(f1),
               eval_mcc=float(skm.matthews_corrcoef(y, pred)))
  return out


# ---------------------------------------------------------------- export


def export_params(workdir: str, out_dir: str, *, step: Optional[int] = None, overwrite: bool = False) -> Path:
  """A training (or params) workdir -> a params workdir (config.gin + params/) with LoRA merged into the kernels.

  The run's tokenizer (TaskConfig.tokenizer, else DIR/tokenizer.model or DIR/hf_tokenizer/) is copied beside when
  there is one. `t_jax.load`, TrainConfig.init_from and launch.convert read the result like any converted workdir.
  """
  from t_jax.models.lora import merge_lora

  cfg, task = workdir_lib.read_config(workdir)
  params = workdir_lib.read_params(workdir, workdir_lib.params_target(cfg), step)
  cfg, params = merge_lora(cfg, params)
  root = workdir_lib.write_params_workdir(out_dir, cfg, params, overwrite=overwrite)
  tokenizer = Path(task.get("tokenizer") or Path(workdir) / "tokenizer.model")
  if not tokenizer.exists():
    tokenizer = Path(workdir) / HF_TOKENIZER_DIR
  if tokenizer.exists():
    tok = load_tokenizer(tokenizer, task.get("num_extra_ids", 0))
    if isinstance(tok, HFTokenizer):
      tok.save(root / HF_TOKENIZER_DIR)
    else:
      (root / "tokenizer.model").write_bytes(tok.model_proto)
  return root
