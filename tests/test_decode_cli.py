"""launch.decode: one output line per input, --output_file, sacreBLEU BLEU + chrF with signatures, one-line errors."""

import os
import subprocess
import sys

import pytest
import sacrebleu

from launch import decode
from t_jax.inference import generate
from tests.test_inference import ROOT, CharTokenizer, params_for, tiny


def test_outputs_one_line_per_input_and_scores(tmp_path, monkeypatch, capsys):
  """Run loader replaced: batches, beam search; one prompt or several print the same format."""
  cfg = tiny(architecture="encoder_decoder")
  params = params_for(cfg)
  tok = CharTokenizer()
  monkeypatch.setattr(decode, "load_run", lambda workdir: (cfg, params, tok))
  (tmp_path / "src.txt").write_text("abc\nhello there\nxyz\n")
  (tmp_path / "ref.txt").write_text("abc\nhello\nxy\n")
  common = ["--workdir", str(tmp_path), "--method", "beam", "--num_beams", "2", "--max_new_tokens", "5"]
  rc = decode.main(common + ["--input_file", str(tmp_path / "src.txt"), "--batch_size", "2",
                             "--reference_file", str(tmp_path / "ref.txt"), "--output_file", str(tmp_path / "o.txt")])
  summary = capsys.readouterr().out.splitlines()
  outs = (tmp_path / "o.txt").read_text().splitlines()
  assert rc == 0 and len(outs) == 3 and len(summary) == 2
  texts, refs = ["abc", "hello there", "xyz"], ["abc", "hello", "xy"]
  kw = dict(num_beams=2, tokenizer=tok, pad_multiple=8)
  assert outs == generate(cfg, params, texts[:2], 5, "beam", **kw) + generate(cfg, params, texts[2:], 5, "beam", **kw)
  bleu = sacrebleu.corpus_bleu(outs, [refs])
  assert summary[0].startswith("BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
  assert f" = {bleu.score:.2f} " in summary[0]
  assert summary[1].startswith("chrF2|nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
  assert summary[1].endswith(f" = {sacrebleu.corpus_chrf(outs, [refs]).score:.2f}")
  # Without --output_file the outputs, and only they, go to stdout: one line per input, in order.
  assert decode.main(common + ["--prompt", "xyz", "--input_file", str(tmp_path / "src.txt")]) == 0
  assert capsys.readouterr().out.splitlines() == [outs[2], *outs]
  assert decode.main(common + ["--prompt", "abc"]) == 0
  assert capsys.readouterr().out.splitlines() == [outs[0]]
  assert decode.main(common + ["--prompt", "abc", "--cache", "paged", "--page_size", "3"]) == 0  # same beams
  assert capsys.readouterr().out.splitlines() == [outs[0]]


def test_gin_bindings_set_the_page_pool(tmp_path, monkeypatch, capsys):
  """PagedCacheConfig bindings (--gin_bindings, --gin_file) reach generate(); --page_size overrides them."""
  cfg = tiny()
  params = params_for(cfg)
  monkeypatch.setattr(decode, "load_run", lambda workdir: (cfg, params, CharTokenizer()))
  calls = []
  monkeypatch.setattr(decode, "generate", lambda *a, **kw: calls.append(kw) or generate(*a, **kw))
  common = ["--workdir", str(tmp_path), "--prompt", "abc", "--max_new_tokens", "4"]
  assert decode.main(common) == 0
  want = capsys.readouterr().out
  (tmp_path / "pool.gin").write_text("PagedCacheConfig.page_size = 3\n")
  for extra, page_size, num_pages in [
      (["--gin_bindings", "PagedCacheConfig.page_size=3", "--gin_bindings", "PagedCacheConfig.num_pages=9"], 3, 9),
      (["--gin_file", str(tmp_path / "pool.gin")], 3, None),
      (["--gin_file", str(tmp_path / "pool.gin"), "--page_size", "5"], 5, None)]:
    assert decode.main(common + ["--cache", "paged", *extra]) == 0
    assert (calls[-1]["cache"], calls[-1]["page_size"], calls[-1]["num_pages"]) == ("paged", page_size, num_pages)
    assert capsys.readouterr().out == want  # the same greedy tokens on any page size
  # The pool the bindings size is the one used: 1 page of 3 positions cannot hold the request.
  assert decode.main(common + ["--cache", "paged", "--gin_file", str(tmp_path / "pool.gin"),
                               "--gin_bindings", "PagedCacheConfig.num_pages=1"]) == 2
  assert "KV page pool exhausted" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--workdir", "x"], "give --prompt and/or --input_file"),
    (["--workdir", "x", "--prompt", "ab", "--method", "beam", "--top_k", "3"], "deterministic"),
    (["--workdir", "x", "--prompt", "ab", "--repetition_penalty", "0"], "repetition_penalty"),
    (["--workdir", "x", "--prompt", "ab", "--batch_size", "0"], "--batch_size"),
    (["--workdir", "x", "--prompt", "ab", "--max_new_tokens", "two"], "invalid int value"),
    (["--prompt", "ab"], "required: --workdir"),
    (["--workdir", "x", "--prompt", "ab", "--reference_file", "/nonexistent/ref.txt"], "No such file"),
    (["--workdir", "x", "--prompt", "ab", "--output_file", "/nonexistent/out.txt"], "no directory"),
    (["--workdir", "x", "--prompt", "ab", "--max_new_tokens", "4", "--prompt_cache", "/nonexistent/cache"],
     "no prompt cache directory"),
    (["--workdir", "x", "--prompt", "ab", "--gin_bindings", "PagedCacheConfig.page_size=0"],
     "PagedCacheConfig.page_size must be an int >= 1"),
    (["--workdir", "x", "--prompt", "ab", "--gin_bindings", "PagedCacheConfig.page_size='big'"],
     "PagedCacheConfig.page_size='big' must be int"),
    (["--workdir", "x", "--prompt", "ab", "--gin_bindings", "PagedCacheConfig.pages=3"], "bad gin config"),
    (["--workdir", "x", "--prompt", "ab", "--gin_bindings", "ModelConfig.dtype='bfloat16'"],
     "sets only PagedCacheConfig"),
    (["--workdir", "x", "--prompt", "ab", "--gin_file", "nonexistent.gin"], "gin file not found"),
    (["--workdir", "x", "--prompt", "ab", "--num_pages", "0"], "--num_pages"),
], ids=["no_input", "beam_top_k", "penalty", "batch", "int", "workdir", "reference", "output", "prompt_cache",
        "gin_value", "gin_type", "gin_field", "gin_class", "gin_file", "num_pages"])
