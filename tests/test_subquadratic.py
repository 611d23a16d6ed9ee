"""Sub-quadratic attention kinds (#15): performer/rfa, bigbird, lsh, aft against their exact forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t_jax.attention import Mask, xla_attention
from t_jax.attention.aft import aft_attention, aft_dense
from t_jax.attention.linear import draw_features, feature_map, linear_attention, linear_sums
from t_jax.attention.lsh import draw_rotations, lsh_attention
from t_jax.attention.masks import BlockSparse
from t_jax.models import ModelConfig, build_model


def _normal(seed, *shape, scale=1.0):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _softmax_ref(q, k, v, allowed, scale):
  """Naive masked softmax attention; allowed [b, q, k] (numpy-style, no t_jax code)."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  logits = jnp.where(allowed[:, None], logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(allowed[:, None], p, 0.0), v)


# Performer / RFA -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["performer", "rfa"])
def test_random_features_are_unbiased_with_error_shrinking_as_one_over_sqrt_features(kind):
  q, k, v = _normal(0, 1, 8, 1, 8, scale=0.5), _normal(1, 1, 8, 1, 8, scale=0.5), _normal(2, 1, 8, 1, 8)
  sigma, scale = 1.0, 8 ** -0.5
  if kind == "rfa":  # RFA estimates softmax(sigma^2 cos(q, k))
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    exact = xla_attention(unit(q), unit(k), v, scale=sigma ** 2)
  else:
    exact = xla_attention(q, k, v, scale=scale)

  def draws(m, n):
    one = lambda key: linear_attention(q, k, v, mask=Mask(), kind=kind, w=draw_features(key, kind, m, 8, sigma),
                                       scale=scale)[0]
    return jax.vmap(one)(jax.random.split(jax.random.PRNGKey(m), n))

  rms = {}
  for m in (64, 128):
    est = draws(m, 400)
    rms[m] = float(jnp.sqrt(jnp.mean((est - exact) ** 2)))
    bias = float(jnp.sqrt(jnp.mean((est.mean(0) - exact) ** 2)))
    assert bias < 0.2 * rms[m], (m, bias, rms[m])  # the mean over draws converges to softmax attention
  assert 1.15 < rms[64] / rms[128] < 1.75, rms  # ~sqrt(2) per doubling of the features


def _allowed(mask, b, n):
  dense = mask.dense(b, n, n)
  return jnp.ones((b, n, n), bool) if dense is None else dense[:, 0]


def _quadratic_sums(fq, fk, v, mask):
  allowed = _allowed(mask, fq.shape[0], fq.shape[1])
  a = jnp.einsum("bqhf,bkhf->bhqk", fq, fk) * allowed[:, None]
  return jnp.einsum("bhqk,bkhd->bqhd", a, v), jnp.einsum("bhqk->bqh", a)


SEG = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 0], [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]], jnp.int32)
MASKS = {"causal": Mask(causal=True), "causal_packed": Mask(causal=True, q_segment_ids=SEG, kv_segment_ids=SEG),
         "prefix": Mask(causal=True, prefix_len=jnp.asarray([3, 7])),
         "bidirectional": Mask(), "bidirectional_packed": Mask(q_segment_ids=SEG, kv_segment_ids=SEG)}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_prefix_sum_form_equals_quadratic_masked_form(name):
  w = draw_features(jax.random.PRNGKey(0), "performer", 16, 8)
  q, k, v = _normal(0, 2, 11, 2, 8), _normal(1, 2, 11, 2, 8), _normal(2, 2, 11, 2, 8)
  fq, fk = feature_map(q, w, "performer", 0.3, True), feature_map(k, w, "performer", 0.3, False)
  num, den, _ = linear_sums(fq, fk, v, MASKS[name], chunk=4)  # 11 = 4 + 4 + 3: a ragged last chunk
  ref_num, ref_den = _quadratic_sums(fq, fk, v, MASKS[name])
  np.testing.assert_allclose(num, ref_num, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(den, ref_den, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["performer", "rfa"])
def test_recurrent_state_continues_the_parallel_form(kind):
  w = draw_features(jax.random.PRNGKey(3), kind, 16, 8)
  q, k, v = _normal(0, 2, 9, 4, 8), _normal(1, 2, 9, 2, 8), _normal(2, 2, 9, 2, 8)
  full, _ = linear_attention(q, k, v, mask=Mask(causal=True), kind=kind, w=w, scale=0.35, chunk=4)
  out, state = linear_attention(q[:, :5], k[:, :5], v[:, :5], mask=Mask(causal=True), kind=kind, w=w, scale=0.35)
  steps = [out]
  for t in range(5, 9):
    pos = jnp.full((2, 1), t)
    o, state = linear_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], kind=kind, w=w, scale=0.35,
                                mask=Mask(causal=True, q_positions=pos, kv_positions=pos), state=state)
    steps.append(o)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-4, atol=1e-5)


