"""Writes a small spoken corpus with espeak-ng (a Debian package: `apt-get install espeak-ng`), no download.

  python -m launch.make_speech_corpus --out=workdirs/data/speech_digits                 # digit strings
  python -m launch.make_speech_corpus --kind=captions --out=workdirs/data/speech_captions  # short Multi30K captions

Each utterance is one espeak-ng voice (an English accent + a voice variant), a speed (words per minute) and a
pitch drawn at random, resampled to 16 kHz (librosa, soxr), its leading/trailing silence trimmed, and written as
16-bit mono WAV. Splits (t_jax.data.SpeechCorpusSource reads them):

  train        training texts, spoken by the training voices (TRAIN_ACCENTS x TRAIN_VARIANTS)
  validation   held-out texts (none is a training text), training voices: the loss evaluated during training
  test         other held-out texts, training voices: word error rate on unseen texts from seen voices
  test_voice   the same texts as `test`, spoken by HELD_OUT_VOICE, whose accent and variant never occur in
               training: word error rate on an unseen voice

Layout: OUT/{split}.tsv (id, voice, speed, pitch, text; a header line), OUT/{split}/{id}.wav and OUT/corpus.json
(the settings and counts). Digits are written as words ('three one four'); captions are lower-cased, with
punctuation removed, of at most --max_words words, from ../shared/data/multi30k/{train,val}.en.gz.
The corpus depends only on the settings and the espeak-ng version (recorded in corpus.json).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import wave
from pathlib import Path
from typing import Optional

import numpy as np

SAMPLE_RATE = 16000
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng's own English voices (no mbrola); a voice is `accent+variant`.
TRAIN_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "f1", "f2", "f3", "f4")
HELD_OUT_VOICE = "en-gb-x-gbcwmd+m7"  # West Midlands accent, variant m7: neither occurs in training
SPEEDS = (130, 210)  # words per minute, uniform
PITCHES = (25, 75)  # espeak-ng pitch 0..99 (default 50), uniform
SPLITS = ("train", "validation", "test", "test_voice")
MULTI30K = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "multi30k"


def espeak_version() -> Optional[str]:
  """`espeak-ng --version`'s first line, or None when espeak-ng is not installed."""
  if shutil.which("espeak-ng") is None:
    return None
  out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=False)
  return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def synthesize(text: str, voice: str, speed: int, pitch: int, trim_db: float = 40.0) -> np.ndarray:
  """int16 samples at SAMPLE_RATE of espeak-ng speaking `text`, silence beyond 50 ms at either end trimmed."""
  import librosa  # the `speech` extra

  out = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                       capture_output=True, check=False)
  if out.returncode != 0 or len(out.stdout) <= 44:
    raise RuntimeError(f"espeak-ng -v {voice} failed: {out.stderr.decode(errors='replace').strip()}")
  with wave.open(io.BytesIO(out.stdout)) as w:  # the streamed header's frame count is a placeholder: read the rest
    rate = w.getframerate()
  pcm = np.frombuffer(out.stdout[44:len(out.stdout) - len(out.stdout) % 2], np.int16).astype(np.float32) / 32768
  y = librosa.resample(pcm, orig_sr=rate, target_sr=SAMPLE_RATE)
  _, (start, end) = librosa.effects.trim(y, top_db=trim_db, frame_length=400, hop_length=160)
  margin = SAMPLE_RATE // 20
  y = y[max(0, start - margin):end + margin]
  return np.clip(np.round(y * 32767), -32768, 32767).astype(np.int16)


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
  """16-bit mono WAV."""
  with wave.open(str(path), "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(sample_rate)
    w.writeframes(np.asarray(samples, np.int16).tobytes())


def digit_strings(n: int, rng: np.random.Generator, min_digits: int, max_digits: int,
                  exclude: set[str] = frozenset()) -> list[str]:
  """n distinct digit strings in words ('four two seven'), none in `exclude`."""
  if 10 ** max_digits - len(exclude) < n:
    raise ValueError(f"cannot draw {n} distinct strings of at most {max_digits} digits")
  out: dict[str, None] = {}
  while len(out) < n:
    text = " ".join(DIGITS[d] for d in rng.integers(0, 10, int(rng.integers(min_digits, max_digits + 1))))
    if text not in exclude:
      out[text] = None
  return list(out)


def normalize_caption(text: str) -> str:
  """Lower-cased words and apostrophes only (what the WER compares)."""
  return " ".join(re.sub(r"[^a-z' ]+", " ", text.lower()).split())


def captions(path: Path, n: int, rng: np.random.Generator, max_words: int, exclude: set[str] = frozenset()
             ) -> list[str]:
  """n distinct normalised captions of at most max_words words from a Multi30K .en.gz file."""
  with gzip.open(path, "rt", encoding="utf-8") as f:
    lines = [t for t in dict.fromkeys(normalize_caption(line) for line in f)
             if t and len(t.split()) <= max_words and t not in exclude]
  if len(lines) < n:
    raise ValueError(f"{path}: only {len(lines)} captions of at most {max_words} words")
  return [lines[i] for i in sorted(rng.choice(len(lines), n, replace=False))]


def plan(args: argparse.Namespace) -> dict[str, list[dict]]:
  """The utterances of every split: {split: [{id, voice, speed, pitch, text}]}, seeded by --seed."""
  rng = np.random.default_rng(args.seed)
  sizes = {"train": args.train, "validation": args.validation, "test": args.test}
  if args.kind == "digits":
    train = digit_strings(sizes["train"], rng, args.min_digits, args.max_digits)
    held = digit_strings(sizes["validation"] + sizes["test"], rng, args.min_digits, args.max_digits, set(train))
  else:
    train = captions(Path(args.captions_dir) / "train.en.gz", sizes["train"], rng, args.max_words)
    held = captions(Path(args.captions_dir) / "val.en.gz", sizes["validation"] + sizes["test"], rng,
                    args.max_words, set(train))
  texts = {"train": train, "validation": held[:sizes["validation"]], "test": held[sizes["validation"]:]}
  texts["test_voice"] = texts["test"]
  voices = [f"{a}+{v}" for a in TRAIN_ACCENTS for v in TRAIN_VARIANTS]
  out = {}
  for split in SPLITS:
    rows = []
    for i, text in enumerate(texts[split]):
      voice = HELD_OUT_VOICE if split == "test_voice" else voices[int(rng.integers(len(voices)))]
      rows.append({"id": f"{split}_{i:05d}", "voice": voice, "speed": int(rng.integers(SPEEDS[0], SPEEDS[1] + 1)),
                   "pitch": int(rng.integers(PITCHES[0], PITCHES[1] + 1)), "text": text})
    out[split] = rows
  return out


def write_corpus(out: str | Path, utterances: dict[str, list[dict]], settings: dict, workers: int = 4) -> dict:
  """Synthesises every utterance (espeak-ng, in `workers` threads), writes the splits; returns corpus.json's dict."""
  root = Path(out)
  root.mkdir(parents=True, exist_ok=True)
  stats = {}
  for split, rows in utterances.items():
    (root / split).mkdir(exist_ok=True)

    def one(row: dict, split: str = split) -> float:
      samples = synthesize(row["text"], row["voice"], row["speed"], row["pitch"])
      write_wav(root / split / f"{row['id']}.wav", samples)
      return len(samples) / SAMPLE_RATE

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      seconds = list(pool.map(one, rows))
    with open(root / f"{split}.tsv", "w", newline="") as f:
      writer = csv.DictWriter(f, ["id", "voice", "speed", "pitch", "text"], delimiter="\t", lineterminator="\n")
      writer.writeheader()
      writer.writerows(rows)
    stats[split] = {"utterances": len(rows), "voices": len({r["voice"] for r in rows}),
                    "seconds": round(float(np.sum(seconds)), 1), "max_seconds": round(float(np.max(seconds)), 3)}
    print(f"{split}: {stats[split]}", flush=True)
  info = {**settings, "espeak_ng": espeak_version(), "sample_rate": SAMPLE_RATE, "splits": stats,
          "train_voices": [f"{a}+{v}" for a in TRAIN_ACCENTS for v in TRAIN_VARIANTS],
          "held_out_voice": HELD_OUT_VOICE}
  (root / "corpus.json").write_text(json.dumps(info, indent=1) + "\n")
  return info


def main(argv: Optional[list[str]] = None) -> int:
  """The command line (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="corpus directory (created)")
  p.add_argument("--kind", choices=("digits", "captions"), default="digits")
  p.add_argument("--train", type=int, default=3000)
  p.add_argument("--validation", type=int, default=100)
  p.add_argument("--test", type=int, default=200)
  p.add_argument("--min_digits", type=int, default=3)
  p.add_argument("--max_digits", type=int, default=6)
  p.add_argument("--max_words", type=int, default=8, help="captions: longest caption kept")
  p.add_argument("--captions_dir", default=str(MULTI30K), help="captions: the Multi30K directory")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
  args = p.parse_args(argv)
  if espeak_version() is None:
    print("error: espeak-ng is not installed (apt-get install espeak-ng)", file=sys.stderr)
    return 2
  settings = {k: v for k, v in vars(args).items() if k not in ("out", "workers", "captions_dir")}
  write_corpus(args.out, plan(args), settings, args.workers)
  return 0


if __name__ == "__main__":
  sys.exit(main())
