"""ModelConfig: one frozen dataclass describes every model of the family (launchers fill it from gin)."""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from t_jax.attention.variants import KINDS as ATTENTION_KINDS

ARCHITECTURES = ("decoder", "prefix_lm", "encoder", "encoder_decoder")
POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "t5_relative", "none")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
NORMS = ("layernorm", "rmsnorm")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention_out")
KERNEL_OPTIONS = ("block_q", "block_k", "block_q_bwd", "block_k_bwd", "num_warps", "num_stages")
# Fields that change how a model runs, not what its parameters mean (conversion overrides, resume checks).
RUNTIME_FIELDS = frozenset({"dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl",
                            "paged_attention_impl",
                            "dropout_rate", "attention_dropout_rate", "init_std"}
                           | {f"attention_{n}" for n in KERNEL_OPTIONS})
DTYPES = ("float32", "bfloat16", "float16")  # dtype strings; jax and flax take them as they are
POOLINGS = ("cls", "first", "mean", "last")  # sequence heads (t_jax/models/heads.py)
INPUT_STEMS = ("tokens", "patches", "audio")  # what turns the inputs into vectors (t_jax/models/transformer.py)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every architectural knob of a t_jax model. Presets live in configs/models/*.gin."""

  architecture: str = "decoder"
  vocab_size: int = 32000
  d_model: int = 512
  num_heads: int = 8
  num_kv_heads: Optional[int] = None  # None -> num_heads (MHA); 1 = MQA; else GQA (resolved on creation)
  head_dim: Optional[int] = None  # None -> d_model // num_heads (resolved on creation)
  mlp_dim: int = 2048
  num_layers: int = 6  # decoder layers (encoder layers for encoder-only models)
  num_encoder_layers: Optional[int] = None  # encoder-decoder only; None = num_layers
  # Input stem: 'tokens' (a token table) or 'patches': images [batch, image_size, image_size, num_channels] cut
  # into non-overlapping patch_size^2 patches, each projected to one token (ViT; t_jax/models/vision.py).
  input_stem: str = "tokens"
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  class_token: bool = True  # patches: a learned [class] token before the patches (pooling 'first' reads it)
  # 'audio' (encoder_decoder): log-mel frames [batch, frames, num_mel_bins] through two 1-D convolutions (the
  # second with stride 2) and sinusoidal positions into the encoder (Whisper; t_jax/models/speech.py).
  num_mel_bins: int = 80
  # Positions.
  position: str = "rope"
  max_len: int = 2048  # learned table size; default KV-cache length
  rope_theta: float = 10000.0
  relative_buckets: int = 32
  relative_max_distance: int = 128
  # Blocks.
  activation: str = "gelu"
  gated: bool = False  # GLU variants: silu + gated = SwiGLU, gelu + gated = GeGLU
  norm: str = "layernorm"
  norm_eps: float = 1e-6
  pre_norm: bool = True  # False = post-LN (Vaswani 2017, BERT)
  use_bias: bool = True  # biases in dense layers and LayerNorm
  scale_attention: bool = True  # False: no 1/sqrt(head_dim) (T5 folds it into the init)
  window: Optional[int] = None  # sliding-window self-attention
  # Embeddings and outputs.
  tie_embeddings: bool = True
  scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model)
  scale_tied_logits: bool = False  # T5 v1.0: multiply by d_model**-0.5 before tied logits
  logits_bias: bool = False  # bias on the output projection (BERT's MLM decoder)
  embed_norm: bool = False  # LayerNorm right after the embeddings (BERT)
  num_token_types: int = 0  # BERT token-type (segment A/B) embeddings
  mlm_transform: bool = True  # encoder-only: dense + act + norm before the MLM logits
  init_std: Optional[float] = None  # normal(init_std) for all kernels; None = fan-in scaling
  # Regularisation and numerics.
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"
  attention_impl: str = "auto"
  # Paged-cache decode steps (t_jax.inference, cache='paged'): 'xla' gathers each row's pages, 'pallas' runs
  # t_jax/kernels/paged_attention.py, 'auto' = the kernel only on device kinds it was verified on (none yet).
  paged_attention_impl: str = "auto"
  # Pallas flash-attention tiling; None = t_jax.kernels.default_blocks for the device and head_dim.
  attention_block_q: Optional[int] = None
  attention_block_k: Optional[int] = None
  attention_block_q_bwd: Optional[int] = None
  attention_block_k_bwd: Optional[int] = None
  attention_num_warps: Optional[int] = None  # Triton launch parameters (GPU only)
  attention_num_stages: Optional[int] = None
  # Attention kind (t_jax/attention/variants.py) and its knobs; cross-attention stays softmax.
  attention_kind: str = "softmax"  # softmax | performer | rfa | bigbird | lsh | aft
  attention_features: int = 64  # performer/rfa random features (rfa takes the sin and cos of each)
  attention_rfa_sigma: float = 2.0  # rfa: w ~ N(0, sigma^2 I), estimating softmax(sigma^2 cos(q, k))
  attention_redraw: bool = False  # performer/rfa/lsh: fresh features / hash rotations every training step
  attention_seed: int = 0  # the fixed draws: features, hash rotations, BigBird's random blocks
  attention_chunk: int = 64  # lsh chunk length; chunk of the causal prefix-sum scans (performer/rfa/aft)
  attention_sparse_block: int = 64  # bigbird block size
  attention_window_blocks: int = 3  # bigbird: the query's block and window_blocks // 2 blocks each side
  attention_global_blocks: int = 1  # bigbird: the first blocks see and are seen by every block
  attention_random_blocks: int = 2  # bigbird: random key blocks per query block (drawn from the seed)
  attention_num_hashes: int = 2  # lsh hash rounds
  attention_num_buckets: int = 8  # lsh buckets: 1 or even
  attention_aft_window: int = 0  # aft: learned relative bias for |i - j| < window (0 = AFT-simple)
  reversible: bool = False  # RevNet residual layers (Reformer): activation memory independent of depth
  # Fine-tuning (None = off, so older configs and checkpoints mean the same): heads.py, lora.py.
  num_classes: Optional[int] = None  # a sequence classifier replaces the LM head; 1 = regression (MSE)
  # BERT pre-training: a next-sentence head (pooler + 2 classes on [CLS]) beside the MLM head; the model then
  # returns (token logits, next-sentence logits). Encoder only; t_jax/data/nsp.py.
  next_sentence: bool = False
  pooling: Optional[str] = None  # 'cls' (first token + BERT pooler) | 'mean' | 'last'; None: cls for encoders, else last
  lora_rank: Optional[int] = None  # LoRA adapters on the dense layers whose module path matches lora_targets
  lora_alpha: Optional[float] = None  # the update is scaled by lora_alpha / lora_rank; None = lora_rank (scale 1)
  lora_targets: Optional[str] = None  # regex searched in '/'-joined module paths; None = 'query|value'

  def __post_init__(self) -> None:
    """Rejects inconsistent configs early, naming the field."""
    _one_of("architecture", self.architecture, ARCHITECTURES)
    _one_of("position", self.position, POSITIONS)
    _one_of("activation", self.activation, ACTIVATIONS)
    _one_of("norm", self.norm, NORMS)
    _one_of("remat_policy", self.remat_policy, REMAT_POLICIES)
    _one_of("paged_attention_impl", self.paged_attention_impl, ("auto", "xla", "pallas"))
    _one_of("dtype", self.dtype, DTYPES)
    _one_of("param_dtype", self.param_dtype, DTYPES)
    for name in ("vocab_size", "d_model", "num_heads", "mlp_dim", "num_layers", "max_len"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads} does not divide "
                       f"ModelConfig.d_model={self.d_model}; set head_dim explicitly or change one")
    object.__setattr__(self, "head_dim", self.head_dim or self.d_model // self.num_heads)
    object.__setattr__(self, "num_kv_heads", self.num_kv_heads or self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
    if self.position == "rope" and self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
    if self.position == "sinusoidal" and self.d_model % 2:
      raise ValueError(f"sinusoidal positions need an even d_model, got {self.d_model}")
    if self.window is not None and self.window < 1:
      raise ValueError(f"ModelConfig.window must be >= 1 or None, got {self.window}")
    if not 0.0 <= self.dropout_rate < 1.0 or not 0.0 <= self.attention_dropout_rate < 1.0:
      raise ValueError("ModelConfig dropout rates must be in [0, 1)")
    self._check_finetuning()
    self._check_attention_kind()
    self._check_stem()
    for name, value in self.attention_kernel_options.items():
      if value < 1 or (name.startswith("block") and value & (value - 1)):
        kind = "a power of two" if name.startswith("block") else ">= 1"
        raise ValueError(f"ModelConfig.attention_{name} must be {kind} or None, got {value}")

  def _check_attention_kind(self) -> None:
    """The kind's knobs, and the combinations it cannot run, refused naming both."""
    kind = self.attention_kind
    _one_of("attention_kind", kind, ATTENTION_KINDS)
    for name, low in (("features", 1), ("chunk", 1), ("sparse_block", 1), ("window_blocks", 1),
                      ("global_blocks", 0), ("random_blocks", 0), ("num_hashes", 1), ("aft_window", 0)):
      if getattr(self, f"attention_{name}") < low:
        raise ValueError(f"ModelConfig.attention_{name} must be >= {low}, got {getattr(self, f'attention_{name}')}")
    if self.attention_num_buckets < 1 or (self.attention_num_buckets > 1 and self.attention_num_buckets % 2):
      raise ValueError(f"ModelConfig.attention_num_buckets must be 1 or even, got {self.attention_num_buckets}")
    if self.attention_rfa_sigma <= 0:
      raise ValueError(f"ModelConfig.attention_rfa_sigma must be > 0, got {self.attention_rfa_sigma}")
    if self.reversible and (self.architecture == "encoder_decoder" or not self.pre_norm or self.dropout_rate
                            or self.position == "t5_relative"):
      raise ValueError("ModelConfig.reversible=True needs one stack, pre_norm, dropout_rate=0 and no t5_relative "
                       f"positions; got architecture={self.architecture!r}, pre_norm={self.pre_norm}, "
                       f"dropout_rate={self.dropout_rate}, position={self.position!r}")
    if kind in ("softmax", "bigbird"):
      return
    clash = [(f"position={self.position!r}", self.position in ("alibi", "t5_relative")),
             (f"window={self.window}", self.window is not None),
             (f"attention_dropout_rate={self.attention_dropout_rate}", self.attention_dropout_rate > 0),
             (f"attention_impl={self.attention_impl!r}", self.attention_impl in ("pallas", "cudnn"))]
    for what, bad in clash:
      if bad:
        raise ValueError(f"ModelConfig.attention_kind={kind!r} does not support ModelConfig.{what} "
                         "(bias, window, dropout and kernels belong to softmax/bigbird attention)")

  def _check_finetuning(self) -> None:
    if self.num_classes is not None and (self.num_classes < 1 or self.architecture == "encoder_decoder"):
      raise ValueError(f"ModelConfig.num_classes={self.num_classes} needs to be >= 1 and a one-stack architecture "
                       f"(decoder, prefix_lm, encoder), not {self.architecture!r}")
    if self.pooling is not None:
      _one_of("pooling", self.pooling, POOLINGS)
    if self.next_sentence and (self.architecture != "encoder" or self.num_classes):
      raise ValueError("ModelConfig.next_sentence needs architecture='encoder' and no num_classes (it sits beside "
                       f"the MLM head), not architecture={self.architecture!r}, num_classes={self.num_classes}")
    if self.lora_rank is not None and self.lora_rank < 1:
      raise ValueError(f"ModelConfig.lora_rank must be >= 1 or None, got {self.lora_rank}")
    if self.lora_targets is not None:
      try:
        re.compile(self.lora_targets)
      except re.error as e:
        raise ValueError(f"ModelConfig.lora_targets={self.lora_targets!r} is not a regex: {e}") from e

  def _check_stem(self) -> None:
    _one_of("input_stem", self.input_stem, INPUT_STEMS)
    if self.input_stem == "audio":
      self._check_audio_stem()
    if self.input_stem != "patches":
      return
    for name in ("image_size", "patch_size", "num_channels"):
      if getattr(self, name) < 1:
        raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.image_size % self.patch_size:
      raise ValueError(f"ModelConfig.patch_size={self.patch_size} does not divide image_size={self.image_size}")
    if self.architecture == "encoder_decoder" or not self.num_classes:
      raise ValueError("ModelConfig.input_stem='patches' needs a one-stack architecture with a classification head "
                       f"(num_classes), not architecture={self.architecture!r}, num_classes={self.num_classes}")
    if self.position == "sinusoidal" and self.d_model % 4:
      raise ValueError(f"2-D sinusoidal positions need d_model divisible by 4, got {self.d_model}")
    if not self.class_token and self.pooling in ("cls", "first"):
      raise ValueError(f"ModelConfig.pooling={self.pooling!r} reads the class token: set class_token=True or "
                       "pooling='mean'")

  def _check_audio_stem(self) -> None:
    if self.architecture != "encoder_decoder" or self.position not in ("learned", "sinusoidal", "none"):
      raise ValueError("ModelConfig.input_stem='audio' needs architecture='encoder_decoder' and absolute decoder "
                       "positions ('learned', 'sinusoidal' or 'none'; the encoder's are sinusoidal), not "
                       f"architecture={self.architecture!r}, position={self.position!r}")
    if self.num_mel_bins < 1 or self.d_model % 2:
      raise ValueError(f"ModelConfig.num_mel_bins must be >= 1 and d_model even (sinusoidal encoder positions), "
                       f"got {self.num_mel_bins}, {self.d_model}")

  @property
  def num_patches(self) -> int:
    """Patches per image (input_stem='patches')."""
    return (self.image_size // self.patch_size) ** 2

  @property
  def attention_kernel_options(self) -> dict:
    """The Pallas kernel options that are set (`t_jax.attention(..., kernel_options=...)`)."""
    options = {n: getattr(self, f"attention_{n}") for n in KERNEL_OPTIONS}
    return {n: v for n, v in options.items() if v is not None}

  @property
  def encoder_layers(self) -> int:
    """Encoder depth of an encoder-decoder model."""
    return self.num_layers if self.num_encoder_layers is None else self.num_encoder_layers

  def replace(self, **changes: object) -> ModelConfig:
    """A copy with some fields changed (validated again); a derived head_dim / num_kv_heads is derived again."""
    if "head_dim" not in changes and self.head_dim * self.num_heads == self.d_model:
      changes["head_dim"] = None
    if "num_kv_heads" not in changes and self.num_kv_heads == self.num_heads:
      changes["num_kv_heads"] = None
    return dataclasses.replace(self, **changes)


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"ModelConfig.{name}={value!r} is not one of {choices}")
