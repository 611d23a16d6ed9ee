"""HF import/export: logits and greedy generation against transformers, exact round trips, workdirs, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gin
import jax
import numpy as np
import pytest

from launch.convert import hf_to_workdir
from t_jax.config_utils import parse_gin
from t_jax.convert import (
                           ConversionError,
                           config_to_gin,
                           from_hf,
                           read_params_workdir,
                           to_hf,
                           write_params_workdir,
)
from t_jax.models import ModelConfig, build_model, init_params

torch = pytest.importorskip("torch", reason="HF conversion tests need torch")
transformers = pytest.importorskip("transformers", reason="HF conversion tests need transformers")

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-4  # relative error of float32 logits
NEW_TOKENS = 20

# Small random HF models: odd head counts, GQA/MQA, tied and untied heads, non-default eps/theta/head_dim.
GPT2 = {
    "h3_tied": dict(n_embd=24, n_head=3),
    "h5_untied": dict(n_embd=40, n_head=5, n_inner=56, activation_function="gelu", tie_word_embeddings=False,
                      layer_norm_epsilon=1e-6),
}
BERT = {
    "h3_tied": dict(hidden_size=24, num_attention_heads=3, intermediate_size=40),
    "h5_untied": dict(hidden_size=40, num_attention_heads=5, intermediate_size=64, type_vocab_size=3,
                      hidden_act="gelu_new", tie_word_embeddings=False),
}
T5 = {
    "v1_0_h3": dict(d_model=24, d_kv=8, num_heads=3, d_ff=40, feed_forward_proj="relu"),
    "v1_1_h5": dict(d_model=30, d_kv=6, num_heads=5, d_ff=48, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    relative_attention_num_buckets=16, relative_attention_max_distance=24),
    # transformers 5 reads tie_word_embeddings=False as "tied head, no d_model**-0.5 scaling".
    "tied_unscaled": dict(d_model=20, d_kv=4, num_heads=5, d_ff=24, feed_forward_proj="gated-silu",
                          tie_word_embeddings=False),
}
T5_HEAD = {"v1_0_h3": (True, True), "v1_1_h5": (False, False), "tied_unscaled": (True, False)}  # (tied, scaled)
LLAMA = {
    "gqa3_tied": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=40,
                      rope_theta=500.0, tie_word_embeddings=True),
    "mqa_h5_untied": dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, head_dim=12,
                          intermediate_size=36, rms_norm_eps=1e-5),
    "mha3_bias": dict(hidden_size=36, num_attention_heads=3, intermediate_size=30, attention_bias=True, mlp_bias=True),
}


def randomize(m, seed: int, std: float = 0.2):
  """Every weight, bias and norm scale random (HF inits biases to 0 and norms to 1, which hides bugs)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in m.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * std)
    for mod in m.modules():
      if "Norm" in type(mod).__name__:
        mod.weight.copy_(1.0 + 0.1 * torch.randn(mod.weight.shape, generator=gen))
  return m.eval()


def gpt2(name):
  cfg = transformers.GPT2Config(vocab_size=96, n_layer=2, n_positions=48, **GPT2[name])
  return randomize(transformers.GPT2LMHeadModel(cfg), 1)


def bert(name):
  cfg = transformers.BertConfig(vocab_size=96, num_hidden_layers=2, max_position_embeddings=32, **BERT[name])
  return randomize(transformers.BertForMaskedLM(cfg), 2)


def t5(name):
  m = transformers.T5ForConditionalGeneration(
      transformers.T5Config(vocab_size=96, num_layers=2, num_decoder_layers=3, **T5[name]))
  if not T5_HEAD[name][0]:  # like a v1.1 checkpoint: its own lm_head
    m.lm_head.weight = torch.nn.Parameter(torch.empty_like(m.shared.weight))
  return randomize(m, 3, std=0.5)


