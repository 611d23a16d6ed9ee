"""Image classification through the same data layer: {image, label} sources and the ImageClassification objective.

ImageClassification(image_size=224, num_channels=3, num_classes=10, augment=None, crop_padding=4, mean=(0.5,),
                    std=(0.5,), eval_crop_fraction=1.0, image_key="image", label_field="label")
    A Classification objective whose rows hold an image instead of tokens (B = batch size):
      image [B, image_size, image_size, num_channels] float32   (pixel / 255 - mean) / std, per channel
      label [B] int32;  weights [B] float32 (0 on the rows padding a final eval batch)
    The model reads the image with ModelConfig.input_stem='patches' (t_jax/models/vision.py); Experiment checks
    that image_size and num_channels agree. No tokenizer is trained or read. The training stream applies
    `augment`; evaluation never does:
      None              the image as it is (resized when its size differs, see below)
      'crop'            random translations: crop_padding zero pixels of padding, a random image_size crop
      'flip_crop'       CIFAR's (He et al. 2016): 'crop' (crop_padding 4) and a random horizontal flip
      'inception_crop'  ImageNet's (Szegedy et al. 2015; ViT's big_vision input pipeline): a random crop of 8-100%
                        of the area with aspect ratio 3/4-4/3, resized to image_size, a random horizontal flip
    An image of another size is resized (PIL, bilinear): its shorter side to image_size / eval_crop_fraction,
    then the central image_size square (ImageNet evaluation: 0.875). Grayscale images feed 3-channel models
    as three equal channels. Random choices depend only on (seed, element index), as for every objective.
    The training log's tokens_per_sec counts images for these batches.

Sources (records {"image": uint8 [H, W, C], "label": int}):
  DigitsSource(split="train", test_fraction=0.2, seed=0)  the 1,797 8x8 handwritten digits scikit-learn ships in
      its package (sklearn.datasets.load_digits; 16 grey levels, scaled to 0-255), split into train/test by a
      stratified, seeded scikit-learn train_test_split: 1,437 / 360 images. No download.
  TfdsImageSource(name, split="train", image_key="image", label_key="label")  a TFDS image dataset through
      tfds.data_source (mnist, cifar10, imagenet2012: configs/tasks/{mnist,cifar10,imagenet2012}.gin).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional

import numpy as np

from t_jax.data.classification import Classification
from t_jax.data.objectives import Row
from t_jax.data.sources import Example, InMemorySource, TfdsRecords
from t_jax.data.tokenizer import Tokenizer

AUGMENTATIONS = (None, "crop", "flip_crop", "inception_crop")


@dataclasses.dataclass
class ImageClassification(Classification):
  """One label per image: the Classification loss, metrics and head, with image rows instead of token rows."""

  uses_tokenizer: ClassVar[bool] = False
  image_size: int = 224
  num_channels: int = 3
  augment: Optional[str] = None  # training stream only: None | 'crop' | 'flip_crop' | 'inception_crop'
  crop_padding: int = 4  # 'crop', 'flip_crop': the largest translation, in pixels
  mean: tuple = (0.5,)  # per channel (or one for all), of pixel / 255; HF ViT's default
  std: tuple = (0.5,)
  eval_crop_fraction: float = 1.0  # images of another size: shorter side to image_size / this, central crop
  image_key: str = "image"

  def lengths(self) -> dict[str, int]:
    """No sequence features: rows are neither packed nor padded."""
    return {}

  def check(self, tokenizer: Optional[Tokenizer]) -> None:
    """Settings only; there is no tokenizer."""
    del tokenizer
    if self.pack:
      raise ValueError("ImageClassification rows hold one image each (pack=False)")
    if self.augment not in AUGMENTATIONS:
      raise ValueError(f"ImageClassification.augment={self.augment!r} is not one of {AUGMENTATIONS}")
    for name in ("num_classes", "image_size", "num_channels"):
      if getattr(self, name) < 1:
        raise ValueError(f"ImageClassification.{name} must be >= 1, got {getattr(self, name)}")
    if self.crop_padding < 0:
      raise ValueError(f"ImageClassification.crop_padding must be >= 0, got {self.crop_padding}")
    for name in ("mean", "std"):
      if len(getattr(self, name)) not in (1, self.num_channels):
        raise ValueError(f"ImageClassification.{name}={getattr(self, name)} needs 1 or num_channels="
                         f"{self.num_channels} values")
    if not 0 < self.eval_crop_fraction <= 1:
      raise ValueError(f"ImageClassification.eval_crop_fraction={self.eval_crop_fraction} must be in (0, 1]")

  def for_stream(self, train: bool) -> ImageClassification:
    """Evaluation streams do not augment."""
    return self if train or self.augment is None else dataclasses.replace(self, augment=None)

  def examples(self, example: Example, rng: np.random.Generator, tokenizer: Optional[Tokenizer]) -> list[Row]:
    """One row: the (augmented) image, normalised, its label and weight 1."""
    del tokenizer
    image = self.channels(np.asarray(example[self.image_key]))
    if self.augment == "inception_crop":
      image = resize(inception_crop(image, rng), self.image_size)
    else:
      image = fit(image, self.image_size, self.eval_crop_fraction)
      if self.augment in ("crop", "flip_crop"):
        image = pad_crop(image, self.crop_padding, rng)
    if self.augment in ("flip_crop", "inception_crop") and rng.random() < 0.5:
      image = image[:, ::-1]
    x = (image.astype(np.float32) / 255.0 - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    return [{"image": x, "label": self.label(example), "weights": np.float32(1.0)}]

  def channels(self, image: np.ndarray) -> np.ndarray:
    """[H, W, num_channels] uint8: a missing channel axis added, grey repeated for colour models."""
    image = image[..., None] if image.ndim == 2 else image
    if image.ndim != 3:
      raise ValueError(f"ImageClassification: an image must be [H, W] or [H, W, C], got shape {image.shape}")
    if image.shape[-1] == 1 and self.num_channels == 3:
      image = np.repeat(image, 3, axis=-1)
    if image.shape[-1] != self.num_channels:
      raise ValueError(f"an image with {image.shape[-1]} channels for ImageClassification.num_channels="
                       f"{self.num_channels}")
    return image

  def finalize(self, row: Row) -> Row:
    """image, label, weights."""
    return {"image": row["image"], "label": row["label"], "weights": row["weights"]}

  def spec_row(self, **extra: Any) -> Row:
    """An image of zeros, label 0."""
    image = np.zeros((self.image_size, self.image_size, self.num_channels), np.float32)
    return self.finalize({"image": image, "label": np.int32(0), "weights": np.float32(1.0), **extra})

  def model_inputs(self, batch: Row) -> tuple[tuple, dict]:
    """The images (the patch stem's input)."""
    return (batch["image"],), {}


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """uint8 [H, W, C] -> [size, size, C] (or [h, w, C] for a (h, w) size), PIL bilinear with antialiasing."""
  from PIL import Image

  h, w = (size, size) if isinstance(size, int) else size
  if image.shape[:2] == (h, w):
    return image
  out = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c])).resize((w, h), Image.BILINEAR))
         for c in range(image.shape[-1])]
  return np.stack(out, axis=-1)


