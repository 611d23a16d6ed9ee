"""Vision: the patch stem against its definitions, image data (digits, TFDS, augmentation), a tiny ViT trained on the
8x8 digits, ViT-B/16's published parameter count, and HF ViTForImageClassification parity.

The HF checkpoints and float64 reference logits in tests/fixtures/hf/vit_* come from
tests/fixtures/make_hf_fixtures.py; with T_JAX_HF_LIVE=1 the parity test also runs the installed transformers.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from launch import config
from t_jax.convert import ConversionError, from_hf, to_hf
from t_jax.data import CausalLM, DigitsSource, ImageClassification, TaskConfig, make_dataset
from t_jax.models import ModelConfig, abstract_params, build_model, count_params, init_params
from t_jax.models.vision import PatchEmbedder, patchify, sincos_2d
from t_jax.training import Experiment, OptimizerConfig, TrainConfig, train
from tests.fixtures import make_hf_fixtures as hf_fixtures

REPO = Path(__file__).resolve().parent.parent
LIVE = os.environ.get("T_JAX_HF_LIVE") == "1"
TOL = 1e-4  # as tests/test_convert.py: float32 logits against float64 references, relative to the largest logit


@pytest.fixture(autouse=True)
def _clean_gin():
  yield
  gin.clear_config()


def vit(**changes) -> ModelConfig:
  """A tiny ViT for 8x8 grey digits."""
  base = dict(architecture="encoder", input_stem="patches", image_size=8, patch_size=2, num_channels=1, d_model=32,
              num_heads=4, mlp_dim=64, num_layers=2, position="learned", num_classes=10, norm_eps=1e-6)
  return ModelConfig(**{**base, **changes})


# ---------------------------------------------------------------- the patch stem


@pytest.mark.parametrize("size,patch,channels", [(8, 2, 1), (12, 4, 3), (6, 6, 2)])
def test_patch_embedding_is_reshape_and_matmul(size, patch, channels):
  cfg = vit(image_size=size, patch_size=patch, num_channels=channels, position="none", class_token=False,
            d_model=24, num_heads=4)
  images = np.random.default_rng(0).normal(size=(3, size, size, channels)).astype(np.float32)
  stem = PatchEmbedder(cfg)
  params = nn.meta.unbox(jax.jit(stem.init)(jax.random.key(1), images)["params"])
  params = jax.tree.map(lambda x: x + 0.1, params)  # a non-zero bias
  got = np.asarray(jax.jit(stem.apply)({"params": params}, images))
  kernel, bias = (np.asarray(params["patch_embedding"][k]) for k in ("kernel", "bias"))
  assert kernel.shape == (patch, patch, channels, 24)
  # The definition: every non-overlapping patch, row-major over the grid, flattened (row, column, channel)
  # and multiplied by the kernel seen as a [p * p * C, embed] matrix.
  g = size // patch
  want = np.stack([np.stack([images[b, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].reshape(-1)
                             @ kernel.reshape(-1, 24) + bias for i in range(g) for j in range(g)]) for b in range(3)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # ... and the equivalent strided convolution (kernel = stride = patch size).
  conv = jax.lax.conv_general_dilated(images, kernel, (patch, patch), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
  np.testing.assert_allclose(got, np.asarray(conv).reshape(3, g * g, 24), rtol=1e-5, atol=1e-5)
  assert patchify(jnp.asarray(images), patch).shape == (3, g * g, patch, patch, channels)


def test_class_token_and_positions():
  images = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype(np.float32)
  for position in ("learned", "sinusoidal"):
    cfg = vit(position=position)
    stem = PatchEmbedder(cfg)
    params = nn.meta.unbox(jax.jit(stem.init)(jax.random.key(0), images)["params"])
    x = np.asarray(jax.jit(stem.apply)({"params": params}, images))
    assert x.shape == (2, 17, 32)
    names = set(params)
    assert names == {"patch_embedding", "class_token"} | ({"position_embedding"} if position == "learned" else set())
    if position == "learned":
      assert params["position_embedding"].shape == (17, 32)
  table = np.asarray(sincos_2d(4, 32))  # 2-D: the first half follows the row, the second the column
  rows, cols = np.divmod(np.arange(16), 4)
  for i in range(16):
    for j in range(16):
      assert np.allclose(table[i, :16], table[j, :16]) == (rows[i] == rows[j])
      assert np.allclose(table[i, 16:], table[j, 16:]) == (cols[i] == cols[j])
  mean = build_model(vit(class_token=False, num_layers=1))  # mean pooling by default without a class token
  params = jax.jit(lambda k: init_params(mean, k))(jax.random.key(0))
  assert "class_token" not in params["embedder"]
  assert jax.eval_shape(mean.apply, {"params": params}, images).shape == (2, 10)


def test_bad_image_configs_name_the_field():
  with pytest.raises(ValueError, match="patch_size=3 does not divide image_size=8"):
    vit(patch_size=3)
  with pytest.raises(ValueError, match="num_classes"):
    vit(num_classes=None)
  with pytest.raises(ValueError, match="class token"):
    vit(class_token=False, pooling="first")
  with pytest.raises(ValueError, match="input_stem"):
    vit(input_stem="pixels")
  model = build_model(vit())
  with pytest.raises(ValueError, match=r"images \[batch, 8, 8, 1\]"):
    model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


# ---------------------------------------------------------------- data


def test_digits_split_is_fixed_stratified_and_disjoint():
  train_src, test_src = DigitsSource("train"), DigitsSource("test")
  assert (len(train_src), len(test_src)) == (1437, 360)
  first = train_src[0]
  assert first["image"].shape == (8, 8, 1) and first["image"].dtype == np.uint8 and first["image"].max() <= 255
  key = lambda s: {s[i]["image"].tobytes() + bytes([s[i]["label"]]) for i in range(len(s))}
  assert not key(train_src) & key(test_src)
  assert np.bincount([test_src[i]["label"] for i in range(360)]).min() >= 35  # stratified: ~36 per class
  assert key(DigitsSource("test")) == key(test_src)  # the same split every time
  assert key(DigitsSource("test", seed=1)) != key(test_src)
  with pytest.raises(ValueError, match="split='validation'"):
    DigitsSource("validation")


def test_image_rows_normalisation_and_augmentation():
  image = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 4
  example = {"image": image, "label": 3}
  plain = ImageClassification(image_size=8, num_channels=1, num_classes=10)
  row = plain.examples(example, np.random.default_rng(0), None)[0]
  np.testing.assert_allclose(row["image"], (image / 255.0 - 0.5) / 0.5, atol=1e-6)
  assert row["label"] == 3 and row["image"].dtype == np.float32
  shifted = ImageClassification(image_size=8, num_channels=1, num_classes=10, augment="crop", crop_padding=1)
  rows = [shifted.examples(example, np.random.default_rng(s), None)[0]["image"] for s in range(20)]
  assert any(not np.array_equal(r, row["image"]) for r in rows)
  assert all(r.shape == (8, 8, 1) for r in rows)
  assert shifted.for_stream(False).augment is None and shifted.for_stream(True) is shifted
  colour = ImageClassification(image_size=4, num_channels=3, num_classes=10, augment="inception_crop",
                               mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.2))
  out = colour.examples(example, np.random.default_rng(0), None)[0]["image"]  # grey -> 3 channels, resized
  assert out.shape == (4, 4, 3)
  evaluated = ImageClassification(image_size=4, num_channels=1, num_classes=10, eval_crop_fraction=0.5)
  centre = evaluated.examples(example, None, None)[0]["image"]  # 8 -> 8 (4 / 0.5), then the central 4x4
  np.testing.assert_allclose(centre, (image[2:6, 2:6] / 255.0 - 0.5) / 0.5, atol=1e-6)
  with pytest.raises(ValueError, match="augment='mixup'"):
    ImageClassification(augment="mixup").check(None)


def test_pipeline_batches_and_eval_stream_without_augmentation():
  objective = ImageClassification(image_size=8, num_channels=1, num_classes=10, augment="crop", crop_padding=1)
  source = DigitsSource("test")
  kw = dict(batch_size=64, num_threads=1, prefetch_buffer_size=2)
  evals = [next(iter(make_dataset(source, None, objective, train=False, seed=s, **kw))) for s in (0, 1)]
  assert {k: v.shape for k, v in evals[0].items()} == {"image": (64, 8, 8, 1), "label": (64,), "weights": (64,)}
  np.testing.assert_array_equal(evals[0]["image"], evals[1]["image"])  # never augmented
  plain = ImageClassification(image_size=8, num_channels=1, num_classes=10)
  plain = np.stack([plain.examples(source[i], None, None)[0]["image"] for i in range(64)])
  np.testing.assert_array_equal(evals[0]["image"], plain)
  batches = list(make_dataset(source, None, objective, train=False, **kw))
  assert len(batches) == 6 and batches[-1]["weights"].sum() == 360 - 5 * 64


def test_experiment_checks_the_image_model():
  task = TaskConfig(objective=ImageClassification(image_size=8, num_channels=1, num_classes=10),
                    train_source=DigitsSource("train"))
  Experiment(model=vit(), task=task)
  with pytest.raises(ValueError, match="input_stem='patches'"):
    Experiment(model=vit(input_stem="tokens", num_classes=10, vocab_size=64), task=task)
  with pytest.raises(ValueError, match="differ"):
    Experiment(model=vit(image_size=16), task=task)
  with pytest.raises(ValueError, match="needs the Classification objective"):
    Experiment(model=vit(architecture="decoder"), task=TaskConfig(objective=CausalLM(), train_source=[]))


@pytest.mark.parametrize("task,size,channels,augment", [("mnist", 28, 1, None), ("cifar10", 32, 3, "flip_crop"),
                                                         ("imagenet2012", 224, 3, "inception_crop")])
def test_tfds_image_configs_read_mock_records(task, size, channels, augment):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=4):
    config.parse([f"tasks/{task}.gin", "models/vit_tiny.gin"],
                 [f"ModelConfig.image_size = {size}", f"ModelConfig.num_channels = {channels}",
                  f"ModelConfig.patch_size = {size // 4 if task != 'imagenet2012' else 16}",
                  f"ModelConfig.num_classes = {1000 if task == 'imagenet2012' else 10}"])
    exp = config.experiment()
    objective = exp.task.objective
    assert objective.augment == augment and len(exp.task.train_source) == 4
    batch = next(iter(make_dataset(exp.task.train_source, None, objective, batch_size=2, num_threads=1,
                                   prefetch_buffer_size=1)))
  assert batch["image"].shape == (2, size, size, channels) and batch["image"].dtype == np.float32
  assert np.all(np.abs(batch["image"]) <= 1.0) and batch["label"].dtype == np.int32


# ---------------------------------------------------------------- training


@pytest.mark.slow
def test_tiny_vit_learns_the_digits(tmp_path):
  """A few seconds of training: the loss falls and accuracy/loss reach metrics.jsonl like every run."""
  exp = Experiment(
      model=vit(d_model=32, num_layers=1, position="sinusoidal"),
      task=TaskConfig(objective=ImageClassification(image_size=8, num_channels=1, num_classes=10),
                      train_source=DigitsSource("train"), eval_source=DigitsSource("test"), data_threads=1,
                      prefetch=4),
      train=TrainConfig(num_steps=60, batch_size=32, log_every=20, eval_every=0, eval_batches=None,
                        checkpoint_every=60, num_samples=0, progress_bar=False),
      optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"))
  out = train(str(tmp_path), exp)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
  assert {"accuracy", "loss"} <= set(rows[0]) and {"eval_accuracy", "eval_loss", "eval_f1"} <= set(rows[-1])
  assert out["eval_accuracy"] > 0.3  # chance is 0.1
  assert not (tmp_path / "tokenizer.model").exists()


def test_vit_digits_experiment_is_consistent():
  config.parse(["experiments/vit_digits.gin"])
  exp = config.experiment()
  assert exp.model.input_stem == "patches" and exp.model.num_classes == 10
  assert count_params(abstract_params(build_model(exp.model))) < 500_000


# ---------------------------------------------------------------- presets


def preset_count(name: str) -> int:
  config.parse([f"models/{name}.gin"])
  return count_params(abstract_params(build_model(config.build(ModelConfig))))


def test_vit_tiny_parameter_count():
  assert preset_count("vit_tiny") == 5_717_416  # ViT-Ti/16 (DeiT-Ti, timm vit_tiny_patch16_224)


@pytest.mark.slow
def test_vit_base_dry_run_prints_the_published_count():
  out = subprocess.run([sys.executable, "-m", "launch.train", "--gin_file=models/vit_base.gin", "--dry_run"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines[-1] == "total parameters: 86567656"  # ViT-B/16 with 1000 classes (Dosovitskiy et al. 2021)
  assert any(line.startswith("embedder/patch_embedding/kernel") and "(16, 16, 3, 768)" in line for line in lines)


# ---------------------------------------------------------------- Hugging Face


def _reference(fixture: str) -> dict:
  with np.load(hf_fixtures.HF / fixture / "reference.npz") as f:
    return dict(f)


@pytest.mark.parametrize("name", sorted(hf_fixtures.VIT))
def test_hf_vit_logits_parity(name):
  fixture = f"vit_{name}"
  model, params = from_hf(hf_fixtures.HF / fixture)
  cfg, kw = model.cfg, hf_fixtures.VIT[name]
  assert (cfg.input_stem, cfg.image_size, cfg.patch_size, cfg.num_channels, cfg.num_classes, cfg.pooling) == (
      "patches", kw["image_size"], kw["patch_size"], kw["num_channels"], kw["num_labels"], "first")
  ref = _reference(fixture)
  logits = np.asarray(jax.jit(model.apply)({"params": params}, ref["pixel_values"].transpose(0, 2, 3, 1)))  # NHWC
  wants = {"fixture": ref["logits"]}
  if LIVE:
    import transformers

    wants[f"transformers {transformers.__version__}"] = hf_fixtures.hf_outputs(
        hf_fixtures.HF / fixture, {"pixel_values": ref["pixel_values"]})["logits"]
  for source, want in wants.items():
    err = np.abs(logits - want).max() / np.abs(want).max()
    assert err < TOL, f"{fixture} vs {source}: relative error {err:.2e}"


def test_vit_to_hf_and_back_is_exact(tmp_path):
  cfg = vit(num_classes=7, activation="gelu_tanh", num_layers=1)
  model = build_model(cfg)
  params = jax.jit(lambda k: init_params(model, k))(jax.random.key(3))
  to_hf(model, params, tmp_path)
  hf = json.loads((tmp_path / "config.json").read_text())
  assert hf["architectures"] == ["ViTForImageClassification"] and len(hf["id2label"]) == 7
  assert hf["hidden_act"] == "gelu_new"
  back_model, back = from_hf(tmp_path)
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), params, back))
  weights = load_file(str(tmp_path / "model.safetensors"))
  assert weights["vit.embeddings.patch_embeddings.projection.weight"].shape == (32, 1, 2, 2)
  to_hf(back_model, back, tmp_path / "again")
  assert (tmp_path / "again" / "config.json").read_text() == (tmp_path / "config.json").read_text()
  with pytest.raises(ConversionError, match="class token"):
    to_hf(build_model(cfg.replace(pooling="mean")), params, tmp_path / "mean")


@pytest.mark.slow
def test_live_exported_vit_loads_in_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_fixtures.quiet()
  model = build_model(vit(image_size=12, patch_size=4, num_channels=3, num_classes=4))
  params = jax.jit(lambda k: init_params(model, k))(jax.random.key(4))
  to_hf(model, params, tmp_path)
  m = transformers.ViTForImageClassification.from_pretrained(tmp_path, dtype=torch.float64,
                                                             attn_implementation="eager").eval()
  images = np.random.default_rng(0).normal(size=(2, 12, 12, 3)).astype(np.float32)
  with torch.no_grad():
    want = m(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2), dtype=torch.float64)).logits.numpy()
  got = np.asarray(model.apply({"params": params}, images))
  assert np.abs(got - want).max() / np.abs(want).max() < TOL


def test_tfds_image_source_registers_image_datasets_on_a_miss(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  from t_jax.data.images import TfdsImageSource

  records, imported = [{"image": np.full((2, 2, 1), 7, np.uint8), "label": np.int64(3)}], []
  def data_source(name, split, data_dir):  # found only once the image modules are imported
    if "tensorflow_datasets.image_classification" not in imported:
      raise tfds.core.registered.DatasetNotFoundError(name)
    return records
  real_import = importlib.import_module
  monkeypatch.setattr(importlib, "import_module", lambda m: imported.append(m) or real_import(m))
  monkeypatch.setattr(tfds, "data_source", data_source)
  src = TfdsImageSource("mnist", "test")
  assert imported == ["tensorflow_datasets.image_classification"] and len(src) == 1
  assert src[0]["label"] == 3 and src[0]["image"].shape == (2, 2, 1) and src.stats == {"images": 1}
  monkeypatch.setattr(tfds, "data_source", lambda name, split, data_dir: [])
  with pytest.raises(ValueError, match="no records"):
    TfdsImageSource("mnist", "test")
