"""The benchmark scripts still run (--smoke, on CPU) and write JSON that names device, versions and config.

They measure nothing meaningful on CPU; these tests only keep them working for the next GPU run.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def run_script(name, tmp_path, *flags, env=None):
  out = tmp_path / f"{name}.json"
  cmd = [sys.executable, os.path.join(REPO, "benchmarks", f"{name}.py"), f"--out={out}", *flags]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                        env=dict(os.environ, **(env or {})))
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(out.read_text()), proc.stdout


def test_attention_benchmark_packed_with_kernel_options(tmp_path):
  data, stdout = run_script("attention", tmp_path, "--smoke", "--no-isolate", "--impls=pallas,xla,cudnn",
                            "--causal=true", "--docs=2", "--kernel-options=block_q=32,block_k=16")
  assert data["device"] and data["jax"] and data["config"]["docs"] == 2
  by_impl = {}
  for r in data["results"]:
    by_impl.setdefault(r["impl"], []).append(r)
  assert {r["status"] for r in by_impl["pallas"] + by_impl["xla"]} == {"ok"}
  assert all(r["kernel_options"] == {"block_q": 32, "block_k": 16} for r in by_impl["pallas"])
  assert all(r["status"] == "unsupported" for r in by_impl["cudnn"])  # CPU, and segment ids
  assert "block_q=32,block_k=16" in stdout


def test_best_blocks_picks_the_fastest_candidate():
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  try:
    import attention as bench
  finally:
    sys.path.pop(0)
  row = dict(impl="pallas", status="ok", head_dim=64, causal=True, seq=2048)
  results = [dict(row, kernel_options=dict(block_q=64, block_k=64), fwd_ms=2.0, fwd_bwd_ms=9.0),
             dict(row, kernel_options=dict(block_q=128, block_k=64), fwd_ms=1.5, fwd_bwd_ms=9.5),
             dict(row, kernel_options=dict(block_q_bwd=64, block_k_bwd=64), fwd_ms=1.0, fwd_bwd_ms=8.0),
             dict(row, kernel_options=dict(block_q_bwd=32, block_k_bwd=64), fwd_ms=1.0, fwd_bwd_ms=7.0),
             dict(row, kernel_options=dict(block_q=16, block_k=16), status="error")]
  best = bench.best_blocks(results)["D=64 causal=True seq=2048"]
  assert best["fwd"]["options"] == dict(block_q=128, block_k=64)
  assert best["bwd"]["options"] == dict(block_q_bwd=32, block_k_bwd=64)
  assert bench.parse_options("block_q=128, num_warps=4") == dict(block_q=128, num_warps=4)


def test_decode_benchmark_smoke(tmp_path):
  data, _ = run_script("decode", tmp_path, "--smoke")
  assert data["device"]["platform"] == "cpu" and data["versions"]["jax"] and data["config"]["d_model"]
  assert data["throughput"] and all(r["decode_tok_s"] > 0 and r["bound_tok_s"] > 0 for r in data["throughput"])
  rate = {s["setting"]: s["acceptance_rate"] for s in data["speculative"]}
  assert rate["agreeing"] >= 0.5 and rate["agreeing"] > rate["random"], rate  # the late layers barely matter
  assert set(data["goals"]) == {"batch1_at_least_70pct_of_bound", "speculative_at_least_2x_when_agreeing"}


def test_decode_benchmark_times_a_workdir_s_model(tmp_path):
  """--workdir: the trained run's own config and params (here: a params workdir), throughput rows only."""
  import jax

  from t_jax.models import ModelConfig, build_model, init_params
  from t_jax.workdir import write_params_workdir
  cfg = ModelConfig(vocab_size=96, d_model=32, num_heads=4, num_kv_heads=1, mlp_dim=64, num_layers=2, max_len=64)
  write_params_workdir(tmp_path / "run", cfg, init_params(build_model(cfg), jax.random.key(0)))
  data, stdout = run_script("decode", tmp_path, f"--workdir={tmp_path / 'run'}", "--batches=1,2",
                            "--prompt_len=8", "--new_tokens=8", "--repeats=1", "--bandwidth_mib=8")
  assert data["config"]["num_kv_heads"] == 1 and data["config"]["vocab_size"] == 96
  assert [r["batch"] for r in data["throughput"]] == [1, 2] and all(r["decode_tok_s"] > 0 for r in data["throughput"])
  assert data["speculative"] == [] and data["goals"] == {} and "speculative" not in stdout


@pytest.mark.parametrize("preset", ["fsdp"])
def test_scaling_benchmark_smoke(tmp_path, preset):
  data, _ = run_script("scaling", tmp_path, f"--presets={preset}", "--steps=2")
  (r,) = data["results"]
  assert data["device"]["count"] == 8 and data["versions"]["optax"]
  assert r["preset"] == preset and abs(r["state_fraction_per_device"] - 1 / 8) < 0.02, r


