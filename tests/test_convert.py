"""HF import/export: logits and greedy tokens against stored transformers outputs, exact round trips, workdirs, CLI.

The checkpoints and reference outputs in tests/fixtures/hf come from tests/fixtures/make_hf_fixtures.py, so
these tests need neither torch nor transformers. With T_JAX_HF_LIVE=1 the parity tests also compare against the
installed transformers and fail without it; the test_live_* tests (`-k live`) need torch and transformers and
skip without them.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gin
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import t_jax
from launch.config import build, parse
from launch.convert import hf_to_workdir, workdir_to_hf
from t_jax.convert import (
                           ConversionError,
                           config_to_gin,
                           family_for_config,
                           from_hf,
                           read_params_workdir,
                           to_hf,
                           write_params_workdir,
)
from t_jax.models import ModelConfig, build_model, init_params
from tests.fixtures import make_hf_fixtures as hf_fixtures

REPO = Path(__file__).resolve().parent.parent
FIXTURES = hf_fixtures.HF
LIVE = os.environ.get("T_JAX_HF_LIVE") == "1"
# t_jax's float32 logits against transformers' float64 ones, relative to the largest logit. Float32 references
# are not exact enough: the random T5 models are ill-conditioned (weight noise at float32 rounding level moves
# their float64 logits by up to 1.3e-4), so float32 runs that only order the sums differently disagree by ~1e-4.
# t5_tied_unscaled vs transformers 5.24 in float32: 8.7e-5 with torch's SDPA flash kernel, 1.5e-4 with eager or
# SDPA math attention, 2.09e-4 where it failed; yet t_jax and transformers both in float64 agree to 3e-13 (with
# T5LayerNorm's float32 variance made float64). Against the float64 references t_jax's float32 error is at
# most 4.4e-5 (T5), about 1e-6 for the other families.
TOL = 1e-4
NEW_TOKENS = hf_fixtures.NEW_TOKENS
INPUTS = ("input_ids", "attention_mask", "token_type_ids", "decoder_input_ids", "prompt")
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
T5_HEAD = {"v1_0_h3": (True, True), "v1_1_h5": (False, False), "tied_unscaled": (True, False)}  # (tied, scaled)


def hf_config(fixture: str) -> dict:
  return json.loads((FIXTURES / fixture / "config.json").read_text())


def reference(fixture: str) -> dict:
  with np.load(FIXTURES / fixture / "reference.npz") as f:
    return dict(f)


def load(fixture: str):
  """(model, params, reference arrays) of one fixture."""
  model, params = from_hf(FIXTURES / fixture)
  return model, params, reference(fixture)


def wanted(fixture: str, ref: dict):
  """(source, outputs) to match: the stored ones, plus the installed transformers' under T_JAX_HF_LIVE=1."""
  yield "fixture", ref
  if LIVE:  # without torch or transformers this raises: the scheduled check must not skip
    import transformers

    inputs = {k: ref[k] for k in INPUTS if k in ref}
    yield f"transformers {transformers.__version__}", hf_fixtures.hf_outputs(FIXTURES / fixture, inputs)


def check(fixture: str, ref: dict, logits, tokens=None, real=None) -> None:
  """Logits within TOL (at the `real` positions) and identical greedy tokens, for every source."""
  pick = (lambda a: np.asarray(a)) if real is None else (lambda a: np.asarray(a)[real])
  for source, want in wanted(fixture, ref):
    assert rel_err(pick(logits), pick(want["logits"])) <= TOL, source
    if tokens is not None:
      np.testing.assert_array_equal(tokens, want["tokens"], err_msg=source)


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def tj_logits(model, params, *args, **kwargs) -> np.ndarray:
  return np.asarray(jax.jit(model.apply)({"params": params}, *args, **kwargs))


def init(model, seed: int):
  return jax.jit(lambda rng: init_params(model, rng))(jax.random.key(seed))


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


def copy_fixture(fixture: str, path: Path) -> Path:
  shutil.copytree(FIXTURES / fixture, path, dirs_exist_ok=True)
  return path


def edit_config(path: Path, **fields) -> None:
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, **fields}))


# ---------------------------------------------------------------- HF -> t_jax numerics


def decoder_parity(fixture: str) -> ModelConfig:
  model, params, ref = load(fixture)
  fwd = jax.jit(lambda x: model.apply({"params": params}, x))
  ids = ref["input_ids"]
  check(fixture, ref, fwd(ids), greedy_decoder(fwd, ref["prompt"], ids.shape[1]))
  return model.cfg


