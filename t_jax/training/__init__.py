"""Training: configs (TrainConfig, OptimizerConfig, TaskConfig), losses, optimizers, the step and the loop.

  python -m launch.train --gin_file=experiments/quickstart.gin --workdir=/tmp/qs        # ~3 min on 2 CPU cores
  python -m launch.train --gin_file=experiments/translation.gin --gin_file=hardware/dp.gin \\
      --gin_bindings='TrainConfig.batch_size=256' --workdir=/tmp/mt   # same command again = resume

configs/: models/ (ModelConfig presets), tasks/ (TaskConfig: sources + objective), experiments/ (model + task
+ TrainConfig/OptimizerConfig), hardware/ (MeshConfig, dtype, per-device batch). Later files and bindings win.

A workdir holds config.gin (operative config), tokenizer.model, checkpoints/<step>/{state,data} (orbax; the
data item is the grain iterator position as JSON), metrics.jsonl and TensorBoard events. SIGTERM/SIGINT save
and exit 0; `t_jax.load(workdir)` returns (ModelConfig, params, tokenizer).
"""

from t_jax.training.config import OptimizerConfig, TrainConfig
from t_jax.training.load import load
from t_jax.training.loop import train
from t_jax.training.losses import token_losses
from t_jax.training.optim import make_optimizer, make_schedule
from t_jax.training.step import make_eval_step, make_init, make_train_step
from t_jax.training.tasks import TaskConfig
