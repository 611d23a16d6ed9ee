#!/usr/bin/env bash
# Wheels of t_jax's imports that the GPU machine's image lacks (its python3 is 3.12 and has jax, flax, optax,
# orbax, torch, transformers, sentencepiece, absl-py, etils), into the git-ignored .whl/ that
# `run(carry=[".whl"])` takes along. Versions from the committed lock. See benchmarks/gpu_run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -m1 -i "^$1==" requirements/lock-cpu.txt | cut -d' ' -f1; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "$(pin gin-config)" "$(pin grain)" "$(pin array-record)" \
  "$(pin portpicker)"
ls -l .whl
