"""t_jax.attention (XLA implementation) against a float64 NumPy reference, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t_jax
from t_jax.attention import Mask, api
from tests.attention_reference import np_attention, np_mask

CASES = {
    "none": dict(),
    "causal": dict(causal=True),
    "padding": dict(seg="pad"),
    "packed": dict(seg="packed"),
    "packed_causal": dict(seg="packed", causal=True),
    "prefix": dict(causal=True, prefix=np.array([3, 5])),
    "window": dict(window=3),
    "window_causal": dict(window=4, causal=True),
    "bias": dict(bias=True, causal=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_xla_matches_float64_reference(case, heads, kv_heads):
  spec = CASES[case]
  rng = np.random.default_rng(hash((case, heads, kv_heads)) % 2**32)
  b, s, d = 2, 9, 8
  q, k, v, dout = (rng.standard_normal(shape).astype(np.float32) for shape in
                   [(b, s, heads, d), (b, s, kv_heads, d), (b, s, kv_heads, d), (b, s, heads, d)])
  qseg = kseg = None
  if spec.get("seg") == "pad":
    qseg = kseg = (np.arange(s)[None] < np.array([[6], [9]])).astype(np.int32)
  elif spec.get("seg") == "packed":
    qseg = kseg = np.array([[1] * 4 + [2] * 5, [1] * 2 + [2] * 3 + [3] * 2 + [0] * 2], np.int32)
  bias = rng.standard_normal((1, heads, s, s)).astype(np.float32) if spec.get("bias") else None
  scale = 0.3
  kw = dict(causal=spec.get("causal", False), q_segment_ids=qseg, kv_segment_ids=kseg,
            prefix_len=spec.get("prefix"), window=spec.get("window"), scale=scale, implementation="xla")
  mask = np_mask(b, s, s, kw["causal"], qseg, kseg, spec.get("prefix"), spec.get("window"))
  out_ref, (dq, dk, dv, _) = np_attention(q, k, v, mask, bias, scale, dout)
  want = (out_ref, dq, dk, dv)

  def f(q, k, v):
    return jnp.sum(t_jax.attention(q, k, v, bias=bias, **kw) * dout)

  out = t_jax.attention(q, k, v, bias=bias, **kw)
  grads = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  for got, ref in zip((out, *grads), want):
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kv_heads,logits", [(6, (2, 6, 8, 5)), (2, (2, 2, 8, 3, 5))])
def test_xla_attention_adds_a_group_axis_only_for_gqa_after_the_queries(kv_heads, logits):
  # A size-1 group axis made XLA:CPU's attention forward+backward 2x slower, a group axis before the
  # queries 1.3x (benchmarks/NOTES.md): logits are [b, kv_heads, q, k], or [b, kv_heads, q, group, k].
  q, kv = jnp.ones((2, 8, 6, 16)), jnp.ones((2, 5, kv_heads, 16))
  jaxpr = jax.make_jaxpr(jax.grad(lambda q: t_jax.attention(q, kv, kv).sum()))(q)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) >= 3 and dots[0].outvars[0].aval.shape == logits
  assert {e.outvars[0].aval.ndim for e in dots} == {len(logits)}


def test_fully_masked_rows_are_zero_not_nan():
  q = jnp.ones((1, 4, 2, 8))
  seg_q = jnp.array([[1, 1, 2, 2]])
  seg_k = jnp.array([[1, 1, 1, 1]])
  out = t_jax.attention(q, q, q, q_segment_ids=seg_q, kv_segment_ids=seg_k)
  grad = jax.grad(lambda x: t_jax.attention(x, x, x, q_segment_ids=seg_q, kv_segment_ids=seg_k).sum())(q)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad))
  np.testing.assert_array_equal(out[0, 2:], 0.0)
  assert np.abs(out[0, :2]).sum() > 0


def test_dense_mask_agrees_with_elementwise_rules():
  qseg = np.array([[1, 1, 1, 2, 2, 0]])
  got = Mask(causal=True, q_segment_ids=qseg, kv_segment_ids=qseg, window=2, prefix_len=2).dense(1, 6, 6)
  np.testing.assert_array_equal(np.asarray(got)[:, 0], np_mask(1, 6, 6, True, qseg, qseg, 2, 2))


def test_explicit_positions_mask_empty_cache_slots():
  q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 1, 2, 4)), jnp.float32)
  kv = jnp.asarray(np.random.default_rng(1).standard_normal((1, 5, 2, 4)), jnp.float32)
  kv_pos = jnp.array([[0, 1, 2, -1, -1]])
  got = t_jax.attention(q, kv, kv, causal=True, q_positions=jnp.array([[2]]), kv_positions=kv_pos)
  want = t_jax.attention(q, kv[:, :3], kv[:, :3])
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_bad_arguments_are_named():
  q = jnp.ones((1, 4, 3, 8))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    t_jax.attention(q, jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)))
  with pytest.raises(ValueError, match="unknown attention implementation"):
    t_jax.attention(q, q, q, implementation="flash")
  with pytest.raises(ValueError, match="prefix_len"):
    t_jax.attention(q, q, q, prefix_len=2)


def test_attention_dropout_needs_rng_and_is_reproducible():
  q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 2, 8)), jnp.float32)
  with pytest.raises(ValueError, match="dropout_rng"):
    t_jax.attention(q, q, q, dropout_rate=0.5)
  a = t_jax.attention(q, q, q, dropout_rate=0.5, dropout_rng=jax.random.key(1))
  b = t_jax.attention(q, q, q, dropout_rate=0.5, dropout_rng=jax.random.key(1))
  c = t_jax.attention(q, q, q)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


BAD_MASKS = {  # Mask fields -> the field the error names; q is [1, 4, ...], k [1, 5, ...]
    "segments_alone": (dict(q_segment_ids=np.ones((1, 4))), "q_segment_ids"),
    "q_seg_shape": (dict(q_segment_ids=np.ones((1, 5)), kv_segment_ids=np.ones((1, 5))), "q_segment_ids"),
    "kv_seg_shape": (dict(q_segment_ids=np.ones((1, 4)), kv_segment_ids=np.ones((2, 5))), "kv_segment_ids"),
    "prefix_not_causal": (dict(prefix_len=2), "prefix_len"),
    "prefix_shape": (dict(causal=True, prefix_len=np.ones((1, 2), np.int32)), "prefix_len"),
    "window_zero": (dict(window=0), "window"),
    "window_float": (dict(window=2.5), "window"),
    "q_positions_shape": (dict(q_positions=np.ones((1, 5))), "q_positions"),
    "kv_positions_shape": (dict(kv_positions=np.ones((3, 5))), "kv_positions"),
}


@pytest.mark.parametrize("case", sorted(BAD_MASKS))
def test_mask_names_each_bad_field(case):
  """Each rule lives in Mask.validate; attention() reports the same error for the mask and keyword forms."""
  fields, name = BAD_MASKS[case]
  q, k = jnp.ones((1, 4, 2, 8)), jnp.ones((1, 5, 2, 8))
  for call in (lambda: Mask(**fields).validate(q.shape, k.shape), lambda: t_jax.attention(q, k, k, **fields),
               lambda: t_jax.attention(q, k, k, mask=Mask(**fields))):
    with pytest.raises(ValueError, match=f"^{name} "):
      call()


def test_mask_argument_equals_keyword_form():
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.standard_normal((2, 6, 2, 8)), jnp.float32) for _ in range(2))
  seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
  for kw in (dict(causal=True, window=3, q_segment_ids=seg, kv_segment_ids=seg, prefix_len=np.array([2, 4])),
             dict(causal=True, q_positions=jnp.arange(6)[None] + 2, kv_positions=jnp.arange(6)[None] - 1)):
    np.testing.assert_array_equal(t_jax.attention(q, k, k, mask=Mask(**kw)), t_jax.attention(q, k, k, **kw))
  with pytest.raises(ValueError, match="not both"):
    t_jax.attention(q, k, k, mask=Mask(causal=True), window=2)


def test_mask_is_a_pytree_through_jit():
  seg = jnp.array([[1, 1, 2, 2, 2, 0]])
  mask = Mask(causal=True, window=3, q_segment_ids=seg, kv_segment_ids=seg, prefix_len=jnp.array([2]))
  assert len(jax.tree.leaves(mask)) == 3  # the arrays; causal and window are static
  q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 2, 8)), jnp.float32)
  attend = lambda q, mask: t_jax.attention(q, q, q, mask=mask)
  np.testing.assert_allclose(jax.jit(attend)(q, mask), attend(q, mask), atol=1e-6)
  np.testing.assert_array_equal(jax.jit(lambda m: m.dense(1, 6, 6))(mask), mask.dense(1, 6, 6))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_is_xla_until_the_device_kind_is_verified(backend, monkeypatch):
  """'auto' picks Pallas only on a device kind in VERIFIED_PALLAS (admitted by a committed benchmark)."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  q = jnp.ones((1, 16, 2, 16))
  assert api._auto(q, q, Mask(causal=True), None) == "xla"
  monkeypatch.setitem(api.VERIFIED_PALLAS, jax.devices()[0].device_kind, "benchmarks/results/<run>.json")
  assert api._auto(q, q, Mask(causal=True), None) == "pallas"
  assert api._auto(q, q, Mask(causal=True, kv_positions=jnp.arange(16)[None]), None) == "xla"  # not covered


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU (benchmarks/gpu_run.py runs it)")
@pytest.mark.parametrize("mask", [Mask(), Mask(causal=True), Mask(causal=True, window=100)],
                         ids=["none", "causal", "causal_window"])
def test_cudnn_matches_the_float64_reference_on_a_gpu(mask):
  """implementation='cudnn' in bf16: output and gradients against the float64 oracle on the same inputs."""
  b, s, h, d = 2, 512, 4, 128
  rng = np.random.default_rng(0)
  q, k, v, g = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.bfloat16) for _ in range(4))
  attend = lambda q, k, v: t_jax.attention(q, k, v, mask=mask, implementation="cudnn")
  out, vjp = jax.vjp(attend, q, k, v)
  m = np_mask(b, s, s, causal=mask.causal, window=mask.window)
  want, (dq, dk, dv, _) = np_attention(*(np.asarray(x, np.float64) for x in (q, k, v)), m, None, d ** -0.5,
                                       np.asarray(g, np.float64))
  rel = lambda a, r: np.linalg.norm(np.asarray(a, np.float64) - r) / np.linalg.norm(r)
  assert rel(out, want) < 1e-2
  for got, ref in zip(vjp(g), (dq, dk, dv)):
    assert rel(got, ref) < 2e-2
