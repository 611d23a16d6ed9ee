"""Partitioner: mesh + rules -> shardings for state and batches, sharded init, global batches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t_jax.sharding.mesh import MeshConfig, make_mesh
from t_jax.sharding.rules import rules_for

PyTree = Any


class Partitioner:
  """Everything the training loop needs to place arrays on a mesh."""

  def __init__(self, mesh: Mesh, rules: tuple) -> None:
    """Wraps a mesh and its logical-axis rules."""
    self.mesh = mesh
    self.rules = rules

  @classmethod
  def from_config(cls, cfg: Optional[MeshConfig] = None) -> Partitioner:
    """Builds the mesh and rules described by a MeshConfig (gin-configurable)."""
    cfg = MeshConfig() if cfg is None else cfg
    return cls(make_mesh(cfg), rules_for(cfg.rules))

  @contextlib.contextmanager
  def context(self) -> Iterator[None]:
    """Mesh + logical rules in scope, so `nn.with_logical_constraint` in layers takes effect."""
    with self.mesh, nn.logical_axis_rules(self.rules):
      yield

  def shardings(self, abstract_boxed: PyTree) -> PyTree:
    """NamedShardings for a tree whose leaves carry flax logical-axis boxes (others replicate)."""
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, self.mesh, self.rules)

  def init(self, init_fn: Callable[..., PyTree], *args: Any) -> tuple[PyTree, PyTree]:
    """Runs init_fn already sharded (no full copy on one device); returns (unboxed tree, shardings)."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = self.shardings(abstract)
    with self.context():
      tree = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return tree, shardings

  @property
  def batch_sharding(self) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp."""
    return NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))

  @property
  def replicated(self) -> NamedSharding:
    """Fully replicated placement."""
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def data_shards(self) -> int:
    """How many ways the global batch is split."""
    return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's slice of the batch -> global arrays (jax.make_array_from_process_local_data)."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local.items()}
