"""Shared test fixtures and helpers."""

import os
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
