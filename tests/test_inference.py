"""t_jax.inference: cached decoding vs full forward passes, search methods, speculative decoding, errors."""

import functools
import itertools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t_jax.inference import Runner, generate, length_penalty, process_logits
from t_jax.models import ModelConfig, build_model, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SHARDED = """
import jax, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from t_jax.inference import generate, generate_sharded
from t_jax.models import ModelConfig, build_model, init_params
assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
for arch in ("decoder", "encoder_decoder"):
  cfg = ModelConfig(architecture=arch, vocab_size=48, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                    mlp_dim=64, num_layers=2, max_len=64, tie_embeddings=False)
  params = init_params(build_model(cfg), jax.random.key(0))
  specs = jax.tree_util.tree_map(lambda x: P(None, "model") if x.ndim == 2 and x.shape[1] % 2 == 0 else P(),
                                 params)
  prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [1], [2, 3], [4, 5, 6]]  # 6 rows: padded to 8
  draft = (cfg.replace(num_layers=1), init_params(build_model(cfg.replace(num_layers=1)), jax.random.key(1)))
  methods = [("speculative", dict(draft=draft, temperature=1.0, top_k=8))] if arch == "decoder" else []
  methods += [("beam", dict(num_beams=3))] if arch == "encoder_decoder" else [("greedy", {})]
  for method, kw in methods:
    want = generate(cfg, params, prompts, 6, method, seed=4, **kw)
    got = generate_sharded(cfg, params, prompts, 6, method, mesh=mesh, param_shardings=specs, seed=4, **kw)
    assert got.shape == want.shape and (got == want).all(), (arch, method, got, want)
print("SHARDED_OK")
"""


def test_generate_sharded_on_eight_cpu_devices():
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run([sys.executable, "-c", textwrap.dedent(SHARDED)], env=env, capture_output=True, text=True,
                       timeout=600)
  assert res.returncode == 0 and "SHARDED_OK" in res.stdout, res.stderr[-3000:]


def tiny(**kw) -> ModelConfig:
  """An untied output layer keeps random models from just repeating their input token."""
  base = dict(vocab_size=48, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, num_layers=2,
              max_len=64, tie_embeddings=False)
  return ModelConfig(**{**base, **kw})


def params_for(cfg, seed=0):
  return init_params(build_model(cfg), jax.random.key(seed))


@functools.cache
def _forward(cfg):
  model = build_model(cfg)
  if cfg.architecture == "encoder_decoder":
    return jax.jit(lambda p, src, mask, dec: model.apply({"params": p}, src, dec, encoder_padding_mask=mask))
  return jax.jit(lambda p, ids, prefix: model.apply({"params": p}, ids, prefix_len=prefix))


def full_logits(cfg, params, prompts, conts):
  """Logits [batch, T, vocab] predicting conts[:, 0..T-1]: one non-cached forward pass over unpadded rows.

  Rows are right-padded; causal attention keeps the padding from influencing real positions.
  """
  conts = np.asarray(conts)
  b, steps = conts.shape
  lens = np.asarray([len(p) for p in prompts])
  if cfg.architecture == "encoder_decoder":
    src = np.zeros((b, lens.max()), np.int32)
    for i, p in enumerate(prompts):
      src[i, :len(p)] = p
    dec = np.concatenate([np.zeros((b, 1), np.int32), conts[:, :-1]], axis=1)
    mask = (np.arange(lens.max())[None] < lens[:, None]).astype(np.int32)
    return np.asarray(_forward(cfg)(params, src, mask, dec))
  seq = np.zeros((b, lens.max() + steps - 1), np.int32)
  for i, p in enumerate(prompts):
    seq[i, :len(p) + steps - 1] = [*p, *conts[i, :-1]]
  prefix = jnp.asarray(lens, jnp.int32) if cfg.architecture == "prefix_lm" else None
  logits = np.asarray(_forward(cfg)(params, seq, prefix))
  at = lens[:, None] - 1 + np.arange(steps)[None]
  return np.take_along_axis(logits, at[:, :, None], axis=1)


