"""FlashAttention-2 kernels written for the Pallas Triton (GPU) lowering; on CPU they run in interpret mode.

Layout: q/k/v stay [batch, seq, heads, head_dim] (no transposes); each program handles one block of one
head, and loops over the other sequence with `lax.fori_loop`, loading kv (or q) tiles with `pl.ds`. GQA
reads kv head h // group (`idiv`) in the index maps (k/v are never repeated); the dk/dv kernel runs per kv
head and loops over the query heads of its group, so no reduction over repeated heads is needed afterwards.

Every loop is split into masked / fully visible / masked ranges (see `_blocks.kv_range`): fully masked
blocks (by causality, window, prefix or segment ids) are not visited at all and fully visible ones skip
the mask arithmetic. BigBird (`Mask.block_sparse`) replaces the ranges by a visit table (`sparse_visits`,
built in JAX per call): the forward and dq loops walk each q block's row of key blocks, the dk/dv loop the
transposed table; visited tiles take the in-block mask of the other rules.

Verified: interpret mode on CPU (every mask kind) and lowering to Triton IR (`lowering_platforms=("cuda",)`);
not yet PTX compilation or speed on a real GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from t_jax.kernels._blocks import (
  Config,
  block_mask,
  idiv,
  kv_range,
  q_range,
  segment_block_bounds,
  sparse_visits,
)

Array = jax.Array
_F32 = jnp.float32


def _compiler_params(cfg: Config, num_warps: int) -> Optional[object]:
  if cfg.interpret:
    return None
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=cfg.num_stages)


def _unpack(cfg: Config, refs: tuple, n_tail: int) -> tuple:
  """(q, k, v, bias, q_seg, kv_seg, prefix scalar, this block's 4 segment bounds, (visit row ref, count) for
  BigBird, rest...); None if absent."""
  it = iter(refs)
  q, k, v = next(it), next(it), next(it)
  bias = next(it) if cfg.has_bias else None
  q_seg, kv_seg, seg = (next(it), next(it), next(it)) if cfg.has_segments else (None, None, None)
  prefix = next(it)[...] if cfg.has_prefix else None
  sparse = (next(it), next(it)[...]) if cfg.block_sparse is not None else None
  rest = list(it)
  assert len(rest) == n_tail, (len(refs), n_tail)
  seg = tuple(seg[c] for c in range(4)) if seg is not None else None
  return (q, k, v, bias, q_seg, kv_seg, prefix, seg, sparse, *rest)


def _phased_loop(cfg: Config, bounds: tuple, sparse: Optional[tuple], step: Callable, carry: object) -> object:
  """Runs step(masked, idx, carry) over masked [lo, flo), visible [flo, fhi), masked [fhi, hi); with a
  BigBird visit table (row ref, count), over the row's first `count` blocks instead."""
  if sparse is not None:
    row, count = sparse
    return lax.fori_loop(0, count, lambda t, c: step(cfg.any_mask, row[t], c), carry)
  lo, flo, fhi, hi = bounds
  if not cfg.any_mask:
    return lax.fori_loop(lo, hi, functools.partial(step, False), carry)
  carry = lax.fori_loop(lo, flo, functools.partial(step, True), carry)
  carry = lax.fori_loop(flo, fhi, functools.partial(step, False), carry)
  return lax.fori_loop(fhi, hi, functools.partial(step, True), carry)


def _positions(start: Array, n: int) -> Array:
  return start + jnp.arange(n, dtype=jnp.int32)


# ----------------------------------------------------------------------------------------- forward


