"""Speech recognition data: log-mel features (librosa), spoken-corpus sources and the SpeechToText objective.

Needs the `speech` extra (`pip install -e '.[speech]'`: librosa for the features, jiwer for word error rates).

log_mel(audio, sample_rate=16000, n_mels=80, window_ms=25, hop_ms=10) -> [frames, n_mels] float32
    Whisper's features (Radford et al. 2022): a Hann-windowed STFT (25 ms window = n_fft 400 at 16 kHz, 10 ms
    hop, centred: frames = 1 + samples // hop), power through librosa's Slaney mel filterbank, log10 clamped
    at 1e-10 and to 8 below the utterance's maximum, then (x + 4) / 4.

Sources (records {audio: float32 samples in [-1, 1] at SAMPLE_RATE, text: transcript}):
  SpeechCorpusSource(directory, split)   a corpus written by launch/make_speech_corpus.py (espeak-ng, offline):
      DIR/{split}.tsv lists the utterances, DIR/{split}/{id}.wav holds them (read when a record is read).
  TfdsSpeechSource(name='librispeech', split='train_clean100')   a TFDS speech dataset via tfds.data_source
      (needs the prepared dataset, i.e. internet once); transcripts lower-cased.

SpeechToText(max_frames=3000, targets_len=128, n_mels=80, ...): never packed, one utterance per row
  (B = batch size, F = max_frames):
    encoder_inputs [B, F, n_mels] float32    log-mel frames, zero after the utterance
    encoder_segment_ids [B, F]               1 on the utterance's frames, 0 on padding
    decoder_inputs, decoder_targets, decoder_segment_ids, decoder_positions, weights [B, targets_len]
        as Seq2Seq's: the transcript's tokens + eos, the inputs shifted right after the start token 0.
  An utterance longer than max_frames is skipped (counted "too_long"), a transcript longer than targets_len - 1
  tokens truncated (counted "truncated_text"). The model needs input_stem='audio' with num_mel_bins = n_mels.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import os
import wave
from typing import Any, ClassVar, Optional

import numpy as np

from t_jax.data.objectives import Objective, Row
from t_jax.data.sources import Example, TfdsRecords
from t_jax.data.tokenizer import Tokenizer

SAMPLE_RATE = 16000


def window_and_hop(sample_rate: int = SAMPLE_RATE, window_ms: float = 25.0, hop_ms: float = 10.0) -> tuple[int, int]:
  """(window = n_fft, hop) in samples: (400, 160) at 16 kHz."""
  return round(sample_rate * window_ms / 1000), round(sample_rate * hop_ms / 1000)


def num_frames(num_samples: int, sample_rate: int = SAMPLE_RATE, hop_ms: float = 10.0) -> int:
  """Frames `log_mel` makes of num_samples samples (centred STFT): 1 + num_samples // hop."""
  return 1 + num_samples // window_and_hop(sample_rate, hop_ms=hop_ms)[1]


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
  """librosa's Slaney-normalised mel filterbank [n_mels, n_fft // 2 + 1] (Whisper's), computed once."""
  import librosa

  return librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels).astype(np.float32)


def log_mel(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, n_mels: int = 80, window_ms: float = 25.0,
            hop_ms: float = 10.0) -> np.ndarray:
  """Whisper-style log-mel features [1 + len(audio) // hop, n_mels] float32 of mono samples in [-1, 1]."""
  import librosa

  audio = np.asarray(audio, np.float32)
  if audio.ndim != 1 or audio.size == 0:
    raise ValueError(f"log_mel takes mono samples [n > 0], got shape {audio.shape}")
  n_fft, hop = window_and_hop(sample_rate, window_ms, hop_ms)
  power = np.abs(librosa.stft(audio, n_fft=n_fft, hop_length=hop, window="hann", center=True)) ** 2
  mel = np.log10(np.maximum(mel_filterbank(sample_rate, n_fft, n_mels) @ power, 1e-10))
  mel = np.maximum(mel, mel.max() - 8.0)
  return ((mel + 4.0) / 4.0).T.astype(np.float32)


