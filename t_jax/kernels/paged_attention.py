"""Paged decode attention: one query per sequence over its pages, read through the page table (Pallas).

Semantics: q [B, H, D] (the query of each row's newest position), k_pages / v_pages [P, S, Hkv, D] (one
layer's page pool, t_jax.inference.paged), page_table [B, M] (physical page of each row's logical page j,
which holds positions j*S .. j*S+S-1; -1 = unmapped) and lengths [B]: row b attends to its positions
[max(0, len - window), len) (len = query position + 1; 0 = an idle row, output 0). GQA: query head h reads
kv head h // (H // Hkv). Returns [B, H, D]. The XLA path in t_jax.models.kv_cache (gather the row's pages
into one contiguous view, then masked attention) is the oracle (tests/test_paged.py).

Structure (after JAX's TPU paged-attention kernel, jax.experimental.pallas.ops.tpu.paged_attention, which
is not vendored): grid (row, logical page), the page axis "arbitrary"; lengths and the flattened page table
are scalar-prefetched, and the k/v index maps look the physical page up in the table, so the pipeline
fetches exactly the row's pages (no gather copy, no [B, M*S] view). Pages past the row's length or
before its window are skipped: their index maps are clamped onto a visited page, so no new DMA is issued.
An online softmax (f32 running max / sum / accumulator in VMEM scratch) runs across the pages. Each page
is read as a 2-D [S*Hkv, D] tile (a free reshape of the pool): logits for all query heads against all
(slot, kv head) rows in one matmul, with a constant group mask keeping each query head on its kv head,
so the kernel needs only 2-D dots (it computes Hkv x the logits it needs: decode attention is bound by
reading the pages, not by these flops).

Verified: interpret mode on CPU against the XLA gather path, and compilation for a TPU v5e with libtpu's
ahead-of-time compiler (tests/test_paged.py); never run or timed on a TPU, so no device kind picks it by
default (VERIFIED_PAGED_PALLAS is empty): select it with ModelConfig.paged_attention_impl='pallas'.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from t_jax.kernels._blocks import online_softmax_step

Array = jax.Array
_F32 = jnp.float32

# Device kinds where paged_attention_impl='auto' picks this kernel, each with the committed benchmark that
# admitted it (ran, matched the gather path, and was faster). Empty: it has never run on a GPU or a TPU.
VERIFIED_PAGED_PALLAS: dict[str, str] = {}


def use_pallas(impl: str) -> bool:
  """Whether a paged decode step with implementation `impl` ('auto' | 'xla' | 'pallas') runs this kernel."""
  if impl == "auto":
    return jax.default_backend() in ("gpu", "tpu") and jax.devices()[0].device_kind in VERIFIED_PAGED_PALLAS
  return impl == "pallas"


def _check(q: Array, k_pages: Array, v_pages: Array, page_table: Array, lengths: Array,
           window: Optional[int]) -> None:
  if q.ndim != 3 or k_pages.ndim != 4:
    raise ValueError(f"expected q [B, H, D] and pages [P, S, Hkv, D], got {q.shape} and {k_pages.shape}")
  if k_pages.shape != v_pages.shape:
    raise ValueError(f"k_pages and v_pages differ: {k_pages.shape} vs {v_pages.shape}")
  (b, h, d), hkv = q.shape, k_pages.shape[2]
  if k_pages.shape[3] != d or h % hkv:
    raise ValueError(f"q {q.shape} does not fit pages {k_pages.shape} (head_dim, or heads % kv_heads)")
  if page_table.ndim != 2 or page_table.shape[0] != b or lengths.shape != (b,):
    raise ValueError(f"page_table must be [B={b}, max_pages] and lengths [B], got {page_table.shape}, "
                     f"{lengths.shape}")
  if window is not None and (not isinstance(window, (int, np.integer)) or window < 1):
    raise ValueError(f"window must be a static int >= 1, got {window!r}")


def _page_range(length: Array, page_size: int, max_pages: int, window: Optional[int]) -> tuple[Array, Array]:
  """(first, last) logical pages holding a visible position (first > last: none, len 0)."""
  last = jnp.minimum(lax.div(length + (page_size - 1), jnp.int32(page_size)), max_pages) - 1
  if window is None:
    return jnp.int32(0), last
  return lax.div(jnp.maximum(length - window, 0), jnp.int32(page_size)), last


def _constants(h: int, hkv: int, page_size: int) -> tuple[np.ndarray, np.ndarray]:
  """slot [1, S*Hkv] (position within the page of each tile row) and mine [H, S*Hkv] (1 where query head
  h reads that tile row's kv head)."""
  rows = np.arange(page_size * hkv)
  slot = (rows // hkv).astype(np.int32)[None]
  mine = ((rows % hkv)[None] == (np.arange(h) // (h // hkv))[:, None]).astype(np.int32)
  return slot, mine


def _kernel(lens_ref: object, table_ref: object, q_ref: object, k_ref: object, v_ref: object,
            slot_ref: object, mine_ref: object, o_ref: object, m_sc: object, l_sc: object, acc_sc: object, *,
            page_size: int, max_pages: int, window: Optional[int], scale: float, exact: bool) -> None:
  b, i = pl.program_id(0), pl.program_id(1)
  length = lens_ref[b]
  first, last = _page_range(length, page_size, max_pages, window)
  prec = lax.Precision.HIGHEST if exact else None
  dot = lambda a, c, ca, cc: lax.dot_general(a, c, (((ca,), (cc,)), ((), ())), precision=prec,
                                             preferred_element_type=_F32)

  @pl.when(i == 0)
  def _init() -> None:
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, _F32)
    l_sc[...] = jnp.zeros(l_sc.shape, _F32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

  @pl.when((i >= first) & (i <= last) & (table_ref[b * max_pages + i] >= 0))
  def _compute() -> None:
    s = dot(q_ref[...], k_ref[...], 1, 1) * scale  # [H, S*Hkv]
    pos = i * page_size + slot_ref[...]  # [1, S*Hkv]
    ok = (mine_ref[...] != 0) & (pos < length)
    if window is not None:
      ok = ok & (pos >= length - window)
    s = jnp.where(ok, s, -jnp.inf)
    online_softmax_step(s, v_ref[...], m_sc, l_sc, acc_sc, dot)

  @pl.when(i == max_pages - 1)
  def _finish() -> None:
    den = l_sc[...]
    o_ref[...] = (acc_sc[...] / jnp.where(den == 0.0, 1.0, den)).astype(o_ref.dtype)


def paged_attention(q: Array, k_pages: Array, v_pages: Array, page_table: Array, lengths: Array, *,
                    scale: Optional[float] = None, window: Optional[int] = None,
                    interpret: Optional[bool] = None) -> Array:
  """Decode attention [B, H, D] over paged keys/values; see the module docstring.

  interpret: run in Pallas interpret mode (default: on CPU). Compiled, it is a Mosaic (TPU) kernel.
  """
  _check(q, k_pages, v_pages, page_table, lengths, window)
  interpret = jax.default_backend() == "cpu" if interpret is None else interpret
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
  return _paged(q, k_pages, v_pages, page_table.astype(jnp.int32), lengths.astype(jnp.int32),
                scale=scale, window=None if window is None else int(window), interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=("scale", "window", "interpret"))
def _paged(q: Array, k_pages: Array, v_pages: Array, table: Array, lengths: Array, *, scale: float,
           window: Optional[int], interpret: bool) -> Array:
  (b, h, d), (num_pages, size, hkv, _) = q.shape, k_pages.shape
  max_pages = table.shape[1]
  slot, mine = _constants(h, hkv, size)
  flat = lambda pages: pages.reshape(num_pages, size * hkv, d)  # free: the pool is row-major

  def page(bb: Array, i: Array, lens: Array, tbl: Array) -> tuple:
    first, last = _page_range(lens[bb], size, max_pages, window)
    j = jnp.minimum(jnp.maximum(i, first), jnp.maximum(last, first))  # skipped steps re-use a page
    j = jnp.minimum(j, max_pages - 1)
    return jnp.maximum(tbl[bb * max_pages + j], 0), 0, 0

  row = pl.BlockSpec((None, h, d), lambda bb, i, *_: (bb, 0, 0))
  kv = pl.BlockSpec((None, size * hkv, d), page)
  const = lambda x: pl.BlockSpec(x.shape, lambda *_: (0, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, max_pages), in_specs=[row, kv, kv, const(slot), const(mine)],
      out_specs=row, scratch_shapes=[pltpu.VMEM((h, 1), _F32), pltpu.VMEM((h, 1), _F32),
                                     pltpu.VMEM((h, d), _F32)])
  kernel = functools.partial(_kernel, page_size=size, max_pages=max_pages, window=window, scale=scale,
                             exact=q.dtype == jnp.float32)
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((b, h, d), q.dtype), interpret=interpret,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      name="paged_attention",
  )(lengths, table.reshape(-1), q, flat(k_pages), flat(v_pages), jnp.asarray(slot),
    jnp.asarray(mine))