@pytest.mark.parametrize("name", sorted(hf_fixtures.GPT2))
def test_gpt2_logits_and_generation(name):
  cfg = decoder_parity(f"gpt2_{name}")
  assert cfg.tie_embeddings == hf_fixtures.GPT2[name].get("tie_word_embeddings", True)


@pytest.mark.parametrize("name", sorted(hf_fixtures.BERT))
def test_bert_mlm_logits_with_padding(name):
  model, params, ref = load(f"bert_{name}")
  ids, mask, types = ref["input_ids"], ref["attention_mask"], ref["token_type_ids"]
  fwd = jax.jit(lambda mask: model.apply({"params": params}, ids, padding_mask=mask, token_type_ids=types))
  real = mask == 1
  check(f"bert_{name}", ref, fwd(mask), real=real)
  # The mask matters: without it the real positions of padded rows change.
  assert rel_err(np.asarray(fwd(np.ones_like(mask)))[real], ref["logits"][real]) > 1e-3


@pytest.mark.parametrize("name", sorted(hf_fixtures.PRETRAINING["bert"]))
def test_bert_pretraining_mlm_and_next_sentence_logits(name):
  """BertForPreTraining: MLM logits, and the next-sentence head (pooler + seq_relationship on [CLS])."""
  model, params, ref = load(f"bert_{name}")
  assert model.cfg.next_sentence
  mlm, nsp = jax.jit(model.apply)({"params": params}, ref["input_ids"], padding_mask=ref["attention_mask"],
                                  token_type_ids=ref["token_type_ids"])
  check(f"bert_{name}", ref, mlm, real=ref["attention_mask"] == 1)
  for source, want in wanted(f"bert_{name}", ref):
    assert rel_err(nsp, want["nsp_logits"]) <= TOL, source


@pytest.mark.parametrize("name", sorted(hf_fixtures.T5))
def test_t5_logits_and_generation(name):
  model, params, ref = load(f"t5_{name}")
  assert (model.cfg.tie_embeddings, model.cfg.scale_tied_logits) == T5_HEAD[name]
  src, mask, tgt = ref["input_ids"], ref["attention_mask"], ref["decoder_input_ids"]
  fwd = jax.jit(lambda d: model.apply({"params": params}, src, d, encoder_padding_mask=mask))
  check(f"t5_{name}", ref, fwd(tgt), greedy_t5(fwd, len(src), int(ref["tokens"][0, 0]), tgt.shape[1]))


@pytest.mark.parametrize("fixture", [f"{family}_{name}" for family, names in hf_fixtures.CLASSIFIERS.items()
                                     for name in names])
def test_sequence_classifier_logits_with_padding(fixture):
  """Bert/GPT2/LlamaForSequenceClassification: BERT's pooler + classifier on [CLS], the decoders' bias-free score
  on the last real token; 3 classes, and a regression head (Llama)."""
  model, params, ref = load(fixture)
  config = hf_config(fixture)
  assert model.cfg.num_classes == len(config["id2label"]) and model.cfg.pooling == ("cls" if "bert" in fixture
                                                                                     else "last")
  kw = {"token_type_ids": ref["token_type_ids"]} if "token_type_ids" in ref else {}
  fwd = jax.jit(lambda mask: model.apply({"params": params}, ref["input_ids"], padding_mask=mask, **kw))
  logits = fwd(ref["attention_mask"])
  assert logits.shape == ref["logits"].shape
  check(fixture, ref, logits)
  assert rel_err(fwd(np.ones_like(ref["attention_mask"])), ref["logits"]) > 1e-3  # the padding matters


@pytest.mark.parametrize("name", sorted(hf_fixtures.LLAMA))
def test_llama_logits_and_generation(name):
  cfg = decoder_parity(f"llama_{name}")
  assert cfg.num_kv_heads == hf_config(f"llama_{name}")["num_key_value_heads"]
  assert cfg.rope_theta == hf_fixtures.LLAMA[name].get("rope_theta", 10000.0)


# ---------------------------------------------------------------- round trips

PRESETS = [("gpt2_small_tiny", False), ("bert_base_tiny", False), ("t5_small_tiny", True), ("llama_tiny", False)]
# What to_hf writes differently but equivalently: GPT-2's n_inner=None means 4 * n_embd; transformers 5 writes
# tie_word_embeddings=true for every T5 (an lm_head.weight in the file unties it), to_hf writes false; an untied
# BERT keeps a cls.predictions.bias that forward() never reads (to_hf writes decoder.bias there).
EXPORT_DIFFERS = {"gpt2_h3_tied": {"n_inner"}, "gpt2_seqcls_h3": {"n_inner"}, "t5_v1_1_h5": {"tie_word_embeddings"},
                  "bert_h5_untied": {"cls.predictions.bias"}}


