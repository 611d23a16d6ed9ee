"""The supported Hugging Face families (GPT-2, BERT MLM, T5 v1.0/v1.1, Llama, ViT): configs and tensor rules.

GPT-2, BERT and Llama also convert their *ForSequenceClassification models, to and from a t_jax model with a
sequence head (ModelConfig.num_classes; t_jax/models/heads.py): BERT's pooler and classifier are the head's
'cls' pooler and logits, GPT-2's and Llama's bias-free `score` reads the last real token ('last' pooling).
BERT's BertForPreTraining converts with its next-sentence head (ModelConfig.next_sentence: the pooler and
`seq_relationship` are the next_sentence head's 'cls' pooler and two-way logits).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from t_jax.convert import common as c
from t_jax.models.config import RUNTIME_FIELDS, ModelConfig  # noqa: F401 - RUNTIME_FIELDS is re-exported

Weights = dict[str, np.ndarray]

# Position-scheme fields that families without those positions leave at their defaults.
NO_POSITION_FIELDS = frozenset({"rope_theta", "relative_buckets", "relative_max_distance"})


@dataclasses.dataclass(frozen=True)
class Family:
  """How one HF `model_type` maps onto ModelConfig and the t_jax parameter tree."""

  model_type: str
  hf_class: str  # the `architectures` entry written by to_hf
  matches: Callable[[ModelConfig], bool]  # whether a t_jax config belongs to this family
  model_config: Callable[[dict, Weights], dict]  # (HF config, weights) -> ModelConfig fields
  hf_config: Callable[[ModelConfig], dict]  # ModelConfig -> HF config fields
  rules: Callable[[ModelConfig], list[c.Rule]]
  prefixes: tuple[str, ...]  # canonical top-level key prefixes; the first is added to bare keys
  head: str  # the un-embedding tensor (absent or equal to the embedding when tied)
  ignored: tuple[str, ...]  # regexes of tensors HF keeps but the model does not need
  irrelevant: frozenset[str]  # ModelConfig fields this family leaves at their defaults
  token_ids: dict  # special ids written by to_hf unless given (t_jax tokenizer: pad 0, eos 1)
  aliases: Callable[[ModelConfig], dict] = lambda cfg: {}  # tensors to_hf also writes: alias -> written name
  also_reads: tuple[str, ...] = ()  # other HF classes (config.json `architectures`) whose checkpoints convert
  classifier_class: str = ""  # its *ForSequenceClassification (t_jax: ModelConfig.num_classes set)
  pretraining_class: str = ""  # its LM class with a next-sentence head (t_jax: ModelConfig.next_sentence)
  input_stem: str = "tokens"  # the ModelConfig.input_stem of its models (checked before `matches`)


def hf_class_of(family: Family, cfg: ModelConfig) -> str:
  """The HF class a t_jax config exports to: the LM class, the classifier with a sequence head, or the
  pretraining class with a next-sentence head."""
  if cfg.num_classes and family.classifier_class:
    return family.classifier_class
  return family.pretraining_class if cfg.next_sentence and family.pretraining_class else family.hf_class


def _classification(hf: dict, w: Weights, tensor: str, hf_class: str, pooling: str) -> dict:
  """num_classes and pooling of a sequence-classifier checkpoint (its output tensor's rows, else id2label when
  config.json names the class); {} for the LM classes."""
  if tensor in w:
    n = int(w[tensor].shape[0])
  elif hf_class in (hf.get("architectures") or []):
    n = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
  else:
    return {}
  return dict(num_classes=n, pooling=pooling)


def _classification_hf(cfg: ModelConfig, hf_class: str) -> dict:
  """HF config fields of a sequence classifier: its class and labels (num_labels = len(id2label))."""
  if not cfg.num_classes:
    return {}
  labels = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
  return dict(architectures=[hf_class], id2label=labels, label2id={v: int(k) for k, v in labels.items()})


def tied(hf: dict, weights: Weights, head: str, embed: str) -> bool:
  """HF semantics: tied unless the config says no or a separate, different head tensor is present."""
  if not hf.get("tie_word_embeddings", True):
    return False
  return head not in weights or np.array_equal(weights[head], weights[embed])


def normalize_keys(family: Family, weights: Weights) -> Weights:
  """Canonical tensor names: base-model prefix, LayerNorm gamma/beta -> weight/bias, BERT bias alias."""
  out = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
         for k, v in weights.items()}
  if family.prefixes:  # keys saved from a bare base model (e.g. GPT2Model, BertModel) get its prefix
    out = {k if k.startswith(family.prefixes) else f"{family.prefixes[0]}{k}": v for k, v in out.items()}
  if family.model_type == "bert" and "cls.predictions.decoder.bias" in out:  # the bias forward() adds
    out["cls.predictions.bias"] = out.pop("cls.predictions.decoder.bias")
  return out


# ---------------------------------------------------------------- GPT-2


def _gpt2_config(hf: dict, w: Weights) -> dict:
  c.require(hf, "scale_attn_weights", [True], True)
  c.require(hf, "scale_attn_by_inverse_layer_idx", [False], False)
  c.require(hf, "add_cross_attention", [False], False)
  d = hf["n_embd"]
  return dict(architecture="decoder", vocab_size=hf["vocab_size"], d_model=d, num_heads=hf["n_head"],
              mlp_dim=hf.get("n_inner") or 4 * d, num_layers=hf["n_layer"], position="learned",
              max_len=hf["n_positions"], activation=c.hf_activation(hf.get("activation_function", "gelu_new"),
                                                                   "activation_function"),
              norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), pre_norm=True, use_bias=True,
              tie_embeddings=tied(hf, w, "lm_head.weight", "transformer.wte.weight"),
              init_std=hf.get("initializer_range", 0.02), dropout_rate=hf.get("resid_pdrop", 0.1),
              attention_dropout_rate=hf.get("attn_pdrop", 0.1),
              **_classification(hf, w, "score.weight", "GPT2ForSequenceClassification", "last"))


def _gpt2_hf(cfg: ModelConfig) -> dict:
  return dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_head=cfg.num_heads, n_inner=cfg.mlp_dim,
              n_layer=cfg.num_layers, n_positions=cfg.max_len, activation_function=c.TJ_ACTIVATIONS[cfg.activation],
              layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
              initializer_range=cfg.init_std or 0.02, resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate,
              attn_pdrop=cfg.attention_dropout_rate, **_classification_hf(cfg, "GPT2ForSequenceClassification"))


def _gpt2_rules(cfg: ModelConfig) -> list[c.Rule]:
  d, h, hd, f = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  rules = [c.copy("transformer.wte.weight", "token_embedding/embedding", (cfg.vocab_size, d)),
           c.copy("transformer.wpe.weight", "embedder/position_embedding/embedding", (cfg.max_len, d))]
  for i in range(cfg.num_layers):
    hf, tj = f"transformer.h.{i}", f"decoder/layer_{i}"
    qkv = [f"{tj}/self_attention/{n}" for n in ("query", "key", "value")]
    rules += c.layer_norm(f"{hf}.ln_1", f"{tj}/self_attention_norm", d)
    rules += [c.fused(f"{hf}.attn.c_attn.weight", [f"{p}/kernel" for p in qkv], (d,), (h, hd)),
              c.fused(f"{hf}.attn.c_attn.bias", [f"{p}/bias" for p in qkv], (), (h, hd)),
              c.conv1d(f"{hf}.attn.c_proj.weight", f"{tj}/self_attention/out/kernel", (h, hd), (d,)),
              c.copy(f"{hf}.attn.c_proj.bias", f"{tj}/self_attention/out/bias", (d,))]
    rules += c.layer_norm(f"{hf}.ln_2", f"{tj}/mlp_norm", d)
    rules += [c.conv1d(f"{hf}.mlp.c_fc.weight", f"{tj}/mlp/wi/kernel", (d,), (f,)),
              c.copy(f"{hf}.mlp.c_fc.bias", f"{tj}/mlp/wi/bias", (f,)),
              c.conv1d(f"{hf}.mlp.c_proj.weight", f"{tj}/mlp/wo/kernel", (f,), (d,)),
              c.copy(f"{hf}.mlp.c_proj.bias", f"{tj}/mlp/wo/bias", (d,))]
  rules += c.layer_norm("transformer.ln_f", "decoder/final_norm", d)
  return rules + _untied_head(cfg, "lm_head.weight")


def _untied_head(cfg: ModelConfig, hf: str) -> list[c.Rule]:
  """The LM head's own un-embedding (none when tied); a sequence classifier's bias-free `score` instead."""
  if cfg.num_classes:
    return [c.linear("score.weight", "classifier/logits/kernel", (cfg.d_model,), (cfg.num_classes,))]
  return [] if cfg.tie_embeddings else [c.linear(hf, "head/logits/kernel", (cfg.d_model,), (cfg.vocab_size,))]


GPT2 = Family(
    model_type="gpt2", hf_class="GPT2LMHeadModel",
    matches=lambda cfg: cfg.architecture == "decoder" and cfg.position == "learned",
    model_config=_gpt2_config, hf_config=_gpt2_hf, rules=_gpt2_rules,
    prefixes=("transformer.", "lm_head.", "score."),
    head="lm_head.weight", ignored=(r"\.attn\.(masked_)?bias$",),
    irrelevant=NO_POSITION_FIELDS | {"mlm_transform", "num_encoder_layers"},
    token_ids=dict(pad_token_id=0, eos_token_id=1, bos_token_id=1), also_reads=("GPT2Model",),
    classifier_class="GPT2ForSequenceClassification")

# ---------------------------------------------------------------- BERT (masked LM, + next sentence)


def _bert_config(hf: dict, w: Weights) -> dict:
  c.require(hf, "position_embedding_type", ["absolute"], "absolute")
  c.require(hf, "is_decoder", [False], False)
  c.require(hf, "add_cross_attention", [False], False)
  seqcls = _classification(hf, w, "classifier.weight", "BertForSequenceClassification", "cls")
  return dict(architecture="encoder", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
              num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
              num_layers=hf["num_hidden_layers"], position="learned", max_len=hf["max_position_embeddings"],
              activation=c.hf_activation(hf.get("hidden_act", "gelu"), "hidden_act"), norm="layernorm",
              norm_eps=hf.get("layer_norm_eps", 1e-12), pre_norm=False, use_bias=True,
              tie_embeddings=tied(hf, w, "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
              logits_bias=True, embed_norm=True, num_token_types=hf.get("type_vocab_size", 2), mlm_transform=True,
              init_std=hf.get("initializer_range", 0.02), dropout_rate=hf.get("hidden_dropout_prob", 0.1),
              attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.1),
              next_sentence=not seqcls and ("cls.seq_relationship.weight" in w
                                            or "BertForPreTraining" in (hf.get("architectures") or [])), **seqcls)


def _bert_hf(cfg: ModelConfig) -> dict:
  if cfg.num_token_types < 1:
    raise c.ConversionError("BERT needs ModelConfig.num_token_types >= 1 (HF type_vocab_size)")
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_attention_heads=cfg.num_heads,
              intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers, max_position_embeddings=cfg.max_len,
              hidden_act=c.TJ_ACTIVATIONS[cfg.activation], layer_norm_eps=cfg.norm_eps,
              tie_word_embeddings=cfg.tie_embeddings, type_vocab_size=cfg.num_token_types,
              initializer_range=cfg.init_std or 0.02, hidden_dropout_prob=cfg.dropout_rate,
              attention_probs_dropout_prob=cfg.attention_dropout_rate,
              **_classification_hf(cfg, "BertForSequenceClassification"),
              **({"architectures": ["BertForPreTraining"]} if cfg.next_sentence else {}))


def _bert_rules(cfg: ModelConfig) -> list[c.Rule]:
  d, v = cfg.d_model, cfg.vocab_size
  e = "bert.embeddings"
  rules = [c.copy(f"{e}.word_embeddings.weight", "token_embedding/embedding", (v, d)),
           c.copy(f"{e}.position_embeddings.weight", "embedder/position_embedding/embedding", (cfg.max_len, d)),
           c.copy(f"{e}.token_type_embeddings.weight", "embedder/token_type_embedding", (cfg.num_token_types, d))]
  rules += c.layer_norm(f"{e}.LayerNorm", "embedder/embed_norm", d)
  for i in range(cfg.num_layers):
    hf, tj = f"bert.encoder.layer.{i}", f"encoder/layer_{i}"
    rules += c.attention_rules(f"{hf}.attention", f"{tj}/self_attention",
                               ("self.query", "self.key", "self.value", "output.dense"), cfg, bias=True)
    rules += c.layer_norm(f"{hf}.attention.output.LayerNorm", f"{tj}/self_attention_norm", d)
    rules += c.mlp_rules(hf, f"{tj}/mlp", ("intermediate.dense", "output.dense"), cfg, bias=True)
    rules += c.layer_norm(f"{hf}.output.LayerNorm", f"{tj}/mlp_norm", d)
  if cfg.num_classes:  # BertForSequenceClassification: pooler (dense + tanh on [CLS]) and classifier
    return (rules + c.dense("bert.pooler.dense", "classifier/pooler", (d,), (d,), bias=True)
            + c.dense("classifier", "classifier/logits", (d,), (cfg.num_classes,), bias=True))
  if cfg.next_sentence:  # BertForPreTraining: pooler (dense + tanh on [CLS]) and the two-way seq_relationship
    rules += (c.dense("bert.pooler.dense", "next_sentence/pooler", (d,), (d,), bias=True)
              + c.dense("cls.seq_relationship", "next_sentence/logits", (d,), (2,), bias=True))
  t = "cls.predictions.transform"
  rules += c.dense(f"{t}.dense", "mlm_dense", (d,), (d,), bias=True)
  rules += c.layer_norm(f"{t}.LayerNorm", "mlm_norm", d)
  bias = "head/bias" if cfg.tie_embeddings else "head/logits/bias"
  return rules + _untied_head(cfg, "cls.predictions.decoder.weight") + [c.copy("cls.predictions.bias", bias, (v,))]


BERT = Family(
    model_type="bert", hf_class="BertForMaskedLM", matches=lambda cfg: cfg.architecture == "encoder",
    model_config=_bert_config, hf_config=_bert_hf, rules=_bert_rules, prefixes=("bert.", "cls.", "classifier."),
    head="cls.predictions.decoder.weight",
    ignored=(r"position_ids$", r"^bert\.pooler\.", r"^cls\.seq_relationship\."),
    irrelevant=NO_POSITION_FIELDS | {"num_encoder_layers"}, token_ids=dict(pad_token_id=0),
    # Untied (transformers 5): decoder.bias is its own parameter, and the one forward() uses.
    aliases=lambda cfg: ({} if cfg.tie_embeddings or cfg.num_classes
                         else {"cls.predictions.decoder.bias": "cls.predictions.bias"}),
    classifier_class="BertForSequenceClassification", pretraining_class="BertForPreTraining")

# ---------------------------------------------------------------- T5 (v1.0 and v1.1)


def _t5_activation(hf: dict) -> tuple[str, bool]:
  """(t_jax activation, gated) from feed_forward_proj, with HF's 'gated-gelu' = gelu_new rule."""
  proj = hf.get("feed_forward_proj", "relu")
  parts = proj.split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise c.ConversionError(f"unsupported HF config feed_forward_proj={proj!r}")
  name = "gelu_new" if proj == "gated-gelu" else parts[-1]
  return c.hf_activation(name, "feed_forward_proj"), len(parts) == 2