def _tiny(kind, architecture="decoder", num_layers=2, **kw):
  return ModelConfig(architecture=architecture, vocab_size=40, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                     num_layers=num_layers, max_len=32, attention_kind=kind, attention_features=16, attention_chunk=4, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["performer", "rfa"])
def test_recurrent_decode_generates_the_parallel_forms_tokens(kind):
  from t_jax.inference import generate
  cfg = _tiny(kind)
  model = build_model(cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))["params"]
  prompts, new = [[5, 9, 2, 7, 1], [3, 8]], 6
  tokens = np.asarray(generate(cfg, params, prompts, max_new_tokens=new, method="greedy"))
  forward = jax.jit(lambda ids: model.apply({"params": params}, ids))
  for row, prompt in enumerate(prompts):  # the parallel form, one full forward per token (fixed width: one compile)
    seq = list(prompt)
    for _ in range(new):
      buf = np.zeros((1, len(prompt) + new), np.int32)
      buf[0, :len(seq)] = seq
      seq.append(int(jnp.argmax(forward(buf)[0, len(seq) - 1])))
    assert tokens[row].tolist() == seq[len(prompt):], (row, tokens[row], seq)


# BigBird --------------------------------------------------------------------------------------------------

def _bigbird_case(seed=0, b=2, n=24, h=2, d=8):
  return _normal(seed, b, n, h, d), _normal(seed + 1, b, n, h // 2, d), _normal(seed + 2, b, n, h // 2, d)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_with_every_block_selected_equals_full_attention(causal):
  q, k, v = _bigbird_case()
  every = BlockSparse(block=4, window_blocks=2 * 6 + 1, global_blocks=0, random_blocks=0)
  full = xla_attention(q, k, v, mask=Mask(causal=causal), scale=0.3)
  sparse = xla_attention(q, k, v, mask=Mask(causal=causal, block_sparse=every), scale=0.3)
  np.testing.assert_allclose(sparse, full, rtol=1e-6, atol=1e-6)


def _expected_blocks(rule, nb, causal):
  """The pattern by its definition, per block pair (random draws read from the rule for one query block)."""
  exp = np.zeros((nb, nb), bool)
  for i in range(nb):
    drawn = np.asarray(rule.allowed(jnp.asarray([[i * rule.block]]), jnp.arange(0, nb * rule.block, rule.block)[None],
                                    causal, nb * rule.block))[0]
    for j in range(nb):
      exp[i, j] = abs(i - j) <= rule.window_blocks // 2 or i < rule.global_blocks or j < rule.global_blocks or drawn[j]
  return exp & (np.tril(np.ones((nb, nb), bool)) if causal else True)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_pattern_is_block_sparse_seeded_and_equals_dense_reference(causal):
  rule = BlockSparse(block=4, window_blocks=3, global_blocks=1, random_blocks=2, seed=7)
  mask = Mask(causal=causal, block_sparse=rule)
  dense = np.asarray(mask.dense(1, 24, 24)[0, 0])
  blocks = dense.reshape(6, 4, 6, 4)
  assert (blocks.all((1, 3)) | ~blocks.any((1, 3)))[~np.eye(6, dtype=bool) if causal else slice(None)].all()
  blk = blocks.any((1, 3))
  assert (blk == _expected_blocks(rule, 6, causal)).all()
  off = blk & ~_expected_blocks(BlockSparse(4, 3, 1, 0), 6, causal)
  assert off.sum(1).max() <= 2 and off.sum() > 0  # at most random_blocks extra blocks per row, some drawn
  assert (np.asarray(Mask(causal=causal, block_sparse=rule).dense(1, 24, 24)) == dense).all()  # same every call
  if causal:  # a longer sequence (decoding further) keeps the pattern of the shorter one
    assert (np.asarray(mask.dense(1, 40, 40)[0, 0, :24, :24]) == dense).all()
  seeded = lambda seed: np.asarray(Mask(causal=causal, block_sparse=BlockSparse(4, 3, 1, 2, seed)).dense(1, 64, 64))
  assert (seeded(7) != seeded(8)).any()
  q, k, v = _bigbird_case()
  allowed = jnp.asarray(np.broadcast_to(dense, (2, 24, 24)))
  ref = lambda q, k, v: _softmax_ref(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2), allowed, 0.3)
  got = lambda q, k, v: xla_attention(q, k, v, mask=mask, scale=0.3)
  np.testing.assert_allclose(got(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  grads = lambda f: jax.jit(jax.grad(loss(f), (0, 1, 2)))(q, k, v)
  for g, r in zip(grads(got), grads(ref)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal, rule, extra", [
    (False, BlockSparse(4, 3, 1, 2, seed=3), "segments"), (True, BlockSparse(4, 3, 1, 2, seed=3), "prefix"),
    (True, BlockSparse(4, 5, 0, 3, seed=1), "segments"), (False, BlockSparse(8, 1, 2, 1, seed=0), None)])
def test_gathered_bigbird_equals_the_dense_reference_with_the_same_mask(causal, rule, extra):
  from t_jax.attention.bigbird import bigbird_attention
  q, k, v = _bigbird_case(n=22)  # 22: a ragged last block
  fields = {"segments": dict(q_segment_ids=SEG[:, :11].repeat(2, 1), kv_segment_ids=SEG[:, :11].repeat(2, 1)),
            "prefix": dict(prefix_len=jnp.asarray([5, 9])), None: {}}[extra]
  mask = Mask(causal=causal, block_sparse=rule, **fields)
  loss = lambda f: jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, mask=mask, scale=0.3))),
                                              (0, 1, 2)))
  (got, g_grads), (ref, r_grads) = loss(bigbird_attention)(q, k, v), loss(xla_attention)(q, k, v)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  for g, r in zip(g_grads, r_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_bigbird_runs_in_the_pallas_kernel_and_auto_stays_on_xla(monkeypatch):
  import t_jax.kernels as kernels
  from t_jax.attention import attention, variants
  q, k, v = _bigbird_case()
  mask = Mask(causal=True, block_sparse=BlockSparse(4, 3, 1, 1))
  ref = xla_attention(q, k, v, mask=mask, scale=8 ** -0.5)
  assert kernels.supports(q, k, mask)  # interpret mode on CPU
  np.testing.assert_allclose(attention(q, k, v, mask=mask), ref, rtol=1e-6)
  calls, real = [], kernels.flash_attention
  monkeypatch.setattr(kernels, "flash_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
  spec = variants.Spec(kind="bigbird", sparse_block=4, window_blocks=3, global_blocks=1, random_blocks=1)
  out = attention(q, k, v, kind=spec, mask=Mask(causal=True), implementation="pallas")
  assert len(calls) == 1 and calls[0]["mask"].block_sparse == mask.block_sparse
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_every_kind_goes_through_the_one_entry_point_which_validates_its_mask():
  from t_jax.attention import attention, variants
  q, k, v = _normal(0, 2, 8, 4, 8), _normal(1, 2, 8, 2, 8), _normal(2, 2, 8, 2, 8)
  mask, scale = Mask(causal=True), 8 ** -0.5
  w = variants.Spec(kind="performer").draws(8)
  own = {"performer": linear_attention(q, k, v, mask=mask, kind="performer", w=w, scale=scale)[0],
         "lsh": lsh_attention(q, q, v, mask=mask, scale=scale, rotations=variants.Spec(kind="lsh").draws(8)),
         "aft": aft_attention(q, k, v, mask=mask),
         "softmax": xla_attention(q, k, v, mask=mask, scale=scale)}
  for kind, ref in own.items():
    keys = q if kind == "lsh" else k
    np.testing.assert_allclose(attention(q, keys, v, kind=kind, causal=True), ref, rtol=1e-6)
    with pytest.raises(ValueError, match="q_segment_ids and kv_segment_ids"):  # checked for every kind
      attention(q, keys, v, kind=kind, causal=True, q_segment_ids=jnp.ones((2, 8), jnp.int32))
  out, state = attention(q[:, :1], k[:, :1], v[:, :1], kind="performer", causal=True,  # decoding: (out, state)
                         q_positions=jnp.zeros((2, 1), jnp.int32), kv_positions=jnp.zeros((2, 1), jnp.int32),
                         state=(jnp.zeros((2, 4, 64, 8)), jnp.zeros((2, 4, 64))))
  np.testing.assert_allclose(out, own["performer"][:, :1], rtol=1e-5)
  assert [x.shape for x in state] == [(2, 4, 64, 8), (2, 4, 64)]
  with pytest.raises(ValueError, match="unknown attention kind 'flash'"):
    attention(q, k, v, kind="flash")


# LSH ------------------------------------------------------------------------------------------------------

def _shared_qk_ref(q, v, allowed, scale):
  """Full shared-QK attention (Reformer): keys = unit queries, oneself only when nothing else is allowed."""
  k = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  n = q.shape[1]
  logits = jnp.where(jnp.eye(n, dtype=bool), -1e5, logits)
  logits = jnp.where(allowed[:, None], logits, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("name", ["causal", "causal_packed", "bidirectional_packed", "prefix"])
def test_lsh_with_one_bucket_and_one_hash_equals_full_shared_qk_attention(name):
  q, v = _normal(0, 2, 11, 2, 8), _normal(1, 2, 11, 2, 8)
  mask = MASKS[name]
  got = lsh_attention(q, q, v, mask=mask, scale=0.5, rotations=draw_rotations(jax.random.PRNGKey(0), 8, 1, 1),
                      chunk=11)
  ref = _shared_qk_ref(q, v, _allowed(mask, 2, 11), 0.5)
  real = np.asarray(SEG != 0)[:, :, None, None] if "packed" in name else True
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, ref, 0), rtol=1e-5, atol=1e-6)


def test_lsh_causal_never_attends_to_the_future():
  rot = draw_rotations(jax.random.PRNGKey(1), 8, 3, 4)  # 3 hashes, 4 buckets, chunks of 4 over 16 positions
  q, v = _normal(0, 1, 16, 2, 8), _normal(1, 1, 16, 2, 8)
  f = lambda q, v: lsh_attention(q, q, v, mask=Mask(causal=True), scale=1.0, rotations=rot, chunk=4)
  grad = jax.jit(jax.grad(lambda q, v, t: jnp.sum(jnp.sin(f(q, v)) * (jnp.arange(16) <= t)[None, :, None, None]),
                          (0, 1)))
  for t in (4, 9):  # outputs up to t depend on no query/key/value after t
    dq, dv = grad(q, v, t)
    for d in (dq, dv):
      assert np.abs(np.asarray(d)[:, t + 1:]).max() == 0.0 and np.abs(np.asarray(d)[:, :t + 1]).max() > 0.0


def test_lsh_decoding_against_a_cache_matches_chunked_attention_with_one_bucket():
  q, v = _normal(0, 1, 8, 2, 8), _normal(1, 1, 8, 2, 8)
  rot = draw_rotations(jax.random.PRNGKey(0), 8, 1, 1)
  full = lsh_attention(q, q, v, mask=Mask(causal=True), scale=0.5, rotations=rot, chunk=8)
  pos = jnp.arange(8)[None]
  last = lsh_attention(q[:, -1:], q, v, mask=Mask(causal=True, q_positions=pos[:, -1:], kv_positions=pos),
                       scale=0.5, rotations=rot)
  np.testing.assert_allclose(last, full[:, -1:], rtol=1e-5, atol=1e-6)


# AFT ------------------------------------------------------------------------------------------------------

def _aft_naive(q, k, v, allowed, bias):
  """Y_i = sigmoid(Q_i) * sum_j exp(K_j + w_ij) V_j / sum_j exp(K_j + w_ij), by loops (numpy, float64)."""
  q, k, v, allowed = (np.asarray(x, np.float64) for x in (q, k, v, allowed))
  b, n, h, d = q.shape
  k, v = np.repeat(k, h // k.shape[2], 2), np.repeat(v, h // v.shape[2], 2)
  s = 0 if bias is None else (bias.shape[1] + 1) // 2
  out = np.zeros_like(q)
  for bi in range(b):
    for i in range(n):
      num, den = np.zeros((h, d)), np.zeros((h, d))
      for j in range(n):
        if allowed[bi, i, j]:
          w = np.asarray(bias, np.float64)[:, i - j + s - 1, None] if abs(i - j) < s else 0.0
          num += np.exp(k[bi, j] + w) * v[bi, j]
          den += np.exp(k[bi, j] + w)
      out[bi, i] = np.where(den > 0, 1 / (1 + np.exp(-q[bi, i])) * num / np.where(den > 0, den, 1), 0)
  return out


@pytest.mark.parametrize("name, window", [("causal_packed", 0), ("causal_packed", 3), ("prefix", 3),
                                          ("bidirectional", 3), ("bidirectional_packed", 3)])
def test_aft_equals_its_naive_formula(name, window):
  q, k, v = _normal(0, 2, 11, 4, 3), _normal(1, 2, 11, 2, 3), _normal(2, 2, 11, 2, 3)
  bias = _normal(3, 4, 2 * window - 1, scale=0.5) if window else None
  mask = MASKS[name]
  ref = _aft_naive(q, k, v, _allowed(mask, 2, 11), bias)
  real = np.asarray(SEG != 0)[:, :, None, None] if "packed" in name else True
  for got in (aft_attention(q, k, v, mask=mask, bias=bias, chunk=4), aft_dense(q, k, v, mask=mask, bias=bias)):
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, ref, 0), rtol=1e-4, atol=1e-5)


