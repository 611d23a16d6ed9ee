#!/usr/bin/env bash
# Refreshes requirements/lock-cpu.txt: exact versions + hashes of t_jax and its `test`, `speech` (librosa, jiwer:
# tests/test_speech.py) and `tpu-aot` (libtpu: the TPU compiler for tests/test_compile.py, no TPU needed) extras for
# CPU machines (resolved on Linux x86-64, Python 3.11; the hashes cover every wheel of each version). Needs `pip install uv`.
#   bash requirements/lock.sh            # then run the tests (.ci/run) and commit the lock
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile setup.py --extra test --extra speech --extra tpu-aot --generate-hashes --python-version 3.11 \
  --no-header --annotation-style line -o requirements/lock-cpu.txt
sed -i '1i # Locked CPU test environment (Python 3.11). Refresh: bash requirements/lock.sh. Install:\n#   pip install --require-hashes -r requirements/lock-cpu.txt && pip install --no-deps -e .' \
  requirements/lock-cpu.txt