def _t5_config(hf: dict, w: Weights) -> dict:
  act, gated = _t5_activation(hf)
  tie = tied(hf, w, "lm_head.weight", "shared.weight")
  scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
  if scale and not tie:
    raise c.ConversionError("T5 with d_model**-0.5 output scaling and an untied lm_head.weight is not supported")
  return dict(architecture="encoder_decoder", vocab_size=hf["vocab_size"], d_model=hf["d_model"],
              num_heads=hf["num_heads"], head_dim=hf["d_kv"], mlp_dim=hf["d_ff"],
              num_layers=hf.get("num_decoder_layers") or hf["num_layers"], num_encoder_layers=hf["num_layers"],
              position="t5_relative", relative_buckets=hf.get("relative_attention_num_buckets", 32),
              relative_max_distance=hf.get("relative_attention_max_distance", 128), activation=act, gated=gated,
              norm="rmsnorm", norm_eps=hf.get("layer_norm_epsilon", 1e-6), pre_norm=True, use_bias=False,
              scale_attention=False, tie_embeddings=tie, scale_tied_logits=bool(scale and tie),
              dropout_rate=hf.get("dropout_rate", 0.1))


def _t5_hf(cfg: ModelConfig) -> dict:
  exact_gelu = "gelu_python" if cfg.gated else "gelu"  # 'gated-gelu' means gelu_new in HF
  act = {"gelu_tanh": "gelu" if cfg.gated else "gelu_new", "gelu": exact_gelu}.get(cfg.activation, cfg.activation)
  return dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, num_heads=cfg.num_heads, d_kv=cfg.head_dim,
              d_ff=cfg.mlp_dim, num_layers=cfg.encoder_layers, num_decoder_layers=cfg.num_layers,
              relative_attention_num_buckets=cfg.relative_buckets,
              relative_attention_max_distance=cfg.relative_max_distance,
              feed_forward_proj=("gated-" if cfg.gated else "") + act, layer_norm_epsilon=cfg.norm_eps,
              tie_word_embeddings=cfg.tie_embeddings, scale_decoder_outputs=cfg.tie_embeddings and cfg.scale_tied_logits,
              dropout_rate=cfg.dropout_rate)


