"""t_jax.attention (XLA implementation) against a float64 NumPy reference, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import t_jax
from t_jax.attention import make_mask
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


def test_fully_masked_rows_are_zero_not_nan():
  q = jnp.ones((1, 4, 2, 8))
  seg_q = jnp.array([[1, 1, 2, 2]])
  seg_k = jnp.array([[1, 1, 1, 1]])
  out = t_jax.attention(q, q, q, q_segment_ids=seg_q, kv_segment_ids=seg_k)
  grad = jax.grad(lambda x: t_jax.attention(x, x, x, q_segment_ids=seg_q, kv_segment_ids=seg_k).sum())(q)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad))
  np.testing.assert_array_equal(out[0, 2:], 0.0)
  assert np.abs(out[0, :2]).sum() > 0


def test_make_mask_agrees_with_elementwise_rules():
  qseg = np.array([[1, 1, 1, 2, 2, 0]])
  got = make_mask(1, 6, 6, causal=True, q_segment_ids=qseg, kv_segment_ids=qseg, window=2, prefix_len=2)
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