# Models, config -------------------------------------------------------------------------------------------

@pytest.mark.slow  # a model per case
@pytest.mark.parametrize("kind", ["rfa", "bigbird", "lsh", "aft"])
def test_kinds_train_in_encoder_and_encoder_decoder_models(kind):
  import optax
  for arch in ("encoder", "encoder_decoder"):  # bidirectional and causal self-attention
    cfg = _tiny(kind, arch, 1, attention_sparse_block=4, attention_aft_window=2, attention_redraw=True)
    model = build_model(cfg, deterministic=False)
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 1, 40)
    args = (ids, ids) if arch == "encoder_decoder" else (ids,)
    params = model.init(jax.random.PRNGKey(0), *args)["params"]
    if kind == "aft":
      assert "aft_bias" in params["encoder"]["layer_0"]["self_attention"]
    loss = lambda p, model=model, args=args, ids=ids: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, *args, rngs={"dropout": jax.random.PRNGKey(1)}), ids).mean()
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads)), (kind, arch)


@pytest.mark.parametrize("bindings, words", [
    (["ModelConfig.attention_kind = 'lsh'", "ModelConfig.position = 'alibi'"], ["'lsh'", "'alibi'"]),
    (["ModelConfig.attention_kind = 'performer'", "ModelConfig.window = 16"], ["'performer'", "window=16"]),
    (["ModelConfig.attention_kind = 'aft'", "ModelConfig.attention_impl = 'pallas'"], ["'aft'", "'pallas'"]),
    (["ModelConfig.attention_kind = 'lsh'", "ModelConfig.attention_num_buckets = 3"], ["num_buckets"]),
    (["ModelConfig.attention_kind = 'sparse'"], ["attention_kind", "'sparse'"]),
])
def test_unsupported_combinations_are_refused_at_config_time(bindings, words):
  from launch import config
  config.parse(bindings=bindings)
  with pytest.raises(config.ConfigError) as e:
    config.build(ModelConfig)
  assert all(w in str(e.value) for w in words), str(e.value)


