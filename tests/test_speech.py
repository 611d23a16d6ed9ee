"""Speech (issue #16): the Whisper-layout audio stem, padded audio batches, log-mel features, the SpeechToText
objective and sources, decoding with t_jax.inference's loops, a tiny train whose loss falls, and the espeak-ng
corpus through launch.train and launch.speech_wer (skipped without espeak-ng)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch import config
from t_jax import data
from t_jax.data import SpeechToText, TaskConfig
from t_jax.inference import transcribe
from t_jax.models import ModelConfig, build_model, init_params
from t_jax.models.positions import sinusoidal
from t_jax.models.speech import AudioEmbedder, pad_frames, stem_length, stem_mask
from t_jax.training import Experiment, OptimizerConfig, TrainConfig, train

librosa = pytest.importorskip("librosa", reason="the `speech` extra (librosa) is not installed")

REPO = Path(__file__).resolve().parent.parent
ESPEAK = shutil.which("espeak-ng")
WORDS = {"low": 300.0, "mid": 700.0, "high": 1500.0, "top": 3000.0}  # a toy language of tones


def _cfg(**changes):
  base = dict(architecture="encoder_decoder", input_stem="audio", num_mel_bins=16, vocab_size=32, d_model=32,
              num_heads=4, mlp_dim=64, num_layers=1, num_encoder_layers=2, position="learned", max_len=16,
              init_std=0.02)
  return ModelConfig(**{**base, **changes})


def _tones(text, rate=16000, seconds=0.12, gap=0.04):
  """Each word of `text` as a tone of its frequency, separated by silence: audio whose transcript is the text."""
  t = np.arange(int(rate * seconds)) / rate
  pieces = [np.zeros(int(rate * gap), np.float32)]
  for w in text.split():
    pieces += [0.5 * np.sin(2 * np.pi * WORDS[w] * t).astype(np.float32), np.zeros(int(rate * gap), np.float32)]
  return np.concatenate(pieces)


def _tone_corpus(n, seed=0):
  rng = np.random.default_rng(seed)
  texts = [" ".join(rng.choice(list(WORDS), int(rng.integers(1, 4)))) for _ in range(n)]
  return [{"audio": _tones(t), "text": t} for t in texts]


@pytest.fixture(autouse=True)
def _clean_gin():
  yield
  gin.clear_config()


# --- the stem ---------------------------------------------------------------------------------------------------

def test_conv_stem_output_length():
  """conv1 keeps the length, conv2 (kernel 3, stride 2, padding 1) halves it rounding up: Whisper's 3000 -> 1500."""
  cfg = _cfg()
  stem = AudioEmbedder(cfg)
  params = stem.init(jax.random.key(0), jnp.zeros((1, 8, cfg.num_mel_bins)), None)
  for frames in (1, 2, 3, 21, 3000):  # shapes only (jax.eval_shape: nothing computed)
    out, pos, seg = jax.eval_shape(stem.apply, params, jnp.zeros((2, frames, cfg.num_mel_bins)),
                                   jnp.ones((2, frames), jnp.int32))
    assert out.shape == (2, stem_length(frames), cfg.d_model) == (2, -(-frames // 2), cfg.d_model)
    assert seg.shape == pos.shape == (2, stem_length(frames))
  assert stem_length(3000) == 1500 and stem_length(np.array([1, 2, 5])).tolist() == [1, 1, 3]


def test_conv_stem_is_two_convolutions_and_sinusoids():
  """The windowed dense layers equal lax.conv_general_dilated with the same kernels (Whisper's Conv1d pair)."""
  cfg = _cfg(d_model=24, num_heads=4, num_mel_bins=10)
  x = jax.random.normal(jax.random.key(1), (3, 17, 10))
  params = nn.meta.unbox(AudioEmbedder(cfg).init(jax.random.key(2), x, None)["params"])
  out, _, seg = jax.jit(lambda p, x: AudioEmbedder(cfg).apply({"params": p}, x, None))(params, x)

  def conv(h, layer, stride):  # NWC input, WIO kernel [3, in, out], padding 1 on each side
    y = jax.lax.conv_general_dilated(h, params[layer]["kernel"], (stride,), [(1, 1)],
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    return jax.nn.gelu(y + params[layer]["bias"], approximate=False)

  want = jax.jit(lambda x: conv(conv(x, "conv1", 1), "conv2", 2))(x)
  want = want + sinusoidal(jnp.arange(want.shape[1]), 24)
  np.testing.assert_allclose(out, want, atol=2e-5)
  assert seg is None


def test_padded_audio_batch_shapes_and_masks():
  """A right-padded frame batch: token mask = frame mask at stride-2 window centres; garbage in the padding frames
  changes nothing (masked in encoder self-attention, cross-attention and zeroed before each convolution)."""
  cfg = _cfg()
  model = build_model(cfg)
  params = init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  lengths = np.array([21, 6])
  frames = rng.normal(size=(2, 21, cfg.num_mel_bins)).astype(np.float32)
  mask = (np.arange(21) < lengths[:, None]).astype(np.int32)
  noisy = np.where(mask[..., None] > 0, frames, 1e3 * rng.normal(size=frames.shape)).astype(np.float32)
  dec = rng.integers(3, cfg.vocab_size, (2, 5))

  token_mask = stem_mask(jnp.asarray(mask))
  assert token_mask.shape == (2, stem_length(21)) and token_mask.sum(1).tolist() == stem_length(lengths).tolist()
  encode = jax.jit(lambda f, m: model.apply({"params": params}, f, encoder_padding_mask=m, method="encode"))
  apply = jax.jit(lambda f, d, m: model.apply({"params": params}, f, d, encoder_segment_ids=m))
  encoded, logits = encode(noisy, mask), apply(noisy, dec, mask)
  assert encoded.shape == (2, stem_length(21), cfg.d_model) and logits.shape == (2, 5, cfg.vocab_size)
  np.testing.assert_allclose(encoded[0], encode(frames[:1], mask[:1])[0], atol=1e-4)  # nothing to mask
  short = frames[1:, :6]  # the padded utterance alone
  np.testing.assert_allclose(encoded[1, :3], encode(short, np.ones((1, 6), np.int32))[0], atol=1e-4)
  np.testing.assert_allclose(logits[1], apply(short, dec[1:], np.ones((1, 6), np.int32))[0], atol=1e-4)


def test_audio_stem_config_checks():
  with pytest.raises(ValueError, match="input_stem='audio' needs architecture='encoder_decoder'"):
    _cfg(architecture="decoder")
  with pytest.raises(ValueError, match="absolute decoder"):
    _cfg(position="rope")
  with pytest.raises(ValueError, match="num_mel_bins"):
    _cfg(num_mel_bins=0)
  model = build_model(_cfg())
  params = init_params(model, jax.random.key(0))
  with pytest.raises(ValueError, match=r"log-mel frames \[batch, frames, 16\]"):
    model.apply({"params": params}, jnp.zeros((1, 8, 80)), jnp.zeros((1, 2), jnp.int32))
  task = TaskConfig(objective=SpeechToText(max_frames=64, targets_len=8, n_mels=80), train_source=[{}])
  with pytest.raises(ValueError, match="n_mels = ModelConfig.num_mel_bins"):
    Experiment(model=_cfg(), task=task)
  with pytest.raises(ValueError, match="audio needs input_stem='audio'"):
    Experiment(model=_cfg(input_stem="tokens"), task=task)


# --- features and data ------------------------------------------------------------------------------------------

def test_log_mel_shape_and_params():
  """80 bins, 25 ms Hann window (n_fft 400) and 10 ms hop (160) at 16 kHz, centred: 1 + n // 160 frames; the
  values are librosa's power mel spectrogram, log10, clamped 8 below the max, (x + 4) / 4."""
  assert data.audio.window_and_hop(16000) == (400, 160) and data.audio.window_and_hop(8000) == (200, 80)
  rate, n = 16000, 16000 + 37
  audio = (0.3 * np.sin(2 * np.pi * 1000.0 * np.arange(n) / rate)).astype(np.float32)
  feats = data.log_mel(audio)
  assert feats.shape == (1 + n // 160, 80) == (data.audio.num_frames(n), 80) and feats.dtype == np.float32
  mel = librosa.feature.melspectrogram(y=audio, sr=rate, n_fft=400, hop_length=160, win_length=400,
                                       window="hann", center=True, power=2.0, n_mels=80)
  want = np.log10(np.maximum(mel, 1e-10))
  np.testing.assert_allclose(feats, ((np.maximum(want, want.max() - 8.0) + 4.0) / 4.0).T, atol=1e-4)
  centre = librosa.mel_frequencies(n_mels=82, fmax=rate / 2)[1:-1]  # the filters' centre frequencies
  assert abs(centre[feats[50].argmax()] - 1000.0) < 60  # a 1 kHz tone peaks in the 1 kHz bin
  assert data.log_mel(audio, n_mels=40, hop_ms=20).shape == (1 + n // 320, 40)
  with pytest.raises(ValueError, match="mono"):
    data.log_mel(np.zeros((2, 100), np.float32))


def test_speech_to_text_rows_and_tokenizer(tmp_path):
  records = _tone_corpus(12) + [{"audio": _tones("low " * 30), "text": "too long"}]
  tok = data.Tokenizer.train(records, str(tmp_path / "tok.model"), vocab_size=24)  # audio values are skipped
  assert tok.decode(tok.encode("low mid high top")) == "low mid high top"
  obj = SpeechToText(max_frames=120, targets_len=8, feature_cache=100)
  batches = list(data.make_iterator(records, tok, obj, batch_size=4, train=False))
  b = batches[0]
  assert b["encoder_inputs"].shape == (4, 120, 80) and b["encoder_inputs"].dtype == np.float32
  assert {k: v.shape for k, v in b.items() if k != "encoder_inputs"} == {
      "encoder_segment_ids": (4, 120), "decoder_inputs": (4, 8), "decoder_targets": (4, 8),
      "decoder_segment_ids": (4, 8), "decoder_positions": (4, 8), "weights": (4, 8)}
  frames = data.audio.num_frames(len(records[0]["audio"]))
  assert b["encoder_segment_ids"][0].sum() == frames and not b["encoder_inputs"][0, frames:].any()
  np.testing.assert_array_equal(b["encoder_inputs"][0, :frames], data.log_mel(records[0]["audio"]))
  ids = [*tok.encode(records[0]["text"]), tok.eos_id]
  assert b["decoder_targets"][0, :len(ids)].tolist() == ids and b["decoder_inputs"][0, 0] == 0
  assert sum(int(x["weights"].any(1).sum()) for x in batches) == 12  # the 30-word utterance is skipped
  assert obj.counts.as_dict() == {"too_long": 1} and len(obj._cache) == len({r["text"] for r in records})
  with pytest.raises(ValueError, match="pack=False"):
    SpeechToText(pack=True).check(tok)


def test_tfds_speech_source(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  records = [{"speech": np.array([0, 16384, -32768], np.int64), "text": b"HELLO WORLD"},
             {"speech": np.zeros(0, np.int64), "text": b"EMPTY"}]
  monkeypatch.setattr(tfds, "data_source", lambda name, split, data_dir: records)
  src = data.TfdsSpeechSource("librispeech", "dev_clean")
  r = src[0]
  assert r["text"] == "hello world" and r["audio"].dtype == np.float32
  np.testing.assert_allclose(r["audio"], [0.0, 0.5, -1.0])
  assert src[1] is None and src.stats == {"documents": 2, "empty": 1}


def test_speech_gin_configs_parse(tmp_path):
  for split in ("train", "validation"):  # the sources read their manifests; a corpus of one row each suffices
    (tmp_path / f"{split}.tsv").write_text("id\tvoice\ttext\n0\ten\tone two\n")
  bindings = [f"{scope}/SpeechCorpusSource.directory = '{tmp_path}'" for scope in ("train", "validation")]
  config.parse(["experiments/speech_digits.gin"], bindings)
  exp = config.experiment()
  assert exp.model.input_stem == "audio" and isinstance(exp.task.objective, SpeechToText)
  assert (exp.task.train_source.split, exp.task.eval_source.split) == ("train", "validation")
  config.parse(["models/whisper_tiny.gin"])
  cfg = config.build(ModelConfig)
  assert (cfg.d_model, cfg.num_layers, cfg.encoder_layers, cfg.num_mel_bins, cfg.max_len) == (384, 4, 4, 80, 448)


# --- decoding and training --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_transcribe_greedy_and_beam_match_the_model():
  """Greedy tokens are the argmax of the full (teacher-forced) model at every step, whatever the batch padding;
  one-beam search gives the same tokens."""
  cfg = _cfg(vocab_size=12)
  model = build_model(cfg)
  params = init_params(model, jax.random.key(3))
  rng = np.random.default_rng(1)
  feats = [rng.normal(size=(n, cfg.num_mel_bins)).astype(np.float32) for n in (30, 11, 19)]
  tokens = transcribe(cfg, params, feats, 6, pad_multiple=8)
  assert transcribe(cfg, params, [feats[1]], 6, pad_multiple=8).tolist() == [tokens[1].tolist()]
  frames, lengths = pad_frames(feats, 16)
  assert frames.shape == (3, 32, 16) and lengths.tolist() == [30, 11, 19]
  mask = (np.arange(32) < lengths[:, None]).astype(np.int32)
  dec = np.concatenate([np.zeros((3, 1), np.int32), tokens[:, :-1]], axis=1)  # teacher forcing on the output
  logits = jax.jit(lambda f, d, m: model.apply({"params": params}, f, d, encoder_segment_ids=m))(frames, dec, mask)
  assert np.argmax(logits, -1).tolist() == tokens.tolist()
  assert transcribe(cfg, params, feats, 6, "beam", num_beams=1).tolist() == tokens.tolist()
  with pytest.raises(ValueError, match="'greedy' or 'beam'"):
    transcribe(cfg, params, feats, 6, "sample")


@pytest.mark.slow
def test_tiny_speech_train_loss_falls(tmp_path):
  """A tiny Whisper-layout model learns the tone language through the ordinary training loop (seconds)."""
  cfg = _cfg(num_mel_bins=80, vocab_size=24, d_model=32, num_layers=1, num_encoder_layers=1, max_len=8)
  task = TaskConfig(objective=SpeechToText(max_frames=96, targets_len=8, feature_cache=100),
                    train_source=_tone_corpus(48), eval_source=_tone_corpus(8, seed=1), vocab_size=24,
                    data_threads=1, prefetch=4)
  tc = TrainConfig(num_steps=40, batch_size=8, log_every=10, eval_every=0, eval_batches=1, checkpoint_every=40,
                   num_samples=0, progress_bar=False)
  out = train(str(tmp_path / "run"), Experiment(model=cfg, task=task, train=tc,
                                                optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=5)))
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < 0.6 * losses[0], losses
  assert np.isfinite(out["eval_loss"])


@pytest.mark.slow
@pytest.mark.skipif(ESPEAK is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_espeak_corpus_train_and_wer(tmp_path):
  """launch.make_speech_corpus -> launch.train (speech_digits.gin, a few steps) -> launch.speech_wer."""
  corpus = tmp_path / "corpus"
  from launch import make_speech_corpus
  assert make_speech_corpus.main([f"--out={corpus}", "--train=6", "--validation=2", "--test=2",
                                  "--max_digits=3", "--workers=2"]) == 0
  info = json.loads((corpus / "corpus.json").read_text())
  assert info["splits"]["test_voice"]["voices"] == 1 and info["held_out_voice"] not in info["train_voices"]
  tsv = {s: (corpus / f"{s}.tsv").read_text().splitlines()[1:] for s in ("train", "test", "test_voice")}
  train_texts = {r.split("\t")[-1] for r in tsv["train"]}
  assert not train_texts & {r.split("\t")[-1] for r in tsv["test"]}  # held-out texts
  assert [r.split("\t")[-1] for r in tsv["test"]] == [r.split("\t")[-1] for r in tsv["test_voice"]]
  src = data.SpeechCorpusSource(str(corpus), "test_voice")
  assert src[0]["audio"].dtype == np.float32 and src.rows[0]["voice"] == make_speech_corpus.HELD_OUT_VOICE

  workdir = tmp_path / "run"
  bindings = [f"{s}/SpeechCorpusSource.directory = '{corpus}'" for s in ("train", "validation")] + [
      "TrainConfig.num_steps = 4", "TrainConfig.batch_size = 2", "TrainConfig.eval_every = 0",
      "TrainConfig.log_every = 2", "TrainConfig.progress_bar = False", "ModelConfig.d_model = 32",
      "ModelConfig.mlp_dim = 64", "ModelConfig.num_layers = 1", "ModelConfig.num_encoder_layers = 1",
      "TaskConfig.data_threads = 1", "TaskConfig.prefetch = 4"]
  cmd = [sys.executable, "-m", "launch.train", "--gin_file=experiments/speech_digits.gin", f"--workdir={workdir}"]
  run = subprocess.run(cmd + [f"--gin_bindings={b}" for b in bindings], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  out = tmp_path / "wer.json"
  from launch import speech_wer
  assert speech_wer.main([f"--workdir={workdir}", f"--corpus={corpus}", f"--out={out}", "--batch_size=2"]) == 0
  summary = json.loads(out.read_text())
  assert set(summary["results"]) == {"test", "test_voice"} and summary["versions"]["jiwer"]
  assert all(0.0 <= r["wer"] and r["utterances"] == 2 for r in summary["results"].values())
  assert summary["results"]["test_voice"]["voices"] == [make_speech_corpus.HELD_OUT_VOICE]
