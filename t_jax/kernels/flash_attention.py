"""Flash attention (FlashAttention-2: tiled, online softmax, log-sum-exp residual) under `jax.custom_vjp`.

Semantics match `xla_attention`: q [B, Sq, H, D], k/v [B, Sk, Hkv, D], a `t_jax.attention.Mask` (causal,
optionally prefix-LM, AND segment ids AND sliding window AND BigBird's `block_sparse` pattern; no
explicit positions), optional additive bias broadcastable to [B, H, Sq, Sk]; fully masked rows give 0
output and 0 gradients. With block_sparse the kernel blocks divide the BigBird block (chosen so by
default; on TPU the key blocks are >= 128, so its block must be a multiple of 128) and only the tiles
the rule allows are computed.

Backends: "triton" (GPU; also the formulation run in interpret mode on CPU) and "mosaic_tpu" (TPU).
Gradients flow to q, k, v and, when the bias is being differentiated (e.g. a learned T5 bias), to the
bias too: its gradient materialises the [B, H, Sq, Sk] f32 logits gradient, so it costs O(S^2) memory.
A bias that is not differentiated (ALiBi, constants) costs nothing extra.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Optional

import jax
import jax.numpy as jnp

from t_jax.attention.masks import Mask, check_shapes
from t_jax.kernels._blocks import Config

Array = jax.Array
BACKENDS = ("triton", "mosaic_tpu")
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 256


def _backend_module(backend: str) -> object:
  """t_jax.kernels._triton or ._mosaic_tpu, imported on first use."""
  return importlib.import_module(f"t_jax.kernels._{backend}")


def default_backend() -> str:
  """'mosaic_tpu' on TPU, else 'triton' (GPU, and interpret mode on CPU)."""
  return "mosaic_tpu" if jax.default_backend() == "tpu" else "triton"


def default_blocks(backend: str, head_dim: int) -> dict:
  """Default block sizes and Triton launch parameters (untuned guesses: no GPU/TPU was at hand)."""
  if backend == "mosaic_tpu":
    return dict(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128,
                num_warps=0, num_stages=0, num_warps_bwd=0)
  if head_dim <= 64:
    return dict(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64,
                num_warps=4, num_stages=3, num_warps_bwd=4)
  if head_dim <= 128:
    return dict(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64,
                num_warps=8, num_stages=2, num_warps_bwd=8)
  return dict(block_q=64, block_k=32, block_q_bwd=32, block_k_bwd=32,
              num_warps=8, num_stages=2, num_warps_bwd=8)


def _bias_shape(bias: Array, b: int, h: int, sq: int, sk: int) -> tuple[int, ...]:
  """The bias shape as 4-D [Bb, Hb, Sq', Sk'] (each 1 or full); raises if not broadcastable."""
  if bias.ndim > 4:
    raise ValueError(f"bias must have at most 4 dims, got shape {bias.shape}")
  shape = (1,) * (4 - bias.ndim) + tuple(bias.shape)
  for n, full in zip(shape, (b, h, sq, sk)):
    if n not in (1, full):
      raise ValueError(f"bias of shape {bias.shape} does not broadcast to [B, H, Sq, Sk] = {(b, h, sq, sk)}")
  return shape


def _check(q: Array, k: Array, v: Array, mask: Mask, bias: Optional[Array]) -> None:
  """Raises ValueError (bad arguments) or NotImplementedError (valid but unsupported by the kernels)."""
  check_shapes(q, k, v)
  mask.validate(q.shape, k.shape)
  if k.shape != v.shape:
    raise ValueError(f"the kernels need k and v of one shape; got {k.shape}, {v.shape}")
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
    raise NotImplementedError(f"flash attention needs q, k, v of one dtype among f32/bf16/f16; got "
                              f"{q.dtype}, {k.dtype}, {v.dtype}")
  if q.shape[3] > MAX_HEAD_DIM:
    raise NotImplementedError(f"head_dim {q.shape[3]} > {MAX_HEAD_DIM} is not supported")
  if mask.q_positions is not None or mask.kv_positions is not None:
    raise NotImplementedError("the Pallas kernels take no explicit positions (KV-cache decoding); "
                              "use implementation='xla' there")
  if bias is not None:
    _bias_shape(bias, q.shape[0], q.shape[2], q.shape[1], k.shape[1])


def supports(q: Array, k: Array, mask: Optional[Mask] = None, bias: Optional[Array] = None) -> bool:
  """Whether `flash_attention` covers this call, bias included (any backend; interpret mode on CPU)."""
  try:
    _check(q, k, k, Mask() if mask is None else mask, bias)
  except (ValueError, NotImplementedError):
    return False
  return True


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _pick_block(given: Optional[int], default: int, length: int, backend: str, interpret: bool,
                minor: bool, sparse: Optional[int]) -> int:
  """A block size: the default shrunk to the (rounded-up) length and to a divisor of the BigBird block
  `sparse` (if given), or the caller's, validated."""
  low = 128 if backend == "mosaic_tpu" and minor else 16
  if given is None:
    given = max(low, min(default, 1 << max(0, length - 1).bit_length()))
    if sparse is None:
      return given
    given = min(given, sparse & -sparse)  # the largest power of two dividing the BigBird block
  if given < 1 or given & (given - 1):
    raise ValueError(f"block sizes must be powers of two, got {given}")
  if sparse is not None and sparse % given:
    raise ValueError(f"with block_sparse, block sizes must divide the BigBird block {sparse}; got {given}")
  if not interpret and given < low:
    raise ValueError(f"the {backend} kernels need blocks >= {low}, got {given}"
                     + ("" if sparse is None else f" (a divisor of the BigBird block {sparse})"))
  return given


