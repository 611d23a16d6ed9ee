"""The train state and the pure step functions: init_state, train_step, eval_step.

State is a plain dict {'step', 'params', 'opt_state', 'rng'}; the per-step dropout key is
fold_in(rng, step), so a restored state continues exactly where the saved one would have.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from t_jax.data import Objective
from t_jax.models import init_boxed
from t_jax.training.config import TrainConfig
from t_jax.training.finetune import eval_outputs, extra_metrics, objective_losses

State = dict[str, Any]
Batch = dict[str, jax.Array]


def _rebox(value: jax.Array, box: Any) -> Any:
  """Gives an optimizer-state leaf its parameter's logical axes when it has the parameter's shape."""
  if isinstance(box, nn.Partitioned) and getattr(value, "shape", None) == box.value.shape:
    return box.replace_boxed(value)
  return value


def make_init(model: nn.Module, tx: optax.GradientTransformation, length: int) -> Callable[[jax.Array], State]:
  """init(key) -> state with flax logical-axis boxes (for Partitioner.init) on params and optimizer moments."""

  def init(key: jax.Array) -> State:
    param_key, step_key = jax.random.split(key)
    boxed = init_boxed(model, param_key, length)
    opt_state = tx.init(nn.meta.unbox(boxed))
    opt_state = optax.tree_map_params(tx, _rebox, opt_state, boxed,  # MaskedNode: a frozen leaf's no-state
                                      is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    return {"step": jnp.zeros((), jnp.int32), "params": boxed, "opt_state": opt_state,
            "rng": jax.random.key_data(step_key)}

  return init


def _microbatches(batch: Batch, accum: int) -> Batch:
  """[B, ...] -> [accum, B / accum, ...]; row r goes to microbatch r % accum so each keeps its data shard."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)


def _logits(model: nn.Module, params: Any, objective: Objective, batch: Batch, rngs: Any = None) -> jax.Array:
  """The model applied to a batch, with the arguments its objective names."""
  args, kwargs = objective.model_inputs(batch)
  return model.apply({"params": params}, *args, **kwargs, rngs=rngs)


def _split(params: Any, trainable: Optional[Callable[[Any], Any]]) -> tuple[list, Callable[[list], Any]]:
  """(the trainable leaves, leaves -> the whole tree with those leaves swapped in and the frozen ones as they are)."""
  leaves, treedef = jax.tree.flatten(params)
  mask = [True] * len(leaves) if trainable is None else [bool(m) for m in jax.tree.leaves(trainable(params))]

  def combine(chosen: list, frozen: Callable[[Any], Any] = lambda x: x) -> Any:
    it = iter(chosen)
    return jax.tree.unflatten(treedef, [next(it) if m else frozen(x) for x, m in zip(leaves, mask)])

  return [x for x, m in zip(leaves, mask) if m], combine


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, objective: Objective, cfg: TrainConfig,
                    schedule: optax.Schedule, accum: int = 1, param_shardings: Any = None,
                    trainable: Optional[Callable[[Any], Any]] = None) -> Callable[[State, Batch], tuple[State, dict]]:
  """train_step(state, batch) -> (state, metrics); gradients summed over `accum` microbatches (lax.scan).

  `param_shardings` (optional) pins the gradients to the parameters' layout (a reduce-scatter under FSDP).
  `trainable` (params -> tree of bools, the optimizer's mask; t_jax.training.finetune): the loss is
  differentiated w.r.t. the trainable leaves only, so no backward work is spent on frozen ones (a frozen
  encoder under a new head is not back-propagated through); frozen leaves pass the step bit for bit and
  reach the optimizer as zero gradients (grad_norm is then the trainable gradients' norm, what clipping sees).
  """

  losses = objective_losses(objective)  # token cross-entropy; squared error for a regression head

  def loss_fn(params: Any, batch: Batch, key: jax.Array, total_weight: jax.Array) -> tuple[jax.Array, dict]:
    logits = _logits(model, params, objective, batch, {"dropout": key})
    sums = losses(logits, batch, cfg.label_smoothing, cfg.z_loss)
    return sums["loss"] / total_weight, sums

  def train_step(state: State, batch: Batch) -> tuple[State, dict]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    total = jnp.maximum(batch["weights"].sum(), 1.0)  # normalise by the whole batch's weight
    chosen, combine = _split(state["params"], trainable)
    grad_fn = jax.grad(lambda leaves, *a: loss_fn(combine(leaves), *a), has_aux=True)  # trainable leaves only
    if accum == 1:
      grads, sums = grad_fn(chosen, batch, key, total)
    else:
      micro = _microbatches(batch, accum)

      def body(carry: tuple, xs: tuple) -> tuple[tuple, None]:
        i, mb = xs
        return jax.tree.map(jnp.add, carry, grad_fn(chosen, mb, jax.random.fold_in(key, i), total)), None

      first = jax.tree.map(lambda x: x[0], micro)
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, chosen, first, key, total))
      (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    grads = combine(grads, jnp.zeros_like)  # frozen leaves: zeros, which the optimizer ignores
    if param_shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    loss = sums["loss"] / total
    grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)  # bad loss: skip too
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    updated = optax.apply_updates(state["params"], updates)
    params = combine(_split(updated, trainable)[0])  # frozen leaves: the arrays that came in
    metrics = {"loss": loss, "nll": sums["nll"] / total, "accuracy": sums["correct"] / total,
               "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state["step"]),
               "skipped_steps": opt_state.total_notfinite, "consecutive_skips": opt_state.notfinite_count}
    if cfg.z_loss:
      metrics["z_loss"] = sums["z_loss"] / total
    metrics.update(extra_metrics(sums))  # BERT pre-training's next-sentence loss and accuracy
    return {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return train_step


def make_eval_step(model: nn.Module, objective: Objective) -> Callable[[Any, Batch], dict]:
  """eval_step(params, batch) -> summed nll, correct and weight (deterministic model); classification objectives
  also return per-row predictions, labels and row_weights (finetune.eval_outputs)."""
  losses = objective_losses(objective)

  def eval_step(params: Any, batch: Batch) -> dict:
    logits = _logits(model, params, objective, batch)
    return {**losses(logits, batch),
            **eval_outputs(objective, logits, batch)}

  return eval_step
