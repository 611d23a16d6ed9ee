"""FlashAttention-2 kernels for Pallas Mosaic TPU: the kv (or q) loop is the last, "arbitrary" grid axis.

Tensors are transposed to [batch, heads, seq, head_dim] so each tile is a plain 2-D VMEM block; the
online-softmax state lives in VMEM scratch across the reduction axis. Skipped (fully masked) steps do
no compute, and their index maps are clamped into the visited range so the pipeline issues no new DMA
(the grid step itself remains). GQA: index maps read kv head h // group (`idiv`); the dk/dv kernel's
reduction axis walks (query head of the group, q block), so k/v are never repeated. BigBird
(`Mask.block_sparse`): a scalar-prefetched table (`_fetch_table`) names the block each step fetches: its
own when the rule visits it, else the last visited one, so skipped steps issue no DMA.

Verified: interpret mode on CPU (every mask kind) and lowering to Mosaic MLIR (`lowering_platforms=("tpu",)`);
not yet Mosaic compilation (which enforces the block/layout rules) or speed on a TPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from t_jax.kernels._blocks import (
  Config,
  block_mask,
  idiv,
  kv_range,
  online_softmax_step,
  q_range,
  segment_block_bounds,
  sparse_blocks,
)

Array = jax.Array
_F32 = jnp.float32
_COMPILER_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _unpack(cfg: Config, refs: tuple) -> tuple:
  """(q, k, v, bias, q_seg, kv_seg, rest...) with None for absent inputs."""
  it = iter(refs)
  q, k, v = next(it), next(it), next(it)
  bias = next(it) if cfg.has_bias else None
  q_seg, kv_seg = (next(it), next(it)) if cfg.has_segments else (None, None)
  return (q, k, v, bias, q_seg, kv_seg, *it)


def _tile_mask(cfg: Config, qi: Array, kj: Array, bq: int, bk: int, qseg_ref: object, kseg_ref: object,
               prefix: Optional[Array]) -> Array:
  q_pos = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  kv_pos = kj * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  q_seg = qseg_ref[...] if qseg_ref is not None else None       # [bq, 1]
  kv_seg = kseg_ref[...] if kseg_ref is not None else None      # [1, bk]
  return block_mask(cfg, q_pos, kv_pos, q_seg, kv_seg, prefix)


def _when_visited(cfg: Config, step: Array, bounds: Callable, entry: Optional[Array], compute: Callable) -> None:
  """Runs compute(masked) when `step` is in [lo, hi) of bounds(); the mask only outside [full_lo, full_hi).
  BigBird: when the step's fetch-table `entry` is the step itself (visited)."""
  if cfg.block_sparse is not None:
    pl.when(entry == step)(lambda: compute(cfg.any_mask))
    return
  lo, flo, fhi, hi = bounds()
  visited = (step >= lo) & (step < hi)
  if not cfg.any_mask:
    pl.when(visited)(lambda: compute(False))
    return
  visible = (step >= flo) & (step < fhi)
  pl.when(visited & visible)(lambda: compute(False))
  pl.when(visited & jnp.logical_not(visible))(lambda: compute(True))


def _clamped(step: Array, bounds: tuple) -> Array:
  """The block index to fetch at `step`: clamped into [lo, hi) so skipped steps re-use a block."""
  lo, hi = bounds[0], bounds[3]
  return jnp.minimum(jnp.maximum(step, lo), jnp.maximum(hi - 1, lo))


def _entry(cfg: Config, step: Array, fetch_ref: object, b: Array, row: Array, rows: int, steps: int
           ) -> Optional[Array]:
  """BigBird's `_fetch_table` entry for `step` of row block `row` (None without block_sparse)."""
  return fetch_ref[(b * rows + row) * steps + step] if cfg.block_sparse is not None else None


def _fetch(cfg: Config, step: Array, bounds: Callable, fetch_ref: object, b: Array, row: Array, rows: int,
           steps: int) -> Array:
  """The block fetched at `step` of row block `row`: from BigBird's table, else clamped into bounds()."""
  if cfg.block_sparse is None:
    return _clamped(step, bounds())
  return lax.rem(_entry(cfg, step, fetch_ref, b, row, rows, steps), jnp.int32(steps))