def _fwd_kernel(cfg: Config, *refs: object) -> None:
  q_ref, k_ref, v_ref, bias_ref, qseg_ref, kseg_ref, prefix, seg, sparse, o_ref, lse_ref = _unpack(cfg, refs, 2)
  bq, bk = cfg.block_q, cfg.block_k
  qi = pl.program_id(0)
  q = q_ref[...]
  q_pos = _positions(qi * bq, bq)[:, None]
  q_seg = qseg_ref[...][:, None] if qseg_ref is not None else None

  def step(masked: bool, j: Array, carry: tuple) -> tuple:
    acc, m, den = carry
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    s = cfg.dot(q, k, 1, 1) * cfg.scale
    if bias_ref is not None:
      s = s + bias_ref[:, pl.ds(start, bk)].astype(_F32)
    if masked:
      kv_seg = kseg_ref[pl.ds(start, bk)][None, :] if kseg_ref is not None else None
      mask = block_mask(cfg, q_pos, _positions(start, bk)[None, :], q_seg, kv_seg, prefix)
      s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet
    p = jnp.exp(s - shift[:, None])
    alpha = jnp.exp(m - shift)
    den = den * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + cfg.dot(p.astype(v.dtype), v, 1, 0)
    return acc, m_new, den

  d = q.shape[-1]
  carry = (jnp.zeros((bq, d), _F32), jnp.full((bq,), -jnp.inf, _F32), jnp.zeros((bq,), _F32))
  acc, m, den = _phased_loop(cfg, kv_range(cfg, qi, bq, bk, prefix, seg), sparse, step, carry)
  empty = den == 0.0  # fully masked rows: output 0, lse +inf (so backward gets p = 0)
  o_ref[...] = (acc / jnp.where(empty, 1.0, den)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, den)))


def _common_specs(cfg: Config, q_spec: pl.BlockSpec, kv_spec: pl.BlockSpec, bias_spec: pl.BlockSpec,
                  qseg_spec: pl.BlockSpec, kseg_spec: pl.BlockSpec, prefix_spec: pl.BlockSpec,
                  visits: int) -> list:
  """In-specs of the inputs present: q, k, v, bias, segment ids, their bounds (per axis-0 block), prefix,
  BigBird's visit table (`visits` columns) and count (per axis-0 block)."""
  specs = [q_spec, kv_spec, kv_spec]
  if cfg.has_bias:
    specs.append(bias_spec)
  if cfg.has_segments:
    specs += [qseg_spec, kseg_spec, pl.BlockSpec((None, None, 4), lambda i, b, h: (b, i, 0))]
  if cfg.has_prefix:
    specs.append(prefix_spec)
  if cfg.block_sparse is not None:
    specs += [pl.BlockSpec((None, None, visits), lambda i, b, h: (b, i, 0)),
              pl.BlockSpec((None, None), lambda i, b, h: (b, i))]
  return specs


def _extra_args(cfg: Config, bias: Optional[Array], q_seg: Optional[Array], kv_seg: Optional[Array],
                prefix: Optional[Array], seg_bounds: Optional[Array], sparse: Optional[tuple] = None) -> list:
  args = [bias] if cfg.has_bias else []
  args += [q_seg, kv_seg, seg_bounds] if cfg.has_segments else []
  return args + ([prefix] if cfg.has_prefix else []) + list(sparse or ())


def _q_block_specs(cfg: Config, bq: int, bk: int, sk: int, d: int) -> list:
  """Inputs of a kernel with one program per (q block, batch, head): q, k/v, bias, segments, prefix."""
  g = cfg.group
  return _common_specs(
      cfg,
      pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, sk, None, d), lambda i, b, h: (b, 0, idiv(h, g), 0)),
      pl.BlockSpec((None, None, bq, sk), lambda i, b, h: (*cfg.bias_index(b, h), i, 0)),
      pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
      pl.BlockSpec((None, sk), lambda i, b, h: (b, 0)),
      pl.BlockSpec((None,), lambda i, b, h: (b,)), sk // bk)


def _visits(cfg: Config, q: Array, prefix: Optional[Array], seg: Optional[Array], bq: int, bk: int,
            by_kv: bool = False) -> Optional[tuple[Array, Array]]:
  """BigBird's visit table and counts per q block (by_kv: per kv block) from the per-q-block segment bounds
  `seg`; None without block_sparse."""
  if cfg.block_sparse is None:
    return None
  return sparse_visits(cfg, q.shape[0], bq, bk, prefix, seg, by_kv)