def padded(cfg, prompts):
  width = max(map(len, prompts))
  ids = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    if cfg.architecture == "encoder_decoder":
      ids[i, :len(p)] = p
    else:
      ids[i, width - len(p):] = p
  return jnp.asarray(ids), jnp.asarray([len(p) for p in prompts], jnp.int32)


CACHE_CASES = (
    [("decoder", pos, {}) for pos in ("rope", "alibi", "t5_relative", "learned", "sinusoidal", "none")]
    + [("prefix_lm", pos, {}) for pos in ("rope", "alibi", "t5_relative", "learned")]
    + [("encoder_decoder", pos, {}) for pos in ("rope", "alibi", "t5_relative", "learned", "sinusoidal", "none")]
    + [("decoder", "rope", dict(num_kv_heads=1)), ("decoder", "rope", dict(scan_layers=True)), ("decoder", "rope", dict(window=4)),
       ("decoder", "alibi", dict(window=3)), ("decoder", "t5_relative", dict(window=4)),
       ("prefix_lm", "rope", dict(window=4)), ("encoder_decoder", "rope", dict(window=3))])


@pytest.mark.parametrize("arch,position,extra", CACHE_CASES, ids=lambda x: str(x))
def test_cached_decode_matches_full_forward(arch, position, extra):
  """Prefill + one-token steps give the logits of a full forward pass over the same prefix, per row."""
  cfg = tiny(architecture=arch, position=position, **extra)
  params = params_for(cfg)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(2, 48, n).tolist() for n in (5, 2, 7)]
  steps = 6
  cont = rng.integers(2, 48, (3, steps))
  # A window model gets a ring buffer of `window` slots, smaller than the 13-token sequences.
  slots = cfg.window or (1 if arch == "encoder_decoder" else 7) + steps
  runner = Runner(cfg, slots)

  @jax.jit
  def cached(params, ids, lengths, cont):
    """Prefill, then teacher-force cont one token per step; logits predicting cont[:, t] for every t."""
    logits, state, pos = runner.prefill(params, ids, lengths)

    def step(state, xs):
      tok, t = xs
      out, state = runner.step(params, state, tok[:, None], (pos + t)[:, None])
      return state, out[:, -1]

    _, rest = jax.lax.scan(step, state, (cont[:, :-1].T, jnp.arange(steps - 1)))
    return jnp.concatenate([logits[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)

  got = cached(params, *padded(cfg, prompts), jnp.asarray(cont))
  np.testing.assert_allclose(got, full_logits(cfg, params, prompts, cont), atol=2e-4, rtol=2e-4)


def test_greedy_matches_uncached_argmax():
  """Every greedy token is the argmax of a full forward pass over the prompt and the tokens before it."""
  cfg = tiny()
  params = params_for(cfg)
  prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
  out = generate(cfg, params, prompts, 6)
  np.testing.assert_array_equal(out, full_logits(cfg, params, prompts, out).argmax(-1))


def test_eos_stops_rows_and_pads():
  cfg = tiny()
  params = params_for(cfg)
  prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
  free = generate(cfg, params, prompts, 6)
  eos = int(free[1, 2])  # row 1 emits it at step 2 (and may emit it earlier)
  out = generate(cfg, params, prompts, 6, eos_id=eos, pad_id=47)
  for row, ref in zip(out, free):
    hits = np.flatnonzero(ref == eos)
    stop = hits[0] + 1 if hits.size else 6
    assert row[:stop].tolist() == ref[:stop].tolist() and (row[stop:] == 47).all()


SPEC_CASES = [("decoder", "rope", {}, True), ("decoder", "alibi", dict(window=4), False),
              ("prefix_lm", "t5_relative", {}, False), ("encoder_decoder", "sinusoidal", {}, False),
              ("decoder", "learned", dict(max_len=16), False)]


@pytest.mark.parametrize("arch,position,extra,self_draft", SPEC_CASES, ids=lambda x: str(x))
def test_speculative_greedy_equals_target_greedy(arch, position, extra, self_draft):
  """A different, smaller draft exercises rejections; the target as its own draft accepts everything.

  The learned-position case ends exactly at max_len (drafts run past it); the window case uses a
  ring-buffer cache that must survive per-row rewinds.
  """
  cfg = tiny(architecture=arch, position=position, **extra)
  params = params_for(cfg)
  dcfg = cfg.replace(num_layers=1, d_model=16, mlp_dim=32, num_heads=2, num_kv_heads=1)
  dparams = params_for(dcfg, seed=1)
  prompts = [[5, 6, 7, 8, 9], [9, 10], [11, 12, 13]]
  n = 16 - 5 if cfg.max_len == 16 else 12
  want = generate(cfg, params, prompts, n)
  got, stats = generate(cfg, params, prompts, n, "speculative", draft=(dcfg, dparams), num_draft_tokens=3,
                        return_stats=True)
  np.testing.assert_array_equal(got, want)
  assert 0.0 <= stats["acceptance_rate"] < 1.0
  if self_draft:
    eos = int(want[1, 4])  # rows stop at different steps; later slots hold pad_id
    cut = [np.flatnonzero(r == eos)[0] + 1 if eos in r else n for r in want]
    expect = np.asarray([[*r[:c], *[0] * (n - c)] for r, c in zip(want, cut)])
    got, stats = generate(cfg, params, prompts, n, "speculative", draft=(cfg, params), num_draft_tokens=2,
                          eos_id=eos, return_stats=True)
    np.testing.assert_array_equal(got, expect)
    assert stats["acceptance_rate"] == 1.0


def exact_two_token_dist(cfg, params, prompt, vocab, **proc):
  """P(t1, t2 | prompt) of the processed distribution, from one full forward pass."""
  conts = np.stack([np.arange(vocab), np.zeros(vocab, int)], axis=1)
  logits = jnp.asarray(full_logits(cfg, params, [prompt] * vocab, conts))
  p1 = jax.nn.softmax(process_logits(logits[0, 0], **proc))
  p2 = jax.nn.softmax(process_logits(logits[:, 1], **proc), axis=-1)
  return np.asarray(p1[:, None] * p2, np.float64)


def empirical(tokens, vocab):
  counts = np.bincount(tokens[:, 0] * vocab + tokens[:, 1], minlength=vocab * vocab)
  return counts.reshape(vocab, vocab) / len(tokens)


@pytest.mark.parametrize("proc", [dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.95)],
                         ids=["plain", "processed"])
def test_speculative_sampling_keeps_target_distribution(proc):
  """20000 two-token samples; total variation to the exact target distribution < 0.04.

  With 64 outcomes the sampling noise of the TV estimate is below 0.023 even for a uniform
  distribution; the draft's own distribution is required to be far (> 0.12) from the target's, so
  accepting drafts blindly (or sampling from the draft) would fail the test.
  """
  vocab, n, tol = 8, 20000, 0.04
  cfg = tiny(vocab_size=vocab)
  dcfg = cfg.replace(num_layers=1)
  params, dparams = params_for(cfg), params_for(dcfg, seed=7)
  prompt = [3, 1, 4, 1, 5]
  target = exact_two_token_dist(cfg, params, prompt, vocab, **proc)
  draft = exact_two_token_dist(dcfg, dparams, prompt, vocab, **proc)
  assert 0.5 * np.abs(target - draft).sum() > 3 * tol
  spec, stats = generate(cfg, params, [prompt] * n, 2, "speculative", draft=(dcfg, dparams),
                         num_draft_tokens=2, seed=1, return_stats=True, **proc)
  assert 0.0 < stats["acceptance_rate"] < 1.0
  assert 0.5 * np.abs(empirical(spec, vocab) - target).sum() < tol
  plain = generate(cfg, params, [prompt] * n, 2, "sample", seed=2, **proc)
  assert 0.5 * np.abs(empirical(plain, vocab) - target).sum() < tol


def allowed_sets(logits, top_k=None, top_p=None):
  """Token sets allowed by top-k / nucleus, from a plain numpy sort."""
  logits = np.asarray(logits, np.float64)
  out = []
  for row in logits:
    order = np.argsort(-row, kind="stable")
    keep = len(row) if top_k is None else top_k
    if top_p is not None:
      probs = np.exp(row[order[:keep]] - row[order[0]])
      probs /= probs.sum()
      before = np.cumsum(probs) - probs
      keep = int(np.sum(before < top_p))
    out.append(set(order[:keep].tolist()))
  return out


@pytest.mark.parametrize("method,opts", [("sample", dict(top_k=3)), ("sample", dict(top_p=0.5)),
                                         ("sample", dict(top_k=4, top_p=0.8, temperature=2.0)),
                                         ("speculative", dict(top_k=2, temperature=1.5))],
                         ids=["top_k", "top_p", "both", "speculative_top_k"])
def test_sampling_never_emits_excluded_tokens(method, opts):
  cfg = tiny()
  params = params_for(cfg)
  draft = dict(draft=(cfg.replace(num_layers=1), params_for(cfg.replace(num_layers=1), 3))) if method == "speculative" else {}
  prompts = [[5, 6, 7, 8], [20, 21, 22, 23], [30, 2, 9, 40]] * 40
  steps = 4
  out = generate(cfg, params, prompts, steps, method, seed=3, **opts, **draft)
  logits = full_logits(cfg, params, prompts, out) / opts.get("temperature", 1.0)
  seen = set()
  for t in range(steps):
    allowed = allowed_sets(logits[:, t], opts.get("top_k"), opts.get("top_p"))
    for i in range(len(prompts)):
      assert int(out[i, t]) in allowed[i], (i, t)
      seen.add((i % 3, t, int(out[i, t])))
  assert len(seen) > 3 * steps  # genuinely sampled, not one deterministic path


def test_temperature_top_p_and_length_penalty_are_traced_not_recompiled():
  """Changing temperature / top_p / length_penalty reuses the compiled program, and the new value is used."""
  from t_jax.inference import api

  cfg = tiny()
  params = params_for(cfg)
  prompts = [[5, 6, 7, 8], [20, 21, 22, 23], [30, 2, 9, 40]] * 20
  generate(cfg, params, prompts, 3, "sample", seed=3, temperature=0.5, top_p=0.99)
  generate(cfg, params, prompts, 3, "beam", num_beams=2, length_penalty=0.6)
  before = api._decode._cache_size()
  out = generate(cfg, params, prompts, 3, "sample", seed=3, temperature=2.0, top_p=0.3)
  generate(cfg, params, prompts, 3, "beam", num_beams=2, length_penalty=1.5)
  assert api._decode._cache_size() == before
  logits = full_logits(cfg, params, prompts, out) / 2.0
  for t in range(3):  # the nucleus of the second call, not of the first (0.99 would allow far more)
    allowed = allowed_sets(logits[:, t], None, 0.3)
    assert all(int(out[i, t]) in allowed[i] for i in range(len(prompts))), t


@pytest.mark.parametrize("arch,eos,alpha", [("decoder", 7, 0.0), ("encoder_decoder", None, 0.6),
                                            ("prefix_lm", None, 1.0)])
def test_beam_width_one_is_greedy(arch, eos, alpha):
  """With one beam and alpha = 0 (or no EOS, so every hypothesis has the same length) beam = greedy."""
  cfg = tiny(architecture=arch)
  params = params_for(cfg)
  prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
  greedy, gscore = generate(cfg, params, prompts, 7, eos_id=eos, return_scores=True)
  beam, bscore = generate(cfg, params, prompts, 7, "beam", num_beams=1, length_penalty=alpha, eos_id=eos,
                          return_scores=True)
  np.testing.assert_array_equal(beam, greedy)
  lens = np.array([(np.flatnonzero(r == eos)[0] + 1) if eos in r else 7 for r in greedy])
  np.testing.assert_allclose(bscore, gscore / np.asarray(length_penalty(lens, alpha)), rtol=1e-4, atol=1e-5)


def enumerate_best(cfg, params, prompt, vocab, length, alpha, eos):
  """Best length-penalised hypothesis over all vocab**length outputs (each cut after its first EOS)."""
  outs = np.asarray(list(itertools.product(range(vocab), repeat=length)))
  logp = jax.nn.log_softmax(jnp.asarray(full_logits(cfg, params, [prompt] * len(outs), outs)), axis=-1)
  token_lp = np.take_along_axis(np.asarray(logp), outs[:, :, None], axis=-1)[:, :, 0]
  is_eos = outs == eos if eos is not None else np.zeros(outs.shape, bool)
  lens = np.where(is_eos.any(1), is_eos.argmax(1) + 1, length)
  scores = (token_lp * (np.arange(length)[None] < lens[:, None])).sum(1) / np.asarray(length_penalty(lens, alpha))
  best = int(np.argmax(scores))  # a cut hypothesis appears several times with the same score
  return [*outs[best, :lens[best]], *[0] * (length - lens[best])], scores[best]


@pytest.mark.parametrize("arch,eos", [("decoder", None), ("encoder_decoder", None), ("decoder", 1)])
def test_beam_is_exact_with_vocab_pow_length_beams(arch, eos):
  """V=4, L=3, K=V^(L-1)=16 beams: the result is the best of all 4^3 outputs by the same score.

  EOS handling: a hypothesis ends at its first EOS (scored with |Y| including EOS) or at
  max_new_tokens; the enumeration cuts every output after its first EOS the same way.
  """
  vocab, length, alpha = 4, 3, 0.6
  cfg = tiny(architecture=arch, vocab_size=vocab)
  params = params_for(cfg)
  prompts = [[3, 2, 1, 2], [1, 3]]
  out, scores = generate(cfg, params, prompts, length, "beam", num_beams=vocab ** (length - 1),
                         length_penalty=alpha, eos_id=eos, return_scores=True)
  for i, prompt in enumerate(prompts):
    best, score = enumerate_best(cfg, params, prompt, vocab, length, alpha, eos)
    assert out[i].tolist() == best
    np.testing.assert_allclose(scores[i], score, rtol=1e-4)


def test_bad_requests():
  cfg = tiny()
  params = params_for(cfg)
  ok = [[5, 6, 7]]
  cases = [
      (dict(prompt_tokens=[]), "empty prompt"),
      (dict(prompt_tokens=[[1, 2], []]), "empty prompt"),
      (dict(prompt_tokens=[[1] * 65]), "exceeds the context"),
      (dict(prompt_tokens=[[1] * 40], max_new_tokens=30), "exceeds the context"),
      (dict(prompt_tokens=[[1, 99]]), "outside the vocabulary"),
      (dict(max_new_tokens=0), "max_new_tokens"),
      (dict(method="nucleus"), "unknown method"),
      (dict(method="beam", temperature=0.7), "deterministic"),
      (dict(method="beam", top_k=5), "deterministic"),
      (dict(method="greedy", top_p=0.9), "deterministic"),
      (dict(method="greedy", num_beams=4), "only apply to method='beam'"),
      (dict(method="beam", num_beams=0), "num_beams"),
      (dict(method="sample", temperature=0.0), "temperature must be > 0"),
      (dict(method="sample", top_k=0), "top_k"),
      (dict(method="sample", top_p=1.5), "top_p"),
      (dict(method="speculative"), "needs draft"),
      (dict(method="sample", draft=(cfg, params)), "needs draft"),
      (dict(method="speculative", draft=(cfg.replace(vocab_size=50), params)), "vocabulary"),
      (dict(method="speculative", draft=(cfg, params), top_k=3), "greedy speculative"),
      (dict(cache_len=4), "cache_len=4 is too small"),
      (dict(model=cfg.replace(architecture="encoder")), "encoder-only"),
      (dict(prompt_tokens=np.asarray([[3, 0, 4]])), "inside a prompt row"),
      (dict(prompt_tokens="The for statement"), "string prompts need tokenizer="),
      (dict(prompt_tokens=["a", "b"]), "string prompts need tokenizer="),
      (dict(repetition_penalty=0.0), "repetition_penalty must be a positive"),
      (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an int >= 0"),
      (dict(no_repeat_ngram_size=2.5), "no_repeat_ngram_size must be an int >= 0"),
      (dict(method="speculative", draft=(cfg, params), repetition_penalty=1.2), "not supported with method='speculative'"),
  ]
  for kw, match in cases:
    kw = {"model": cfg, "prompt_tokens": ok, "max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=match):
      generate(kw.pop("model"), params, kw.pop("prompt_tokens"), kw.pop("max_new_tokens"), **kw)


def test_padded_array_prompts_equal_lists():
  cfg = tiny()
  params = params_for(cfg)
  arr = np.asarray([[0, 0, 5, 6], [7, 8, 9, 10], [11, 12, 0, 0]])  # left, none and right padding
  np.testing.assert_array_equal(generate(cfg, params, arr, 4),
                                generate(cfg, params, [[5, 6], [7, 8, 9, 10], [11, 12]], 4))


def test_sliding_window_generates_past_max_len():
  """A bounded cache lets a window model without learned positions run past max_len."""
  cfg = tiny(window=4, max_len=8)
  params = params_for(cfg)
  out = generate(cfg, params, [[5, 6, 7]], 12)
  assert out.shape == (1, 12)
  assert out[0].tolist()[:5] == generate(cfg, params, [[5, 6, 7]], 5)[0].tolist()


class CharTokenizer:
  """Letters a..z <-> ids 3..28; pad 0, eos/bos 1."""

  pad_id, eos_id, bos_id = 0, 1, 1

  def encode(self, text):
    return [3 + (ord(c) - ord("a")) % 26 for c in text.lower() if c.isalpha()]

  def decode(self, ids):
    return "".join(chr(ord("a") + (i - 3) % 26) for i in ids if i >= 3)


def hf_repetition(logits, seqs, penalty):
  """Hugging Face RepetitionPenaltyLogitsProcessor on one row per sequence (numpy)."""
  out = logits.copy()
  for r, seq in enumerate(seqs):
    score = logits[r, seq]
    out[r, seq] = np.where(score < 0, score * penalty, score / penalty)
  return out


def hf_no_repeat(logits, seqs, n):
  """Hugging Face NoRepeatNGramLogitsProcessor (_get_ngrams + _get_generated_ngrams) on one row per sequence."""
  out = logits.copy()
  for r, seq in enumerate(seqs):
    if len(seq) + 1 < n:
      continue
    grams = {}
    for gram in zip(*[seq[i:] for i in range(n)]):
      grams.setdefault(tuple(gram[:-1]), []).append(gram[-1])
    out[r, grams.get(tuple(seq[len(seq) + 1 - n:]), [])] = -np.inf
  return out


@pytest.mark.parametrize("rep,n", [(1.3, 0), (0.7, 0), (1.0, 1), (1.0, 2), (1.0, 3), (1.5, 2), (1.0, 9)])
def test_penalty_matches_hf_reference(rep, n):
  """Left-padded contexts, partly generated rows and junk in the padding: only the real sequence counts."""
  from t_jax.inference import Penalty

  rng = np.random.default_rng(0)
  vocab, width, steps = 10, 5, 6
  lengths = np.asarray([5, 3, 1, 0, 2])  # 0: an encoder-decoder-like row whose context is all generated
  context = rng.integers(0, 4, (5, width))  # few distinct tokens: many repeats
  out = rng.integers(0, 4, (5, steps))
  logits = rng.normal(size=(5, vocab)).astype(np.float32) * 3
  logits[:, 0] = 0.0
  changed = 0
  for i in range(steps + 1):
    seqs = [[*c[width - n_:], *o[:i]] for c, o, n_ in zip(context, out, lengths)]
    want = hf_no_repeat(hf_repetition(logits, seqs, rep), seqs, n) if n else hf_repetition(logits, seqs, rep)
    got = Penalty(rep, n)(jnp.asarray(logits), jnp.asarray(context), jnp.asarray(width - lengths),
                          jnp.asarray(out), jnp.int32(i))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    changed += int(np.isinf(want).sum() if n else (want != logits).sum())
  assert changed or n == 9  # 9-grams rarely recur: checks that nothing is banned wrongly


def tied(**kw):
  """Tied embeddings make a random model repeat itself."""
  return tiny(tie_embeddings=True, **kw)


def repeats(seq, n):
  """How many n-grams of seq occur earlier in it."""
  grams = list(zip(*[seq[i:] for i in range(n)]))
  return len(grams) - len(set(grams))


@pytest.mark.parametrize("arch,method,opts", [("decoder", "greedy", {}), ("decoder", "sample", dict(temperature=0.7)),
                                              ("encoder_decoder", "beam", dict(num_beams=3))])
def test_no_repeat_ngram_end_to_end(arch, method, opts):
  """With no_repeat_ngram_size=2 the output adds no repeated bigram to the row's sequence; without, it does.

  The decoder's sequence starts with the prompt (whose own repeat (5, 6) stays the only one), the
  encoder-decoder's with the decoder start token 0.
  """
  cfg = tied(architecture=arch, vocab_size=24)
  params = params_for(cfg)
  prompts = [[5, 6, 7, 5, 6], [9, 10], [11, 12, 13]]
  heads = [[0] if arch == "encoder_decoder" else p for p in prompts]
  free = generate(cfg, params, prompts, 24, method, **opts)
  out = generate(cfg, params, prompts, 24, method, no_repeat_ngram_size=2, **opts)
  assert any(repeats([*h, *o], 2) > repeats(h, 2) for h, o in zip(heads, free))
  assert all(repeats([*h, *o], 2) == repeats(h, 2) for h, o in zip(heads, out))


@pytest.mark.parametrize("arch,method", [("decoder", "greedy"), ("encoder_decoder", "beam")])
def test_penalties_follow_hf_step_by_step(arch, method):
  """Each token is the argmax of the HF-processed logits of a full forward pass over the row's sequence
  (one beam with alpha 0: of the processed log-probs); top-1 sampling takes the same tokens."""
  cfg = tied(architecture=arch)
  params = params_for(cfg)
  prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
  kw = dict(num_beams=1, length_penalty=0.0) if method == "beam" else {}
  steps, rep, n = 10, 1.8, 3
  out = generate(cfg, params, prompts, steps, method, repetition_penalty=rep, no_repeat_ngram_size=n, **kw)
  assert (out != generate(cfg, params, prompts, steps, method, **kw)).any()
  logits = full_logits(cfg, params, prompts, out)
  if method == "beam":
    logits = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  for t in range(steps):
    seqs = [[*([0] if arch == "encoder_decoder" else p), *o[:t]] for p, o in zip(prompts, out.tolist())]
    want = hf_no_repeat(hf_repetition(logits[:, t], seqs, rep), seqs, n).argmax(-1)
    np.testing.assert_array_equal(out[:, t], want)
  if method == "greedy":
    sampled = generate(cfg, params, prompts, steps, "sample", top_k=1, repetition_penalty=rep,
                       no_repeat_ngram_size=n)
    np.testing.assert_array_equal(sampled, out)


def test_string_prompts_with_a_tokenizer():
  """Strings are encoded with BOS in front; the continuation comes back decoded and cut at EOS."""
  cfg = tiny()
  params = params_for(cfg)
  texts = ["abcd", "hello", "xyz"]
  ids = [[1, *CharTokenizer().encode(t)] for t in texts]
  tok = CharTokenizer()
  tok.eos_id = int(generate(cfg, params, ids, 8)[0, 3])  # row 0 stops at step 3 (or before)
  want, scores = generate(cfg, params, ids, 8, eos_id=tok.eos_id, return_scores=True)
  assert (want == tok.eos_id).any()
  cut = [tok.decode(r[:list(r).index(tok.eos_id)] if tok.eos_id in r else r) for r in want.tolist()]
  assert generate(cfg, params, texts, 8, tokenizer=tok) == cut
  single, score = generate(cfg, params, texts[0], 8, tokenizer=tok, return_scores=True)
  assert single == cut[0] and isinstance(score, float)
  np.testing.assert_allclose(score, scores[0], rtol=1e-4)
  # Token ids keep working as before: used as given, ids out (the tokenizer's eos_id is the default).
  np.testing.assert_array_equal(generate(cfg, params, ids, 8, tokenizer=tok), want)