def _t5_rules(cfg: ModelConfig) -> list[c.Rule]:
  d = cfg.d_model
  rules = [c.copy("shared.weight", "token_embedding/embedding", (cfg.vocab_size, d))]
  for side, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.num_layers)):
    rules.append(c.copy(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                        f"{side}/relative_bias", (cfg.relative_buckets, cfg.num_heads)))
    for i in range(n):
      hf, tj = f"{side}.block.{i}.layer", f"{side}/layer_{i}"
      rules += c.attention_rules(f"{hf}.0.SelfAttention", f"{tj}/self_attention", "qkvo", cfg, bias=False)
      rules += c.layer_norm(f"{hf}.0.layer_norm", f"{tj}/self_attention_norm", d, bias=False)
      j = 1
      if side == "decoder":
        rules += c.attention_rules(f"{hf}.1.EncDecAttention", f"{tj}/cross_attention", "qkvo", cfg, bias=False)
        rules += c.layer_norm(f"{hf}.1.layer_norm", f"{tj}/cross_attention_norm", d, bias=False)
        j = 2
      names = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")
      rules += c.mlp_rules(f"{hf}.{j}.DenseReluDense", f"{tj}/mlp", names, cfg, bias=False)
      rules += c.layer_norm(f"{hf}.{j}.layer_norm", f"{tj}/mlp_norm", d, bias=False)
    rules += c.layer_norm(f"{side}.final_layer_norm", f"{side}/final_norm", d, bias=False)
  return rules + _untied_head(cfg, "lm_head.weight")


