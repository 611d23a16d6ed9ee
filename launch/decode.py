"""Generate text from a trained run: one output line per input, in input order (--prompt flags, then --input_file).

  python -m launch.decode --workdir=DIR --prompt='Hello' [--method=sample --temperature=0.8 --top_p=0.9]
  python -m launch.decode --workdir=DIR --input_file=src.txt --output_file=out.txt --reference_file=ref.txt \\
      --method=beam
  python -m launch.decode --workdir=DIR --prompt='Hello' --cache=paged \\
      --gin_bindings='PagedCacheConfig.page_size=8'

Outputs go to stdout, or with --output_file to that file; --reference_file adds two summary lines on
stdout: sacreBLEU's BLEU and chrF, each with its signature. Errors: one `error:` line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import gzip
import io
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from launch import error_line
from t_jax.inference import CACHES, METHODS, PagedCacheConfig, PoolExhausted, generate


class UsageError(ValueError):
  """A bad command line."""


class Parser(argparse.ArgumentParser):
  """The launchers' ArgumentParser: a bad flag raises UsageError (one `error:` line, no usage, no SystemExit)."""

  def error(self, message: str) -> None:
    """Raises UsageError(message)."""
    raise UsageError(message)


class _WarningsOnly(io.TextIOBase):
  """A stand-in for stderr that passes on only the lines starting with `warning:` (from any thread)."""

  def __init__(self, out: Any) -> None:
    super().__init__()
    self.out, self._partial, self._lock = out, "", threading.Lock()

  def write(self, text: str) -> int:
    """Forwards each completed `warning:` line; drops the other lines."""
    with self._lock:
      *lines, self._partial = (self._partial + text).split("\n")
    for line in lines:
      if line.startswith("warning:"):
        self.out.write(line + "\n")
    return len(text)


@contextlib.contextmanager
def _quiet_checkpoint_reads() -> Iterator[None]:
  """Keeps only `warning:` lines on stderr while a checkpoint is read.

  When a truncated checkpoint fails, orbax and tensorstore threads still in flight print tracebacks
  ("Event loop is closed", futures never retrieved) and orbax logs errors that say nothing the loader's
  warning or error does not.
  """
  stderr, loggers = sys.stderr, [logging.getLogger(name) for name in ("asyncio", "absl")]
  levels, sys.stderr = [log.level for log in loggers], _WarningsOnly(sys.stderr)
  for log in loggers:
    log.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    gc.collect()  # failed futures and coroutines report at collection: do it while quiet
    sys.stderr = stderr
    for log, level in zip(loggers, levels):
      log.setLevel(level)


def load_run(workdir: str) -> tuple[Any, Any, Any]:
  """(model_cfg, params, tokenizer) of a training run (t_jax.load)."""
  from t_jax.workdir import load  # imported lazily
  with _quiet_checkpoint_reads():
    return load(workdir)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  """Command-line flags (UsageError on bad ones)."""
  p = Parser(prog="python -m launch.decode", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="Run directory to load (t_jax.load).")
  p.add_argument("--prompt", action="append", default=[], help="A prompt (repeatable).")
  p.add_argument("--input_file", help="Prompts (or translation sources), one per line (.gz: gzip).")
  p.add_argument("--output_file", help="Write the outputs here, one per line, instead of to stdout.")
  p.add_argument("--reference_file", help="References, one per line (.gz: gzip): prints sacreBLEU's BLEU and chrF.")
  p.add_argument("--method", default="greedy", choices=METHODS)
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=None)
  p.add_argument("--top_k", type=int, default=None)
  p.add_argument("--top_p", type=float, default=None)
  p.add_argument("--repetition_penalty", type=float, default=None, help="CTRL penalty on seen tokens (1 = off).")
  p.add_argument("--no_repeat_ngram_size", type=int, default=None, help="Never repeat an n-gram (0 = off).")
  p.add_argument("--prompt_cache",
                 help="A t_jax.inference.save_prompt_cache directory (Orbax) to continue from (paged cache).")
  p.add_argument("--cache", default="contiguous", choices=CACHES, help="KV cache layout (paged: a page pool).")
  p.add_argument("--gin_file", action="append", default=[],
                 help="Gin file (searched in . and configs/); only its PagedCacheConfig bindings are used.")
  p.add_argument("--gin_bindings", action="append", default=[],
                 help="Gin binding, e.g. 'PagedCacheConfig.page_size=8' (repeatable).")
  p.add_argument("--page_size", type=int, default=None,
                 help="Positions per page (paged cache); overrides PagedCacheConfig.page_size (16).")
  p.add_argument("--num_pages", type=int, default=None,
                 help="Pages in the pool (paged cache); overrides PagedCacheConfig.num_pages (None: what "
                 "each batch needs).")
  p.add_argument("--paged_impl", default=None, choices=("auto", "xla", "pallas"),
                 help="Paged decode attention (default: the run's ModelConfig.paged_attention_impl).")
  p.add_argument("--num_beams", type=int, default=None)
  p.add_argument("--length_penalty", type=float, default=None, help="GNMT alpha for beam search (0.6).")
  p.add_argument("--draft_workdir", help="Draft model run for --method=speculative.")
  p.add_argument("--num_draft_tokens", type=int, default=4)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.batch_size < 1:
    raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
  args.paged = paged_config(args)
  return args