def fit(image: np.ndarray, size: int, crop_fraction: float = 1.0) -> np.ndarray:
  """The shorter side resized to size / crop_fraction, then the central size x size square (as it is if it fits)."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  short = max(size, round(size / crop_fraction))
  scale = short / min(h, w)
  image = resize(image, (max(short, round(h * scale)), max(short, round(w * scale))))
  h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def pad_crop(image: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
  """A random crop of the image's own size from the image with `pad` zero pixels on every side."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  top, left = rng.integers(0, 2 * pad + 1, 2)
  return padded[top:top + h, left:left + w]


def inception_crop(image: np.ndarray, rng: np.random.Generator, area: tuple[float, float] = (0.08, 1.0),
                   ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """A random crop covering `area` of the image with aspect ratio (w / h) in `ratio`; after 10 misses, the centre."""
  h, w = image.shape[:2]
  for _ in range(10):
    target = rng.uniform(*area) * h * w
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      return image[top:top + ch, left:left + cw]
  side = min(h, w)
  return image[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]


class DigitsSource(InMemorySource):
  """scikit-learn's 8x8 handwritten digits, [8, 8, 1] uint8 images (0-255), one seeded stratified split."""

  SPLITS: ClassVar[tuple[str, ...]] = ("train", "test")

  def __init__(self, split: str = "train", *, test_fraction: float = 0.2, seed: int = 0) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in self.SPLITS:
      raise ValueError(f"DigitsSource split={split!r} is not one of {self.SPLITS}")
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    train, test = train_test_split(np.arange(len(images)), test_size=test_fraction, random_state=seed,
                                   stratify=digits.target)
    chosen = np.sort(train if split == "train" else test)
    examples = [{"image": images[i], "label": int(digits.target[i])} for i in chosen]
    super().__init__(examples, f"DigitsSource({split!r}, test_fraction={test_fraction}, seed={seed})")

  @property
  def stats(self) -> dict[str, int]:
    """Images."""
    return {"images": len(self)}


class TfdsImageSource(TfdsRecords):
  """A labelled TFDS image dataset (mnist, cifar10, imagenet2012, ...) read through tfds.data_source."""

  modules = ("image_classification",)

  def __init__(self, name: str, split: str = "train", *, image_key: str = "image", label_key: str = "label",
               data_dir: Optional[str] = None) -> None:
    super().__init__(name, split, data_dir)
    self.image_key, self.label_key = image_key, label_key

  def __getitem__(self, index: int) -> Example:
    record = self._source[index]
    return {"image": np.asarray(record[self.image_key]), "label": int(np.asarray(record[self.label_key]))}

  @property
  def stats(self) -> dict[str, int]:
    """Images."""
    return {"images": len(self)}
