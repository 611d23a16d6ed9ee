"""Device mesh from config: named axes data, fsdp, sequence, tensor (-1 = the rest of the devices)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Optional

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "sequence", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes (one may be -1: the remaining devices) and the logical-axis rule preset."""

  data: int = -1
  fsdp: int = 1
  sequence: int = 1
  tensor: int = 1
  rules: str = "data_parallel"  # see t_jax.sharding.rules.PRESETS
  indivisible: str = "replicate"  # a parameter dim a rule's mesh axes don't divide: "replicate" (warn) or "error"


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
  """Resolves -1 and checks that the axis sizes multiply to the device count."""
  sizes = [getattr(cfg, a) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A Mesh over all (or the given) devices in jax.make_mesh's topology-aware order; `Auto` axes (GSPMD)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
