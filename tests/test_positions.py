"""Position schemes: RoPE relativity, sinusoidal shift maps, ALiBi slopes, T5 buckets."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from t_jax.models import positions as P


def test_rope_dot_product_depends_only_on_offset():
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32) for _ in range(2))
  def dot(m, n):
    qm = P.apply_rope(q, jnp.array([[m]]))
    kn = P.apply_rope(k, jnp.array([[n]]))
    return float(jnp.sum(qm * kn))
  for offset in (0, 3, 17):
    vals = [dot(m + offset, m) for m in (0, 5, 40, 123)]
    np.testing.assert_allclose(vals, vals[0], rtol=1e-4, atol=1e-4)
  assert abs(dot(5, 0) - dot(6, 0)) > 1e-3  # and it does depend on the offset
  # Rotation preserves norms.
  np.testing.assert_allclose(jnp.linalg.norm(P.apply_rope(q, jnp.array([[77]]))), jnp.linalg.norm(q), rtol=1e-5)


def test_sinusoidal_shift_is_a_fixed_linear_map():
  d, k = 16, 7
  pe = np.asarray(P.sinusoidal(jnp.arange(200)[None], d))[0]
  src, dst = pe[:150], pe[k:150 + k]
  m, *_ = np.linalg.lstsq(src, dst, rcond=None)  # one matrix M with PE[p + k] = PE[p] M for all p
  np.testing.assert_allclose(src @ m, dst, atol=1e-4)
  # The paper's formula, element by element.
  p, i = 13, 3
  assert math.isclose(pe[p, 2 * i], math.sin(p / 10000 ** (2 * i / d)), abs_tol=1e-5)
  assert math.isclose(pe[p, 2 * i + 1], math.cos(p / 10000 ** (2 * i / d)), abs_tol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_alibi_slopes_are_the_papers_geometric_sequence(n):
  s = P.alibi_slopes(n)
  np.testing.assert_allclose(s[0], 2 ** (-8 / n), rtol=1e-6)
  np.testing.assert_allclose(s[1:] / s[:-1], 2 ** (-8 / n), rtol=1e-5)


def test_alibi_slopes_non_power_of_two():
  s = P.alibi_slopes(12)  # 8 from the 8-head sequence, then every other one of the 16-head sequence
  np.testing.assert_allclose(s[:8], P.alibi_slopes(8))
  np.testing.assert_allclose(s[8:], P.alibi_slopes(16)[0::2][:4])


def test_alibi_bias_is_linear_in_distance():
  b = np.asarray(P.alibi_bias(jnp.arange(6)[None], jnp.arange(6)[None], 4))
  np.testing.assert_allclose(b[0, 2, 5, 1], -P.alibi_slopes(4)[2] * 4, rtol=1e-6)
  np.testing.assert_allclose(np.diagonal(b[0, 0]), 0)


def _mtf_bucket(rel, bidirectional, num_buckets=32, max_distance=128):
  """T5's published bucketing (mesh-tensorflow), written out for one integer."""
  ret, n = 0, -rel
  if bidirectional:
    num_buckets //= 2
    ret += num_buckets if n < 0 else 0
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_match_published_bucketing(bidirectional):
  rel = np.arange(-300, 301)
  got = np.asarray(P.t5_bucket(jnp.asarray(rel), bidirectional=bidirectional))
  want = np.array([_mtf_bucket(int(r), bidirectional) for r in rel])
  np.testing.assert_array_equal(got, want)
  assert got.max() == 31 and got.min() == 0


def test_t5_buckets_match_transformers_reference():
  torch = pytest.importorskip("torch")
  t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
  rel = np.arange(-200, 201)
  for bidi in (True, False):
    want = t5.T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bidi, num_buckets=32,
                                                    max_distance=128).numpy()
    np.testing.assert_array_equal(np.asarray(P.t5_bucket(jnp.asarray(rel), bidirectional=bidi)), want)