T5 = Family(
    model_type="t5", hf_class="T5ForConditionalGeneration",
    matches=lambda cfg: cfg.architecture == "encoder_decoder" and cfg.position == "t5_relative",
    model_config=_t5_config, hf_config=_t5_hf, rules=_t5_rules, prefixes=(), head="lm_head.weight",
    ignored=(r"EncDecAttention\.relative_attention_bias\.weight$", r"^(encoder|decoder)\.embed_tokens\.weight$"),
    irrelevant=frozenset({"rope_theta", "max_len", "mlm_transform"}),
    token_ids=dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0), also_reads=("T5Model",))

# ---------------------------------------------------------------- Llama


def _rope_theta(hf: dict) -> float:
  """rope_theta from `rope_parameters` (transformers 5) or the top level (4.x); scaled RoPE is refused."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind != "default":
    raise c.ConversionError(f"unsupported HF RoPE type {kind!r} (only 'default' RoPE is implemented)")
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise c.ConversionError("unsupported HF config partial_rotary_factor != 1")
  return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama_config(hf: dict, w: Weights) -> dict:
  bias = hf.get("attention_bias", False)
  c.require(hf, "mlp_bias", [bias], False)
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  return dict(architecture="decoder", vocab_size=hf["vocab_size"], d_model=d, num_heads=h,
              num_kv_heads=hf.get("num_key_value_heads") or h, head_dim=hf.get("head_dim") or d // h,
              mlp_dim=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], position="rope",
              max_len=hf.get("max_position_embeddings", 2048), rope_theta=_rope_theta(hf),
              activation=c.hf_activation(hf.get("hidden_act", "silu"), "hidden_act"), gated=True, norm="rmsnorm",
              norm_eps=hf.get("rms_norm_eps", 1e-6), pre_norm=True, use_bias=bias, scale_attention=True,
              tie_embeddings=tied(hf, w, "lm_head.weight", "model.embed_tokens.weight"),
              init_std=hf.get("initializer_range", 0.02), dropout_rate=0.0,
              attention_dropout_rate=hf.get("attention_dropout", 0.0),
              **_classification(hf, w, "score.weight", "LlamaForSequenceClassification", "last"))


def _llama_hf(cfg: ModelConfig) -> dict:
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.mlp_dim,
              num_hidden_layers=cfg.num_layers, max_position_embeddings=cfg.max_len,
              rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
              hidden_act=c.TJ_ACTIVATIONS[cfg.activation], rms_norm_eps=cfg.norm_eps, attention_bias=cfg.use_bias,
              mlp_bias=cfg.use_bias, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std or 0.02,
              attention_dropout=cfg.attention_dropout_rate, **_classification_hf(cfg, "LlamaForSequenceClassification"))


def _llama_rules(cfg: ModelConfig) -> list[c.Rule]:
  d = cfg.d_model
  rules = [c.copy("model.embed_tokens.weight", "token_embedding/embedding", (cfg.vocab_size, d))]
  for i in range(cfg.num_layers):
    hf, tj = f"model.layers.{i}", f"decoder/layer_{i}"
    rules += c.attention_rules(f"{hf}.self_attn", f"{tj}/self_attention", ("q_proj", "k_proj", "v_proj", "o_proj"),
                               cfg, bias=cfg.use_bias)
    rules += c.layer_norm(f"{hf}.input_layernorm", f"{tj}/self_attention_norm", d, bias=False)
    rules += c.mlp_rules(f"{hf}.mlp", f"{tj}/mlp", ("gate_proj", "up_proj", "down_proj"), cfg, bias=cfg.use_bias)
    rules += c.layer_norm(f"{hf}.post_attention_layernorm", f"{tj}/mlp_norm", d, bias=False)
  rules += c.layer_norm("model.norm", "decoder/final_norm", d, bias=False)
  return rules + _untied_head(cfg, "lm_head.weight")


LLAMA = Family(
    model_type="llama", hf_class="LlamaForCausalLM",
    matches=lambda cfg: cfg.architecture == "decoder" and cfg.position == "rope",
    model_config=_llama_config, hf_config=_llama_hf, rules=_llama_rules, prefixes=("model.", "lm_head.", "score."),
    head="lm_head.weight", ignored=(r"rotary_emb\.inv_freq$",),
    irrelevant=frozenset({"relative_buckets", "relative_max_distance", "mlm_transform", "num_encoder_layers"}),
    token_ids=dict(pad_token_id=0, eos_token_id=1, bos_token_id=1), also_reads=("LlamaModel",),
    classifier_class="LlamaForSequenceClassification")

# ---------------------------------------------------------------- ViT (image classification)


def _vit_config(hf: dict, w: Weights) -> dict:
  c.require(hf, "qkv_bias", [True], True)
  sizes = {k: hf.get(k, default) for k, default in (("image_size", 224), ("patch_size", 16))}
  for name, value in sizes.items():  # a square image and patch: one number (or [n, n])
    if isinstance(value, (list, tuple)):
      if len(set(value)) != 1:
        raise c.ConversionError(f"unsupported HF config {name}={value!r}: t_jax needs square images and patches")
      sizes[name] = value[0]
  labels = hf.get("id2label")
  return dict(architecture="encoder", input_stem="patches", **sizes, num_channels=hf.get("num_channels", 3),
              class_token=True, pooling="first", num_classes=len(labels) if labels else hf.get("num_labels", 2),
              d_model=hf["hidden_size"], num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
              num_layers=hf["num_hidden_layers"], position="learned",
              activation=c.hf_activation(hf.get("hidden_act", "gelu"), "hidden_act"), norm="layernorm",
              norm_eps=hf.get("layer_norm_eps", 1e-12), pre_norm=True, use_bias=True, tie_embeddings=False,
              init_std=hf.get("initializer_range", 0.02), dropout_rate=hf.get("hidden_dropout_prob", 0.0),
              attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.0))


def _vit_hf(cfg: ModelConfig) -> dict:
  from t_jax.models.heads import pooling_of

  if pooling_of(cfg) != "first":
    raise c.ConversionError(f"HF ViTForImageClassification reads the class token: ModelConfig.pooling="
                            f"{cfg.pooling!r} cannot be expressed")
  labels = {str(i): f"LABEL_{i}" for i in range(cfg.num_classes)}
  return dict(hidden_size=cfg.d_model, num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
              num_hidden_layers=cfg.num_layers, image_size=cfg.image_size, patch_size=cfg.patch_size,
              num_channels=cfg.num_channels, hidden_act=c.TJ_ACTIVATIONS[cfg.activation], layer_norm_eps=cfg.norm_eps,
              qkv_bias=True, initializer_range=cfg.init_std or 0.02, hidden_dropout_prob=cfg.dropout_rate,
              attention_probs_dropout_prob=cfg.attention_dropout_rate, id2label=labels,
              label2id={v: int(k) for k, v in labels.items()})


def _patch_conv(hf: str, tj: str, d: int, channels: int, p: int) -> c.Rule:
  """Conv2d weight [embed, channels, p, p] (kernel = stride = p) <-> the patch dense kernel [p, p, channels, embed]."""
  return c.Rule((hf,), (tj,), ((d, channels, p, p),), lambda a: [a[0].transpose(2, 3, 1, 0)],
                lambda a: [a[0].transpose(3, 2, 0, 1)])


def _vit_rules(cfg: ModelConfig) -> list[c.Rule]:
  d, e, n = cfg.d_model, "vit.embeddings", cfg.num_patches + 1
  rules = [c.reshape(f"{e}.cls_token", "embedder/class_token", (1, 1, d), (d,)),
           c.reshape(f"{e}.position_embeddings", "embedder/position_embedding", (1, n, d), (n, d)),
           _patch_conv(f"{e}.patch_embeddings.projection.weight", "embedder/patch_embedding/kernel", d,
                       cfg.num_channels, cfg.patch_size),
           c.copy(f"{e}.patch_embeddings.projection.bias", "embedder/patch_embedding/bias", (d,))]
  for i in range(cfg.num_layers):
    hf, tj = f"vit.encoder.layer.{i}", f"encoder/layer_{i}"
    rules += c.layer_norm(f"{hf}.layernorm_before", f"{tj}/self_attention_norm", d)
    rules += c.attention_rules(f"{hf}.attention", f"{tj}/self_attention",
                               ("attention.query", "attention.key", "attention.value", "output.dense"), cfg, bias=True)
    rules += c.layer_norm(f"{hf}.layernorm_after", f"{tj}/mlp_norm", d)
    rules += c.mlp_rules(hf, f"{tj}/mlp", ("intermediate.dense", "output.dense"), cfg, bias=True)
  rules += c.layer_norm("vit.layernorm", "encoder/final_norm", d)
  return rules + c.dense("classifier", "classifier/logits", (d,), (cfg.num_classes,), bias=True)


VIT = Family(
    model_type="vit", hf_class="ViTForImageClassification",
    matches=lambda cfg: cfg.architecture == "encoder", input_stem="patches",
    model_config=_vit_config, hf_config=_vit_hf, rules=_vit_rules, prefixes=("vit.", "classifier."),
    head="classifier.weight", ignored=(),
    irrelevant=NO_POSITION_FIELDS | {"vocab_size", "max_len", "mlm_transform", "num_encoder_layers", "tie_embeddings",
                                     "pooling"},
    token_ids={})

FAMILIES = {f.model_type: f for f in (GPT2, BERT, T5, LLAMA, VIT)}


def family_for_hf(hf: dict) -> Family:
  """The family of an HF config dict by its `model_type`; unknown types raise."""
  kind = hf.get("model_type")
  if kind not in FAMILIES:
    raise c.ConversionError(f"unsupported Hugging Face model_type {kind!r}; supported: {sorted(FAMILIES)}")
  return FAMILIES[kind]


def supported_classes() -> str:
  """The HF model classes whose checkpoints from_hf converts, comma-separated (base models when tied)."""
  return ", ".join(sorted(n for f in FAMILIES.values() for n in _classes(f) if n))


def check_architectures(family: Family, hf: dict) -> None:
  """Raises, naming it, when config.json `architectures` lists a model class `family` does not convert."""
  for name in hf.get("architectures") or []:
    if name not in _classes(family):
      raise c.ConversionError(f"unsupported Hugging Face architecture {name!r}; supported: {supported_classes()}")


def _classes(family: Family) -> tuple[str, ...]:
  """The HF classes whose checkpoints a family converts ('' for none)."""
  return family.hf_class, *family.also_reads, family.classifier_class, family.pretraining_class


def check_head_tensors(family: Family, weights: Weights) -> None:
  """Raises when tensors beside the base model's prefixed ones belong to another head (e.g. `classifier.weight`)."""
  if not family.prefixes or not any(k.startswith(family.prefixes[0]) for k in weights):
    return  # T5 has no prefixes; a bare base model's keys have none
  foreign = sorted(k for k in weights if not k.startswith(family.prefixes))
  if foreign:
    owner = " or ".join(n for n in (family.hf_class, family.classifier_class) if n)
    raise c.ConversionError(f"unsupported Hugging Face head: tensors {foreign[:3]}{' ...' if len(foreign) > 3 else ''}"
                            f" are not part of a {owner}; supported: {supported_classes()}")


def family_for_config(cfg: ModelConfig) -> Family:
  """The HF family a t_jax config exports to; configs no family can express raise."""
  for family in FAMILIES.values():
    if family.input_stem == cfg.input_stem and family.matches(cfg):
      return family
  raise c.ConversionError(f"no Hugging Face family for ModelConfig(architecture={cfg.architecture!r}, "
                          f"position={cfg.position!r}, input_stem={cfg.input_stem!r}); supported: "
                          f"{', '.join(FAMILIES)}")
