#!/usr/bin/env bash
# Scheduled-style check: does t_jax still pass with the NEWEST versions setup.py allows (not the lock)?
# Installs them into a fresh virtualenv and runs the live Hugging Face parity tests (t_jax against the
# installed transformers, not only the committed fixtures) and then the whole suite.
#   bash requirements/check_latest.sh [VENV_DIR]
# On a CPU machine install a CPU torch first to avoid the CUDA wheels, e.g.
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu bash requirements/check_latest.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-$(mktemp -d)/venv}
python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
if [ -n "${TORCH_INDEX:-}" ]; then $pip install -q --upgrade torch --index-url "$TORCH_INDEX"; fi
$pip install -q --upgrade -e ".[test,hf]"
$pip list 2>/dev/null | grep -iE "^(jax|jaxlib|flax|optax|orbax-checkpoint|grain|torch|transformers) "
T_JAX_HF_LIVE=1 "$venv/bin/python" -m pytest -q tests/test_convert.py
"$venv/bin/python" -m pytest -n 2 -q