def forward(cfg: Config, q: Array, k: Array, v: Array, bias: Optional[Array], q_seg: Optional[Array],
            kv_seg: Optional[Array], prefix: Optional[Array]) -> tuple[Array, Array]:
  """Output [B, Sq, H, D] and log-sum-exp [B, H, Sq] (f32; +inf on fully masked rows)."""
  b, sq, h, d = q.shape
  sk, bq, bk = k.shape[1], cfg.block_q, cfg.block_k
  in_specs, seg = _q_block_specs(cfg, bq, bk, sk, d), segment_block_bounds(cfg, q_seg, kv_seg, bq, bk)
  out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0)),
               pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))]
  return pl.pallas_call(
      lambda *refs: _fwd_kernel(cfg, *refs),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, sq), _F32)],
      grid=(sq // bq, b, h), in_specs=in_specs, out_specs=out_specs,
      interpret=cfg.interpret, compiler_params=_compiler_params(cfg, cfg.num_warps),
      name="flash_attention_fwd",
  )(q, k, v, *_extra_args(cfg, bias, q_seg, kv_seg, prefix, seg, _visits(cfg, q, prefix, seg, bq, bk)))


# ---------------------------------------------------------------------------------------- backward


def _dkdv_kernel(cfg: Config, *refs: object) -> None:
  (q_ref, k_ref, v_ref, bias_ref, qseg_ref, kseg_ref, prefix, seg, sparse,
   do_ref, lse_ref, delta_ref, dk_ref, dv_ref) = _unpack(cfg, refs, 5)
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  kj = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  kv_pos = _positions(kj * bk, bk)[None, :]
  kv_seg = kseg_ref[...][None, :] if kseg_ref is not None else None
  bounds = q_range(cfg, kj, bq, bk, prefix, seg)

  def head(hg: Array, carry: tuple) -> tuple:
    def step(masked: bool, i: Array, carry: tuple) -> tuple:
      dk, dv = carry
      start = pl.multiple_of(i * bq, bq)
      q = q_ref[pl.ds(start, bq), hg, :]
      do = do_ref[pl.ds(start, bq), hg, :]
      bias = None
      if bias_ref is not None:
        bias = bias_ref[hg if cfg.bias_heads else 0, pl.ds(start, bq), :]
      mask = None
      if masked:
        q_seg = qseg_ref[pl.ds(start, bq)][:, None] if qseg_ref is not None else None
        mask = block_mask(cfg, _positions(start, bq)[:, None], kv_pos, q_seg, kv_seg, prefix)
      p, ds = cfg.probs_and_ds(q, k, v, do, lse_ref[hg, pl.ds(start, bq)][:, None],
                               delta_ref[hg, pl.ds(start, bq)][:, None], bias, mask)
      dv = dv + cfg.dot(p.astype(do.dtype), do, 0, 0)
      dk = dk + cfg.dot(ds.astype(q.dtype), q, 0, 0)
      return dk, dv
    return _phased_loop(cfg, bounds, sparse, step, carry)

  d = k.shape[-1]
  zeros = jnp.zeros((bk, d), _F32)
  dk, dv = lax.fori_loop(0, cfg.group, head, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(cfg: Config, need_dbias: bool, *refs: object) -> None:
  (q_ref, k_ref, v_ref, bias_ref, qseg_ref, kseg_ref, prefix, seg, sparse,
   do_ref, lse_ref, delta_ref, dq_ref, *dbias_ref) = _unpack(cfg, refs, 4 + need_dbias)
  dbias_ref = dbias_ref[0] if need_dbias else None
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  qi = pl.program_id(0)
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...][:, None], delta_ref[...][:, None]
  q_pos = _positions(qi * bq, bq)[:, None]
  q_seg = qseg_ref[...][:, None] if qseg_ref is not None else None

  def step(masked: bool, j: Array, dq: Array) -> Array:
    start = pl.multiple_of(j * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    bias = bias_ref[:, pl.ds(start, bk)] if bias_ref is not None else None
    mask = None
    if masked:
      kv_seg = kseg_ref[pl.ds(start, bk)][None, :] if kseg_ref is not None else None
      mask = block_mask(cfg, q_pos, _positions(start, bk)[None, :], q_seg, kv_seg, prefix)
    _, ds = cfg.probs_and_ds(q, k, v, do, lse, delta, bias, mask)
    if dbias_ref is not None:
      dbias_ref[:, pl.ds(start, bk)] = ds
    return dq + cfg.dot(ds.astype(k.dtype), k, 1, 0)

  bounds = kv_range(cfg, qi, bq, bk, prefix, seg)
  if dbias_ref is not None:  # skipped (fully masked) tiles get a zero bias gradient
    def zero(j: Array, c: int) -> int:
      dbias_ref[:, pl.ds(pl.multiple_of(j * bk, bk), bk)] = jnp.zeros((bq, bk), _F32)
      return c
    if sparse is not None:  # every tile first; the visited ones are overwritten below
      lax.fori_loop(0, cfg.kv_len_padded // bk, zero, 0)
    else:
      lax.fori_loop(0, bounds[0], zero, 0)
      lax.fori_loop(bounds[3], cfg.kv_len_padded // bk, zero, 0)
  dq = _phased_loop(cfg, bounds, sparse, step, jnp.zeros(q.shape, _F32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def backward(cfg: Config, q: Array, k: Array, v: Array, bias: Optional[Array], q_seg: Optional[Array],
             kv_seg: Optional[Array], prefix: Optional[Array], o: Array, lse: Array, do: Array,
             need_dbias: bool) -> tuple[Array, Array, Array, Optional[Array]]:
  """dq, dk, dv and (if need_dbias) the f32 logits gradient [B, H, Sq, Sk] (the unreduced dbias)."""
  b, sq, h, d = q.shape
  sk, hkv, g = k.shape[1], k.shape[2], cfg.group
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(_F32), do.astype(_F32))
  params = _compiler_params(cfg, cfg.num_warps_bwd)

  # dk, dv: one program per (kv block, batch, kv head), looping over the group's query heads.
  gb = g if cfg.bias_heads else 1
  in_specs = _common_specs(
      cfg,
      pl.BlockSpec((None, sq, g, d), lambda j, b, hk: (b, 0, hk, 0)),
      pl.BlockSpec((None, bk, None, d), lambda j, b, hk: (b, j, hk, 0)),
      pl.BlockSpec((None, gb, sq, bk), lambda j, b, hk: (*cfg.bias_index(b, hk), 0, j)),
      pl.BlockSpec((None, sq), lambda j, b, hk: (b, 0)),
      pl.BlockSpec((None, bk), lambda j, b, hk: (b, j)),
      pl.BlockSpec((None,), lambda j, b, hk: (b,)), sq // bq)
  in_specs += [pl.BlockSpec((None, sq, g, d), lambda j, b, hk: (b, 0, hk, 0)),
               pl.BlockSpec((None, g, sq), lambda j, b, hk: (b, hk, 0)),
               pl.BlockSpec((None, g, sq), lambda j, b, hk: (b, hk, 0))]
  seg = segment_block_bounds(cfg, q_seg, kv_seg, bq, bk)  # per q block: the dq kernel's, and the visit tables'
  extra = _extra_args(cfg, bias, q_seg, kv_seg, prefix, segment_block_bounds(cfg, q_seg, kv_seg, bq, bk, by_kv=True),
                      _visits(cfg, q, prefix, seg, bq, bk, by_kv=True))
  kv_out = pl.BlockSpec((None, bk, None, d), lambda j, b, hk: (b, j, hk, 0))
  dk, dv = pl.pallas_call(
      lambda *refs: _dkdv_kernel(cfg, *refs),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      grid=(sk // bk, b, hkv), in_specs=in_specs, out_specs=[kv_out, kv_out],
      interpret=cfg.interpret, compiler_params=params, name="flash_attention_dkdv",
  )(q, k, v, *extra, do, lse, delta)

  # dq (and the logits gradient for dbias): one program per (q block, batch, head).
  extra = _extra_args(cfg, bias, q_seg, kv_seg, prefix, seg, _visits(cfg, q, prefix, seg, bq, bk))
  in_specs = _q_block_specs(cfg, bq, bk, sk, d)
  row = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  in_specs += [pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0)), row, row]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))]
  if need_dbias:
    out_shape.append(jax.ShapeDtypeStruct((b, h, sq, sk), _F32))
    out_specs.append(pl.BlockSpec((None, None, bq, sk), lambda i, b, h: (b, h, i, 0)))
  outs = pl.pallas_call(
      lambda *refs: _dq_kernel(cfg, need_dbias, *refs),
      out_shape=out_shape, grid=(sq // bq, b, h), in_specs=in_specs, out_specs=out_specs,
      interpret=cfg.interpret, compiler_params=params, name="flash_attention_dq",
  )(q, k, v, *extra, do, lse, delta)
  return outs[0], dk, dv, (outs[1] if need_dbias else None)
