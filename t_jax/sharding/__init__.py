"""Sharding over device meshes: MeshConfig, rule presets, and the Partitioner."""

from t_jax.sharding.mesh import AXES, MeshConfig, make_mesh, mesh_shape
from t_jax.sharding.partitioner import Partitioner
from t_jax.sharding.rules import PRESETS, rules_for