def test_bad_command_lines(argv, match, monkeypatch, capsys):
  cfg = tiny()
  monkeypatch.setattr(decode, "load_run", lambda workdir: (cfg, params_for(cfg), CharTokenizer()))
  assert decode.main(argv) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A convert-style workdir (config.gin + params/) with a SentencePiece tokenizer and a random decoder."""
  from t_jax.data import Tokenizer
  from t_jax.workdir import write_params_workdir
  path = tmp_path_factory.mktemp("run")
  texts = [{"text": f"the quick brown fox {i} jumps over the lazy dog {i * 7}"} for i in range(100)]
  tok = Tokenizer.train(texts, str(path / "tokenizer.model"), vocab_size=60, num_threads=1)
  cfg = tiny(vocab_size=tok.vocab_size)
  params = params_for(cfg)
  write_params_workdir(path, cfg, params)
  return path, cfg, params, tok


def run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "launch.decode", *args], env=env, capture_output=True, text=True,
                        timeout=600, cwd=ROOT)


def test_cli_process_on_a_real_workdir(workdir, tmp_path):
  """python -m launch.decode through t_jax.load: outputs to --output_file, stdout only BLEU and chrF."""
  path, cfg, params, tok = workdir
  (tmp_path / "in.txt").write_text("the lazy dog\nover the\n")
  (tmp_path / "ref.txt").write_text("jumps over\nthe quick brown\nthe dog\n")
  res = run_cli("--workdir", str(path), "--prompt", "the quick brown", "--input_file", str(tmp_path / "in.txt"),
                "--output_file", str(tmp_path / "out.txt"), "--reference_file", str(tmp_path / "ref.txt"),
                "--max_new_tokens", "6", "--method", "sample", "--temperature", "0.8", "--top_p", "0.9",
                "--repetition_penalty", "1.3", "--no_repeat_ngram_size", "2")
  assert res.returncode == 0, res.stderr[-3000:]
  outs = (tmp_path / "out.txt").read_text().splitlines()
  want = generate(cfg, params, ["the quick brown", "the lazy dog", "over the"], 6, "sample", temperature=0.8,
                  top_p=0.9, repetition_penalty=1.3, no_repeat_ngram_size=2, tokenizer=tok, pad_multiple=8)
  assert outs == want
  lines = res.stdout.splitlines()
  assert len(lines) == 2 and lines[0].startswith("BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
  assert lines[1].startswith("chrF2|nrefs:1|")


@pytest.mark.parametrize("args", [["--prompt", "a", "--no_such_flag"], ["--prompt", "a", "--input_file", "missing.txt"],
                                  ["--prompt", "a", "--no_repeat_ngram_size", "-2"]],
                         ids=["flag", "file", "value"])
def test_cli_process_errors_are_one_line(workdir, args):
  res = run_cli("--workdir", str(workdir[0]), *args)
  assert res.returncode == 2 and res.stdout == ""
  assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("error: "), res.stderr[-3000:]


def test_cli_process_prompt_cache(workdir, tmp_path):
  """--prompt_cache (an Orbax directory) continues like recomputing; a damaged one is one `error:` line."""
  from t_jax.inference import save_prompt_cache
  path, cfg, params, tok = workdir
  cache = tmp_path / "cache"
  save_prompt_cache(cfg, params, [tok.bos_id, *tok.encode("the quick")], str(cache), tokenizer=tok)
  args = ("--workdir", str(path), "--prompt", "the quick brown", "--max_new_tokens", "4", "--prompt_cache", str(cache))
  res = run_cli(*args, "--page_size", "4")
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.splitlines() == generate(cfg, params, ["the quick brown"], 4, tokenizer=tok, pad_multiple=8)
  for f in (cache / "kv").rglob("*"):  # the arrays' data lost, the metadata kept
    if f.is_file() and f.parent.name == "d":
      f.unlink()
  res = run_cli(*args)
  assert res.returncode == 2 and res.stdout == ""
  assert len(res.stderr.splitlines()) == 1 and "damaged or not a save_prompt_cache directory" in res.stderr, \
      res.stderr[-3000:]


def test_input_and_reference_files_may_be_gzip(tmp_path):
  """Multi30k ships its test split as .gz: read_lines reads it like the plain file, keeping blank lines."""
  import gzip
  text = "Ein Mann.\n\nZwei Hunde spielen im Schnee.\r\n"
  (tmp_path / "a.txt").write_text(text, encoding="utf-8")
  with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
    f.write(text)
  assert decode.read_lines(str(tmp_path / "a.txt.gz")) == decode.read_lines(str(tmp_path / "a.txt"))
  assert decode.read_lines(str(tmp_path / "a.txt.gz")) == ["Ein Mann.", "", "Zwei Hunde spielen im Schnee."]
