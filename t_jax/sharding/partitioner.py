"""Partitioner: mesh + rules -> shardings for state and batches, sharded init, global batches.

Parameter shardings are shape-aware: a rule whose mesh axes do not divide a dimension (say 2 GQA
kv heads on a 4-way tensor axis) is narrowed to its longest dividing prefix of mesh axes, or
skipped so that a later rule (or none: replicated) applies. With `indivisible="replicate"` (the
default) each such fallback is logged once as a warning; with `indivisible="error"` it raises.
Activation constraints go through flax unchanged; XLA pads uneven activation splits itself.

  part = Partitioner.from_config(MeshConfig(fsdp=-1, data=1, rules='fsdp'))
  state, shardings = part.init(init_fn, key)           # init_fn returns boxed params (+ optimizer state)
  with part.context():                                 # trace model code here
    step = jax.jit(train_step, in_shardings=(shardings, part.batch_sharding),
                   out_shardings=(shardings, part.replicated), donate_argnums=0)
    state, metrics = step(state, part.global_batch(local_batch))

In train_step, `jax.lax.with_sharding_constraint(grads, shardings["params"])` keeps gradients
ZeRO-sharded (a reduce-scatter); GSPMD's own propagation leaves some (the embedding's) replicated.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from t_jax.sharding.mesh import MeshConfig, make_mesh
from t_jax.sharding.rules import rules_for

PyTree = Any
log = logging.getLogger(__name__)
INDIVISIBLE = ("replicate", "error")


def resolve_spec(names: Sequence[Optional[str]], shape: Sequence[int], rules: Sequence[tuple],
                 axis_sizes: Mapping[str, int]) -> tuple[PartitionSpec, list[tuple]]:
  """Flax's rule walk for one array, keeping only mesh axes that divide the dimension.

  Returns the spec and the fallbacks: (logical name, dim size, wanted mesh axes, kept mesh axes).
  Mesh axes of size 1 are left out of the spec (they shard nothing).
  """
  out: list[Any] = [None] * len(names)
  done = [not isinstance(n, str) for n in names]
  used: set[str] = set()
  fallbacks = []
  for logical, mesh_axes in rules:
    wanted = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    for i, name in enumerate(names):
      if done[i] or name != logical or any(a in used for a in wanted):
        continue
      real = tuple(a for a in wanted if axis_sizes[a] > 1)
      kept = list(real)
      while kept and shape[i] % math.prod(axis_sizes[a] for a in kept):
        kept.pop()
      if tuple(kept) != real:
        fallbacks.append((name, shape[i], real, tuple(kept)))
      if kept:
        out[i] = kept[0] if len(kept) == 1 else tuple(kept)
        done[i] = True
        used.update(kept)
  return PartitionSpec(*out), fallbacks


class Partitioner:
  """Everything the training loop needs to place arrays on a mesh."""

  def __init__(self, mesh: Mesh, rules: tuple, indivisible: str = "replicate") -> None:
    """Wraps a mesh and its logical-axis rules; `indivisible` is 'replicate' (warn) or 'error'."""
    if indivisible not in INDIVISIBLE:
      raise ValueError(f"indivisible={indivisible!r} is not one of {INDIVISIBLE}")
    self.mesh, self.rules, self.indivisible = mesh, rules, indivisible
    self._warned: set[tuple] = set()

  @classmethod
  def from_config(cls, cfg: MeshConfig) -> Partitioner:
    """Builds the mesh and rules described by a MeshConfig."""
    return cls(make_mesh(cfg), rules_for(cfg.rules), cfg.indivisible)

  @contextlib.contextmanager
  def context(self) -> Iterator[None]:
    """Mesh + logical rules in scope, so `nn.with_logical_constraint` in layers takes effect.

    Trace (first call of) jitted model code inside it. Uses `jax.set_mesh`: flax only applies the
    constraints when `jax.sharding.get_abstract_mesh()` is set, which the legacy `with mesh:` no
    longer does.
    """
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def spec(self, names: Sequence[Optional[str]], shape: Sequence[int], where: str = "array") -> PartitionSpec:
    """Mesh PartitionSpec of one array from its logical axis names and shape."""
    return self._resolve(names, shape, where)[0]

  def _resolve(self, names: Sequence[Optional[str]], shape: Sequence[int], where: str) -> tuple:
    spec, fallbacks = resolve_spec(names, shape, self.rules, dict(self.mesh.shape))
    if fallbacks and self.indivisible == "error":
      name, size, wanted, kept = fallbacks[0]
      raise ValueError(f"{where} {tuple(shape)}: dim {name!r} of size {size} is not divisible by mesh axes "
                       f"{wanted} of sizes {[self.mesh.shape[a] for a in wanted]} (only {kept} would divide it); "
                       "change the mesh or the model shape, or set MeshConfig.indivisible='replicate'")
    return spec, fallbacks

  def shardings(self, abstract_boxed: PyTree) -> PyTree:
    """NamedShardings for a tree whose leaves carry flax logical-axis boxes (others replicate)."""
    seen: dict[tuple, list[str]] = collections.defaultdict(list)

    def one(path: tuple, leaf: Any) -> NamedSharding:
      if not isinstance(leaf, nn.Partitioned):
        return self.replicated
      where = jax.tree_util.keystr(path)
      spec, fallbacks = self._resolve(leaf.names, leaf.value.shape, where)
      for fb in fallbacks:
        seen[fb].append(where)
      return NamedSharding(self.mesh, spec)

    out = jax.tree_util.tree_map_with_path(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for (name, size, wanted, kept), where in seen.items():
      if (name, size, wanted, kept) not in self._warned:  # once per Partitioner
        self._warned.add((name, size, wanted, kept))
        log.warning("sharding fallback: %r (size %d) is not divisible by mesh axes %s; sharded over %s instead "
                    "in %d arrays, e.g. %s", name, size, wanted, kept or "nothing (replicated)", len(where),
                    min(where, key=len))
    return out

  def abstract(self, abstract_boxed: PyTree) -> PyTree:
    """Unboxed ShapeDtypeStructs carrying this mesh's shardings: orbax restore targets."""
    shardings = self.shardings(abstract_boxed)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.meta.unbox(abstract_boxed), shardings)

  def init(self, init_fn: Callable[..., PyTree], *args: Any) -> tuple[PyTree, PyTree]:
    """Runs init_fn already sharded (no full copy on one device); returns (unboxed tree, shardings).

    Traced with the rules but without the mesh in context: out_shardings place every output, and
    flax's DenseGeneral would otherwise constrain its flattened 2-D kernel init with the 3-D names.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = self.shardings(abstract)
    with nn.logical_axis_rules(self.rules):
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
    shards = self.local_data_shards
    out = {}
    for k, v in local.items():
      v = np.asarray(v)
      if v.shape[0] % shards:
        raise ValueError(f"batch[{k!r}] has {v.shape[0]} rows on this process, not divisible by its {shards} "
                         f"data shards (mesh data x fsdp = {self.data_shards} over {jax.process_count()} processes)")
      out[k] = jax.make_array_from_process_local_data(self.batch_sharding, v)
    return out

  @property
  def local_data_shards(self) -> int:
    """How many distinct batch slices this process's devices hold."""
    names = self.mesh.axis_names
    coords = {tuple(idx[names.index(a)] for a in ("data", "fsdp"))
              for idx, d in np.ndenumerate(self.mesh.devices) if d.process_index == jax.process_index()}
    return len(coords)


def bytes_per_device(tree: PyTree) -> dict[int, int]:
  """Bytes of this process's shards of a tree of jax.Arrays, per device id (replicas count fully)."""
  out: dict[int, int] = collections.defaultdict(int)
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device.id] += shard.data.nbytes
  return dict(out)