def test_attention_kind_is_a_gin_knob():
  from launch import config
  config.parse(bindings=["ModelConfig.attention_kind = 'performer'", "ModelConfig.attention_features = 32"])
  cfg = config.build(ModelConfig)
  assert (cfg.attention_kind, cfg.attention_features) == ("performer", 32)


@pytest.mark.slow  # a model per case
def test_reversible_layers_give_the_ordinary_blocks_gradients(monkeypatch):
  from t_jax.models import reversible, transformer
  cfg = ModelConfig(architecture="decoder", vocab_size=40, d_model=16, num_heads=2, mlp_dim=32, num_layers=3,
                    max_len=32, reversible=True, attention_kind="lsh", attention_num_buckets=2, attention_chunk=4)
  model = build_model(cfg)
  ids = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 1, 40)
  params = model.init(jax.random.PRNGKey(0), ids)["params"]
  assert "layer_2_mlp" in params["decoder"]
  loss = lambda p: jnp.mean(jnp.sin(model.apply({"params": p}, ids)))
  rev = jax.jit(jax.grad(loss))(params)  # rebuilds each layer's inputs from its outputs
  monkeypatch.setattr(transformer, "reversible", reversible.plain)  # the same layers under ordinary autodiff
  plain = jax.jit(jax.grad(loss))(params)
  for a, b in zip(jax.tree.leaves(rev), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="reversible"):
    ModelConfig(architecture="encoder_decoder", reversible=True)
