"""The model family: causality, packing, padding, GQA/MQA, scan vs unrolled, dropout, dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t_jax.models import ModelConfig, build_model, init_params

V = 40


def tiny(**kw) -> ModelConfig:
  base = dict(vocab_size=V, d_model=32, num_heads=4, head_dim=8, mlp_dim=48, num_layers=2, max_len=64)
  return ModelConfig(**{**base, **kw})


def ids(seed, shape=(2, 10)):
  return jnp.asarray(np.random.default_rng(seed).integers(3, V, shape), jnp.int32)


class Jitted:
  """A model whose apply is jitted (eager op-by-op dispatch is slow on CPU)."""

  def __init__(self, model):
    self.model = model
    self.apply = jax.jit(model.apply)


def setup(cfg):
  model = build_model(cfg)
  return Jitted(model), init_params(model, jax.random.key(0))


POSITIONS = ["rope", "alibi", "t5_relative", "learned", "sinusoidal", "none"]


@pytest.mark.parametrize("position", POSITIONS)
def test_decoder_is_causal(position):
  model, p = setup(tiny(position=position, num_kv_heads=2))
  a, b = ids(0), ids(0)
  b = b.at[:, 6:].set(ids(1)[:, 6:])
  la, lb = model.apply({"params": p}, a), model.apply({"params": p}, b)
  np.testing.assert_allclose(la[:, :6], lb[:, :6], atol=1e-5)
  assert not np.allclose(la[:, 6:], lb[:, 6:], atol=1e-3)


@pytest.mark.parametrize("position", ["t5_relative", "sinusoidal"])
def test_encoder_decoder_decoder_is_causal(position):
  model, p = setup(tiny(architecture="encoder_decoder", position=position))
  src, tgt = ids(2, (2, 7)), ids(3)
  tgt2 = tgt.at[:, 5:].set(ids(4)[:, 5:])
  la, lb = model.apply({"params": p}, src, tgt), model.apply({"params": p}, src, tgt2)
  np.testing.assert_allclose(la[:, :5], lb[:, :5], atol=1e-5)
  assert not np.allclose(la[:, 5:], lb[:, 5:], atol=1e-3)
  # ... and every target position sees the whole source.
  lc = model.apply({"params": p}, src.at[:, -1].set(3), tgt)
  assert not np.allclose(la[:, 0], lc[:, 0], atol=1e-4)


def test_prefix_lm_bidirectional_in_prefix_causal_after():
  model, p = setup(tiny(architecture="prefix_lm"))
  x = ids(5)
  prefix = jnp.array([4, 4])
  base = model.apply({"params": p}, x, prefix_len=prefix)
  in_prefix = model.apply({"params": p}, x.at[:, 3].set(3), prefix_len=prefix)
  assert not np.allclose(base[:, 0], in_prefix[:, 0], atol=1e-4)  # position 0 sees position 3
  after = model.apply({"params": p}, x.at[:, 7:].set(3), prefix_len=prefix)
  np.testing.assert_allclose(base[:, :7], after[:, :7], atol=1e-5)  # causal after the prefix
  assert not np.allclose(base[:, 7:], after[:, 7:], atol=1e-3)


def _packed(arch_kw, position):
  model, p = setup(tiny(position=position, **arch_kw))
  a, b = ids(6, (1, 5)), ids(7, (1, 4))
  packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
  seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 3])
  pos = jnp.array([list(range(5)) + list(range(4)) + [0] * 3])
  return model, p, a, b, packed, seg, pos


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
@pytest.mark.parametrize("position", ["rope", "learned", "alibi", "t5_relative"])
def test_packing_equals_separate_runs(arch, position):
  model, p, a, b, packed, seg, pos = _packed(dict(architecture=arch), position)
  out = model.apply({"params": p}, packed, segment_ids=seg, positions=pos)
  np.testing.assert_allclose(out[:, :5], model.apply({"params": p}, a), atol=1e-5)
  np.testing.assert_allclose(out[:, 5:9], model.apply({"params": p}, b), atol=1e-5)


def test_packing_encoder_decoder():
  model, p = setup(tiny(architecture="encoder_decoder", position="t5_relative"))
  s1, s2, t1, t2 = ids(8, (1, 4)), ids(9, (1, 6)), ids(10, (1, 3)), ids(11, (1, 5))
  src, tgt = jnp.concatenate([s1, s2], 1), jnp.concatenate([t1, t2], 1)
  es, ds = jnp.array([[1] * 4 + [2] * 6]), jnp.array([[1] * 3 + [2] * 5])
  ep, dp = jnp.array([list(range(4)) + list(range(6))]), jnp.array([list(range(3)) + list(range(5))])
  out = model.apply({"params": p}, src, tgt, encoder_segment_ids=es, decoder_segment_ids=ds,
                    encoder_positions=ep, decoder_positions=dp)
  np.testing.assert_allclose(out[:, :3], model.apply({"params": p}, s1, t1), atol=1e-5)
  np.testing.assert_allclose(out[:, 3:], model.apply({"params": p}, s2, t2), atol=1e-5)


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_padding_does_not_change_real_positions(arch):
  model, p = setup(tiny(architecture=arch, position="learned"))
  x = ids(12, (1, 6))
  padded = jnp.concatenate([x, ids(13, (1, 4))], axis=1)
  mask = jnp.array([[1] * 6 + [0] * 4])
  out = model.apply({"params": p}, padded, padding_mask=mask)
  np.testing.assert_allclose(out[:, :6], model.apply({"params": p}, x), atol=1e-5)


def test_encoder_decoder_source_padding():
  model, p = setup(tiny(architecture="encoder_decoder", position="sinusoidal"))
  src, tgt = ids(14, (1, 5)), ids(15, (1, 4))
  padded = jnp.concatenate([src, ids(16, (1, 3))], axis=1)
  out = model.apply({"params": p}, padded, tgt, encoder_padding_mask=jnp.array([[1] * 5 + [0] * 3]))
  np.testing.assert_allclose(out, model.apply({"params": p}, src, tgt), atol=1e-5)


def _repeat_kv(params, groups):
  """MHA params equal to a GQA model: each kv head repeated for its query group."""
  def fix(path, x):
    names = [getattr(k, "key", None) for k in path]
    if "self_attention" in names and names[-2] in ("key", "value"):
      return jnp.repeat(x, groups, axis=-2)
    return x
  return jax.tree_util.tree_map_with_path(fix, params)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_and_mqa_equal_mha_with_repeated_kv(kv_heads):
  gqa, p = setup(tiny(num_kv_heads=kv_heads, position="rope"))
  mha = Jitted(build_model(tiny(position="rope")))
  k = p["decoder"]["layer_0"]["self_attention"]["key"]["kernel"]
  assert k.shape == (32, kv_heads, 8)
  x = ids(17)
  np.testing.assert_allclose(gqa.apply({"params": p}, x),
                             mha.apply({"params": _repeat_kv(p, 4 // kv_heads)}, x), atol=1e-5)


def _stack_layers(tree, n):
  """Unrolled params (layer_0..) -> scanned params (layers, leading axis)."""
  if not isinstance(tree, dict):
    return tree
  if "layer_0" in tree:
    rest = {k: v for k, v in tree.items() if not k.startswith("layer_")}
    layers = [tree[f"layer_{i}"] for i in range(n)]
    return {**rest, "layers": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)}
  return {k: _stack_layers(v, n) for k, v in tree.items()}


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder_decoder"])
def test_scan_equals_unrolled_and_remat_equals_plain(arch):
  cfg = tiny(architecture=arch, position="t5_relative")
  model, p = setup(cfg)
  scanned = Jitted(build_model(cfg.replace(scan_layers=True, remat_policy="dots")))
  ps = _stack_layers(p, 2)
  assert jax.tree_util.tree_structure(ps) == jax.tree_util.tree_structure(
      init_params(scanned.model, jax.random.key(1)))
  args = (ids(18), ids(19)) if arch == "encoder_decoder" else (ids(18),)
  np.testing.assert_allclose(model.apply({"params": p}, *args), scanned.apply({"params": ps}, *args), atol=1e-5)
  loss = lambda m, q: jnp.mean(m.apply({"params": q}, *args) ** 2)
  g1 = jax.jit(jax.grad(lambda q: loss(model.model, q)))(p)
  g2 = jax.jit(jax.grad(lambda q: loss(scanned.model, q)))(ps)
  for a, b in zip(jax.tree_util.tree_leaves(_stack_layers(g1, 2)), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_dropout_only_with_rng_and_training():
  cfg = tiny(dropout_rate=0.3, attention_dropout_rate=0.3)
  model, p = setup(cfg)
  x = ids(20)
  train = Jitted(build_model(cfg, deterministic=False))
  eval_out = model.apply({"params": p}, x)
  a = train.apply({"params": p}, x, rngs={"dropout": jax.random.key(1)})
  b = train.apply({"params": p}, x, rngs={"dropout": jax.random.key(1)})
  c = train.apply({"params": p}, x, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, eval_out)
  np.testing.assert_array_equal(eval_out, model.apply({"params": p}, x))


@pytest.mark.parametrize("gated,act", [(False, "relu"), (False, "gelu"), (True, "silu"), (True, "gelu_tanh")])
def test_feed_forward_variants(gated, act):
  model, p = setup(tiny(gated=gated, activation=act, norm="rmsnorm", use_bias=False))
  mlp = p["decoder"]["layer_0"]["mlp"]
  assert set(mlp) == ({"wi_0", "wi_1", "wo"} if gated else {"wi", "wo"})
  assert np.all(np.isfinite(model.apply({"params": p}, ids(21))))


def test_bf16_compute_with_f32_params():
  model, p = setup(tiny(dtype="bfloat16"))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(p))
  out = model.apply({"params": p}, ids(22))
  ref = jax.jit(build_model(tiny()).apply)({"params": p}, ids(22))
  assert out.dtype == jnp.float32
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.02  # bf16 has ~3 significant digits


def test_tied_and_untied_embeddings():
  _, tied = setup(tiny(tie_embeddings=True))
  _, untied = setup(tiny(tie_embeddings=False))
  assert "logits" not in tied.get("head", {}) and untied["head"]["logits"]["kernel"].shape == (32, V)


def test_every_parameter_has_logical_axes():
  from t_jax.models import abstract_params
  for arch in ["decoder", "encoder", "encoder_decoder"]:
    boxed = abstract_params(build_model(tiny(architecture=arch, position="t5_relative", num_token_types=2)))
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="num_heads=6 does not divide"):
    ModelConfig(d_model=64, num_heads=6)
  with pytest.raises(ValueError, match="num_kv_heads=3"):
    ModelConfig(num_heads=8, num_kv_heads=3)
  with pytest.raises(ValueError, match="position='rotary'"):
    ModelConfig(position="rotary")


@pytest.mark.parametrize("preset_kw", [
    dict(architecture="encoder_decoder", position="sinusoidal", scale_embeddings=True, pre_norm=False),
    dict(architecture="decoder", init_std=0.02),
])
def test_initial_loss_is_near_uniform(preset_kw):
  """At init the logits are small: cross-entropy is close to log(vocab) (not tens of nats)."""
  cfg = tiny(vocab_size=512, d_model=64, head_dim=16, **preset_kw)
  model, p = setup(cfg)
  args = (ids(23), ids(24)) if cfg.architecture == "encoder_decoder" else (ids(23),)
  logits = model.apply({"params": p}, *args)
  loss = -jnp.mean(jax.nn.log_softmax(logits)[..., 5])
  assert abs(float(loss) - np.log(512)) < 1.5, float(loss)