def llama(name):
  cfg = transformers.LlamaConfig(vocab_size=96, num_hidden_layers=2, max_position_embeddings=64, **LLAMA[name])
  return randomize(transformers.LlamaForCausalLM(cfg), 4)


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def hf_logits(m, **inputs) -> np.ndarray:
  with torch.no_grad():
    return m(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()


def tj_logits(model, params, *args, **kwargs) -> np.ndarray:
  return np.asarray(jax.jit(model.apply)({"params": params}, *args, **kwargs))


def init(model, seed: int):
  return jax.jit(lambda rng: init_params(model, rng))(jax.random.key(seed))


def hf_generate(m, options=None, **inputs) -> np.ndarray:
  m.generation_config.eos_token_id = None  # random weights: never stop early
  m.generation_config.pad_token_id = 0
  m.generation_config.decoder_start_token_id = 0  # T5: decoding starts from pad
  with torch.no_grad():
    out = m.generate(**{k: torch.tensor(v) for k, v in inputs.items()}, max_new_tokens=NEW_TOKENS, do_sample=False,
                     **(options or {}))
  return out.numpy()


def greedy_decoder(fwd, prompt: np.ndarray, length: int) -> np.ndarray:
  """Greedy decoding by full forward passes over a fixed [batch, length] buffer (causal: later slots unread)."""
  p = prompt.shape[1]
  buf = np.zeros((prompt.shape[0], length), np.int32)
  buf[:, :p] = prompt
  for t in range(p, p + NEW_TOKENS):
    buf[:, t] = np.asarray(fwd(buf))[:, t - 1].argmax(-1)
  return buf[:, :p + NEW_TOKENS]


def greedy_t5(fwd, batch: int, start: int, length: int) -> np.ndarray:
  """Greedy T5 decoding: fwd(decoder_ids [batch, length]) -> logits; later slots are unread."""
  buf = np.full((batch, length), start, np.int32)
  for t in range(NEW_TOKENS):
    buf[:, t + 1] = np.asarray(fwd(buf))[:, t].argmax(-1)
  return buf[:, :NEW_TOKENS + 1]


def tree_equal(a, b) -> bool:
  same = jax.tree_util.tree_map(lambda x, y: x.shape == y.shape and bool(np.array_equal(x, y)), a, b)
  return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(jax.tree_util.tree_leaves(same))


# ---------------------------------------------------------------- HF -> t_jax numerics


@pytest.mark.parametrize("name", sorted(GPT2))
def test_gpt2_logits_and_generation(name):
  m = gpt2(name)
  model, params = from_hf(m)
  assert model.cfg.tie_embeddings == GPT2[name].get("tie_word_embeddings", True)
  ids = np.random.RandomState(0).randint(0, 96, (3, 25))
  fwd = jax.jit(lambda x: model.apply({"params": params}, x))
  assert rel_err(fwd(ids), hf_logits(m, input_ids=ids)) <= TOL
  prompt = ids[:, :5]
  want = hf_generate(m, input_ids=prompt, attention_mask=np.ones_like(prompt))
  np.testing.assert_array_equal(greedy_decoder(fwd, prompt, ids.shape[1]), want)


@pytest.mark.parametrize("name", sorted(BERT))
def test_bert_mlm_logits_with_padding(name):
  m = bert(name)
  model, params = from_hf(m)
  rs = np.random.RandomState(1)
  ids = rs.randint(0, 96, (3, 14))
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  mask[2, 4:] = 0
  types = rs.randint(0, m.config.type_vocab_size, ids.shape)
  want = hf_logits(m, input_ids=ids, attention_mask=mask, token_type_ids=types)
  fwd = jax.jit(lambda mask: model.apply({"params": params}, ids, padding_mask=mask, token_type_ids=types))
  real = mask == 1
  assert rel_err(np.asarray(fwd(mask))[real], want[real]) <= TOL
  # The mask matters: without it the real positions of padded rows change.
  assert rel_err(np.asarray(fwd(np.ones_like(mask)))[real], want[real]) > 1e-3


@pytest.mark.parametrize("name", sorted(T5))
def test_t5_logits_and_generation(name):
  m = t5(name)
  model, params = from_hf(m)
  assert (model.cfg.tie_embeddings, model.cfg.scale_tied_logits) == T5_HEAD[name]
  rs = np.random.RandomState(2)
  src, tgt = rs.randint(0, 96, (2, 40)), rs.randint(0, 96, (2, 36))  # long enough for the log-spaced buckets
  mask = np.ones_like(src)
  mask[1, 25:] = 0
  want = hf_logits(m, input_ids=src, attention_mask=mask, decoder_input_ids=tgt)
  fwd = jax.jit(lambda d: model.apply({"params": params}, src, d, encoder_padding_mask=mask))
  assert rel_err(fwd(tgt), want) <= TOL
  # transformers 5.24's T5 KV cache has config.num_layers (encoder) slots, too few for 3 decoder layers.
  hf_out = hf_generate(m, {"use_cache": False}, input_ids=src, attention_mask=mask)
  np.testing.assert_array_equal(greedy_t5(fwd, len(src), int(hf_out[0, 0]), tgt.shape[1]), hf_out)


@pytest.mark.parametrize("name", sorted(LLAMA))
def test_llama_logits_and_generation(name):
  m = llama(name)
  model, params = from_hf(m)
  assert model.cfg.kv_heads == m.config.num_key_value_heads
  assert model.cfg.rope_theta == LLAMA[name].get("rope_theta", 10000.0)
  ids = np.random.RandomState(3).randint(0, 96, (2, 30))
  fwd = jax.jit(lambda x: model.apply({"params": params}, x))
  assert rel_err(fwd(ids), hf_logits(m, input_ids=ids)) <= TOL
  prompt = ids[:, :6]
  want = hf_generate(m, input_ids=prompt, attention_mask=np.ones_like(prompt))
  np.testing.assert_array_equal(greedy_decoder(fwd, prompt, ids.shape[1]), want)


def test_pytorch_bin_directory_of_a_bare_base_model(tmp_path):
  m = gpt2("h3_tied")
  m.config.save_pretrained(tmp_path)
  torch.save(m.transformer.state_dict(), tmp_path / "pytorch_model.bin")  # GPT2Model keys: 'wte.weight', ...
  model, params = from_hf(tmp_path)
  ids = np.random.RandomState(4).randint(0, 96, (2, 9))
  assert rel_err(tj_logits(model, params, ids), hf_logits(m, input_ids=ids)) <= TOL


# ---------------------------------------------------------------- round trips

PRESETS = [("gpt2_small_tiny", False), ("bert_base_tiny", False), ("t5_small_tiny", True), ("llama_tiny", False)]


def preset(name: str) -> ModelConfig:
  parse_gin([f"models/{name}.gin"])
  try:
    return ModelConfig()
  finally:
    gin.clear_config()


@pytest.mark.parametrize("name,scan", PRESETS)
def test_t_jax_to_hf_to_t_jax_is_exact(tmp_path, name, scan):
  cfg = preset(name).replace(scan_layers=scan)
  model = build_model(cfg)
  params = init(model, 5)
  to_hf(model, params, tmp_path)
  back_model, back = from_hf(tmp_path, overrides={"scan_layers": scan})
  assert tree_equal(params, back)
  to_hf(back_model, back, tmp_path / "again")  # the imported config exports to the same config.json
  assert (tmp_path / "again" / "config.json").read_text() == (tmp_path / "config.json").read_text()
  # transformers loads the export with nothing missing and the same logits.
  cls = getattr(transformers, json.loads((tmp_path / "config.json").read_text())["architectures"][0])
  hf, info = cls.from_pretrained(tmp_path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  ids = np.random.RandomState(6).randint(0, cfg.vocab_size, (2, 12))
  if cfg.architecture == "encoder_decoder":
    want, got = hf_logits(hf.eval(), input_ids=ids, decoder_input_ids=ids), tj_logits(model, params, ids, ids)
  else:
    want, got = hf_logits(hf.eval(), input_ids=ids), tj_logits(model, params, ids)
  assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("factory,name", [(gpt2, "h5_untied"), (bert, "h5_untied"), (t5, "v1_0_h3"),
                                          (t5, "v1_1_h5"), (t5, "tied_unscaled"), (llama, "gqa3_tied")])
def test_hf_to_t_jax_to_hf_reloads_identically(tmp_path, factory, name):
  m = factory(name)
  model, params = from_hf(m)
  to_hf(model, params, tmp_path)
  back = type(m).from_pretrained(tmp_path).eval()
  want_sd, got_sd = m.state_dict(), back.state_dict()
  assert set(want_sd) == set(got_sd)
  if factory is bert and not m.config.tie_word_embeddings:  # untied: forward() reads decoder.bias, never this
    del want_sd["cls.predictions.bias"]
  for k, v in want_sd.items():
    assert torch.equal(v, got_sd[k]), k
  if m.config.is_encoder_decoder:
    ids = dict(input_ids=np.arange(20).reshape(2, 10) % 96, decoder_input_ids=np.arange(16).reshape(2, 8))
  else:
    ids = dict(input_ids=np.arange(20).reshape(2, 10) * 7 % 96)
  np.testing.assert_array_equal(hf_logits(back, **ids), hf_logits(m, **ids))


# ---------------------------------------------------------------- errors


def _gpt2_dir(path: Path) -> Path:
  gpt2("h3_tied").save_pretrained(path)
  return path


def _edit_weights(path: Path, edit) -> None:
  from safetensors.numpy import load_file, save_file

  weights = load_file(str(path / "model.safetensors"))
  edit(weights)
  save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("edit,message", [
    (lambda w: w.update({"transformer.h.1.mlp.c_fc.weight": np.zeros((24, 95), np.float32)}),
     "'transformer.h.1.mlp.c_fc.weight' has shape (24, 95)"),
    (lambda w: w.pop("transformer.h.1.ln_2.bias"), "missing tensor 'transformer.h.1.ln_2.bias'"),
    (lambda w: w.update({"transformer.h.2.ln_1.weight": np.ones(24, np.float32)}), "transformer.h.2.ln_1.weight"),
])
def test_bad_checkpoint_names_the_tensor(tmp_path, edit, message):
  _edit_weights(_gpt2_dir(tmp_path), edit)
  with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
    from_hf(tmp_path)


def test_unknown_family_and_unsupported_features(tmp_path):
  path = _gpt2_dir(tmp_path)
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
  with pytest.raises(ConversionError, match="model_type 'gpt_neox'"):
    from_hf(path)
  m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=32, hidden_size=16, num_attention_heads=2, intermediate_size=16, num_hidden_layers=1,
      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))
  with pytest.raises(ConversionError, match="RoPE type 'linear'"):
    from_hf(m)