def _fetch_table(cfg: Config, batch: int, prefix: Optional[Array], q_seg: Optional[Array],
                 kv_seg: Optional[Array], bq: int, bk: int, by_kv: bool) -> Array:
  """Flat int32 [B * rows * steps]: the step itself where the rule visits it, else steps + the block to
  fetch (the last visited, or the first if none yet)."""
  if cfg.block_sparse is None:
    return jnp.zeros((1,), jnp.int32)
  visit = sparse_blocks(cfg, batch, bq, bk, prefix, segment_block_bounds(cfg, q_seg, kv_seg, bq, bk))
  visit = jnp.swapaxes(visit, 1, 2) if by_kv else visit
  n = visit.shape[-1]
  step = jnp.arange(n, dtype=jnp.int32)
  last = lax.cummax(jnp.where(visit, step, -1), axis=2)
  first = jnp.argmax(visit, axis=-1).astype(jnp.int32)[..., None]
  return jnp.where(visit, step, n + jnp.where(last >= 0, last, first)).reshape(-1)


def _prefix(cfg: Config, prefix_ref: object, b: Array) -> Optional[Array]:
  return prefix_ref[b] if cfg.has_prefix else None


def _seg(cfg: Config, seg_ref: object, b: Array, i: Array, n: int) -> Optional[tuple]:
  """Segment block bounds of block i of batch row b, from the flat scalar-prefetched [B * n * 4] array."""
  if not cfg.has_segments:
    return None
  base = (b * n + i) * 4
  return tuple(seg_ref[base + c] for c in range(4))


def _bounds(cfg: Config, bq: int, bk: int, by_kv: bool = False) -> Callable:
  """(q block, batch, prefix ref, seg ref) -> kv_range, or with by_kv (kv block, ...) -> q_range: usable in
  index maps and kernels alike."""
  if by_kv:
    nk = cfg.kv_len_padded // bk
    return lambda j, b, p, s: q_range(cfg, j, bq, bk, _prefix(cfg, p, b), _seg(cfg, s, b, j, nk))
  nq = cfg.q_len_padded // bq
  return lambda i, b, p, s: kv_range(cfg, i, bq, bk, _prefix(cfg, p, b), _seg(cfg, s, b, i, nq))


def _scalar_args(cfg: Config, prefix: Optional[Array], batch: int, q_seg: Optional[Array],
                 kv_seg: Optional[Array], bq: int, bk: int, by_kv: bool = False) -> tuple[Array, Array, Array]:
  """Scalar-prefetched prefix lengths [B], flat segment bounds [B * n_blocks * 4] and BigBird's fetch table
  (`_fetch_table`; dummies if absent)."""
  fetch = _fetch_table(cfg, batch, prefix, q_seg, kv_seg, bq, bk, by_kv)
  prefix = prefix if cfg.has_prefix else jnp.zeros((batch,), jnp.int32)
  bounds = segment_block_bounds(cfg, q_seg, kv_seg, bq, bk, by_kv)
  return prefix, jnp.zeros((4,), jnp.int32) if bounds is None else bounds.reshape(-1), fetch


def _to_bhsd(x: Array) -> Array:
  return jnp.swapaxes(x, 1, 2)


def _aux_args(cfg: Config, bias: Optional[Array], q_seg: Optional[Array], kv_seg: Optional[Array]) -> list:
  args = [bias] if cfg.has_bias else []
  return args + ([q_seg[:, :, None], kv_seg[:, None, :]] if cfg.has_segments else [])


