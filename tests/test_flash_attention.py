"""Pallas flash attention (t_jax.kernels) against a float64 NumPy oracle and the XLA reference.

On CPU the kernels run in Pallas interpret mode, so these tests execute the real kernel code (both the
Triton formulation and the Mosaic TPU one). Lowering tests check that the same kernels lower to Triton
IR (CUDA) and Mosaic MLIR (TPU); compilation on real devices is not covered here.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t_jax.attention import Mask, attention, xla_attention
from t_jax.attention.masks import BlockSparse
from t_jax.kernels import flash_attention, supports
from t_jax.kernels._blocks import Config, kv_range, q_range, segment_bounds, sparse_visits
from tests.attention_reference import np_attention, np_mask

# Tolerances, as max |error| / max(1, max |reference|): f32 is exact f32 math up to summation order;
# bf16 rounds the output and the p / ds tiles fed to the matmuls (as FlashAttention does) to 8 bits.
TOL = {jnp.float32: dict(out=2e-5, grad=1e-4), jnp.bfloat16: dict(out=2e-2, grad=5e-2)}


# --------------------------------------------------------------------------------------- references


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  assert np.all(np.isfinite(x)), "non-finite values"
  return float(np.max(np.abs(x - ref)) / max(1.0, np.max(np.abs(ref))))


def packed_segments(rng, b, n, pad=0):
  """Random packing: increasing segment ids 1, 2, ... with `pad` trailing padding (id 0) positions."""
  ids = np.zeros((b, n), np.int32)
  for bi in range(b):
    cuts = np.sort(rng.choice(np.arange(1, n - pad), size=2, replace=False))
    ids[bi, : n - pad] = 1 + np.searchsorted(cuts, np.arange(n - pad), side="right")
  return ids


def inputs(seed, b, sq, sk, h, hkv, d, dtype):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, sq, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, sk, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, sk, hkv, d), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, sq, h, d), jnp.float32).astype(dtype)
  return q, k, v, do


MASK_FIELDS = {f.name for f in dataclasses.fields(Mask)}


def _jitted(f, q, k, v, do, bias, kw):
  """jit(f) with the mask keywords as one Mask argument (its arrays traced) and the other keywords static."""
  mask = Mask(**{n: x for n, x in kw.items() if n in MASK_FIELDS})
  static = {n: x for n, x in kw.items() if n not in MASK_FIELDS}
  run = jax.jit(lambda q, k, v, do, bias, mask: f(q, k, v, do, bias, mask, **static))
  return run(q, k, v, do, bias, mask)


def _kernel_vjp(q, k, v, do, bias, mask, **kw):
  args = (q, k, v) if bias is None else (q, k, v, bias)
  f = lambda q, k, v, *b: flash_attention(q, k, v, mask=mask, bias=b[0] if b else None, **kw)
  out, vjp = jax.vjp(f, *args)
  return out, vjp(do)


def _xla_vjp(q, k, v, do, bias, mask):
  args = (q, k, v) if bias is None else (q, k, v, bias)
  f = lambda q, k, v, *b: xla_attention(q, k, v, bias=b[0] if b else None, mask=mask,
                                        scale=1 / math.sqrt(q.shape[-1]))
  out, vjp = jax.vjp(f, *args)
  return out, vjp(do)


def run_kernel(q, k, v, do, bias=None, **kw):
  """Output and (dq, dk, dv[, dbias]) of flash_attention via jax.vjp (bias differentiated if given)."""
  return _jitted(_kernel_vjp, q, k, v, do, bias, kw)


def run_xla(q, k, v, do, bias=None, **masks):
  """The same from the XLA reference (xla_attention)."""
  return _jitted(_xla_vjp, q, k, v, do, bias, masks)


def check_against_references(q, k, v, do, bias=None, blocks=None, backend=None, **masks):
  """Kernel vs float64 NumPy (within TOL) and vs XLA (no worse than XLA's own error, plus TOL)."""
  blocks = blocks or {}
  out, grads = run_kernel(q, k, v, do, bias=bias, backend=backend, **blocks, **masks)
  xout, xgrads = run_xla(q, k, v, do, bias=bias, **masks)
  mask = np_mask(q.shape[0], q.shape[1], k.shape[1], causal=masks.get("causal", False),
                 qseg=masks.get("q_segment_ids"), kseg=masks.get("kv_segment_ids"),
                 prefix=masks.get("prefix_len"), window=masks.get("window"))
  rout, (rdq, rdk, rdv, rds) = np_attention(q, k, v, mask, bias, 1 / math.sqrt(q.shape[-1]), do)
  refs = [rdq, rdk, rdv]
  if bias is not None:
    axes = tuple(a for a in range(4) if np.shape(bias)[a] == 1)
    refs.append(rds.sum(axis=axes, keepdims=True))
  tol = TOL[q.dtype.type]
  assert out.shape == q.shape and out.dtype == q.dtype
  e, ex = rel_err(out, rout), rel_err(xout, rout)
  assert e <= max(tol["out"], 2 * ex), f"output: kernel err {e:.2e} vs xla err {ex:.2e}"
  for name, g, xg, r in zip(("dq", "dk", "dv", "dbias"), grads, xgrads, refs):
    assert g.shape == r.shape, name
    e, ex = rel_err(g, r), rel_err(xg, r)
    assert e <= max(tol["grad"], 2 * ex), f"{name}: kernel err {e:.2e} vs xla err {ex:.2e}"
  return out, grads


# ------------------------------------------------------------------------------------ block ranges


def _cfg(sq, sk, bq, bk, causal, window, prefix, segments=False):
  pad = lambda n, b: -(-n // b) * b
  return Config(backend="triton", interpret=True, causal=causal, window=window, has_prefix=prefix is not None,
                has_segments=segments, has_bias=False, bias_batch=False, bias_heads=False, q_len=sq,
                kv_len=sk, q_len_padded=pad(sq, bq), kv_len_padded=pad(sk, bk), num_heads=1, num_kv_heads=1,
                scale=1.0, block_q=bq, block_k=bk, block_q_bwd=bq, block_k_bwd=bk, num_warps=4,
                num_stages=2, num_warps_bwd=4, exact_f32=True)


@pytest.mark.parametrize("sq,sk,bq,bk", [(64, 64, 16, 16), (50, 70, 16, 32), (96, 40, 32, 8)])
def test_block_ranges_match_brute_force(sq, sk, bq, bk):
  """kv_range / q_range visit every block with a visible entry, only those, and `full` blocks are fully visible."""
  for causal, window, prefix in [(False, None, None), (True, None, None), (True, None, 0), (True, None, 21),
                                 (True, 5, None), (False, 17, None), (True, 40, 33), (False, 1, None)]:
    cfg = _cfg(sq, sk, bq, bk, causal, window, prefix)
    sqp, skp = cfg.q_len_padded, cfg.kv_len_padded
    m = np_mask(1, sqp, skp, causal=causal, window=window, prefix=prefix)[0]
    m[:, sk:] = False                                             # kv padding is never visible
    tiles = m.reshape(sqp // bq, bq, skp // bk, bk)
    any_vis = tiles.any(axis=(1, 3))                              # [nq, nk]
    all_vis = tiles.all(axis=(1, 3))
    pfx = None if prefix is None else jnp.int32(prefix)
    for rng_fn, vis, full, idx in [(kv_range, any_vis, all_vis, jnp.arange(sqp // bq)),
                                   (q_range, any_vis.T, all_vis.T, jnp.arange(skp // bk))]:
      lo, flo, fhi, hi = (np.asarray(x) for x in rng_fn(cfg, idx, bq, bk, pfx))
      for r in range(len(idx)):
        visited = np.zeros(vis.shape[1], bool)
        visited[lo[r]:hi[r]] = True
        assert lo[r] <= flo[r] <= fhi[r] <= hi[r]
        np.testing.assert_array_equal(visited, vis[r], err_msg=f"{rng_fn.__name__} {causal=} {window=} {prefix=} block {r}")
        assert full[r, flo[r]:fhi[r]].all(), f"{rng_fn.__name__}: a 'full' block needs the mask"


@pytest.mark.parametrize("ids", ["packed", "packed_padding", "unsorted"])
def test_segment_block_ranges(ids):
  """With segment ids, kv_range / q_range (given `segment_bounds`) never skip a block with a visible entry,
  'full' blocks are fully visible, and packed (increasing) ids skip exactly the blocks they mask."""
  rng = np.random.default_rng(0)
  b, sq, sk, bq, bk = 3, 96, 96, 16, 8
  if ids == "unsorted":
    seg = rng.integers(0, 3, (b, sq)).astype(np.int32)
    seg[0, 40:] = 5                        # a long single-segment run gives 'full' blocks
  else:
    seg = packed_segments(rng, b, sq, pad=13 if ids == "packed_padding" else 0)
  skipped = unmasked = 0
  for causal, window, prefix in [(False, None, None), (True, None, None), (True, 20, None), (True, None, 30)]:
    cfg = _cfg(sq, sk, bq, bk, causal, window, prefix, segments=True)
    m = np_mask(b, sq, sk, causal=causal, window=window, prefix=prefix, qseg=seg, kseg=seg)
    tiles = m.reshape(b, sq // bq, bq, sk // bk, bk)
    pfx = None if prefix is None else jnp.int32(prefix)
    for rng_fn, vis, full, bounds in [
        (kv_range, tiles.any(axis=(2, 4)), tiles.all(axis=(2, 4)), segment_bounds(seg, seg, sq, sk, bq, bk)),
        (q_range, tiles.any(axis=(2, 4)).transpose(0, 2, 1), tiles.all(axis=(2, 4)).transpose(0, 2, 1),
         segment_bounds(seg, seg, sk, sq, bk, bq))]:
      for bi in range(b):
        idx = jnp.arange(vis.shape[1])
        lo, flo, fhi, hi = (np.asarray(x) for x in rng_fn(cfg, idx, bq, bk, pfx, tuple(bounds[bi].T)))
        for r in range(len(idx)):
          visited = np.zeros(vis.shape[2], bool)
          visited[lo[r]:hi[r]] = True
          assert lo[r] <= flo[r] <= fhi[r] <= hi[r]
          assert not (vis[bi, r] & ~visited).any(), f"{rng_fn.__name__} skipped a visible block ({ids})"
          assert full[bi, r, flo[r]:fhi[r]].all(), f"{rng_fn.__name__}: a 'full' block needs the mask"
          if ids != "unsorted" and not causal and window is None:
            np.testing.assert_array_equal(visited, vis[bi, r])
          skipped += int((~visited).sum())
          unmasked += int(fhi[r] - flo[r])
  assert skipped > 0 and unmasked > 0, (skipped, unmasked)


# ------------------------------------------------------------------------------- numerics: forward+bwd


CASES = {
    # name: (b, sq, sk, h, hkv, d, masks, blocks)
    "plain": (2, 48, 48, 2, 2, 16, {}, dict(block_q=16, block_k=16)),
    "causal": (1, 64, 64, 2, 1, 32, dict(causal=True), dict(block_q=16, block_k=16)),
    "causal_ragged_len": (2, 37, 37, 4, 2, 16, dict(causal=True), dict(block_q=16, block_k=16)),
    "causal_qk_blocks_differ": (1, 80, 80, 2, 2, 16, dict(causal=True),
                                dict(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)),
    "window": (1, 72, 72, 2, 2, 16, dict(window=9), dict(block_q=16, block_k=16)),
    "causal_window": (1, 80, 80, 2, 1, 16, dict(causal=True, window=20), dict(block_q=16, block_k=16)),
    "prefix_lm": (2, 64, 64, 2, 2, 16, dict(causal=True, prefix_len=np.array([0, 27])),
                  dict(block_q=16, block_k=16)),
    "prefix_lm_int": (1, 40, 40, 2, 2, 16, dict(causal=True, prefix_len=17), dict(block_q=16, block_k=16)),
    "segments": (2, 64, 64, 2, 2, 16, "segments", dict(block_q=16, block_k=16)),
    "segments_padding": (2, 50, 50, 2, 2, 16, "padding", dict(block_q=16, block_k=16)),
    "segments_unsorted": (2, 64, 64, 2, 2, 16, "unsorted", dict(block_q=16, block_k=16)),
    "causal_segments_window": (2, 64, 64, 4, 2, 16, "causal_segments_window", dict(block_q=16, block_k=32)),
    "gqa4_causal": (1, 32, 32, 8, 2, 16, dict(causal=True), dict(block_q=16, block_k=16)),
    "mqa8": (1, 32, 32, 8, 1, 16, dict(causal=True, window=7), dict(block_q=16, block_k=16)),
    "cross_attention": (2, 24, 56, 2, 1, 16, {}, dict(block_q=16, block_k=32)),
    "cross_attention_causal": (1, 40, 24, 2, 2, 16, dict(causal=True), dict(block_q=16, block_k=16)),
    "head_dim_8_padded": (1, 32, 32, 2, 2, 8, dict(causal=True), dict(block_q=16, block_k=16)),
    "head_dim_24_padded": (1, 20, 20, 2, 2, 24, {}, dict(block_q=16, block_k=16)),
    "head_dim_64": (1, 64, 64, 2, 1, 64, dict(causal=True), dict(block_q=32, block_k=32)),
    "default_blocks": (1, 80, 80, 2, 2, 32, dict(causal=True), {}),
}


def _masks(spec, b, sq, sk, rng):
  if not isinstance(spec, str):
    return dict(spec)
  if spec == "segments":
    seg = packed_segments(rng, b, sq)
    return dict(q_segment_ids=seg, kv_segment_ids=seg)
  if spec == "unsorted":  # any ids, not increasing: block skipping must stay conservative
    seg = rng.integers(0, 3, (b, sq)).astype(np.int32)
    seg[:, 20:44] = 7
    return dict(q_segment_ids=seg, kv_segment_ids=seg)
  if spec == "padding":
    seg = (np.arange(sq)[None] < np.array([[sq], [sq - 19]])).astype(np.int32)
    return dict(q_segment_ids=seg, kv_segment_ids=seg)
  seg = packed_segments(rng, b, sq, pad=7)
  return dict(causal=True, window=13, q_segment_ids=seg, kv_segment_ids=seg)


# Every case in f32; a representative subset in bf16 (keeps the suite within a few minutes on CPU).
BF16_CASES = ("causal", "segments_padding", "causal_segments_window", "mqa8", "cross_attention", "head_dim_64")
DTYPE_CASES = [pytest.param(c, jnp.float32, id=f"{c}-f32") for c in CASES] + [
    pytest.param(c, jnp.bfloat16, id=f"{c}-bf16") for c in BF16_CASES]


@pytest.mark.parametrize("case,dtype", DTYPE_CASES)
def test_matches_references(case, dtype):
  b, sq, sk, h, hkv, d, spec, blocks = CASES[case]
  masks = _masks(spec, b, sq, sk, np.random.default_rng(len(case)))
  q, k, v, do = inputs(len(case), b, sq, sk, h, hkv, d, dtype)
  check_against_references(q, k, v, do, blocks=blocks, **masks)


@pytest.mark.parametrize("bias_shape", [(1, 2, 40, 40), (2, 1, 1, 40), (2, 2, 40, 40)])
def test_bias_values_and_gradient(bias_shape):
  """Additive bias (T5-style learned, key padding, full): outputs and dbias, reduced over broadcast dims."""
  q, k, v, do = inputs(3, 2, 40, 40, 2, 2, 16, jnp.float32)
  bias = 2.0 * jax.random.normal(jax.random.PRNGKey(9), bias_shape, jnp.float32)
  check_against_references(q, k, v, do, bias=bias, blocks=dict(block_q=16, block_k=16), causal=True, window=30)


def test_constant_bias_skips_the_bias_gradient():
  """A bias that is not differentiated (ALiBi) must not make the backward materialise [B, H, Sq, Sk]."""
  q, k, v, do = inputs(4, 1, 32, 32, 2, 2, 16, jnp.float32)
  alibi = -0.5 * jnp.abs(jnp.arange(32)[:, None] - jnp.arange(32)[None]).astype(jnp.float32)[None, None]
  alibi = alibi * jnp.array([1.0, 0.25])[None, :, None, None]

  def dq_kernel_outputs(loss, *args):
    found = []

    def walk(jaxpr):
      for e in jaxpr.eqns:
        if e.primitive.name == "pallas_call" and "dq" in str(e.params["name"]):
          found.append(len(e.outvars))
        for p in e.params.values():
          for sub in p if isinstance(p, tuple | list) else [p]:
            if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
              walk(getattr(sub, "jaxpr", sub))

    walk(jax.make_jaxpr(jax.grad(loss, tuple(range(len(args)))))(*args).jaxpr)
    return found

  kw = dict(block_q=16, block_k=16)
  const = dq_kernel_outputs(lambda q, k, v: (flash_attention(q, k, v, bias=alibi, **kw) * do).sum(), q, k, v)
  learned = dq_kernel_outputs(lambda q, b: (flash_attention(q, k, v, bias=b, **kw) * do).sum(), q, alibi)
  assert const == [1] and learned == [2], (const, learned)
  check_against_references(q, k, v, do, bias=alibi, blocks=dict(block_q=16, block_k=16), causal=True)


def test_fully_masked_rows_are_zero_with_zero_gradients():
  """Query rows whose segment matches no key (and padding-only rows) give exact zeros, never NaN."""
  q, k, v, do = inputs(5, 2, 40, 40, 4, 2, 16, jnp.float32)
  qseg = np.ones((2, 40), np.int32)
  qseg[0, 5:20] = 7                       # no key has segment 7
  qseg[1, 30:] = 3
  kseg = np.ones((2, 40), np.int32)
  kseg[1, 33:] = 2
  masks = dict(q_segment_ids=qseg, kv_segment_ids=kseg, causal=True)
  out, (dq, dk, dv) = run_kernel(q, k, v, do, block_q=16, block_k=16, **masks)
  dead = np.asarray(qseg) != 1
  assert np.all(np.asarray(out)[dead] == 0) and np.all(np.asarray(dq)[dead] == 0)
  assert np.all(np.isfinite(np.asarray(out))) and np.all(np.isfinite(np.asarray(dk)))
  check_against_references(q, k, v, do, blocks=dict(block_q=16, block_k=16), **masks)
  out2, _ = run_kernel(q, k, v, do, block_q=16, block_k=16, window=1, causal=True, prefix_len=0)
  np.testing.assert_allclose(out2, jnp.repeat(v, 2, axis=2), atol=1e-6)  # attends only itself


SEGMENTS_96 = np.repeat(np.array([[1, 2, 3]], np.int32), [40, 24, 32], axis=1)  # rows < 32: only kv < 40


@pytest.mark.parametrize("masks,backend", [
    (dict(causal=True), "triton"), (dict(window=16), "triton"),
    (dict(q_segment_ids=SEGMENTS_96, kv_segment_ids=SEGMENTS_96), "triton"),
    (dict(q_segment_ids=SEGMENTS_96, kv_segment_ids=SEGMENTS_96), "mosaic_tpu")],
    ids=["causal", "window", "segments", "segments-mosaic_tpu"])
def test_masked_blocks_are_skipped(masks, backend):
  """NaNs in k/v blocks a q block never sees must not reach it: those tiles are not computed at all."""
  q, k, v, do = inputs(6, 1, 96, 96, 2, 2, 16, jnp.float32)
  poison = np.zeros((1, 96, 1, 1), np.float32)
  poison[:, 64:] = np.nan                 # kv blocks 4.. (of 16) are fully masked for q rows < 32
  if "window" in masks:
    poison[:, :16] = np.nan               # ... and kv blocks < 1 for q rows 32..47 with window 16
  kp, vp = k + poison, v + poison
  blocks = dict(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16)
  out, (dq, _, _) = run_kernel(q, kp, vp, do, backend=backend, **blocks, **masks)
  rows = slice(0, 32) if "window" not in masks else slice(32, 48)
  rout, (rdq, _, _) = run_xla(q, k, v, do, **masks)
  np.testing.assert_allclose(np.asarray(out)[:, rows], np.asarray(rout)[:, rows], atol=2e-5)
  np.testing.assert_allclose(np.asarray(dq)[:, rows], np.asarray(rdq)[:, rows], atol=1e-4)


# ------------------------------------------------------------------------------ BigBird block-sparse

BIGBIRD_CASES = {
    # name: (causal, rule, other mask rules, explicit blocks, backend); 44 positions: a ragged last block
    "bidirectional_r2_segments": (False, BlockSparse(8, 3, 1, 2, seed=3), "segments", {}, "triton"),
    "causal_r2_bias": (True, BlockSparse(8, 3, 1, 2, seed=1), "bias", {}, "triton"),
    "causal_r0_segments_prefix": (True, BlockSparse(8, 3, 1, 0), "prefix", {}, "triton"),
    "bidirectional_r1_window_blocks8": (False, BlockSparse(16, 1, 0, 1, seed=2), "window",
                                        dict(block_q=8, block_k=8), "triton"),
    "causal_r2_segments-mosaic_tpu": (True, BlockSparse(8, 3, 1, 2, seed=1), "segments", {}, "mosaic_tpu"),
    "causal_r0_segments_prefix-mosaic_tpu": (True, BlockSparse(8, 3, 1, 0), "prefix", {}, "mosaic_tpu"),
}


@pytest.mark.parametrize("case", list(BIGBIRD_CASES))
def test_block_sparse_matches_xla(case):
  """The kernel (visiting only the rule's key blocks) equals the dense XLA oracle: output and dq, dk, dv."""
  causal, rule, extra, blocks, backend = BIGBIRD_CASES[case]
  q, k, v, do = inputs(11, 2, 44, 44, 4, 2, 16, jnp.float32)  # GQA: 4 query heads over 2 kv heads
  seg = packed_segments(np.random.default_rng(1), 2, 44, pad=5)
  masks = {"segments": dict(q_segment_ids=seg, kv_segment_ids=seg),
           "prefix": dict(q_segment_ids=seg, kv_segment_ids=seg, prefix_len=np.array([6, 19], np.int32)),
           "window": dict(window=20), "bias": {}}[extra]
  bias = 0.5 * jax.random.normal(jax.random.PRNGKey(2), (1, 4, 44, 44)) if extra == "bias" else None
  out, grads = run_kernel(q, k, v, do, bias, causal=causal, block_sparse=rule, backend=backend, **blocks, **masks)
  xout, xgrads = run_xla(q, k, v, do, bias, causal=causal, block_sparse=rule, **masks)
  assert rel_err(out, xout) < 1e-5 and len(grads) == len(xgrads) == 3 + (bias is not None)
  for name, g, xg in zip(("dq", "dk", "dv", "dbias"), grads, xgrads):
    assert rel_err(g, xg) < 1e-4, name


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_block_sparse_visits_only_the_rule_s_blocks(backend):
  """The visit table holds exactly the rule's blocks (far fewer than dense), and poisoned (NaN) k/v blocks
  that a q block never visits do not reach its output or dq."""
  rule, n = BlockSparse(16, 3, 1, 2, seed=5), 128
  mask = Mask(block_sparse=rule)
  cfg = dataclasses.replace(_cfg(n, n, 16, 16, False, None, None), block_sparse=rule)
  table, count = sparse_visits(cfg, 1, 16, 16, None, None)
  dense = np.asarray(mask.dense(1, n, n))[0, 0].reshape(8, 16, 8, 16).any((1, 3))
  count, table = np.asarray(count)[0], np.asarray(table)[0]
  assert [sorted(table[i, :c]) for i, c in enumerate(count)] == [list(np.flatnonzero(r)) for r in dense]
  assert count.sum() == dense.sum() < 0.7 * dense.size and count[1:].max() <= 3 + 1 + 2
  by_kv, count_kv = (np.asarray(x)[0] for x in sparse_visits(cfg, 1, 16, 16, None, None, by_kv=True))
  assert [sorted(by_kv[j, :c]) for j, c in enumerate(count_kv)] == [list(np.flatnonzero(c)) for c in dense.T]
  q, k, v, do = inputs(12, 1, n, n, 1, 1, 16, jnp.float32)
  j = int(np.flatnonzero(~dense.all(0))[-1])    # a key block some q blocks never visit
  rows = np.repeat(~dense[:, j], 16)
  poison = np.zeros((1, n, 1, 1), np.float32)
  poison[:, 16 * j:16 * (j + 1)] = np.nan
  out, (dq, _, _) = run_kernel(q, k + poison, v + poison, do, block_sparse=rule, backend=backend)
  xout, (xdq, _, _) = run_xla(q, k, v, do, block_sparse=rule)
  assert rows.sum() >= 32 and not np.isfinite(np.asarray(out)).all()  # visiting rows do see the NaNs
  np.testing.assert_allclose(np.asarray(out)[:, rows], np.asarray(xout)[:, rows], atol=2e-5)
  np.testing.assert_allclose(np.asarray(dq)[:, rows], np.asarray(xdq)[:, rows], atol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
def test_block_sparse_rows_with_no_visit_are_zero(backend):
  """Cross-attention: q blocks 2.. have no diagonal key block (and no global or random ones) to visit."""
  q, k, v, do = inputs(13, 1, 40, 16, 2, 1, 16, jnp.float32)
  rule = BlockSparse(8, 1, 0, 0)
  out, grads = run_kernel(q, k, v, do, block_sparse=rule, backend=backend)
  xout, xgrads = run_xla(q, k, v, do, block_sparse=rule)
  assert np.all(np.asarray(out)[:, 16:] == 0) and rel_err(out, xout) < 1e-5
  for g, xg in zip(grads, xgrads):
    assert rel_err(g, xg) < 1e-4


def test_block_sparse_block_sizes_and_backends():
  q, k, _, _ = inputs(0, 1, 32, 32, 2, 2, 16, jnp.float32)
  mask = Mask(causal=True, block_sparse=BlockSparse(24, 1, 0, 0))  # blocks must divide 24: 8 by default
  ref = xla_attention(q, k, k, mask=mask, scale=0.25)
  np.testing.assert_allclose(flash_attention(q, k, k, mask=mask), ref, atol=2e-5)
  with pytest.raises(ValueError, match="divide the BigBird block 24"):
    flash_attention(q, k, k, mask=mask, block_k=16)
  with pytest.raises(ValueError, match=">= 16"):  # a real GPU needs 16-blocks: 24 has no such divisor
    flash_attention(q, k, k, mask=mask, interpret=False)
  assert supports(q, k, mask)
  with pytest.raises(ValueError, match=">= 128, got 64 .a divisor of the BigBird block 64"):  # TPU: 128 lanes
    flash_attention(q, k, k, mask=Mask(block_sparse=BlockSparse(64)), backend="mosaic_tpu", interpret=False)


# ---------------------------------------------------------------------------------- TPU formulation


@pytest.mark.parametrize("case", ["causal_ragged_len", "prefix_lm", "causal_segments_window", "mqa8",
                                  "cross_attention"])
def test_mosaic_tpu_kernels_in_interpret_mode(case):
  b, sq, sk, h, hkv, d, spec, blocks = CASES[case]
  masks = _masks(spec, b, sq, sk, np.random.default_rng(len(case)))
  q, k, v, do = inputs(len(case), b, sq, sk, h, hkv, d, jnp.float32)
  bias = 0.5 * jax.random.normal(jax.random.PRNGKey(1), (1, h, sq, sk)) if case == "mqa8" else None
  check_against_references(q, k, v, do, bias=bias, blocks=dict(block_q=16, block_k=16), backend="mosaic_tpu",
                           **masks)


# ------------------------------------------------------------------------------------- integration


def test_attention_api_dispatches_to_the_kernel(monkeypatch):
  """t_jax.attention(implementation='pallas') calls t_jax.kernels.flash_attention and matches 'xla'."""
  import t_jax.kernels as kernels
  calls = []
  real = kernels.flash_attention

  def spy(*args, **kw):
    calls.append(kw)
    return real(*args, **kw, block_q=16, block_k=16)

  monkeypatch.setattr(kernels, "flash_attention", spy)
  q, k, v, do = inputs(7, 2, 48, 48, 4, 2, 16, jnp.float32)
  seg = packed_segments(np.random.default_rng(0), 2, 48, pad=5)
  masks = dict(causal=True, q_segment_ids=seg, kv_segment_ids=seg, window=20)
  f = lambda impl: jax.value_and_grad(
      lambda q, k, v: (attention(q, k, v, implementation=impl, **masks) * do).sum(), (0, 1, 2))
  (lp, gp), (lx, gx) = f("pallas")(q, k, v), f("xla")(q, k, v)
  assert len(calls) == 1 and calls[0]["mask"].window == 20 and calls[0]["mask"].causal
  np.testing.assert_allclose(lp, lx, rtol=1e-5)
  for a, bb in zip(gp, gx):
    np.testing.assert_allclose(a, bb, atol=1e-4)


MODEL_CASES = {
    # name: (ModelConfig fields, whether the batch is packed)
    "gpt_rope_gqa_packed": (dict(architecture="decoder", position="rope", num_kv_heads=2), True),
    "bert_learned_padding": (dict(architecture="encoder", position="learned"), False),
    "prefix_lm_alibi_window": (dict(architecture="prefix_lm", position="alibi", window=9), False),
    "t5_relative_bias": (dict(architecture="encoder_decoder", position="t5_relative", scale_attention=False), True),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_whole_model_loss_and_gradients_match_xla(case):
  """A model's loss and every parameter gradient with attention_impl='pallas' (interpreted) equal 'xla'.

  Block sizes come from ModelConfig (the gin-reachable kernel options); the T5 case differentiates the
  learned relative-position bias through the kernel.
  """
  from t_jax.models import ModelConfig, build_model, init_params
  fields, packed = MODEL_CASES[case]
  base = dict(vocab_size=50, d_model=32, num_heads=4, head_dim=16, mlp_dim=48, num_layers=2, max_len=64,
              attention_block_q=16, attention_block_k=16, **fields)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(3, 50, (2, 40)), jnp.int32)
  seg = jnp.asarray(np.repeat([[1, 2, 3, 0]], [11, 17, 8, 4], axis=1).repeat(2, 0), jnp.int32)
  kw = {}
  if fields["architecture"] == "encoder_decoder":
    kw = dict(encoder_segment_ids=seg, decoder_segment_ids=seg) if packed else {}
    args = (x, x[:, ::-1])
  else:
    args = (x,)
    if packed:
      kw = dict(segment_ids=seg)
    elif fields["architecture"] == "prefix_lm":
      kw = dict(prefix_len=jnp.array([5, 23]))
    else:
      kw = dict(padding_mask=(jnp.arange(40)[None] < jnp.array([[40], [29]])).astype(jnp.int32))
  params = init_params(build_model(ModelConfig(**base)), jax.random.key(0))

  def loss_and_grads(impl):
    model = build_model(ModelConfig(**base, attention_impl=impl))
    loss = lambda p: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, *args, **kw))[..., 7] ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  (lp, gp), (lx, gx) = loss_and_grads("pallas"), loss_and_grads("xla")
  np.testing.assert_allclose(lp, lx, rtol=1e-5)
  flat_p, flat_x = jax.tree_util.tree_leaves_with_path(gp), jax.tree_util.tree_leaves(gx)
  assert len(flat_p) == len(flat_x)
  overall = max(float(np.abs(g).max()) for g in flat_x)
  for (path, a), bb in zip(flat_p, flat_x):  # per leaf, relative to it (or to 1% of the largest gradient)
    scale = max(float(np.abs(bb).max()), 1e-2 * overall)
    err = float(np.abs(a - bb).max()) / scale
    assert err <= 1e-4, f"{jax.tree_util.keystr(path)}: relative error {err:.1e}"


def test_model_config_reaches_the_kernel(monkeypatch):
  """ModelConfig.attention_block_* / num_warps / num_stages arrive at flash_attention unchanged."""
  import t_jax.kernels as kernels
  from t_jax.models import ModelConfig, build_model, init_params
  seen = []
  real = kernels.flash_attention
  monkeypatch.setattr(kernels, "flash_attention", lambda *a, **kw: (seen.append(kw), real(*a, **kw))[1])
  cfg = ModelConfig(vocab_size=20, d_model=16, num_heads=2, mlp_dim=16, num_layers=1, max_len=32,
                    attention_impl="pallas", attention_block_q=32, attention_block_k=16, attention_num_warps=2)
  model = build_model(cfg)
  model.apply({"params": init_params(model, jax.random.key(0))}, jnp.ones((1, 20), jnp.int32))
  assert seen and all(kw["block_q"] == 32 and kw["block_k"] == 16 and kw["num_warps"] == 2
                      and "block_q_bwd" not in kw for kw in seen)
  with pytest.raises(ValueError, match="attention_block_k must be a power of two"):
    ModelConfig(attention_block_k=48)


@pytest.mark.parametrize("backend", ["triton", "mosaic_tpu"])
@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_custom_softmax_scale(backend, scale):
  """scale= replaces 1/sqrt(head_dim) in the output and in every gradient (T5 uses scale 1)."""
  q, k, v, do = inputs(11, 2, 40, 40, 4, 2, 16, jnp.float32)
  mask = Mask(causal=True)
  kernel = lambda q, k, v: flash_attention(q, k, v, mask=mask, scale=scale, block_q=16, block_k=16,
                                           backend=backend)
  out, vjp = jax.vjp(kernel, q, k, v)
  ref, ref_vjp = jax.vjp(lambda q, k, v: xla_attention(q, k, v, bias=None, mask=mask, scale=scale), q, k, v)
  np.testing.assert_allclose(out, ref, atol=2e-5)
  for g, rg in zip(vjp(do), ref_vjp(do)):
    np.testing.assert_allclose(g, rg, atol=1e-4)


def test_jit_matches_eager():
  q, k, v, _ = inputs(8, 1, 40, 40, 2, 2, 16, jnp.float32)
  f = lambda q, k, v: flash_attention(q, k, v, mask=Mask(causal=True, window=12), block_q=16, block_k=16)
  np.testing.assert_array_equal(jax.jit(f)(q, k, v), f(q, k, v))


def test_supports_and_errors():
  q, k, _, _ = inputs(0, 1, 32, 32, 4, 2, 16, jnp.float32)
  assert supports(q, k, Mask(causal=True, window=4, prefix_len=3))
  assert supports(q, k, bias=jnp.zeros((4, 32, 32)))
  assert not supports(q, k, bias=jnp.zeros((3, 32, 32)))                           # does not broadcast
  assert not supports(q.astype(jnp.float64) if jax.config.x64_enabled else q.astype(jnp.int32), k)
  assert not supports(jnp.zeros((1, 8, 4, 512)), jnp.zeros((1, 8, 2, 512)))        # head_dim > 256
  assert not supports(q, k, Mask(q_segment_ids=jnp.zeros((1, 32), jnp.int32)))     # kv ids missing
  assert not supports(q, k, Mask(prefix_len=3))                                    # prefix without causal
  assert not supports(q, k, Mask(causal=True, kv_positions=jnp.arange(32)[None]))  # positions: XLA only
  assert not supports(jnp.zeros((1, 32, 3, 16)), k)                                # 3 heads vs 2 kv heads
  with pytest.raises(NotImplementedError):
    flash_attention(q.astype(jnp.int32), k.astype(jnp.int32), k.astype(jnp.int32))
  with pytest.raises(ValueError, match="powers of two"):
    flash_attention(q, k, k, block_q=24)
  with pytest.raises(ValueError, match="window"):
    flash_attention(q, k, k, mask=Mask(window=0))
  with pytest.raises(ValueError, match="prefix_len"):
    flash_attention(q, k, k, mask=Mask(prefix_len=2))
  with pytest.raises(ValueError, match="backend"):
    flash_attention(q, k, k, backend="cuda")
  with pytest.raises(ValueError, match=">= 16"):
    flash_attention(q, k, k, block_q=8, interpret=False)


# ---------------------------------------------------------------------------------------- lowering


def _lowered(loss, args, platform):
  """StableHLO text of the gradient of loss lowered for `platform`. Without a GPU, Triton lowering from jax 0.11
  on needs an abstract GPU device to read the target from (jax 0.10 does not; the context works in both)."""
  lower = lambda: jax.jit(jax.grad(loss, (0, 1, 2, 3))).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  if platform != "cuda" or jax.default_backend() == "gpu":
    return lower()
  h100 = jax.sharding.AbstractDevice("NVIDIA H100", None, "cuda")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
    return lower()


@pytest.mark.parametrize("backend,platform,marker", [("triton", "cuda", "xla.gpu.triton"),
                                                     ("mosaic_tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_kernels_lower_for_real_devices(backend, platform, marker, d):
  """Forward + backward (with every mask and a learned bias) lower to Triton IR / Mosaic MLIR."""
  s = jax.ShapeDtypeStruct
  b, sq, h, hkv = 2, 300, 4, 2
  seg = s((b, sq), jnp.int32)

  def loss(q, k, v, bias, seg, prefix):
    mask = Mask(causal=True, window=100, prefix_len=prefix, q_segment_ids=seg, kv_segment_ids=seg)
    o = flash_attention(q, k, v, mask=mask, bias=bias, backend=backend, interpret=False)
    return o.astype(jnp.float32).sum()

  args = (s((b, sq, h, d), jnp.bfloat16), s((b, sq, hkv, d), jnp.bfloat16), s((b, sq, hkv, d), jnp.bfloat16),
          s((1, h, sq, sq), jnp.float32), seg, s((b,), jnp.int32))
  assert _lowered(loss, args, platform).count(marker) == 3, "expected forward, dk/dv and dq kernels"


@pytest.mark.parametrize("backend,platform,marker", [("triton", "cuda", "xla.gpu.triton"),
                                                     ("mosaic_tpu", "tpu", "tpu_custom_call")])
def test_block_sparse_kernels_lower_for_real_devices(backend, platform, marker):
  """BigBird's visit tables (with segments, prefix and a learned bias) lower to Triton IR / Mosaic MLIR."""
  s = jax.ShapeDtypeStruct
  b, sq, h, hkv, d = 2, 300, 4, 2, 64
  seg = s((b, sq), jnp.int32)

  def loss(q, k, v, bias, seg, prefix):
    mask = Mask(causal=True, prefix_len=prefix, q_segment_ids=seg, kv_segment_ids=seg,
                block_sparse=BlockSparse(128, 3, 1, 2))
    return flash_attention(q, k, v, mask=mask, bias=bias, backend=backend, interpret=False).astype(jnp.float32).sum()

  args = (s((b, sq, h, d), jnp.bfloat16), s((b, sq, hkv, d), jnp.bfloat16), s((b, sq, hkv, d), jnp.bfloat16),
          s((1, h, sq, sq), jnp.float32), seg, s((b,), jnp.int32))
  assert _lowered(loss, args, platform).count(marker) == 3, "expected forward, dk/dv and dq kernels"