def test_to_hf_refuses_what_hf_cannot_express(tmp_path):
  alibi = ModelConfig(vocab_size=32, d_model=16, num_heads=2, mlp_dim=32, num_layers=1, position="alibi")
  with pytest.raises(ConversionError, match="no Hugging Face family"):
    to_hf(alibi, {}, tmp_path)
  gated = preset("gpt2_small_tiny").replace(gated=True)
  with pytest.raises(ConversionError, match="ModelConfig.gated=True"):
    to_hf(gated, {}, tmp_path)
  cfg = preset("llama_tiny")
  params = init(build_model(cfg), 0)
  params["decoder"]["layer_1"]["mlp"]["wo"]["kernel"] = np.zeros((3, 64), np.float32)
  with pytest.raises(ConversionError, match="decoder/layer_1/mlp/wo/kernel"):
    to_hf(cfg, params, tmp_path)


# ---------------------------------------------------------------- workdir and CLI


def test_params_workdir_round_trip(tmp_path):
  cfg = preset("llama_tiny").replace(scan_layers=True, param_dtype="bfloat16")
  params = init(build_model(cfg), 7)
  write_params_workdir(tmp_path, cfg, params)
  got_cfg, got = read_params_workdir(tmp_path)
  assert got_cfg == cfg and tree_equal(params, got)
  with pytest.raises(FileExistsError):
    write_params_workdir(tmp_path, cfg, params)
  gin.clear_config()  # config.gin is plain gin: parsing it reproduces the config
  try:
    gin.parse_config_file(str(tmp_path / "config.gin"))
    assert ModelConfig() == cfg
  finally:
    gin.clear_config()
  assert (tmp_path / "config.gin").read_text() == config_to_gin(cfg)


