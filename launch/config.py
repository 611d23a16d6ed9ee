"""Gin at the edge: the one place that reads gin files and bindings and turns them into config objects.

Library code never reads gin; it takes the objects built here (`experiment()` -> t_jax.training.Experiment).
Gin names are the class names: ModelConfig, TrainConfig, OptimizerConfig, TaskConfig, MeshConfig,
PagedCacheConfig (launch.decode's page pool), and the data classes used by configs/tasks/*.gin
(PydocSource, TextFileSource, ParallelTextPrefix, CausalLM, ...).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin

from t_jax import data
from t_jax.data.task import TaskConfig
from t_jax.inference.paged import PagedCacheConfig
from t_jax.models import ModelConfig
from t_jax.sharding import MeshConfig
from t_jax.training import Experiment, OptimizerConfig, TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = (ModelConfig, TrainConfig, OptimizerConfig, TaskConfig, MeshConfig, PagedCacheConfig)
_DATA = (data.PydocSource, data.TextFileSource, data.ParallelTextSource, data.TfdsSource, data.CausalLM,
         data.PrefixLM, data.MaskedLM, data.SpanCorruption, data.Seq2Seq, data.Classification,
         data.AcceptabilitySource, data.TfdsClassificationSource, data.ImageClassification, data.DigitsSource,
         data.TfdsImageSource, data.SpeechToText, data.SpeechCorpusSource, data.TfdsSpeechSource,
         data.TextToText, data.TextToTextSource, data.BertPretraining, data.NextSentenceSource,
         data.ListOpsSource, data.LanguageIdSource)
_GIN = {cls: gin.external_configurable(cls, module="t_jax") for cls in CONFIGS}
for _cls in _DATA:
  gin.external_configurable(_cls, module="t_jax.data")
gin.external_configurable(data.ParallelTextSource.from_prefix, name="ParallelTextPrefix", module="t_jax.data")


class ConfigError(ValueError):
  """A gin file or binding is wrong; the message names it."""


def parse(files: Sequence[str] = (), bindings: Sequence[str] = ()) -> None:
  """Parses gin files (searched in . and configs/) and bindings; unknown or mistyped names raise ConfigError."""
  gin.clear_config()
  for path in (os.getcwd(), str(CONFIG_DIR)):
    if path not in gin.config._LOCATION_PREFIXES:  # noqa: SLF001 - gin has no public getter
      gin.add_config_file_search_path(path)
  for f in files:
    if not any(Path(base, f).exists() for base in ("", os.getcwd(), CONFIG_DIR)):
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


def build(cls: type) -> Any:
  """An instance of one config class with the parsed bindings; a binding of the wrong type is a ConfigError."""
  literals = {k: v for k, v in gin.get_bindings(cls).items() if type(v) in (int, float, str, bool)}
  _check_types(cls, literals)  # before __post_init__ compares 'abc' with a number
  try:
    obj = _GIN[cls]()
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e).split("\n")[0]) from e
  _check_types(cls, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
  return obj


def experiment() -> Experiment:
  """The whole run described by the parsed gin config."""
  try:
    return Experiment(model=build(ModelConfig), task=build(TaskConfig), train=build(TrainConfig),
                      optimizer=build(OptimizerConfig), mesh=build(MeshConfig))
  except ValueError as e:
    raise ConfigError(str(e)) from e


def operative() -> str:
  """The gin config as parsed (for WORKDIR/config.gin)."""
  return gin.config_str()


def _check_types(cls: type, values: dict[str, Any]) -> None:
  """Field values must have their field's type (int for float is fine): 'abc' for d_model is an error."""
  hints = typing.get_type_hints(cls)
  for name, value in values.items():
    hint = hints.get(name)
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    allowed = tuple(t for t in options if t in (int, float, str, bool))
    if not allowed or value is None or isinstance(value, allowed):
      continue
    if isinstance(value, int) and not isinstance(value, bool) and float in allowed:
      continue
    names = " or ".join(t.__name__ for t in allowed)
    raise ConfigError(f"{cls.__name__}.{name}={value!r} must be {names}, not {type(value).__name__}")
