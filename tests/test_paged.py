"""Paged KV cache, prompt caches on disk and continuous batching (t_jax.inference paged/prompt_cache/engine)."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t_jax.attention import Mask, xla_attention
from t_jax.inference import (
  Engine,
  PageAllocator,
  PoolExhausted,
  generate,
  load_prompt_cache,
  save_prompt_cache,
)
from t_jax.inference.paged import beam_reorder, plan_rows
from t_jax.models import ModelConfig, build_model, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [9, 10], [11, 12, 13, 14, 15]]  # ragged


def tiny(**kw) -> ModelConfig:
  base = dict(vocab_size=48, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, num_layers=2,
              max_len=64, tie_embeddings=False)
  return ModelConfig(**{**base, **kw})


@functools.cache
def params_for(cfg):
  return init_params(build_model(cfg), jax.random.key(0))


def draft_for(cfg):
  draft = cfg.replace(num_layers=1)
  return dict(draft=(draft, params_for(draft)))


SLOW = pytest.mark.slow  # > 10 s on the shared CPU: the suite's -m 'not slow' skips them


@pytest.mark.parametrize("extra,page_size,method,kw", [
    ({}, 4, "greedy", {}),  # 4 divides no row's 17 / 12 / 15 positions ...
    ({}, 3, "sample", dict(temperature=0.8, seed=3)),  # ... 3 divides two of them
    (dict(num_kv_heads=1, scan_layers=True), 5, "greedy", {}),  # MQA, layers under nn.scan
    (dict(window=4), 3, "greedy", {}),  # the window is a mask rule; the pages keep every position
    ({}, 3, "beam", dict(num_beams=3, eos_id=3)),  # beams share the prompt pages, reorder by page table
    pytest.param(dict(architecture="prefix_lm"), 4, "beam", dict(num_beams=2), marks=SLOW),
    ({}, 3, "speculative", dict(num_draft_tokens=3)),  # rows accept different counts
    pytest.param({}, 4, "speculative", dict(num_draft_tokens=2, temperature=0.7, seed=1), marks=SLOW),
    pytest.param(dict(architecture="encoder_decoder"), 3, "sample", dict(temperature=0.9, seed=2), marks=SLOW),
    pytest.param(dict(architecture="encoder_decoder", scan_layers=True), 4, "beam", dict(num_beams=3), marks=SLOW),
    # Decode steps in the Pallas kernel (interpret mode): beams, then MQA + window + scanned layers.
    pytest.param({}, 3, "beam", dict(num_beams=2, paged_impl="pallas"), marks=SLOW),
    pytest.param(dict(num_kv_heads=1, window=4, scan_layers=True), 3, "greedy", dict(paged_impl="pallas"),
                 marks=SLOW),
], ids=str)
def test_paged_decoding_equals_contiguous(extra, page_size, method, kw):
  cfg = tiny(**extra)
  kw = {**kw, **(draft_for(cfg) if method == "speculative" else {})}
  impl = {"paged_impl": kw.pop("paged_impl")} if "paged_impl" in kw else {}
  want, want_scores = generate(cfg, params_for(cfg), PROMPTS, 10, method, return_scores=True, **kw)
  got, scores = generate(cfg, params_for(cfg), PROMPTS, 10, method, cache="paged", page_size=page_size,
                         return_scores=True, **impl, **kw)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_beams_share_prompt_pages_and_reorder_by_table():
  rows = [[1] * 9, [2] * 2]  # pages of 4: row 0 fills 2 pages and part of a third, row 1 part of one
  p = plan_rows(rows, 6, 4, None, beams=2)
  # Row pages (written by prefill) once; each beam owns the pages from the one holding position len(row) on.
  assert p["table"].tolist() == [[0, 1, 2, -1], [7, -1, -1, -1]]
  assert p["own"].tolist() == [[-1, -1, 3, 4], [-1, -1, 5, 6], [8, 9, -1, -1], [10, 11, -1, -1]]
  assert p["num_pages"] == 12  # contiguous caches: 4 beams x 15 positions, 15 pages' worth
  pool = jnp.arange(12, dtype=jnp.float32)[:, None, None, None] * jnp.ones((12, 4, 1, 2))  # page i holds i
  state = dict(cache={"layer": {"k_pages": pool, "v_pages": -pool, "page_table": jnp.zeros((2, 4), jnp.int32)}},
               table=jnp.asarray(p["table"]), own=jnp.asarray(p["own"]))
  state = beam_reorder(state, jnp.asarray([0, 0, 1, 1]), jnp.asarray([9, 9, 2, 2]), 4)  # examples -> beams
  assert state["table"].tolist() == [[0, 1, 3, 4], [0, 1, 5, 6], [8, 9, -1, -1], [10, 11, -1, -1]]
  k = lambda: state["cache"]["layer"]["k_pages"][:, 0, 0, 0].astype(int).tolist()
  assert k() == [0, 1, 2, 2, 4, 2, 6, 7, 7, 9, 7, 11]  # the partly filled prompt page copied per beam
  # Beam 1 continues twice (positions 12: its full pages shared, its page 3 copied once), beams 2/3 swap.
  state = beam_reorder(state, jnp.asarray([1, 1, 3, 2]), jnp.asarray([12, 12, 4, 4]), 4)
  assert state["table"].tolist() == [[0, 1, 5, 4], [0, 1, 5, 6], [10, 9, -1, -1], [8, 11, -1, -1]]
  assert k() == [0, 1, 2, 2, 6, 2, 6, 7, 7, 11, 7, 9]  # copies read the pool before any write
  assert state["cache"]["layer"]["page_table"].tolist() == state["table"].tolist()
  assert (state["cache"]["layer"]["v_pages"] == -state["cache"]["layer"]["k_pages"]).all()


def random_pages(rng, lengths, page_size, kv_heads, head_dim, dtype, spare=3):
  """A shuffled pool holding rows of the given lengths, and their page tables (-1 past each row's pages)."""
  need = [-(-n // page_size) for n in lengths]
  num_pages = sum(need) + spare  # pages no row maps (never read)
  pool = lambda: jnp.asarray(rng.normal(size=(num_pages, page_size, kv_heads, head_dim)), dtype)
  table = np.full((len(lengths), max(need) + 1), -1, np.int32)  # one unmapped page more than the longest
  ids = rng.permutation(num_pages)
  for i, n in enumerate(need):
    table[i, :n], ids = ids[:n], ids[n:]
  return pool(), pool(), jnp.asarray(table)


def gather_path(q, k_pages, v_pages, table, lengths, *, scale, window):
  """The XLA path of t_jax.models.kv_cache on the kernel's arguments: each row's pages gathered into one
  view (slot j = position j, -1 where unmapped), then masked attention of the query at position len - 1."""
  b, (num_pages, size) = q.shape[0], k_pages.shape[:2]
  mapped = jnp.where(table >= 0, table, num_pages)
  view = lambda pool: jnp.take(pool, mapped, axis=0, mode="fill", fill_value=0).reshape((b, -1) + pool.shape[2:])
  kv_pos = jnp.where(jnp.repeat(table >= 0, size, axis=1), jnp.arange(table.shape[1] * size), -1)
  mask = Mask(causal=True, window=window, q_positions=(lengths - 1)[:, None], kv_positions=kv_pos)
  return xla_attention(q[:, None], view(k_pages), view(v_pages), mask=mask, scale=scale)[:, 0]


@pytest.mark.parametrize("lengths,page_size,heads,kv_heads,window,dtype", [
    ([13, 0, 16, 1, 8], 4, 4, 2, None, "float32"),  # GQA; lengths 16 and 8 fill their pages, 13 and 1 do not
    ([9, 14, 3], 3, 4, 1, 5, "float32"),  # MQA, a sliding window (pages before it skipped), 3 divides 9 only
    pytest.param([7, 12], 5, 2, 2, None, "bfloat16", marks=SLOW),  # MHA, bf16 pages
], ids=str)
def test_pallas_paged_kernel_equals_gather_path(lengths, page_size, heads, kv_heads, window, dtype):
  from t_jax.kernels.paged_attention import paged_attention

  rng = np.random.default_rng(len(lengths))
  k, v, table = random_pages(rng, lengths, page_size, kv_heads, 8, dtype)
  q = jnp.asarray(rng.normal(size=(len(lengths), heads, 8)), dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  got = paged_attention(q, k, v, table, lengths, window=window, scale=0.3)
  want = gather_path(q, k, v, table, lengths, window=window, scale=0.3)
  tol = 2e-2 if dtype == "bfloat16" else 1e-5
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
  assert not np.asarray(got[np.asarray(lengths) == 0], np.float32).any()  # an idle row attends to nothing


def _tpu_compile_matrix() -> dict[str, str]:
  """The paged kernel compiled by libtpu for a v5e chip (no TPU needed): {case: 'ok' or the error}."""
  from jax.sharding import SingleDeviceSharding

  from t_jax.kernels.paged_attention import paged_attention
  from t_jax.training import aot

  jax.config.update("jax_platforms", "cpu")
  place = SingleDeviceSharding(aot.topology_devices("v5e:2x2")[0])
  out = {}
  for batch, heads, kv_heads, head_dim, page_size, window, dtype in [
      (8, 32, 8, 128, 16, None, "bfloat16"), (8, 8, 2, 64, 32, 100, "bfloat16"), (4, 12, 4, 64, 8, None, "float32")]:
    s = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=place)
    pages = s((256, page_size, kv_heads, head_dim))
    fn = lambda *a, w=window: paged_attention(*a, window=w, interpret=False)
    name = f"{dtype}-h{heads}-kv{kv_heads}-d{head_dim}-page{page_size}-window{window}"
    try:
      hlo = jax.jit(fn).lower(s((batch, heads, head_dim)), pages, pages, s((batch, 32), "int32"),
                              s((batch,), "int32")).compile().as_text()
      out[name] = "ok" if 'custom_call_target="tpu_custom_call"' in hlo else "compiled without the kernel"
    except Exception as e:  # noqa: BLE001 - any compiler error is the finding
      out[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
  return out


@SLOW
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (no TPU compiler)")
def test_pallas_paged_kernel_compiles_for_tpu():
  res = subprocess.run([sys.executable, "-m", "tests.test_paged"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1"))
  assert res.returncode == 0, res.stderr[-3000:]
  results = json.loads(res.stdout.splitlines()[-1])
  assert results and all(r == "ok" for r in results.values()), results


def test_allocator_shares_frees_and_refuses_when_exhausted():
  alloc = PageAllocator(4)
  a = alloc.alloc(2)
  alloc.share(a[:1])  # a second sequence reads a[0]
  b = alloc.alloc(2)
  assert sorted(a + b) == [0, 1, 2, 3] and alloc.num_free == 0
  with pytest.raises(PoolExhausted, match="1 pages needed, 0 of 4 free"):
    alloc.alloc(1)
  alloc.free(a)  # a[0] is still read by the other sequence
  assert alloc.num_free == 1 and alloc.alloc(1) == [a[1]]
  alloc.free(a[:1])
  assert alloc.num_free == 1
  with pytest.raises(ValueError, match="freed twice"):
    alloc.free(a[:1])
  cfg = tiny()
  with pytest.raises(PoolExhausted, match="pool exhausted"):  # the rows need 5 + 3 + 4 pages of 4
    generate(cfg, params_for(cfg), PROMPTS, 10, cache="paged", page_size=4, num_pages=11)
  with pytest.raises(ValueError, match="unknown cache 'ring'"):
    generate(cfg, params_for(cfg), PROMPTS, 10, cache="ring")
  with pytest.raises(ValueError, match="paged_impl= applies to cache='paged'"):
    generate(cfg, params_for(cfg), PROMPTS, 10, paged_impl="pallas")
  with pytest.raises(ValueError, match="paged_attention_impl='triton' is not one of"):
    generate(cfg, params_for(cfg), PROMPTS, 10, cache="paged", paged_impl="triton")


def test_prompt_cache_continues_like_recomputing(tmp_path):
  cfg = tiny()
  params = params_for(cfg)
  path = str(tmp_path / "prompt")
  pc = save_prompt_cache(cfg, params, [5, 6, 7, 8, 9], path)
  assert pc.k.shape == (2, 5, 2, 8) and {"kv", "meta"} <= set(os.listdir(path))  # an Orbax composite checkpoint
  back = load_prompt_cache(path, cfg, params)
  assert back.tokens == pc.tokens and back.k.dtype == pc.k.dtype
  np.testing.assert_array_equal(back.k, pc.k)
  np.testing.assert_array_equal(back.v, pc.v)
  # The whole prompt, a longer one, and one that leaves it mid-page (page 2: positions 2-3 copied).
  rows = [[5, 6, 7, 8, 9], [5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 1, 2]]
  want = generate(cfg, params, rows, 8)
  got = generate(cfg, params, rows, 8, prompt_cache=path, page_size=2)
  np.testing.assert_array_equal(got, want)
  load_prompt_cache(path, cfg.replace(scan_layers=True, dtype="bfloat16"), params)  # run-time fields differ
  with pytest.raises(ValueError, match="rope_theta: cache 10000.0 vs model 500.0"):
    generate(cfg.replace(rope_theta=500.0), params, rows, 8, prompt_cache=path)
  with pytest.raises(ValueError, match="tokenizer: cache None vs model 'spm-b'"):
    load_prompt_cache(path, cfg, params, "spm-b")
  other = tiny(mlp_dim=32)
  with pytest.raises(ValueError, match="mlp_dim.*param_shapes"):
    load_prompt_cache(path, other, params_for(other))


def test_prompt_cache_directory_errors(tmp_path):
  """Missing, damaged or foreign directories: a ValueError naming the path; only caches are overwritten."""
  cfg = tiny()
  params = params_for(cfg)
  path = tmp_path / "prompt"
  with pytest.raises(ValueError, match="no prompt cache directory at .*prompt"):
    load_prompt_cache(str(path), cfg, params)
  save_prompt_cache(cfg, params, [5, 6, 7], str(path))
  save_prompt_cache(cfg, params, [5, 6, 7, 8], str(path))  # replaces the cache
  assert load_prompt_cache(str(path), cfg, params).tokens == (5, 6, 7, 8)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match="exists and is not a prompt cache"):
    save_prompt_cache(cfg, params, [5, 6, 7], str(tmp_path / "other"))
  with pytest.raises(ValueError, match="damaged or not a save_prompt_cache directory"):
    load_prompt_cache(str(tmp_path / "other"), cfg, params)
  for f in (path / "kv").rglob("*"):  # the arrays' data lost, the metadata kept
    if f.is_file() and f.parent.name == "d":
      f.unlink()
  with pytest.raises(ValueError, match="damaged or not a save_prompt_cache directory"):
    load_prompt_cache(str(path), cfg, params)


def test_engine_equals_each_request_alone_and_shares_prefix_pages(tmp_path):
  cfg = tiny()
  params = params_for(cfg)
  path = str(tmp_path / "system")
  save_prompt_cache(cfg, params, [5, 6, 7, 8, 9, 10], path)  # pages 0, 1 (of 4 positions)
  requests = [([5, 6, 7, 8, 9, 10, 11], 9), ([9, 10], 3), ([5, 6, 7, 8, 9, 1], 12), ([5, 6, 7, 8, 9, 10], 5),
              ([3], 1), ([11, 12, 13, 14, 15], 7)]
  # Greedy tokens do not depend on max_new_tokens: one compilation. EOS: a token request 2 emits later on.
  alone = [generate(cfg, params, [prompt], 12, pad_multiple=16)[0].tolist() for prompt, _ in requests]
  early = {t for row in alone[:3] for t in row[:2]}  # the first step runs with all three
  eos = next(t for t in alone[2][3:] if t not in early)
  engine = Engine(cfg, params, max_batch=3, page_size=4, num_pages=16, prompt_cache=path, decode_chunk=1,
                  eos_id=eos)
  ids = [engine.submit(p, n) for p, n in requests]
  engine.step()  # admits the first three, one decode step
  first, second, third = (engine.pages(i) for i in ids[:3])
  assert first[0] == third[0] == 0  # the full prefix page is shared ...
  assert first[1] != third[1] and 1 not in first + second + third  # ... the partial one copied per request
  assert engine.memory()["pages"] == 2 + 1 + 1 + 1  # pinned prefix, then each request's own pages
  engine.decode_chunk = 4  # up to 4 decode steps per program, cut where a request ends
  out = engine.run_until_done()
  assert engine.allocator.num_free == 16 - 2  # all but the pinned prefix returned
  assert engine.decode_calls < 12  # the longest request alone emits 12 tokens (1 from prefill)
  for i, (prompt, n), row in zip(ids, requests, alone):
    want = row[:n][:row.index(eos) + 1] if eos in row[:n] else row[:n]
    assert out[i].tolist() == want, (i, prompt)
  assert len(out[ids[2]]) < 12  # ended at EOS
  with pytest.raises(PoolExhausted, match="can never fit"):  # 15 pages of 4 > 14 unpinned
    engine.submit([1] * 40, 20)


def test_serving_benchmark_smoke(tmp_path):
  out = tmp_path / "serving.json"
  res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "serving.py"), "--smoke", f"--out={out}"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
  assert res.returncode == 0, res.stderr[-3000:]
  data = json.loads(out.read_text())
  assert {"static", "continuous", "continuous_prompt_cache"} <= set(data["modes"])
  assert all(m["tokens"] > 0 and m["tokens_per_s"] > 0 for m in data["modes"].values())
  assert "goals" in data and "met" in res.stdout


if __name__ == "__main__":
  print(json.dumps(_tpu_compile_matrix()))