def paged_config(args: argparse.Namespace) -> PagedCacheConfig:
  """PagedCacheConfig from --gin_file / --gin_bindings, then --page_size / --num_pages (ValueError if bad)."""
  paged = PagedCacheConfig()
  other = [b for b in args.gin_bindings if not re.match(r"\s*([\w.]+\.)?PagedCacheConfig\.", b)]
  if other:
    raise UsageError(f"--gin_bindings sets only PagedCacheConfig here, not {other[0]!r}")
  if args.gin_file or args.gin_bindings:
    from launch import config  # imported lazily: it loads the training and data modules for gin
    config.parse(args.gin_file, args.gin_bindings)
    paged = config.build(PagedCacheConfig)
  overrides = {k: getattr(args, k) for k in ("page_size", "num_pages") if getattr(args, k) is not None}
  try:
    return dataclasses.replace(paged, **overrides)
  except ValueError as e:
    raise UsageError(f"{e} (--page_size / --num_pages)") from e


def decode_texts(cfg: Any, params: Any, tokenizer: Any, texts: list[str], args: argparse.Namespace,
                 draft: Any = None) -> list[str]:
  """Generates for every text, batch by batch (t_jax.generate with the tokenizer: BOS/EOS as in training)."""
  opts = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
              length_penalty=args.length_penalty, repetition_penalty=args.repetition_penalty,
              no_repeat_ngram_size=args.no_repeat_ngram_size, pad_multiple=8)
  if args.prompt_cache:
    opts["prompt_cache"] = args.prompt_cache
  if args.prompt_cache or args.cache == "paged":
    opts.update(cache="paged", paged_impl=args.paged_impl, **dataclasses.asdict(args.paged))
  if draft is not None:
    opts.update(draft=draft, num_draft_tokens=args.num_draft_tokens)
  outs = []
  for start in range(0, len(texts), args.batch_size):
    outs += generate(cfg, params, texts[start:start + args.batch_size], args.max_new_tokens, args.method,
                     seed=args.seed + start, tokenizer=tokenizer, **opts)
  return [" ".join(o.splitlines()) for o in outs]  # one line per input, whatever the tokenizer emits


def read_lines(path: str) -> list[str]:
  """Lines of a text file (plain, or gzip when the name ends in .gz) without their line ends."""
  with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
    return [line.rstrip("\r\n") for line in f]


def metric_lines(outputs: list[str], refs: list[str]) -> list[str]:
  """sacreBLEU's BLEU and chrF lines, each with its signature (nrefs:1|case:mixed|...)."""
  from sacrebleu.metrics import BLEU, CHRF
  return [m.corpus_score(outputs, [refs]).format(signature=str(m.get_signature())) for m in (BLEU(), CHRF())]


def run(args: argparse.Namespace) -> list[str]:
  """Reads the inputs, decodes, writes the outputs; returns the lines for stdout."""
  texts = list(args.prompt) + (read_lines(args.input_file) if args.input_file else [])
  if not texts:
    raise UsageError("give --prompt and/or --input_file")
  refs = read_lines(args.reference_file) if args.reference_file else None
  if refs is not None and len(refs) != len(texts):
    raise ValueError(f"{len(refs)} references in {args.reference_file} for {len(texts)} inputs")
  if args.output_file and not os.path.isdir(os.path.dirname(os.path.abspath(args.output_file))):
    raise ValueError(f"no directory for --output_file={args.output_file}")
  cfg, params, tokenizer = load_run(args.workdir)
  if tokenizer is None:
    raise ValueError(f"{args.workdir} has no tokenizer (tokenizer.model or TaskConfig.tokenizer)")
  draft = load_run(args.draft_workdir)[:2] if args.draft_workdir else None  # (cfg, params)
  outputs = decode_texts(cfg, params, tokenizer, texts, args, draft)
  lines = [] if args.output_file else list(outputs)
  if args.output_file:
    with open(args.output_file, "w", encoding="utf-8") as f:
      f.writelines(o + "\n" for o in outputs)
  return lines + (metric_lines(outputs, refs) if refs is not None else [])


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point; returns the exit status (2 with one `error:` line on stderr for bad flags, gin, files or
  requests)."""
  try:
    lines = run(parse_args(argv))
  except (ValueError, OSError, PoolExhausted) as e:  # PoolExhausted: --num_pages too small
    print(f"error: {error_line(e)}", file=sys.stderr)
    return 2
  for line in lines:
    print(line)
  return 0


if __name__ == "__main__":
  status = main()
  if status:  # skip interpreter teardown, where reads still in flight after a failed load print tracebacks
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(status)
