"""Training: the Experiment (configs), losses, optimizers, the pure step and the loop around it.

  from t_jax.training import Experiment, train
  train("/tmp/qs", Experiment(model=ModelConfig(...), task=TaskConfig(...)))

Launchers build the Experiment from gin (launch/config.py); the workdir format is in t_jax/workdir.py.
"""

from t_jax.training.config import Experiment, OptimizerConfig, TrainConfig
from t_jax.training.loop import train
from t_jax.training.losses import token_losses
from t_jax.training.optim import make_optimizer, make_schedule
from t_jax.training.step import make_eval_step, make_init, make_train_step
