"""Presets: published parameter counts, and the dry-run launcher's parameter table."""

import subprocess
import sys

import gin
import pytest

from launch.config import ConfigError, build, parse
from t_jax.models import ModelConfig, abstract_params, build_model, count_params
from tests.conftest import REPO

# (preset, published count, relative tolerance). Exact where the count is published exactly.
PUBLISHED = [
    ("gpt2_small", 124_439_808, 0.0),  # GPT-2 small with tied embeddings
    ("t5_small", 76_961_152, 0.0),  # T5 v1.1 small (google/t5-v1_1-small)
    ("t5_base", 247_577_856, 0.0),  # T5 v1.1 base
    ("llama", 1_100_048_384, 0.0),  # TinyLlama-1.1B shapes
    ("bert_base", 110e6, 0.01),  # "110M" (Devlin et al. 2019), here with the MLM head
    ("transformer_big", 213e6, 0.01),  # "213M" (Vaswani et al. 2017, Table 3)
    ("transformer_base", 65e6, 0.04),  # "65M"; the paper's vocabulary size is approximate (~37k)
]


def preset_count(name: str) -> int:
  parse([f"models/{name}.gin"])
  try:
    return count_params(abstract_params(build_model(build(ModelConfig))))
  finally:
    gin.clear_config()


@pytest.mark.parametrize("name,count,tol", PUBLISHED)
def test_published_parameter_counts(name, count, tol):
  got = preset_count(name)
  assert abs(got - count) <= tol * count, f"{name}: {got:,} vs published {count:,.0f}"


@pytest.mark.parametrize("name", ["transformer_base", "transformer_big", "bert_base", "gpt2_small", "t5_small",
                                  "t5_base", "llama"])
def test_tiny_variant_keeps_the_family(name):
  parse([f"models/{name}.gin"])
  big = build(ModelConfig)
  parse([f"models/{name}_tiny.gin"])
  small = build(ModelConfig)
  gin.clear_config()
  for field in ("architecture", "position", "activation", "gated", "norm", "pre_norm", "tie_embeddings"):
    assert getattr(big, field) == getattr(small, field), field
  assert count_params(abstract_params(build_model(small))) < 1e6


def test_dry_run_prints_table_ending_in_total():
  out = subprocess.run([sys.executable, "-m", "launch.train", "--gin_file=models/gpt2_small.gin", "--dry_run"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines[-1] == "total parameters: 124439808"
  assert any(line.startswith("decoder/layer_0/self_attention/query/kernel") for line in lines)


def test_bad_bindings_and_files_fail_with_their_name():
  with pytest.raises(ConfigError, match="d_modle"):
    parse(["models/gpt2_small.gin"], ["ModelConfig.d_modle = 3"])
  with pytest.raises(ConfigError, match="no_such.gin"):
    parse(["models/no_such.gin"])
  gin.clear_config()
  out = subprocess.run([sys.executable, "-m", "launch.train", "--gin_file=models/gpt2_small.gin",
                        "--gin_bindings=ModelConfig.num_heads=7", "--dry_run"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "num_heads=7" in out.stderr
