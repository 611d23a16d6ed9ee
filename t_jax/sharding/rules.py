"""Logical-axis rules: the one place where model axis names meet mesh axes.

Rules are ordered (logical, mesh) pairs; flax assigns each array dimension the first rule whose
mesh axes are still free, so `batch` (listed first) takes data+fsdp in activations and `embed`
falls back to replicated there, while parameters (no batch axis) get `embed` sharded over fsdp.
"""

from __future__ import annotations

BATCH = (("batch", ("data", "fsdp")), ("length", "sequence"))
FSDP = (("embed", "fsdp"), ("vocab_fsdp", "fsdp"))
TENSOR = (("heads", "tensor"), ("kv", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))

PRESETS: dict[str, tuple] = {
    "data_parallel": BATCH,  # params replicated
    "fsdp": BATCH + FSDP,  # ZeRO-3: params, grads and optimizer state sharded over fsdp
    "tensor": BATCH + TENSOR,  # Megatron column/row splits of attention and MLP
    "fsdp_tensor": BATCH + TENSOR + FSDP,
}


def rules_for(preset: str) -> tuple:
  """The rule tuple of a preset name; unknown names are an error that lists the choices."""
  if preset not in PRESETS:
    raise ValueError(f"unknown sharding rules preset {preset!r}; choose from {sorted(PRESETS)}")
  return PRESETS[preset]
