"""Sharding over device meshes: MeshConfig, rule presets, the Partitioner, multi-process start-up."""

from t_jax.sharding.distributed import cluster_environment, initialize_distributed, is_primary
from t_jax.sharding.mesh import AXES, MeshConfig, make_mesh, mesh_shape
from t_jax.sharding.partitioner import Partitioner, bytes_per_device, resolve_spec
from t_jax.sharding.rules import PRESETS, rules_for
