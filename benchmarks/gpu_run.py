"""The whole accelerator session in one call: probe the device, run the kernel tests compiled, time everything.

On the GPU machine (its python3 has jax, flax, optax, orbax, torch, transformers; t_jax's other imports
travel as wheels, fetched here by `bash benchmarks/gpu_wheels.sh` into the git-ignored .whl/):

  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
  PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu_run.py --out /tmp/gpu_run --tar $OUT/gpu_run.tgz

  python benchmarks/gpu_run.py --smoke --out /tmp/gpu_smoke   # the CPU dry run the test suite keeps working

Stages run in priority order, each in its own process (the parent never touches the device), with a
timeout of min(its cap, what is left of --budget): a stage past its time gets SIGINT (pytest still writes
its report), then SIGKILL; a stage that no longer fits is skipped. Every stage's log and JSON land in
--out, summary.json is rewritten after each stage and --tar re-packs the folder each time, so whatever
ends the run, what finished is kept. The table printed last says what ran.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
RESERVE_S = 10  # kept back for the summary and the tar

PROBE = """
import json, subprocess, sys
import flax, jax, optax
sys.path.insert(0, "benchmarks")
from attention import matmul_tflops  # bf16, normal inputs
from decode import measure_bandwidth
n, mib, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dev = jax.devices()[0]
try:
  smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem",
                        "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as e:
  smi = f"unavailable: {e}"
r = dict(platform=dev.platform, kind=dev.device_kind, count=jax.device_count(), nvidia_smi=smi,
         versions=dict(python=sys.version.split()[0], jax=jax.__version__, flax=flax.__version__,
                       optax=optax.__version__),
         matmul=dict(n=n, dtype="bfloat16", inputs="normal", tflops=matmul_tflops(n, 3, 10)),
         copy=dict(mib=mib, tb_per_s=measure_bandwidth(mib * 2**20, 10) / 1e12))
