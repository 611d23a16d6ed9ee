"""Paged KV cache, prompt caches on disk and continuous batching (t_jax.inference paged/prompt_cache/engine)."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from t_jax.inference import (
  Engine,
  PageAllocator,
  PoolExhausted,
  generate,
  load_prompt_cache,
  save_prompt_cache,
)
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


@pytest.mark.parametrize("extra,page_size,method", [
    ({}, 4, "greedy"),  # 4 divides no row's 17 / 12 / 15 positions ...
    ({}, 3, "sample"),  # ... 3 divides two of them
    (dict(num_kv_heads=1, scan_layers=True), 5, "greedy"),  # MQA, layers under nn.scan
    (dict(window=4), 3, "greedy"),  # the window is a mask rule; the pages keep every position
], ids=str)
def test_paged_decoding_equals_contiguous(extra, page_size, method):
  cfg = tiny(**extra)
  kw = dict(temperature=0.8, seed=3) if method == "sample" else {}
  want = generate(cfg, params_for(cfg), PROMPTS, 10, method, **kw)
  got = generate(cfg, params_for(cfg), PROMPTS, 10, method, cache="paged", page_size=page_size, **kw)
  np.testing.assert_array_equal(got, want)


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
  with pytest.raises(ValueError, match="method='greedy' or 'sample'"):
    generate(cfg, params_for(cfg), PROMPTS, 10, "beam", cache="paged")


def test_prompt_cache_continues_like_recomputing(tmp_path):
  cfg = tiny()
  params = params_for(cfg)
  path = str(tmp_path / "prompt.npz")
  pc = save_prompt_cache(cfg, params, [5, 6, 7, 8, 9], path)
  assert pc.k.shape == (2, 5, 2, 8)
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


def test_engine_equals_each_request_alone_and_shares_prefix_pages(tmp_path):
  cfg = tiny()
  params = params_for(cfg)
  path = str(tmp_path / "system.npz")
  save_prompt_cache(cfg, params, [5, 6, 7, 8, 9, 10], path)  # pages 0, 1 (of 4 positions)
  requests = [([5, 6, 7, 8, 9, 10, 11], 9), ([9, 10], 3), ([5, 6, 7, 8, 9, 1], 12), ([5, 6, 7, 8, 9, 10], 5),
              ([3], 1), ([11, 12, 13, 14, 15], 7)]
  engine = Engine(cfg, params, max_batch=3, page_size=4, num_pages=16, prompt_cache=path)
  ids = [engine.submit(p, n) for p, n in requests]
  engine.step()  # admits the first three
  first, second, third = (engine.pages(i) for i in ids[:3])
  assert first[0] == third[0] == 0  # the full prefix page is shared ...
  assert first[1] != third[1] and 1 not in first + second + third  # ... the partial one copied per request
  assert engine.memory()["pages"] == 2 + 1 + 1 + 1  # pinned prefix, then each request's own pages
  out = engine.run_until_done()
  assert engine.allocator.num_free == 16 - 2  # all but the pinned prefix returned
  for i, (prompt, n) in zip(ids, requests):  # greedy tokens do not depend on max_new_tokens: one compilation
    alone = generate(cfg, params, [prompt], 12, pad_multiple=16)[0]
    assert out[i].tolist() == alone[:n].tolist(), (i, prompt)
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