def flash_attention(q: Array, k: Array, v: Array, *, mask: Optional[Mask] = None,
                    bias: Optional[Array] = None, scale: Optional[float] = None,
                    block_q: Optional[int] = None, block_k: Optional[int] = None,
                    block_q_bwd: Optional[int] = None, block_k_bwd: Optional[int] = None,
                    num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                    backend: Optional[str] = None, interpret: Optional[bool] = None) -> Array:
  """Memory-efficient attention over [batch, seq, heads, head_dim]; see the module docstring.

  backend: "triton" or "mosaic_tpu" (default: from jax.default_backend()). interpret: run the Pallas
  kernels in interpret mode (default: True on CPU). Block sizes must be powers of two; sequences are
  padded internally to block multiples (one copy, only when not already a multiple).
  """
  mask = Mask() if mask is None else mask
  _check(q, k, v, mask, bias)
  backend = default_backend() if backend is None else backend
  if backend not in BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
  interpret = jax.default_backend() == "cpu" if interpret is None else interpret
  b, sq, h, d = q.shape
  sk, hkv = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
  dflt = default_blocks(backend, d)
  pick = functools.partial(_pick_block, backend=backend, interpret=interpret,
                           sparse=None if mask.block_sparse is None else mask.block_sparse.block)
  blk = dict(block_q=pick(block_q, dflt["block_q"], sq, minor=False),
             block_k=pick(block_k, dflt["block_k"], sk, minor=True),
             block_q_bwd=pick(block_q_bwd, dflt["block_q_bwd"], sq, minor=False),
             block_k_bwd=pick(block_k_bwd, dflt["block_k_bwd"], sk, minor=True))
  sq_pad = _round_up(sq, max(blk["block_q"], blk["block_q_bwd"]))
  sk_pad = _round_up(sk, max(blk["block_k"], blk["block_k_bwd"]))
  # Triton tiles need power-of-two head dims >= 16: zero columns change neither logits nor outputs.
  d_pad = max(16, 1 << (d - 1).bit_length()) if backend == "triton" else d

  bias_shape = None if bias is None else _bias_shape(bias, b, h, sq, sk)
  cfg = Config(
      backend=backend, interpret=interpret, causal=mask.causal,
      window=None if mask.window is None else int(mask.window), has_prefix=mask.prefix_len is not None,
      has_segments=mask.q_segment_ids is not None, has_bias=bias is not None,
      bias_batch=bias_shape is not None and bias_shape[0] > 1,
      bias_heads=bias_shape is not None and bias_shape[1] > 1,
      q_len=sq, kv_len=sk, q_len_padded=sq_pad, kv_len_padded=sk_pad, num_heads=h, num_kv_heads=hkv, scale=scale,
      num_warps=num_warps or dflt["num_warps"], num_stages=num_stages or dflt["num_stages"],
      num_warps_bwd=num_warps or dflt["num_warps_bwd"], exact_f32=q.dtype == jnp.float32,
      block_sparse=mask.block_sparse, **blk)

  pad4 = lambda x, s, dd: jnp.pad(x, ((0, 0), (0, s - x.shape[1]), (0, 0), (0, dd - x.shape[3])))
  qp, kp, vp = pad4(q, sq_pad, d_pad), pad4(k, sk_pad, d_pad), pad4(v, sk_pad, d_pad)
  if bias is not None:
    bias = jnp.broadcast_to(bias.reshape(bias_shape), bias_shape[:2] + (sq, sk))
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, sq_pad - sq), (0, sk_pad - sk)))
  pad_ids = lambda x, n, c: jnp.pad(x.astype(jnp.int32), ((0, 0), (0, n - x.shape[1])), constant_values=c)
  if mask.q_segment_ids is not None:  # padding rows/cols get ids that match nothing real
    mask = mask.replace(q_segment_ids=pad_ids(mask.q_segment_ids, sq_pad, -1),
                        kv_segment_ids=pad_ids(mask.kv_segment_ids, sk_pad, -2))
  if mask.prefix_len is not None:
    mask = mask.replace(prefix_len=jnp.broadcast_to(jnp.asarray(mask.prefix_len, jnp.int32), (b,)))
  return _flash(cfg, qp, kp, vp, bias, mask)[:, :sq, :, :d]


