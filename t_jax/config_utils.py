"""Gin plumbing: search paths, parsing with clear errors, the operative config."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import gin

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
  """A gin file or binding is wrong; the message names it."""


def parse_gin(files: Sequence[str] = (), bindings: Sequence[str] = (), *, clear: bool = True) -> None:
  """Parses gin files and bindings; unknown or mistyped bindings and missing files raise ConfigError."""
  if clear:
    gin.clear_config()
  for path in (os.getcwd(), str(CONFIG_DIR)):
    if path not in gin.config._LOCATION_PREFIXES:  # noqa: SLF001 - gin has no public getter
      gin.add_config_file_search_path(path)
  for f in files:
    if not _findable(f):
      raise ConfigError(f"gin file not found: {f!r} (searched the current directory and {CONFIG_DIR})")
  quiet = logging.getLogger()  # gin logs every search-path probe of an include as an error
  level = quiet.level
  quiet.setLevel(logging.CRITICAL)
  try:
    gin.parse_config_files_and_bindings(list(files), list(bindings), skip_unknown=False)
  except (ValueError, KeyError, SyntaxError, TypeError, OSError) as e:
    raise ConfigError(f"bad gin config: {e}") from e
  finally:
    quiet.setLevel(level)


def _findable(f: str) -> bool:
  return any(Path(base, f).exists() for base in ("", os.getcwd(), CONFIG_DIR))