def read_wav(path: str) -> tuple[np.ndarray, int]:
  """(float32 mono samples in [-1, 1], sample rate) of a 16-bit PCM WAV file (channels averaged)."""
  with wave.open(path) as w:
    if w.getsampwidth() != 2:
      raise ValueError(f"{path}: {8 * w.getsampwidth()}-bit samples; expected 16-bit PCM")
    rate, channels, raw = w.getframerate(), w.getnchannels(), w.readframes(w.getnframes())
  samples = np.frombuffer(raw, np.int16).astype(np.float32) / 32768.0
  return samples.reshape(-1, channels).mean(axis=1), rate


def _resampled(samples: np.ndarray, rate: int) -> np.ndarray:
  if rate == SAMPLE_RATE:
    return samples
  import librosa

  return librosa.resample(samples, orig_sr=rate, target_sr=SAMPLE_RATE)


class SpeechCorpusSource:
  """One split of a corpus from launch/make_speech_corpus.py: {audio, text} records, audio read on access.

  `rows` keeps every utterance's metadata (id, voice, speed, pitch, text).
  """

  def __init__(self, directory: str, split: str = "train", *, max_examples: Optional[int] = None) -> None:
    self.name = f"SpeechCorpusSource({directory!r}, split={split!r})"
    manifest = os.path.join(directory, f"{split}.tsv")
    if not os.path.isfile(manifest):
      raise ValueError(f"{self.name}: {manifest} does not exist (write the corpus with "
                       f"`python -m launch.make_speech_corpus --out={directory}`)")
    with open(manifest, newline="") as f:
      self.rows = list(csv.DictReader(f, delimiter="\t"))[:max_examples]
    if not self.rows:
      raise ValueError(f"{self.name}: no utterances in {manifest}")
    self.directory, self.split = directory, split

  def __len__(self) -> int:
    return len(self.rows)

  def path(self, index: int) -> str:
    """The WAV file of utterance `index`."""
    return os.path.join(self.directory, self.split, f"{self.rows[index]['id']}.wav")

  def __getitem__(self, index: int) -> dict:
    samples, rate = read_wav(self.path(index))
    return {"audio": _resampled(samples, rate), "text": self.rows[index]["text"]}

  @property
  def stats(self) -> dict[str, int]:
    """Utterances and distinct voices."""
    return {"documents": len(self), "voices": len({r.get("voice") for r in self.rows})}

  def __repr__(self) -> str:
    return f"{self.name} ({len(self)} utterances)"


class TfdsSpeechSource(TfdsRecords):
  """A TFDS speech dataset (librispeech: 16 kHz int16 'speech', 'text') via tfds.data_source, no TensorFlow."""

  modules = ("audio",)

  def __init__(self, name: str = "librispeech", split: str = "train_clean100", *, audio_key: str = "speech",
               text_key: str = "text", lowercase: bool = True, data_dir: Optional[str] = None) -> None:
    super().__init__(name, split, data_dir)
    self.audio_key, self.text_key, self.lowercase = audio_key, text_key, lowercase

  def __getitem__(self, index: int) -> Optional[dict]:
    record = self._source[index]
    text = record[self.text_key]
    text = (text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)).strip()
    audio = np.asarray(record[self.audio_key])
    if not text or audio.size == 0:
      self.counts.add("empty")
      return None
    if np.issubdtype(audio.dtype, np.integer):  # TFDS Audio features hold int16 values
      audio = audio.astype(np.float32) / 32768.0
    return {"audio": audio.astype(np.float32).reshape(-1), "text": text.lower() if self.lowercase else text}


