"""Long Range Arena data (#15): ListOps generator, byte-level text source and tokenizer, configs, a tiny run."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import gin
import numpy as np
import pytest

from launch import config
from launch import sweep as sweep_lib
from t_jax.data import LanguageIdSource, ListOpsSource, Tokenizer
from t_jax.data.tokenizer import byte_model
from t_jax.models import ModelConfig

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(max_depth=4, max_args=5, min_length=10, max_length=60)
# The operators as LRA's generator computes them (median: int(np.median)), written apart from t_jax.
FUNCS = {"[MAX": max, "[MIN": min, "[MED": lambda a: int(np.median(a)), "[SM": lambda a: sum(a) % 10}


def _parse(text):
  """(value, operator nesting depth, argument counts) of a ListOps expression, by a stack evaluator."""
  stack, depth, counts = [[]], 0, []
  for sym in text.split():
    if sym in FUNCS:
      stack.append([sym])
      depth = max(depth, len(stack) - 1)
    elif sym == "]":
      op, *args = stack.pop()
      counts.append(len(args))
      stack[-1].append(FUNCS[op](args))
    else:
      assert sym in "0123456789" and len(sym) == 1, sym
      stack[-1].append(int(sym))
  (value,) = stack[0]
  return value, depth, counts


@pytest.fixture(autouse=True)
def _clean_gin():
  yield
  gin.clear_config()


def test_listops_labels_are_the_values_of_their_expressions():
  src = ListOpsSource("train", num_examples=300, **SMALL)
  labels = []
  for i in range(len(src)):
    value, _, _ = _parse(src[i]["text"])
    assert src[i]["label"] == str(value), src[i]
    labels.append(value)
  assert set(labels) == set(range(10))  # every class occurs


@pytest.mark.parametrize("bounds", [SMALL, dict(max_depth=2, max_args=10, min_length=5, max_length=30),
                                    dict(max_depth=10, max_args=10, min_length=500, max_length=2000)])  # LRA's
def test_listops_depth_arguments_and_length_stay_in_bounds(bounds):
  src = ListOpsSource("validation", num_examples=50 if bounds["max_length"] > 100 else 200, **bounds)
  depths = []
  for i in range(len(src)):
    text = src[i]["text"]
    _, depth, counts = _parse(text)
    assert bounds["min_length"] <= len(text.split()) <= bounds["max_length"], text
    assert 1 <= depth <= bounds["max_depth"] and min(counts) >= 2 and max(counts) <= bounds["max_args"], text
    depths.append(depth)
  assert max(depths) == bounds["max_depth"]  # the bound is reached, not just respected


def test_listops_is_deterministic_per_seed_and_the_splits_differ():
  texts = lambda split, seed=0, idx=range(20): [ListOpsSource(split, seed=seed, **SMALL)[i]["text"] for i in idx]
  assert texts("train") == texts("train")
  assert texts("train", idx=[5, 0, 3]) == [texts("train")[i] for i in (5, 0, 3)]  # random access, any order
  assert texts("train", seed=1) != texts("train")
  splits = [set(texts(s)) for s in ("train", "validation", "test")]
  assert all(len(a & b) < 3 for a in splits for b in splits if a is not b)  # short ones may coincide
  src = ListOpsSource("train", num_examples=7, **SMALL)
  assert len(src) == 7 and src.stats == {"documents": 7} and src[-1] == src[6]
  with pytest.raises(IndexError):
    src[7]


def test_listops_refuses_bad_or_unreachable_bounds():
  with pytest.raises(ValueError, match="split"):
    ListOpsSource("dev")
  with pytest.raises(ValueError, match="bad bounds"):
    ListOpsSource(min_length=50, max_length=40)
  with pytest.raises(ValueError, match="no expression within the length bounds"):
    ListOpsSource(max_depth=1, max_args=2, min_length=10, max_length=20)  # at most 4 symbols


def test_word_tokenizer_gives_one_token_per_listops_symbol(tmp_path):
  src = ListOpsSource("train", num_examples=400, **SMALL)
  tok = Tokenizer.train(src, str(tmp_path / "w.model"), vocab_size=32, model_type="word")
  assert tok.vocab_size <= 32
  for i in range(20):
    text = src[i]["text"]
    ids = tok.encode(text)
    assert len(ids) == len(text.split()) and tok.unk_id not in ids and tok.decode(ids) == text


def test_byte_tokenizer_is_one_id_per_utf8_byte(tmp_path):
  tok = Tokenizer.train(None, str(tmp_path / "b.model"), model_type="byte")
  assert tok.vocab_size == 260 and tok.mask_id == 3 and tok.first_regular_id == 4
  for text in ("Ein Hund läuft.", "  two  spaces\tand a tab", "\u2581 x", "日本"):
    ids = tok.encode(text)
    assert ids == [4 + b for b in text.encode()] and tok.decode(ids) == text
  assert Tokenizer.load(str(tmp_path / "b.model")).model_proto == byte_model()  # what the run saves and reloads


def test_language_id_source_labels_lines_by_their_file(tmp_path):
  en, de = tmp_path / "a.en", tmp_path / "a.de.gz"
  en.write_text("".join(f"a dog runs {i}\n" for i in range(9)) + "\n")
  with gzip.open(de, "wt") as f:
    f.write("".join(f"ein Hund läuft {i}\n" for i in range(7)))
  src = LanguageIdSource([str(en), str(de)], lines_per_example=2, seed=3)
  records = [src[i] for i in range(len(src))]
  assert len(records) == 4 + 3 and src.stats["empty"] == 1  # whole groups of 2 lines; the blank line counted
  assert sorted(r["label"] for r in records) == ["0"] * 4 + ["1"] * 3
  for r in records:
    assert r["text"].startswith("a dog" if r["label"] == "0" else "ein Hund")
    assert r["text"].count(" runs " if r["label"] == "0" else " läuft ") == 2  # two lines of one file
  assert records == [LanguageIdSource([str(en), str(de)], lines_per_example=2, seed=3)[i] for i in range(7)]
  assert [r["label"] for r in records] != sorted(r["label"] for r in records)  # shuffled: evals see both
  with pytest.raises(ValueError, match="two or more paths"):
    LanguageIdSource([str(en)])


@pytest.mark.parametrize("name", ["lra_listops", "lra_text"])
def test_every_sweep_variant_is_a_valid_model_at_both_sizes(name):
  """Every attention kind of the ablation builds a ModelConfig (no refused combination) at CPU and full size."""
  for size in ("", "full"):
    sweep = sweep_lib.load([f"ablations/{name}.gin"], size=size)
    variants = sweep_lib.expand(sweep)
    assert [v.knobs["ModelConfig.attention_kind"] for v in variants] == [
        "softmax", "performer", "rfa", "bigbird", "lsh", "aft"] and sweep.metric == "eval_accuracy"
    for v in variants:
      config.parse(sweep.base, [*sweep.bindings, *v.bindings])
      cfg = config.build(ModelConfig)
      seq_len = gin.query_parameter("Classification.seq_len")
      assert cfg.attention_kind == v.knobs["ModelConfig.attention_kind"] and cfg.max_len >= seq_len
      assert seq_len % cfg.attention_sparse_block == 0 and seq_len % cfg.attention_chunk == 0


@pytest.mark.slow
def test_tiny_listops_run_writes_eval_accuracy(tmp_path):
  """launch.train on experiments/lra_listops_cpu.gin shrunk to seconds: trains and evaluates the classifier."""
  bindings = ["TrainConfig.num_steps=4", "TrainConfig.batch_size=8", "TrainConfig.log_every=2",
              "TrainConfig.eval_every=4", "TrainConfig.checkpoint_every=4", "TrainConfig.progress_bar=False",
              "TaskConfig.tokenizer_sentences=200", "TaskConfig.data_threads=1", "TaskConfig.prefetch=2",
              "ListOpsSource.min_length=10", "ListOpsSource.max_length=60", "train/ListOpsSource.num_examples=200",
              "validation/ListOpsSource.num_examples=16", "Classification.seq_len=64"]
  p = subprocess.run([sys.executable, "-m", "launch.train", "--gin_file=experiments/lra_listops_cpu.gin",
                      f"--workdir={tmp_path}", *(f"--gin_bindings={b}" for b in bindings)],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if "eval_accuracy" in r]
  assert evals and evals[-1]["step"] == 4 and 0.0 <= evals[-1]["eval_accuracy"] <= 1.0
  assert "vocab 20;" in p.stdout + p.stderr  # one token per symbol: 15 symbols + pad, eos, unk, mask and '▁<mask>'


@pytest.mark.slow
def test_attention_benchmark_times_every_kind(tmp_path):
  """benchmarks/attention.py --kinds: one forward per attention kind, with its time and XLA temporary memory."""
  kinds = ["softmax", "performer", "rfa", "bigbird", "lsh", "aft", "softmax@pallas", "bigbird@pallas"]
  out = tmp_path / "kinds.json"
  p = subprocess.run([sys.executable, "benchmarks/attention.py", f"--kinds={','.join(kinds)}", "--smoke",
                      "--no-isolate", f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  results = json.loads(out.read_text())["results"]
  assert [(r["kind"], r["seq"]) for r in results] == [(k, s) for s in (64, 128) for k in kinds]
  assert all(r["status"] == "ok" and r["fwd_ms"] > 0 and r["temp_bytes"] > 0 for r in results), results


def test_lra_report_from_a_sweep(tmp_path):
  """benchmarks/lra_report.py: accuracy and median tokens/s from the sweep, the step's memory from its config."""
  sweep = tmp_path / "lra_listops"
  rows = []
  for kind, batch in (("softmax", 4), ("performer", 8)):
    vdir = sweep / f"attention_kind={kind}"
    vdir.mkdir(parents=True)
    config.parse([str(REPO / "configs/experiments/lra_listops_cpu.gin")],
                 [f"ModelConfig.attention_kind='{kind}'", f"TrainConfig.batch_size={batch}",
                  "ListOpsSource.max_length=60", "Classification.seq_len=64", "ModelConfig.max_len=64"])
    (vdir / "config.gin").write_text(config.operative())
    (vdir / "metrics.jsonl").write_text("".join(json.dumps(dict(step=s, tokens_per_sec=t)) + "\n"
                                                for s, t in ((50, 100.0), (100, 300.0), (150, 200.0))))
    rows.append(f"attention_kind={kind},ModelConfig.attention_kind='{kind}',1000,150,60.0,1.0,2.0,7.4,0.25,finished,")
  rows.append("attention_kind=lsh,ModelConfig.attention_kind='lsh',,,,,,,,failed,boom")
  (sweep / "results.csv").write_text("name,bindings,params,steps,wall_s,train_loss,eval_loss,eval_perplexity,"
                                     "eval_accuracy,status,error\n" + "\n".join(rows) + "\n")
  kinds = tmp_path / "kinds.json"
  kinds.write_text(json.dumps(dict(results=[dict(kind="softmax", seq=1024, fwd_ms=2.0, temp_bytes=2**21, status="ok"),
                                            dict(kind="softmax", seq=4096, status="too big")])))
  out = tmp_path / "report"
  p = subprocess.run([sys.executable, "benchmarks/lra_report.py", f"--sweeps={sweep}", f"--kinds_json={kinds}",
                      f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  rep = json.loads((out / "lra.json").read_text())
  by_kind = {r["kind"]: r for r in rep["tasks"]}
  assert set(by_kind) == {"softmax", "performer"}  # the failed variant is left out
  assert by_kind["softmax"]["accuracy"] == 0.25 and by_kind["softmax"]["train_tokens_per_s"] == 200.0
  # The compiled step's memory is the run's own: twice the batch, more memory.
  assert 0 < by_kind["softmax"]["train_step_peak_bytes"] < by_kind["performer"]["train_step_peak_bytes"]
  md = (out / "lra.md").read_text()
  assert "| lra_listops | softmax | 0.250 | 2.0000 | 200 |" in md and "2.0 / 2" in md and "too big" in md
  assert (out / "lra.png").stat().st_size > 0
  p = subprocess.run([sys.executable, "benchmarks/lra_report.py", f"--sweeps={tmp_path / 'none'}", f"--out={out}"],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert p.returncode == 2 and p.stderr.strip().startswith("error:") and "results.csv" in p.stderr