def preset(name: str) -> ModelConfig:
  parse([f"models/{name}.gin"])
  try:
    return build(ModelConfig)
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


@pytest.mark.parametrize("fixture", hf_fixtures.fixture_names())
def test_hf_to_t_jax_to_hf_matches_the_checkpoint(tmp_path, fixture):
  config = hf_config(fixture)
  model, params = from_hf(FIXTURES / fixture)
  to_hf(model, params, tmp_path, token_ids={k: config[k] for k in TOKEN_IDS if k in config})
  want, got = load_file(str(FIXTURES / fixture / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
  assert set(got) == set(want)
  ours = json.loads((tmp_path / "config.json").read_text())
  keys = [*family_for_config(model.cfg).hf_config(model.cfg), "model_type", "architectures", "dtype"]
  differ = {k for k in want if not np.array_equal(want[k], got[k])} | {k for k in keys if ours[k] != config.get(k)}
  assert differ == EXPORT_DIFFERS.get(fixture, set())


# ---------------------------------------------------------------- errors


def edit_weights(path: Path, edit) -> None:
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
  edit_weights(copy_fixture("gpt2_h3_tied", tmp_path), edit)
  with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
    from_hf(tmp_path)


def bert_qa(path: Path, architectures: bool = True) -> Path:
  """A BertForQuestionAnswering checkpoint made from a BERT MLM fixture: a span head, no MLM head."""
  copy_fixture("bert_h3_tied", path)
  edit_config(path, architectures=["BertForQuestionAnswering"] if architectures else None)

  def edit(w):
    for k in [k for k in w if k.startswith("cls.")]:
      del w[k]
    w.update({"qa_outputs.weight": np.zeros((2, 24), np.float32), "qa_outputs.bias": np.zeros(2, np.float32)})

  edit_weights(path, edit)
  return path


def test_unsupported_heads_are_named(tmp_path):
  with pytest.raises(ConversionError, match=r"config.json: unsupported Hugging Face architecture "
                                            r"'BertForQuestionAnswering'.*supported: BertForMaskedLM"):
    t_jax.from_hf(bert_qa(tmp_path / "arch"))
  with pytest.raises(ConversionError, match=r"unsupported Hugging Face head: tensors \['qa_outputs.bias', "
                                            r"'qa_outputs.weight'\] are not part of a BertForMaskedLM or "
                                            r"BertForSequenceClassification"):
    from_hf(bert_qa(tmp_path / "tensors", architectures=False))
  # a sequence classifier is recognised by its tensors too (config.json without `architectures`)
  classifier = copy_fixture("bert_seqcls_h3", tmp_path / "classifier")
  edit_config(classifier, architectures=None)
  assert from_hf(classifier)[0].cfg.num_classes == 3
  pretraining = copy_fixture("bert_pretraining_h3", tmp_path / "pretraining")  # and a BertForPreTraining
  edit_config(pretraining, architectures=None)
  model, params = from_hf(pretraining)
  assert model.cfg.next_sentence and set(params["next_sentence"]) == {"pooler", "logits"}


def test_unknown_family_and_unsupported_features(tmp_path):
  path = copy_fixture("gpt2_h3_tied", tmp_path / "gpt2")
  edit_config(path, model_type="gpt_neox")
  with pytest.raises(ConversionError, match="model_type 'gpt_neox'"):
    from_hf(path)
  edit_config(path, model_type="gpt2", n_head="3")
  with pytest.raises(ConversionError, match="config.json: HF gpt2 config does not fit ModelConfig"):
    from_hf(path)
  path = copy_fixture("llama_gqa3_tied", tmp_path / "llama")
  edit_config(path, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
  with pytest.raises(ConversionError, match="RoPE type 'linear'"):
    from_hf(path)


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
  try:  # config.gin is plain gin: parsing it reproduces the config
    parse([str(tmp_path / "config.gin")])
    assert build(ModelConfig) == cfg
  finally:
    gin.clear_config()
  assert (tmp_path / "config.gin").read_text() == config_to_gin(cfg)


def run(*args) -> subprocess.CompletedProcess:
  """python -m launch.convert ARGS on the CPU."""
  return subprocess.run([sys.executable, "-m", "launch.convert", *args], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_launch_convert_round_trip(tmp_path):
  hf_dir = copy_fixture("llama_mqa_h5_untied", tmp_path / "hf")
  edit_config(hf_dir, eos_token_id=7, bos_token_id=5, pad_token_id=3)
  (tmp_path / "spm.model").write_bytes(b"sentencepiece bytes")
  work = tmp_path / "work"
  r = run(f"--from_hf={hf_dir}", f"--to_workdir={work}", "--scan_layers")
  assert r.returncode == 0, r.stderr
  cfg, params = read_params_workdir(work)
  model, want = from_hf(hf_dir, overrides={"scan_layers": True})
  assert cfg == model.cfg and tree_equal(want, params)
  out = tmp_path / "out"
  r = run(f"--from_workdir={work}", f"--to_hf={out}", f"--tokenizer={tmp_path / 'spm.model'}")
  assert r.returncode == 0, r.stderr
  want, got = load_file(str(hf_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
  assert set(got) == set(want) and all(np.array_equal(v, got[k]) for k, v in want.items())
  config = json.loads((out / "config.json").read_text())
  assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (7, 5, 3)
  assert (out / "tokenizer.model").read_bytes() == b"sentencepiece bytes"
  with pytest.raises(FileExistsError):  # the CLI reports this as 'error: ...' with exit code 2
    hf_to_workdir(str(hf_dir), str(work))
  (work / "hf_config.json").write_text("{")
  with pytest.raises(ConversionError, match="hf_config.json: invalid JSON"):
    workdir_to_hf(str(work), str(tmp_path / "out2"))


def truncate(path: Path) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def without(fixture: str, path: Path, field: str) -> Path:
  copy_fixture(fixture, path)
  config = json.loads((path / "config.json").read_text())
  del config[field]
  (path / "config.json").write_text(json.dumps(config))
  return path


@pytest.fixture(scope="module")
def gpt2_workdir(tmp_path_factory) -> Path:
  return hf_to_workdir(str(FIXTURES / "gpt2_h3_tied"), str(tmp_path_factory.mktemp("gpt2") / "work"))


def truncated_params(tmp: Path, work: Path) -> list[str]:
  shutil.copytree(work, tmp / "work")
  for f in (tmp / "work" / "params").rglob("*"):
    if f.is_file():
      truncate(f)
  return [f"--from_workdir={tmp / 'work'}", f"--to_hf={tmp / 'out'}"]


def truncated_weights(tmp: Path, work: Path) -> list[str]:
  truncate(copy_fixture("gpt2_h3_tied", tmp / "hf") / "model.safetensors")
  return [f"--from_hf={tmp / 'hf'}", f"--to_workdir={tmp / 'work'}"]


def invalid_json(tmp: Path, work: Path) -> list[str]:
  (copy_fixture("gpt2_h3_tied", tmp / "hf") / "config.json").write_text('{"model_type": "gpt2",')
  return [f"--from_hf={tmp / 'hf'}", f"--to_workdir={tmp / 'work'}"]


# Each case: (make(tmp_path, a converted workdir) -> arguments, what the error line contains, with TMP for tmp_path).
BAD_INPUT = {
    "truncated_safetensors": (truncated_weights, "TMP/hf/model.safetensors: not a readable safetensors file"),
    "invalid_json": (invalid_json, "TMP/hf/config.json: invalid JSON"),
    "missing_n_embd": (lambda tmp, work: [f"--from_hf={without('gpt2_h3_tied', tmp / 'hf', 'n_embd')}",
                                          f"--to_workdir={tmp / 'work'}"],
                       "TMP/hf/config.json: missing field 'n_embd'"),
    "missing_hidden_size": (lambda tmp, work: [f"--from_hf={without('llama_gqa3_tied', tmp / 'hf', 'hidden_size')}",
                                               f"--to_workdir={tmp / 'work'}"],
                            "TMP/hf/config.json: missing field 'hidden_size'"),
    "truncated_params": (truncated_params, "TMP/work/params cannot be read"),
    "not_a_workdir": (lambda tmp, work: [f"--from_workdir={tmp}", f"--to_hf={tmp / 'out'}"], "no config.gin in TMP"),
    "qa_head": (lambda tmp, work: [f"--from_hf={bert_qa(tmp / 'hf')}", f"--to_workdir={tmp / 'w'}"],
                "unsupported Hugging Face architecture 'BertForQuestionAnswering'"),
    "qa_tensors": (lambda tmp, work: [f"--from_hf={bert_qa(tmp / 'hf', architectures=False)}",
                                      f"--to_workdir={tmp / 'w'}"],
                   "unsupported Hugging Face head: tensors ['qa_outputs.bias', 'qa_outputs.weight']"),
    "existing_workdir": (lambda tmp, work: [f"--from_hf={FIXTURES / 'gpt2_h3_tied'}",
                                            f"--to_workdir={shutil.copytree(work, tmp / 'work')}"],
                         "TMP/work already holds config.gin, params, hf_config.json, hf_tokenizer; pass --overwrite"),
    "existing_hf_dir": (lambda tmp, work: [f"--from_workdir={work}",
                                           f"--to_hf={copy_fixture('gpt2_h3_tied', tmp / 'hf')}"],
                        "TMP/hf already holds config.json, model.safetensors, tokenizer.json; pass --overwrite"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_launch_convert_bad_input_is_one_error_line(tmp_path, gpt2_workdir, case):
  make, want = BAD_INPUT[case]
  args = make(tmp_path, gpt2_workdir)
  before = {p: p.read_bytes() for p in [*tmp_path.rglob("*"), *gpt2_workdir.rglob("*")] if p.is_file()}
  r = run(*args)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr[-3000:]
  assert want.replace("TMP", str(tmp_path)) in r.stderr, r.stderr
  after = {p: p.read_bytes() for p in [*tmp_path.rglob("*"), *gpt2_workdir.rglob("*")] if p.is_file()}
  assert after == before  # nothing written, nothing lost


# ---------------------------------------------------------------- live: need torch and transformers


@pytest.fixture
def hf():
  """transformers for the test_live_* tests; they skip without torch and transformers, except under T_JAX_HF_LIVE=1."""
  if not LIVE:
    pytest.importorskip("torch", reason="live test: needs torch")
    pytest.importorskip("transformers", reason="live test: needs transformers")
  import transformers

  hf_fixtures.quiet()
  return transformers


def hf_logits(m, **inputs) -> np.ndarray:
  import torch

  with torch.no_grad():
    return m(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()


@pytest.mark.parametrize("name", [name for name, _ in PRESETS])
def test_live_transformers_loads_the_t_jax_export(hf, tmp_path, name):
  cfg = preset(name)
  model = build_model(cfg)
  params = init(model, 5)
  to_hf(model, params, tmp_path)  # transformers loads it with nothing missing and the same logits
  cls = getattr(hf, json.loads((tmp_path / "config.json").read_text())["architectures"][0])
  m, info = cls.from_pretrained(tmp_path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  ids = np.random.RandomState(6).randint(0, cfg.vocab_size, (2, 12))
  if cfg.architecture == "encoder_decoder":
    want, got = hf_logits(m.eval(), input_ids=ids, decoder_input_ids=ids), tj_logits(model, params, ids, ids)
  else:
    want, got = hf_logits(m.eval(), input_ids=ids), tj_logits(model, params, ids)
  assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("fixture", ["gpt2_h5_untied", "bert_h5_untied", "t5_v1_0_h3", "t5_v1_1_h5",
                                     "t5_tied_unscaled", "llama_gqa3_tied", "bert_seqcls_h3", "gpt2_seqcls_h3",
                                     "llama_seqcls_gqa3"])
def test_live_hf_to_t_jax_to_hf_reloads_identically(hf, tmp_path, fixture):
  import torch

  cls = getattr(hf, hf_config(fixture)["architectures"][0])
  m = cls.from_pretrained(FIXTURES / fixture).eval()
  to_hf(*from_hf(FIXTURES / fixture), tmp_path)
  back = cls.from_pretrained(tmp_path).eval()
  want_sd, got_sd = m.state_dict(), back.state_dict()
  assert set(want_sd) == set(got_sd)
  if fixture == "bert_h5_untied":  # untied: forward() reads decoder.bias, never this
    del want_sd["cls.predictions.bias"]
  for k, v in want_sd.items():
    assert torch.equal(v, got_sd[k]), k
  if m.config.is_encoder_decoder:
    ids = dict(input_ids=np.arange(20).reshape(2, 10) % 96, decoder_input_ids=np.arange(16).reshape(2, 8))
  else:
    ids = dict(input_ids=np.arange(20).reshape(2, 10) * 7 % 96)
  np.testing.assert_array_equal(hf_logits(back, **ids), hf_logits(m, **ids))


def test_live_pytorch_bin_directory_of_a_bare_base_model(hf, tmp_path):
  import torch

  m = hf.GPT2LMHeadModel.from_pretrained(FIXTURES / "gpt2_h3_tied")
  m.config.save_pretrained(tmp_path)
  torch.save(m.transformer.state_dict(), tmp_path / "pytorch_model.bin")  # GPT2Model keys: 'wte.weight', ...
  model, params = from_hf(tmp_path)
  assert tree_equal(params, from_hf(FIXTURES / "gpt2_h3_tied")[1])
  ref = reference("gpt2_h3_tied")
  assert rel_err(tj_logits(model, params, ref["input_ids"]), ref["logits"]) <= TOL