@dataclasses.dataclass
class SpeechToText(Objective):
  """Speech recognition with an encoder-decoder: log-mel frames in, the transcript's tokens out."""

  architectures: ClassVar[tuple[str, ...]] = ("encoder_decoder",)
  label_key: ClassVar[str] = "decoder_targets"
  pack: bool = False
  max_frames: int = 3000  # 30 s, Whisper's window; longer utterances are skipped
  targets_len: int = 128
  n_mels: int = 80
  sample_rate: int = SAMPLE_RATE
  window_ms: float = 25.0
  hop_ms: float = 10.0
  audio_key: str = "audio"
  text_key: str = "text"
  # Keep the features of up to this many utterances in memory, keyed by their samples: a small corpus computes
  # them in its first epoch only (0: always compute).
  feature_cache: int = 0
  _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def lengths(self) -> dict[str, int]:
    """The decoder features (encoder frames are padded by `examples`, not by the pipeline)."""
    return {"decoder_inputs": self.targets_len, "decoder_targets": self.targets_len}

  def check(self, tokenizer: Tokenizer) -> None:
    """One utterance per row, room for frames and text."""
    if self.pack:
      raise ValueError("SpeechToText rows hold one utterance each (pack=False)")
    if self.max_frames < 1 or self.n_mels < 1:
      raise ValueError(f"SpeechToText.max_frames and n_mels must be >= 1, got {self.max_frames}, {self.n_mels}")
    super().check(tokenizer)

  def features(self, audio: np.ndarray) -> np.ndarray:
    """log_mel with this objective's settings: [frames, n_mels] (from the cache when it holds them)."""
    if not self.feature_cache:
      return log_mel(audio, self.sample_rate, self.n_mels, self.window_ms, self.hop_ms)
    audio = np.ascontiguousarray(audio, np.float32)
    key = hashlib.blake2b(audio.tobytes(), digest_size=16).digest()
    frames = self._cache.get(key)
    if frames is None:
      frames = log_mel(audio, self.sample_rate, self.n_mels, self.window_ms, self.hop_ms)
      if len(self._cache) < self.feature_cache:
        self._cache[key] = frames
    return frames

  def examples(self, example: Example, rng: np.random.Generator, tokenizer: Tokenizer) -> list[Row]:
    """One row (frames padded to max_frames), or none for an utterance longer than max_frames."""
    frames = self.features(example[self.audio_key])
    if len(frames) > self.max_frames:
      self.counts.add("too_long")
      return []
    ids = tokenizer.encode(example[self.text_key])
    if len(ids) > self.targets_len - 1:
      self.counts.add("truncated_text")
    targets = np.asarray([*ids[:self.targets_len - 1], tokenizer.eos_id], np.int32)
    padded = np.zeros((self.max_frames, self.n_mels), np.float32)
    padded[:len(frames)] = frames
    return [{"encoder_inputs": padded, "encoder_segment_ids": (np.arange(self.max_frames) < len(frames)).astype(
        np.int32), "decoder_inputs": np.concatenate([[0], targets[:-1]]).astype(np.int32),
        "decoder_targets": targets}]

  def finalize(self, row: Row) -> Row:
    """The encoder frames and their mask, the decoder keys of Seq2Seq and weights."""
    seg = row["decoder_targets_segment_ids"]
    return dict(encoder_inputs=row["encoder_inputs"], encoder_segment_ids=row["encoder_segment_ids"],
                decoder_inputs=row["decoder_inputs"], decoder_targets=row["decoder_targets"],
                decoder_segment_ids=seg, decoder_positions=row["decoder_targets_positions"],
                weights=(seg > 0).astype(np.float32))

  def spec_row(self, **extra: Any) -> Row:
    """With max_frames of zero features."""
    return super().spec_row(encoder_inputs=np.zeros((self.max_frames, self.n_mels), np.float32),
                            encoder_segment_ids=np.zeros(self.max_frames, np.int32), **extra)

  def model_inputs(self, batch: Row) -> tuple[tuple, dict]:
    """Frames with their mask (the audio stem makes its own positions), decoder ids, segments and positions."""
    return (batch["encoder_inputs"], batch["decoder_inputs"]), {
        k: batch[k] for k in ("encoder_segment_ids", "decoder_segment_ids", "decoder_positions")}