def test_train_step_benchmark_smoke(tmp_path):
  data, stdout = run_script("train_step", tmp_path, "--smoke", "--configs=tiny,t5_small")
  assert data["device"]["platform"] == "cpu" and data["versions"]["jax"] and data["threads"]["cpu_count"]
  configs = {e["config"]: e for e in data["configs"]}
  assert set(configs) == {"tiny", "t5_small"}
  for e in configs.values():
    r = e["results"]["t_jax"]
    assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["peak_bytes"] > 0, r
    assert e["model_flops_per_step"] > 0 and r["matmul_flops_per_s"] > 0 and r["hlo_flops"] > 0
  assert configs["t5_small"]["torch_note"] == "not GPT-2-style"
  tiny = configs["tiny"]
  if tiny["torch_note"] is None:  # torch + transformers installed: the same GPT-2 in PyTorch, and the ratio
    assert tiny["results"]["pytorch"]["status"] == "ok" and tiny["results"]["t_jax"]["speedup_vs_torch"] > 0
    assert tiny["results"]["pytorch"]["params"] == tiny["results"]["t_jax"]["params"]
  else:
    assert tiny["torch_note"].startswith("skipped") and "pytorch" not in tiny["results"]
  assert set(data["goals"]) == {"cpu_quickstart_at_least_1.3x_torch", "cpu_quickstart_d256_at_least_1.3x_torch",
                                "quickstart_mfu_at_least_45%"}
  assert "goal quickstart_mfu_at_least_45%: not measured" in stdout


def test_matmuls_benchmark_covers_the_step(tmp_path):
  """The listed matmuls are one decoder step's: their FLOPs add up to 6 N + 12 L T d per token."""
  data, stdout = run_script("matmuls", tmp_path, "--smoke")
  s = data["settings"]
  n, d, f, v, L, t = s["batch"] * s["seq"], s["d"], s["mlp"], s["vocab"], s["layers"], s["seq"]
  matmul_params = L * (4 * d * d + 2 * d * f) + v * d  # q, k, v, out, MLP in/out, tied un-embedding
  assert sum(m["flops"] * m["count"] for m in data["matmuls"]) == n * (6 * matmul_params + 12 * L * t * d)
  assert len(data["matmuls"]) == 18 and all(m["gflops_per_s"]["xla"] > 0 for m in data["matmuls"])
  assert data["step_matmul_seconds"]["xla"] > 0 and "matmul time of one step" in stdout


def run_gpu_script(tmp_path, *flags):
  out = tmp_path / "gpu_run"
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_run.py"), f"--out={out}", *flags],
                        capture_output=True, text=True, cwd=REPO, timeout=900)
  summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
  return proc, summary, out


def test_gpu_run_keeps_to_its_budget(tmp_path):
  """A stage past its time is stopped and recorded (its log kept), stages that no longer fit are skipped,
  and a mistyped stage name is one error line."""
  proc, summary, out = run_gpu_script(tmp_path, "--smoke", "--budget=25", "--caps=probe=1")
  assert proc.returncode == 0, proc.stderr[-2000:]
  status = {s["name"]: s["status"] for s in summary["stages"]}
  assert status["probe"] == "timed out" and (out / "probe.log").exists()
  assert set(status.values()) == {"timed out", "skipped (budget)"} and len(status) >= 6
  assert summary["elapsed_s"] < 25
  for flag, named in (("--only=probe,atention", "atention"), ("--caps=probe:5", "probe:5")):
    bad, _, _ = run_gpu_script(tmp_path, flag)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and named in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_gpu_run_smoke(tmp_path):
  """The whole device session at CPU sizes: every stage runs, writes its JSON, and the tar holds it all."""
  import tarfile

  tar = tmp_path / "gpu_run.tgz"
  proc, summary, out = run_gpu_script(tmp_path, "--smoke", "--budget=800", f"--tar={tar}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert all(s["status"] == "ok" for s in summary["stages"]), summary["stages"]
  probe = json.loads((out / "probe.json").read_text())
  assert probe["matmul"]["tflops"] > 0 and probe["copy"]["tb_per_s"] > 0 and probe["versions"]["jax"]
  for name in ("attention", "block_sweep", "decode", "train_step"):
    assert json.loads((out / f"{name}.json").read_text())["smoke"] is True
  assert json.loads((out / "block_sweep.json").read_text())["best_blocks"]
  with tarfile.open(tar) as t:
    assert "gpu_run/summary.json" in t.getnames() and "gpu_run/kernel_tests.xml" in t.getnames()
  assert "device cpu" in proc.stdout
