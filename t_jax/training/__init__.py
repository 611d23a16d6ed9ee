"""Training: configs (TrainConfig, OptimizerConfig, TaskConfig), losses, optimizers, the step and the loop.

  python -m launch.train --gin_file=experiments/quickstart.gin --workdir=/tmp/qs
"""

from t_jax.training.config import OptimizerConfig, TrainConfig
from t_jax.training.load import load
from t_jax.training.loop import train
from t_jax.training.losses import token_losses
from t_jax.training.optim import make_optimizer, make_schedule
from t_jax.training.step import make_eval_step, make_init, make_train_step
from t_jax.training.tasks import TaskConfig