def _aux(mask: Mask) -> tuple:
  return mask.q_segment_ids, mask.kv_segment_ids, mask.prefix_len


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: Config, q: Array, k: Array, v: Array, bias: Optional[Array], mask: Mask) -> Array:
  return _backend_module(cfg.backend).forward(cfg, q, k, v, bias, *_aux(mask))[0]


def _flash_fwd(cfg: Config, q: object, k: object, v: object, bias: object, mask: Mask) -> tuple:
  # symbolic_zeros=True: arguments (each leaf of the mask too) arrive as CustomVJPPrimal(value, perturbed).
  need_dbias = bias is not None and bool(bias.perturbed)
  q, k, v = q.value, k.value, v.value
  bias = None if bias is None else bias.value
  aux = _aux(jax.tree.map(lambda a: a.value, mask))
  o, lse = _backend_module(cfg.backend).forward(cfg, q, k, v, bias, *aux)
  return o, (q, k, v, bias, aux, o, lse, need_dbias)


def _flash_bwd(cfg: Config, res: tuple, do: object) -> tuple:
  q, k, v, bias, aux, o, lse, need_dbias = res
  if isinstance(do, jax.custom_derivatives.SymbolicZero):
    do = jnp.zeros(o.shape, o.dtype)
  dq, dk, dv, dlogits = _backend_module(cfg.backend).backward(
      cfg, q, k, v, bias, *aux, o, lse, do.astype(o.dtype), need_dbias)
  dbias = None
  if need_dbias:  # reduce the logits gradient over the bias' broadcast dims
    axes = tuple(a for a, full in ((0, cfg.bias_batch), (1, cfg.bias_heads)) if not full)
    dbias = jnp.sum(dlogits, axis=axes, keepdims=True).astype(bias.dtype)
  return dq, dk, dv, dbias, None


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)
