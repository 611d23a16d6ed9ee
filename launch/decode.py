"""Generate text from a trained run; with --reference_file, print corpus sacreBLEU (translation).

  python -m launch.decode --workdir=DIR --prompt='Hello' [--method=sample --temperature=0.8 --top_p=0.9]
  python -m launch.decode --workdir=DIR --input_file=src.txt --reference_file=ref.txt --method=beam
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from t_jax.inference import METHODS, generate


def load_run(workdir: str) -> tuple[Any, Any, Any]:
  """(model_cfg, params, tokenizer) of a training run (t_jax.training.load)."""
  from t_jax.training.load import load  # imported lazily: the decode tooling does not need training
  return load(workdir)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """Command-line flags."""
  p = argparse.ArgumentParser(prog="python -m launch.decode", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="Run directory to load (t_jax.training.load).")
  p.add_argument("--prompt", action="append", default=[], help="A prompt (repeatable).")
  p.add_argument("--input_file", help="Prompts (or translation sources), one per line.")
  p.add_argument("--reference_file", help="References, one per line: prints corpus sacreBLEU.")
  p.add_argument("--output_file", help="Write the outputs here, one per line (default: stdout only).")
  p.add_argument("--method", default="greedy", choices=METHODS)
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=None)
  p.add_argument("--top_k", type=int, default=None)
  p.add_argument("--top_p", type=float, default=None)
  p.add_argument("--num_beams", type=int, default=None)
  p.add_argument("--length_penalty", type=float, default=None, help="GNMT alpha for beam search (0.6).")
  p.add_argument("--draft_workdir", help="Draft model run for --method=speculative.")
  p.add_argument("--num_draft_tokens", type=int, default=4)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def encode(tokenizer: Any, text: str, seq2seq: bool) -> list[int]:
  """Sources end with EOS (as in training); decoder-only prompts start with BOS (= EOS in t_jax)."""
  ids = list(tokenizer.encode(text))
  if seq2seq:
    return ids + [tokenizer.eos_id]
  return [getattr(tokenizer, "bos_id", tokenizer.eos_id)] + ids


def detokenize(tokenizer: Any, row: np.ndarray) -> str:
  """Text of the generated ids up to (excluding) the first EOS."""
  ids = row.tolist()
  if tokenizer.eos_id in ids:
    ids = ids[:ids.index(tokenizer.eos_id)]
  return tokenizer.decode(ids)


def decode_texts(cfg: Any, params: Any, tokenizer: Any, texts: list[str], args: argparse.Namespace,
                 draft: Any = None) -> list[str]:
  """Generates for every text, batch by batch."""
  seq2seq = cfg.architecture == "encoder_decoder"
  opts = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
              length_penalty=args.length_penalty, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, pad_multiple=8)
  if draft is not None:
    opts.update(draft=draft, num_draft_tokens=args.num_draft_tokens)
  outs = []
  for start in range(0, len(texts), args.batch_size):
    prompts = [encode(tokenizer, t, seq2seq) for t in texts[start:start + args.batch_size]]
    tokens = generate(cfg, params, prompts, args.max_new_tokens, args.method, seed=args.seed + start, **opts)
    outs += [detokenize(tokenizer, row) for row in tokens]
  return outs


def read_lines(path: str) -> list[str]:
  """Lines of a text file without their newlines."""
  with open(path, encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f]


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point; returns the exit status."""
  args = parse_args(argv)
  texts = list(args.prompt) + (read_lines(args.input_file) if args.input_file else [])
  if not texts:
    print("error: give --prompt and/or --input_file", file=sys.stderr)
    return 2
  try:
    cfg, params, tokenizer = load_run(args.workdir)
    if tokenizer is None:
      raise ValueError(f"{args.workdir} has no tokenizer (tokenizer.model or TaskConfig.tokenizer)")
    draft = None
    if args.draft_workdir:
      dcfg, dparams, _ = load_run(args.draft_workdir)
      draft = (dcfg, dparams)
    outputs = decode_texts(cfg, params, tokenizer, texts, args, draft)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for text, out in zip(texts, outputs):
    print(f"{text}\t{out}" if len(texts) > 1 else out)
  if args.output_file:
    with open(args.output_file, "w", encoding="utf-8") as f:
      f.writelines(o + "\n" for o in outputs)
  if args.reference_file:
    import sacrebleu
    refs = read_lines(args.reference_file)
    if len(refs) != len(outputs):
      print(f"error: {len(refs)} references for {len(outputs)} outputs", file=sys.stderr)
      return 2
    print(f"sacreBLEU: {sacrebleu.corpus_bleu(outputs, [refs]).score:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
