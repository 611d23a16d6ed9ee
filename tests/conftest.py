"""Shared test fixtures and helpers."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
  """../shared beside the checkout; tests that need it skip when it is absent."""
  if not SHARED.is_dir():
    pytest.skip(f"{SHARED} not present (shared data lives beside the checkout)")
  return SHARED


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite runs on the CPU. With libtpu installed (the tpu-aot extra, in CI) JAX would otherwise probe for a
# TPU in every process; tests/test_compile.py loads libtpu itself for compile-only TPU devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the session, shared by the xdist workers and every process they
# start (launch.train runs, multi-process workers): the same tiny train step is compiled once, not per
# process. The controller creates it before the workers start (they inherit the environment) and removes it.
_OWN_CACHE = "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="t_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The test models are tiny: compiling dominates, and LLVM's backend optimisation costs more than it saves
# (a third of a launch.train run's CPU time; XLA's numerics do not change, fast-math stays off).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def _slow_tier() -> list[str]:
  text = (Path(__file__).parent / "slow_tests.txt").read_text()
  return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def pytest_collection_modifyitems(config, items):
  """Marks the cases listed in tests/slow_tests.txt `slow`; a stale entry fails a whole-suite collection."""
  prefixes, used = _slow_tier(), set()
  for item in items:
    nodeid = item.nodeid.removeprefix("tests/")
    hits = [p for p in prefixes if nodeid.startswith(p)]
    if hits:
      item.add_marker(pytest.mark.slow)
      used.update(hits)
  stale = sorted(set(prefixes) - used)
  whole_suite = all(Path(a).resolve() == REPO / "tests" for a in config.args) and not config.option.keyword
  if whole_suite and stale:
    raise pytest.UsageError(f"tests/slow_tests.txt names no collected test: {stale}")