def test_launch_convert_round_trip(tmp_path):
  m = llama("mqa_h5_untied")
  m.config.eos_token_id, m.config.bos_token_id, m.config.pad_token_id = 7, 5, 3
  m.save_pretrained(tmp_path / "hf")
  (tmp_path / "spm.model").write_bytes(b"sentencepiece bytes")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = lambda *args: subprocess.run([sys.executable, "-m", "launch.convert", *args], cwd=REPO, env=env,
                                     capture_output=True, text=True)
  work = tmp_path / "work"
  r = run(f"--from_hf={tmp_path / 'hf'}", f"--to_workdir={work}", "--scan_layers")
  assert r.returncode == 0, r.stderr
  cfg, params = read_params_workdir(work)
  model, want = from_hf(tmp_path / "hf", overrides={"scan_layers": True})
  assert cfg == model.cfg and tree_equal(want, params)
  r = run(f"--from_workdir={work}", f"--to_hf={tmp_path / 'out'}", f"--tokenizer={tmp_path / 'spm.model'}")
  assert r.returncode == 0, r.stderr
  back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
  for k, v in m.state_dict().items():
    assert torch.equal(v, back.state_dict()[k]), k
  assert (back.config.eos_token_id, back.config.bos_token_id, back.config.pad_token_id) == (7, 5, 3)
  assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"sentencepiece bytes"
  with pytest.raises(FileExistsError):  # the CLI reports this as 'error: ...' with exit code 2
    hf_to_workdir(str(tmp_path / "hf"), str(work))
