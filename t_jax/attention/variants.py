"""The sibling entry point for attention kinds beyond softmax (`ModelConfig.attention_kind`).

  softmax    `t_jax.attention` as it is
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
import math
from typing import Any, Optional

import jax

from t_jax.attention import bigbird
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


def attention(q: Array, k: Array, v: Array, *, spec: Spec, mask: Mask, bias: Optional[Array] = None,
              scale: Optional[float] = None, rng: Optional[Array] = None, aft_bias: Optional[Array] = None,
              state: Optional[tuple[Array, Array]] = None, **softmax_kw: Any
              ) -> tuple[Array, Optional[tuple[Array, Array]]]:
  """Attention of the given kind: (out [batch, q, heads, head_dim], recurrent state or None).

  softmax_kw (implementation, kernel_options, dropout_rate, dropout_rng) go to `t_jax.attention` for the
  softmax and bigbird kinds. `state` continues a causal performer/rfa sequence (decoding).
  """
  from t_jax.attention.api import attention as softmax_attention
  if spec.kind not in KINDS:
    raise ValueError(f"unknown attention kind {spec.kind!r}; choose from {KINDS}")
  if spec.kind in ("softmax", "bigbird"):
    mask = mask.replace(block_sparse=spec.block_sparse)
    if (spec.kind == "bigbird" and bias is None and not softmax_kw.get("dropout_rate")
        and softmax_kw.get("implementation", "auto") in ("auto", "xla") and bigbird.supported(q, k, mask)):
      scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
      return bigbird.bigbird_attention(q, k, v, mask=mask.validate(q.shape, k.shape), scale=scale), None
    return softmax_attention(q, k, v, mask=mask, bias=bias, scale=scale, **softmax_kw), None
  if bias is not None or mask.window is not None:
    raise ValueError(f"attention kind {spec.kind!r} takes no additive bias and no sliding window")
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
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
