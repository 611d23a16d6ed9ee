"""Logical-axis rules: the one place where model axis names meet mesh axes.

Rules are ordered (logical, mesh) pairs. For each array, flax walks the rules in order and gives
a dimension the rule's mesh axes when that dimension is still unassigned and those mesh axes are
still free in the array; a later rule for the same name is a fallback. So in activations `batch`
(listed first) takes data+fsdp and `embed` stays replicated, while parameters (no batch axis) get
`embed` sharded over fsdp (ZeRO-3). Unlisted names (`head_dim`, `layers`, ...) are replicated.

Model axis names (t_jax.models): parameters use vocab, embed, heads, kv, head_dim, mlp, layers,
position, relpos_buckets, token_types, embed_out; activations use batch, length, embed, heads,
head_dim, mlp, vocab.

  data_parallel  params replicated; batch over data (and fsdp, size 1 unless set).
  fsdp           ZeRO-3: every parameter split over fsdp (x sequence) on its embed dim, or on
                 another dim for parameters without one; grads and optimizer state follow the
                 parameters, so each device holds ~1/n of them. Gathered per use by GSPMD.
  tensor         Megatron: query/key/value and wi/wi_0/wi_1 column-split (heads, kv, mlp over
                 tensor), out and wo row-split (their input dim heads / mlp over tensor), vocab
                 (embedding table, logits) over tensor. Activations between blocks replicated.
  fsdp_tensor    both: tensor splits first, then the remaining dims over fsdp.

Every preset maps `length` to the `sequence` mesh axis (sequence-parallel activations); the fsdp
presets also shard parameters over `sequence`, so a sequence axis never replicates them.
"""

from __future__ import annotations

PARAM_FSDP = ("fsdp", "sequence")  # mesh axes that split parameters in the ZeRO-3 presets

BATCH = (("batch", ("data", "fsdp")), ("length", "sequence"))
TENSOR = (("heads", "tensor"), ("kv", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
# `embed` first; the rest are fallbacks for parameters without an embed dim (biases, the T5
# bucket table) or whose embed dim does not divide (see Partitioner). Activations never reach
# them: `batch`, listed earlier, has already taken fsdp.
FSDP = tuple((name, PARAM_FSDP) for name in (
    "embed", "embed_out", "mlp", "vocab", "heads", "kv", "head_dim", "position", "relpos_buckets"))

PRESETS: dict[str, tuple] = {
    "data_parallel": BATCH,
    "fsdp": BATCH + FSDP,
    "tensor": BATCH + TENSOR,
    "fsdp_tensor": BATCH + TENSOR + FSDP,
}


def rules_for(preset: str) -> tuple:
  """The rule tuple of a preset name; unknown names are an error that lists the choices."""
  if preset not in PRESETS:
    raise ValueError(f"unknown sharding rules preset {preset!r}; choose from {sorted(PRESETS)}")
  return PRESETS[preset]