def _q_grid_specs(cfg: Config, bq: int, bk: int, d: int) -> tuple[list, pl.BlockSpec, pl.BlockSpec]:
  """On a (batch, head, q block, kv block) grid: in-specs of q, k, v (+ bias, segment ids), the spec of a
  [bq, d] q-block tile and of a [bq, 1] row tile; kv blocks are clamped into the visited range."""
  kvr, g, nq, nk = _bounds(cfg, bq, bk), cfg.group, cfg.q_len_padded // bq, cfg.kv_len_padded // bk
  kblk = lambda bb, i, j, p, s, f: _fetch(cfg, j, lambda: kvr(i, bb, p, s), f, bb, i, nq, nk)
  q_spec = pl.BlockSpec((None, None, bq, d), lambda bb, hh, i, j, *r: (bb, hh, i, 0))
  kv = pl.BlockSpec((None, None, bk, d), lambda bb, hh, i, j, *r: (bb, idiv(hh, g), kblk(bb, i, j, *r), 0))
  specs = [q_spec, kv, kv]
  if cfg.has_bias:
    specs.append(pl.BlockSpec((None, None, bq, bk), lambda bb, hh, i, j, *r: (
        *cfg.bias_index(bb, hh), i, kblk(bb, i, j, *r))))
  if cfg.has_segments:
    specs += [pl.BlockSpec((None, bq, 1), lambda bb, hh, i, j, *r: (bb, i, 0)),
              pl.BlockSpec((None, 1, bk), lambda bb, hh, i, j, *r: (bb, 0, kblk(bb, i, j, *r)))]
  return specs, q_spec, pl.BlockSpec((None, None, bq, 1), lambda bb, hh, i, j, *r: (bb, hh, i, 0))


def _query_row(cfg: Config, bq: int, bk: int, prefix_ref: object, seg_ref: object, fetch_ref: object
               ) -> tuple[Array, Array, Optional[Array], Callable, Optional[Array]]:
  """(q block, k block, prefix, its key-block bounds, visit-table entry) of a program over one query row."""
  b, qi, kj = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  bounds = lambda: _bounds(cfg, bq, bk)(qi, b, prefix_ref, seg_ref)
  entry = _entry(cfg, kj, fetch_ref, b, qi, cfg.q_len_padded // bq, cfg.kv_len_padded // bk)
  return qi, kj, _prefix(cfg, prefix_ref, b), bounds, entry


# ----------------------------------------------------------------------------------------- forward


def _fwd_kernel(cfg: Config, prefix_ref: object, seg_ref: object, fetch_ref: object, *refs: object) -> None:
  (q_ref, k_ref, v_ref, bias_ref, qseg_ref, kseg_ref, o_ref, lse_ref,
   m_sc, l_sc, acc_sc) = _unpack(cfg, refs)
  bq, bk = cfg.block_q, cfg.block_k
  qi, kj, prefix, bounds, entry = _query_row(cfg, bq, bk, prefix_ref, seg_ref, fetch_ref)

  @pl.when(kj == 0)
  def _init() -> None:
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, _F32)
    l_sc[...] = jnp.zeros(l_sc.shape, _F32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

  def compute(masked: bool) -> None:
    s = cfg.dot(q_ref[...], k_ref[...], 1, 1) * cfg.scale
    if bias_ref is not None:
      s = s + bias_ref[...].astype(_F32)
    if masked:
      s = jnp.where(_tile_mask(cfg, qi, kj, bq, bk, qseg_ref, kseg_ref, prefix), s, -jnp.inf)
    online_softmax_step(s, v_ref[...], m_sc, l_sc, acc_sc, cfg.dot)

  _when_visited(cfg, kj, bounds, entry, compute)

  @pl.when(kj == pl.num_programs(3) - 1)
  def _finish() -> None:
    den = l_sc[...]
    empty = den == 0.0
    o_ref[...] = (acc_sc[...] / jnp.where(empty, 1.0, den)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m_sc[...] + jnp.log(jnp.where(empty, 1.0, den)))


def forward(cfg: Config, q: Array, k: Array, v: Array, bias: Optional[Array], q_seg: Optional[Array],
            kv_seg: Optional[Array], prefix: Optional[Array]) -> tuple[Array, Array]:
  """Output [B, Sq, H, D] and log-sum-exp [B, H, Sq, 1] (f32; +inf on fully masked rows)."""
  b, sq, h, d = q.shape
  sk, bq, bk = k.shape[1], cfg.block_q, cfg.block_k
  in_specs, q_spec, row_spec = _q_grid_specs(cfg, bq, bk, d)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(b, h, sq // bq, sk // bk), in_specs=in_specs, out_specs=[q_spec, row_spec],
      scratch_shapes=[pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, d), _F32)])
  o, lse = pl.pallas_call(
      lambda *refs: _fwd_kernel(cfg, *refs), grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, h, sq, d), q.dtype), jax.ShapeDtypeStruct((b, h, sq, 1), _F32)],
      interpret=cfg.interpret, compiler_params=_COMPILER_PARAMS, name="flash_attention_fwd",
  )(*_scalar_args(cfg, prefix, b, q_seg, kv_seg, bq, bk), _to_bhsd(q), _to_bhsd(k), _to_bhsd(v),
    *_aux_args(cfg, bias, q_seg, kv_seg))
  return _to_bhsd(o), lse


