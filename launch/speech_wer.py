"""Word error rates of a trained speech run (input_stem='audio') on the splits of a spoken corpus.

  python -m launch.speech_wer --workdir=workdirs/speech_digits --corpus=workdirs/data/speech_digits
  python -m launch.speech_wer ... --method=beam --num_beams=4 --out=benchmarks/results/speech_digits_cpu.json

Each utterance of each split (default: test = held-out texts from training voices, test_voice = the same texts
from the held-out voice) becomes log-mel frames (t_jax.data.log_mel, the run's num_mel_bins) and is decoded with
t_jax.inference.transcribe (greedy or beam search). Prints one line per split: jiwer's word error rate (WER),
character error rate (CER) and the fraction of utterances transcribed exactly, then a few errors. --out writes a
JSON summary: the numbers, the machine, the library versions and the commands (--train_command, --train_seconds
describe the training run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from typing import Optional

SPLITS = ("test", "test_voice")


def _version(package: str) -> Optional[str]:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


def evaluate_split(cfg: object, params: object, tok: object, corpus: str, split: str, *, method: str = "greedy",
                   num_beams: Optional[int] = None, batch_size: int = 50, max_new_tokens: Optional[int] = None
                   ) -> dict:
  """{wer, cer, exact, utterances, words, errors: [(reference, hypothesis)...]} of one corpus split."""
  import jiwer

  from t_jax.data.audio import SpeechCorpusSource, log_mel
  from t_jax.inference import transcribe

  source = SpeechCorpusSource(corpus, split)
  refs, hyps = [], []
  steps = max_new_tokens or min(cfg.max_len, 64)
  for start in range(0, len(source), batch_size):
    records = [source[i] for i in range(start, min(start + batch_size, len(source)))]
    features = [log_mel(r["audio"], n_mels=cfg.num_mel_bins) for r in records]
    hyps += transcribe(cfg, params, features, steps, method, tokenizer=tok, num_beams=num_beams)
    refs += [r["text"] for r in records]
  hyps = [" ".join(h.split()) for h in hyps]
  return {"wer": jiwer.wer(refs, hyps), "cer": jiwer.cer(refs, hyps),
          "exact": sum(r == h for r, h in zip(refs, hyps)) / len(refs), "utterances": len(refs),
          "words": sum(len(r.split()) for r in refs), "voices": sorted({r["voice"] for r in source.rows}),
          "errors": [(r, h) for r, h in zip(refs, hyps) if r != h]}


def main(argv: Optional[list[str]] = None) -> int:
  """The command line (see the module docstring)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a training run with input_stem='audio'")
  p.add_argument("--corpus", required=True, help="a corpus from launch/make_speech_corpus.py")
  p.add_argument("--splits", default=",".join(SPLITS))
  p.add_argument("--method", choices=("greedy", "beam"), default="greedy")
  p.add_argument("--num_beams", type=int, default=None)
  p.add_argument("--batch_size", type=int, default=50)
  p.add_argument("--show_errors", type=int, default=5, help="errors printed per split")
  p.add_argument("--out", default=None, help="write a JSON summary here")
  p.add_argument("--train_command", default=None, help="recorded in the JSON summary")
  p.add_argument("--train_seconds", type=float, default=None, help="recorded in the JSON summary (wall time)")
  p.add_argument("--train_cpu_seconds", type=float, default=None, help="recorded in the JSON summary (user + sys)")
  p.add_argument("--note", default=None, help="recorded in the JSON summary (e.g. how loaded the machine was)")
  args = p.parse_args(argv)

  import jax

  from t_jax.workdir import load

  cfg, params, tok = load(args.workdir)
  if cfg.input_stem != "audio" or tok is None:
    print(f"error: {args.workdir} is not a speech run (input_stem={cfg.input_stem!r})", file=sys.stderr)
    return 2
  results, t0 = {}, time.time()
  for split in args.splits.split(","):
    r = evaluate_split(cfg, params, tok, args.corpus, split, method=args.method, num_beams=args.num_beams,
                       batch_size=args.batch_size)
    results[split] = r
    print(f"{split}: WER {100 * r['wer']:.2f}%, CER {100 * r['cer']:.2f}%, exact {100 * r['exact']:.1f}% "
          f"({r['utterances']} utterances, {r['words']} words, {len(r['voices'])} voice(s))", flush=True)
    for ref, hyp in r["errors"][:args.show_errors]:
      print(f"  ref: {ref!r}\n  hyp: {hyp!r}")
  if args.out:
    corpus_info = os.path.join(args.corpus, "corpus.json")
    summary = {
        "task": "speech recognition of espeak-ng digit strings (configs/experiments/speech_digits.gin)",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "device": jax.devices()[0].device_kind},
        "versions": {"python": platform.python_version(),
                     **{k: _version(k) for k in ("jax", "flax", "optax", "librosa", "jiwer", "numpy")}},
        "corpus": json.load(open(corpus_info)) if os.path.isfile(corpus_info) else args.corpus,
        "train_command": args.train_command, "train_seconds": args.train_seconds,
        "train_cpu_seconds": args.train_cpu_seconds, "note": args.note,
        "eval_command": "python -m launch.speech_wer " + " ".join(a for a in (argv or sys.argv[1:])
                                                                  if not a.startswith(("--out", "--train_", "--note"))),
        "eval_seconds": round(time.time() - t0, 1), "decoding": args.method,
        "results": {s: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                        if k not in ("errors", "voices")}
                    | {"voices": r["voices"] if len(r["voices"]) <= 3 else len(r["voices"]),
                       "example_errors": r["errors"][:5]} for s, r in results.items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(summary, f, indent=1)
      f.write("\n")
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
