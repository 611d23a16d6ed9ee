"""Data pipeline: text sources -> SentencePiece tokenizer -> objective -> packed fixed-shape numpy batches.

Quick start::

  from t_jax import data
  train_src = data.PydocSource("train")                      # built-in corpus, no download
  tok = data.Tokenizer.train(train_src, f"{workdir}/tokenizer.model", vocab_size=8000,
                             num_extra_ids=100)              # reused when the file exists
  it = data.make_iterator(train_src, tok, data.CausalLM(seq_len=512), batch_size=32, seed=0,
                          shard_index=jax.process_index(), shard_count=jax.process_count())
  batch = next(it)                                           # dict of numpy arrays, fixed shapes
  state = it.get_state()                                     # small JSON-serialisable dict
  it.set_state(state)                                        # resumes bit-identically

Sources (random access: `len(src)`, `src[i] -> dict[str, str] | None`; `src.stats` -> counters):
  TfdsSource(name, split="train", keys="text", data_dir=None, max_chars=MAX_CHARS)
      any TFDS dataset via tfds.data_source (no TensorFlow); keys maps output key -> TFDS feature,
      e.g. TfdsSource("wmt14_translate/de-en", keys={"inputs": "en", "targets": "de"}).
  TextFileSource(patterns, per_line=True, key="text", max_chars=MAX_CHARS)
      glob patterns, .gz allowed; one document per line, or per file with per_line=False.
  ParallelTextSource(source_path, target_path, inputs_key="inputs", targets_key="targets")
  ParallelTextSource.from_prefix(prefix, "en", "de")    # {prefix}.en[.gz] / {prefix}.de[.gz]
      line-aligned files; different line counts -> ValueError naming both files and counts.
  PydocSource(split="train" | "validation", unit="paragraph" | "topic", validation_every=10)
  A source with no documents raises ValueError naming it; empty lines and undecodable (non UTF-8) lines
  are skipped and counted in `stats` ("empty", "undecodable"); max_chars truncates ("truncated"; default
  MAX_CHARS = 1,000,000 characters per record, None = no cap). Training prints one `data:` line per source
  with these counts and refuses a source whose sampled records are mostly unusable
  (TaskConfig.max_bad_fraction, default 0.5).
  Uncompressed line files are indexed once and read from disk per record (a bad line reads as None,
  counted then); `.gz`, per-file and parallel text are read into memory. TfdsSource reads lazily.

Tokenizer (SentencePiece):
  Tokenizer.train(source, path, vocab_size=8000, model_type="unigram" | "bpe", num_extra_ids=0,
                  max_sentences=100_000, ...)  -> trains (seconds on small corpora) and saves to path,
                  or loads path when it exists (overwrite=False).
  Tokenizer.load(path, num_extra_ids=0)
  Ids: pad_id=0, eos_id=1 (= bos_id for decoder-only), unk_id=2, mask_id=3 ('<mask>', for MLM),
  then the SentencePiece pieces (sp_vocab_size in all), then num_extra_ids sentinels:
  sentinel(i) = vocab_size - 1 - i. vocab_size = sp_vocab_size + num_extra_ids (embedding size).
  encode(str) -> list[int] (no eos); decode(ids) -> str (stops at eos, skips pad, sentinels render as
  '<extra_id_i>', ids outside the vocabulary are dropped).

Objectives and the batch contract (B = batch_size; int32 unless noted; segment_ids: 1, 2, 3 ... per packed
example and 0 on padding; positions restart at 0 in every segment):
  CausalLM(seq_len=512, pack=True, overflow="split" | "truncate", text_key="text")
  PrefixLM(seq_len=512, prefix_fraction=None, ...)    # never packed
  MaskedLM(seq_len=512, mask_rate=0.15, mask_prob=0.8, random_prob=0.1, pack=True, ...)
      inputs [B, L], targets [B, L], weights [B, L] float32, segment_ids [B, L], positions [B, L]
      CausalLM: each document is [eos] + tokens + [eos]; targets = inputs shifted left by one within a
        segment; weights 1 on real tokens.
      PrefixLM: one document per row plus prefix_len [B]: the first prefix_len input positions form the
        bidirectional prefix; weights are 1 from position prefix_len - 1 (whose target is the first suffix
        token) to the end of the document. prefix_len is random in [1, n] or round(prefix_fraction * n).
      MaskedLM: inputs corrupted (of max(1, round(0.15 n)) selected tokens 80% -> mask_id, 10% -> random
        regular token, 10% kept), targets = original ids, weights 1 only on selected positions.
  SpanCorruption(inputs_len=512, targets_len=114, noise_density=0.15, mean_noise_span_length=3.0, ...)
      T5 random_spans_noise_mask; needs num_extra_ids >= the number of spans (checked).
  Seq2Seq(inputs_len=512, targets_len=512, inputs_key="inputs", targets_key="targets", pack=True)
      encoder_inputs, encoder_segment_ids, encoder_positions [B, inputs_len];
      decoder_inputs, decoder_targets, decoder_segment_ids, decoder_positions [B, targets_len];
      weights [B, targets_len] float32. decoder_inputs = decoder_targets shifted right within each segment,
      starting with 0 (pad) as the start token. Both sides end with eos.
  Documents longer than a row are split into several rows (overflow="split") or truncated; translation
  pairs are truncated. Counters are in `objective.stats` ("split", "truncated", "truncated_<key>"); like
  source stats they count what this process has read so far (including prefetched elements).

Pipeline:
  make_dataset(source, tokenizer, objective, *, batch_size, train=True, seed=0, num_epochs=None,
               shard_index=0, shard_count=1, packing_bins=None, num_threads=4, prefetch_buffer_size=128)
      -> grain.IterDataset of batches.
  make_iterator(...same arguments...) -> grain.DatasetIterator with get_state()/set_state().
  train=True: the shard is shuffled (seeded, differently each epoch) and repeated num_epochs times
  (None = forever); packing bins are shuffled. train=False: one ordered pass; the last batch is padded
  with all-zero rows (weights 0), so every batch has the same shape. Random choices (masks, spans,
  prefix lengths) depend only on (seed, element index): the stream is deterministic and resumable.
  Each process reads elements shard_index::shard_count of the source. Different shards may yield
  different numbers of eval batches; a multi-host eval loop must agree on when to stop.
"""

from t_jax.data.objectives import (
    CausalLM,
    MaskedLM,
    Objective,
    PrefixLM,
    Seq2Seq,
    SpanCorruption,
    corrupt_spans,
    mask_tokens,
    random_spans_noise_mask,
    span_corruption_raw_length,
)
from t_jax.data.pipeline import make_dataset, make_iterator
from t_jax.data.sources import (
    Counts,
    InMemorySource,
    ParallelTextSource,
    PydocSource,
    TextFileSource,
    TfdsSource,
)
from t_jax.data.task import TaskConfig
from t_jax.data.tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer

__all__ = [
    "EOS_ID", "PAD_ID", "UNK_ID", "CausalLM", "Counts", "InMemorySource", "MaskedLM", "Objective",
    "ParallelTextSource", "PrefixLM", "PydocSource", "Seq2Seq", "SpanCorruption", "TaskConfig",
    "TextFileSource", "TfdsSource", "Tokenizer", "corrupt_spans", "make_dataset", "make_iterator", "mask_tokens",
    "random_spans_noise_mask", "span_corruption_raw_length",
]