json.dump(r, open(out, "w"), indent=1)
print(json.dumps(r, indent=1))
"""


def stages(out: str, smoke: bool) -> list[tuple[str, int, list[str]]]:
  """(name, cap in seconds on the device, argv), most wanted first; --smoke: CPU sizes of the same calls."""
  j = lambda name: os.path.join(out, name + ".json")
  attn = [PY, "benchmarks/attention.py", "--no-isolate"]
  if smoke:
    return [
        ("probe", 60, [PY, "-c", PROBE, "256", "8", j("probe")]),
        ("kernel_tests", 120, [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_flash_attention.py",
                               "-k", "supports_and_errors", "--junitxml", os.path.join(out, "kernel_tests.xml")]),
        ("attention", 150, attn + ["--smoke", "--impls=pallas,xla", "--out", j("attention")]),
        ("block_sweep", 150, attn + ["--smoke", "--sweep-blocks", "--impls=pallas", "--causal=true",
                                     "--out", j("block_sweep")]),
        ("decode", 120, [PY, "benchmarks/decode.py", "--smoke", "--out", j("decode")]),
        ("train_step", 120, [PY, "benchmarks/train_step.py", "--smoke", "--configs=tiny", "--out", j("train_step")]),
    ]
  return [
      ("probe", 60, [PY, "-c", PROBE, "8192", "2048", j("probe")]),
      # Compiled kernels (interpret mode is only the CPU default) and the cuDNN path, against the XLA reference.
      ("kernel_tests", 180, [PY, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-m", "not slow",
                             "tests/test_flash_attention.py", "tests/test_attention.py",
                             "--junitxml", os.path.join(out, "kernel_tests.xml")]),
      # The main goal: Pallas vs cuDNN vs XLA, head dim 128, causal and not, forward and fwd+bwd.
      ("attention", 150, attn + ["--impls=pallas,cudnn,xla", "--seqs=1024,4096,16384", "--head-dims=128",
                                 "--out", j("attention")]),
      ("block_sweep", 75, attn + ["--sweep-blocks", "--impls=pallas", "--seqs=4096", "--head-dims=128",
                                  "--causal=true", "--out", j("block_sweep")]),
      ("decode", 60, [PY, "benchmarks/decode.py", "--batches=1,8,64", "--spec_batches=1", "--out", j("decode")]),
      ("train_step", 90, [PY, "benchmarks/train_step.py", "--configs=gpt2_small", "--rounds=3",
                          "--out", j("train_step")]),
      ("packed", 45, attn + ["--docs=4", "--impls=pallas,xla", "--seqs=4096", "--head-dims=128", "--causal=true",
                             "--out", j("packed")]),
      ("kinds", 45, attn + ["--kinds=softmax,softmax@pallas,bigbird,bigbird@pallas", "--seqs=4096,16384",
                            "--out", j("kinds")]),
      ("serving", 45, [PY, "benchmarks/serving.py", "--out", j("serving")]),
      ("paged_tests", 45, [PY, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "tests/test_paged.py",
                           "-k", "pallas", "--junitxml", os.path.join(out, "paged_tests.xml")]),
      ("attention_d64", 90, attn + ["--impls=pallas,cudnn,xla", "--seqs=1024,4096,16384", "--head-dims=64",
                                    "--out", j("attention_d64")]),
  ]


def run_stage(argv: list[str], timeout: float, log_path: str, env: dict) -> tuple[str, float]:
  """Runs one stage in its own process group: ('ok' | 'failed (rc N)' | 'timed out', seconds)."""
  start = time.monotonic()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
      rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGINT)  # KeyboardInterrupt: pytest still reports what ran
      try:
        proc.wait(timeout=min(10.0, RESERVE_S / 2))
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
      return "timed out", time.monotonic() - start
  return ("ok" if rc == 0 else f"failed (rc {rc})"), time.monotonic() - start


def save(out: str, summary: dict, tar: str | None) -> None:
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  if tar:
    tmp = tar + ".tmp"
    with tarfile.open(tmp, "w:gz") as t:
      t.add(out, arcname=os.path.basename(os.path.normpath(out)))
    os.replace(tmp, tar)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="folder for every log and JSON (created)")
  p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run, the summary included")
  p.add_argument("--tar", default=None, help="also keep a .tar.gz of --out, re-packed after every stage")
  p.add_argument("--only", default=None, help="comma-separated stage names (default: all, in order)")
  p.add_argument("--caps", default="", help="override stage caps, e.g. attention=200,decode=30")
  p.add_argument("--smoke", action="store_true", help="CPU sizes of the same calls (the test suite runs this)")
  args = p.parse_args()
  start = time.monotonic()
  os.makedirs(args.out, exist_ok=True)
  plan = stages(os.path.abspath(args.out), args.smoke)
  names = [n for n, _, _ in plan]
  only = names if args.only is None else args.only.split(",")
  try:
    caps = {k: float(v) for k, v in (kv.split("=") for kv in args.caps.split(",") if kv)}
  except ValueError:
    print(f"error: --caps must look like name=seconds,name=seconds, got {args.caps!r}", file=sys.stderr)
    return 2
  unknown = sorted((set(only) | set(caps)) - set(names))
  if unknown:
    print(f"error: unknown stage(s) {unknown}; stages: {names}", file=sys.stderr)
    return 2
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
  if not args.smoke:
    env["JAX_PLATFORMS"] = "cuda,cpu"  # tests/conftest.py defaults the suite to the CPU; a GPU must be found
  summary = dict(smoke=args.smoke, budget_s=args.budget, started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 stages=[])
  for name, cap, argv in plan:
    if name not in only:
      continue
    cap = caps.get(name, float(cap))
    left = args.budget - (time.monotonic() - start) - RESERVE_S
    timeout = min(cap, left)
    row = dict(name=name, cap_s=cap, argv=[a if a != PROBE else "<PROBE>" for a in argv], log=f"{name}.log")
    if timeout < min(15.0, cap):
      row.update(status="skipped (budget)", seconds=0.0)
    else:
      status, seconds = run_stage(argv, timeout, os.path.join(args.out, f"{name}.log"), env)
      row.update(status=status, seconds=round(seconds, 1))
    summary["stages"].append(row)
    summary["elapsed_s"] = round(time.monotonic() - start, 1)
    save(args.out, summary, args.tar)
    print(f"{name:14s} {row['status']:18s} {row['seconds']:7.1f} s", flush=True)
  probe = os.path.join(args.out, "probe.json")
  if os.path.exists(probe):
    with open(probe) as f:
      d = json.load(f)
    print(f"device {d['kind']} ({d['platform']}); matmul {d['matmul']['tflops']:.1f} TFLOP/s "
          f"({d['matmul']['dtype']} {d['matmul']['n']}^3); copy {d['copy']['tb_per_s']:.2f} TB/s; "
          f"jax {d['versions']['jax']}")
  print(f"elapsed {time.monotonic() - start:.0f} s of {args.budget:.0f}; logs and JSON in {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
