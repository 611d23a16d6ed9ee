"""The attention kinds (`ModelConfig.attention_kind`, `t_jax.attention(..., kind=)`) and their knobs.

  softmax    scaled dot-product attention (XLA, Pallas or cuDNN)
  bigbird    a `BlockSparse` rule in the Mask: gathered key blocks (bigbird.py), the Pallas flash kernel's visit
             table (implementation='pallas'), or densely by `t_jax.attention` (with a bias, dropout or explicit
             positions; the dense XLA form is the oracle)
  performer  FAVOR+ positive orthogonal random features (linear.py)
  rfa        random Fourier features (linear.py)
  lsh        Reformer shared-QK LSH attention (lsh.py; the caller passes k = q)
  aft        attention-free transformer, AFT-local (aft.py; a learned [heads, 2 window - 1] bias)
Random draws (features, hash rotations) come from PRNGKey(seed), or from `rng` (a fresh draw per training
step when the config asks to redraw). performer/rfa carry a recurrent decoding state instead of a KV cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

from t_jax.attention.aft import aft_attention
from t_jax.attention.linear import draw_features, linear_attention
from t_jax.attention.lsh import draw_rotations, lsh_attention
from t_jax.attention.masks import BlockSparse, Mask

Array = jax.Array
KINDS = ("softmax", "performer", "rfa", "bigbird", "lsh", "aft")
LINEAR = ("performer", "rfa")


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything static about one attention kind (ModelConfig's attention_* fields)."""

  kind: str = "softmax"
  features: int = 64
  rfa_sigma: float = 2.0
  seed: int = 0
  chunk: int = 64
  sparse_block: int = 64
  window_blocks: int = 3
  global_blocks: int = 1
  random_blocks: int = 2
  num_hashes: int = 2
  num_buckets: int = 8
  aft_window: int = 0

  @classmethod
  def of(cls, cfg: Any) -> Spec:
    """From a config with `attention_<field>` attributes (ModelConfig)."""
    return cls(**{f.name: getattr(cfg, f"attention_{f.name}") for f in dataclasses.fields(cls)})

  @property
  def recurrent(self) -> bool:
    """Whether decoding keeps a recurrent state instead of a KV cache."""
    return self.kind in LINEAR

  @property
  def block_sparse(self) -> Optional[BlockSparse]:
    """BigBird's Mask rule."""
    if self.kind != "bigbird":
      return None
    return BlockSparse(self.sparse_block, self.window_blocks, self.global_blocks, self.random_blocks, self.seed)

  def num_features(self) -> int:
    """Feature dimension of the recurrent state."""
    return 2 * self.features if self.kind == "rfa" else self.features

  def draws(self, head_dim: int, rng: Optional[Array] = None) -> Optional[Array]:
    """Feature projection (performer/rfa), hash rotations (lsh), else None."""
    key = jax.random.PRNGKey(self.seed) if rng is None else rng
    if self.kind in LINEAR:
      return draw_features(key, self.kind, self.features, head_dim, self.rfa_sigma)
    if self.kind == "lsh":
      return draw_rotations(key, head_dim, self.num_hashes, self.num_buckets)
    return None


def other_kind(q: Array, k: Array, v: Array, spec: Spec, mask: Mask, bias: Optional[Array], scale: float,
               rng: Optional[Array], aft_bias: Optional[Array], state: Optional[tuple[Array, Array]]
               ) -> tuple[Array, Optional[tuple[Array, Array]]]:
  """performer / rfa / lsh / aft for `t_jax.attention` (mask validated there): (out, recurrent state or None)."""
  if bias is not None or mask.window is not None:
    raise ValueError(f"attention kind {spec.kind!r} takes no additive bias and no sliding window")
  if spec.kind in LINEAR:
    return linear_attention(q, k, v, mask=mask, kind=spec.kind, w=spec.draws(q.shape[-1], rng), scale=scale,
                            chunk=spec.chunk, state=state)
  if spec.kind == "lsh":
    return lsh_attention(q, k, v, mask=mask, scale=scale, rotations=spec.draws(q.shape[-1], rng),
                         chunk=spec.chunk), None
  return aft_attention(q, k, v, mask=mask, bias=aft_bias, chunk=spec.chunk), None


def state_shapes(spec: Spec, batch: int, heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
  """Shapes of the recurrent decoding state: sum phi(k) v^T and sum phi(k), per head."""
  f = spec.num_features()
  return {"lin_s": (batch, heads, f, head_dim), "lin_z": (batch, heads, f)}