# ---------------------------------------------------------------------------------------- backward


def _dkdv_kernel(cfg: Config, prefix_ref: object, seg_ref: object, fetch_ref: object, *refs: object) -> None:
  (q_ref, k_ref, v_ref, bias_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref,
   dk_ref, dv_ref, dk_sc, dv_sc) = _unpack(cfg, refs)
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  nq = cfg.q_len_padded // bq
  b, kj, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  qi = lax.rem(t, jnp.int32(nq))
  prefix = _prefix(cfg, prefix_ref, b)
  bounds = lambda: _bounds(cfg, bq, bk, by_kv=True)(kj, b, prefix_ref, seg_ref)
  entry = _entry(cfg, qi, fetch_ref, b, kj, cfg.kv_len_padded // bk, nq)

  @pl.when(t == 0)
  def _init() -> None:
    dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

  def compute(masked: bool) -> None:
    mask = _tile_mask(cfg, qi, kj, bq, bk, qseg_ref, kseg_ref, prefix) if masked else None
    bias = bias_ref[...] if bias_ref is not None else None
    q, do = q_ref[...], do_ref[...]
    p, ds = cfg.probs_and_ds(q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], bias, mask)
    dv_sc[...] += cfg.dot(p.astype(do.dtype), do, 0, 0)
    dk_sc[...] += cfg.dot(ds.astype(q.dtype), q, 0, 0)

  _when_visited(cfg, qi, bounds, entry, compute)

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish() -> None:
    dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(cfg: Config, need_dbias: bool, prefix_ref: object, seg_ref: object, fetch_ref: object,
               *refs: object) -> None:
  (q_ref, k_ref, v_ref, bias_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref,
   dq_ref, *rest) = _unpack(cfg, refs)
  dbias_ref, dq_sc = (rest[0], rest[1]) if need_dbias else (None, rest[0])
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  qi, kj, prefix, bounds, entry = _query_row(cfg, bq, bk, prefix_ref, seg_ref, fetch_ref)

  @pl.when(kj == 0)
  def _init() -> None:
    dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

  if dbias_ref is not None:  # overwritten below on visited tiles
    dbias_ref[...] = jnp.zeros(dbias_ref.shape, _F32)

  def compute(masked: bool) -> None:
    mask = _tile_mask(cfg, qi, kj, bq, bk, qseg_ref, kseg_ref, prefix) if masked else None
    bias = bias_ref[...] if bias_ref is not None else None
    k = k_ref[...]
    _, ds = cfg.probs_and_ds(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], bias, mask)
    if dbias_ref is not None:
      dbias_ref[...] = ds
    dq_sc[...] += cfg.dot(ds.astype(k.dtype), k, 1, 0)

  _when_visited(cfg, kj, bounds, entry, compute)

  @pl.when(kj == pl.num_programs(3) - 1)
  def _finish() -> None:
    dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def backward(cfg: Config, q: Array, k: Array, v: Array, bias: Optional[Array], q_seg: Optional[Array],
             kv_seg: Optional[Array], prefix: Optional[Array], o: Array, lse: Array, do: Array,
             need_dbias: bool) -> tuple[Array, Array, Array, Optional[Array]]:
  """dq, dk, dv and (if need_dbias) the f32 logits gradient [B, H, Sq, Sk]."""
  b, sq, h, d = q.shape
  sk, hkv, g = k.shape[1], k.shape[2], cfg.group
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  nq = sq // bq
  delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(_F32), do.astype(_F32))[..., None]
  qt, kt, vt, dot_ = _to_bhsd(q), _to_bhsd(k), _to_bhsd(v), _to_bhsd(do)
  args = (qt, kt, vt, *_aux_args(cfg, bias, q_seg, kv_seg), dot_, lse, delta)

  # dk, dv: grid (batch, kv head, kv block, group head x q block).
  qr = _bounds(cfg, bq, bk, by_kv=True)
  nk = sk // bk
  qblk = lambda bb, j, t, p, s, f: _fetch(cfg, lax.rem(t, jnp.int32(nq)), lambda: qr(j, bb, p, s), f, bb, j,
                                          nk, nq)
  qhead = lambda hk, t: hk * g + idiv(t, nq)
  qspec = pl.BlockSpec((None, None, bq, d), lambda bb, hk, j, t, *r: (bb, qhead(hk, t), qblk(bb, j, t, *r), 0))
  kvspec = pl.BlockSpec((None, None, bk, d), lambda bb, hk, j, t, *r: (bb, hk, j, 0))
  rowspec = pl.BlockSpec((None, None, bq, 1), lambda bb, hk, j, t, *r: (bb, qhead(hk, t), qblk(bb, j, t, *r), 0))
  in_specs = [qspec, kvspec, kvspec]
  if cfg.has_bias:
    in_specs.append(pl.BlockSpec((None, None, bq, bk), lambda bb, hk, j, t, *r: (
        *cfg.bias_index(bb, qhead(hk, t)), qblk(bb, j, t, *r), j)))
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, bq, 1), lambda bb, hk, j, t, *r: (bb, qblk(bb, j, t, *r), 0)),
                 pl.BlockSpec((None, 1, bk), lambda bb, hk, j, t, *r: (bb, 0, j))]
  in_specs += [qspec, rowspec, rowspec]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(b, hkv, sk // bk, g * nq), in_specs=in_specs, out_specs=[kvspec, kvspec],
      scratch_shapes=[pltpu.VMEM((bk, d), _F32), pltpu.VMEM((bk, d), _F32)])
  dk, dv = pl.pallas_call(
      lambda *refs: _dkdv_kernel(cfg, *refs), grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
      interpret=cfg.interpret, compiler_params=_COMPILER_PARAMS, name="flash_attention_dkdv",
  )(*_scalar_args(cfg, prefix, b, q_seg, kv_seg, bq, bk, by_kv=True), *args)

  # dq (and the logits gradient): grid (batch, head, q block, kv block).
  in_specs, q_spec, row_spec = _q_grid_specs(cfg, bq, bk, d)
  in_specs += [q_spec, row_spec, row_spec]
  out_shape = [jax.ShapeDtypeStruct(qt.shape, q.dtype)]
  out_specs = [q_spec]
  if need_dbias:
    out_shape.append(jax.ShapeDtypeStruct((b, h, sq, sk), _F32))
    out_specs.append(pl.BlockSpec((None, None, bq, bk), lambda bb, hh, i, j, *r: (bb, hh, i, j)))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(b, h, nq, sk // bk), in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((bq, d), _F32)])
  outs = pl.pallas_call(
      lambda *refs: _dq_kernel(cfg, need_dbias, *refs), grid_spec=grid_spec, out_shape=out_shape,
      interpret=cfg.interpret, compiler_params=_COMPILER_PARAMS, name="flash_attention_dq",
  )(*_scalar_args(cfg, prefix, b, q_seg, kv_seg, bq, bk), *args)
  return _to_bhsd(outs[0]), _to_bhsd(dk), _to_bhsd(dv), (outs[1] if need_dbias else None)
