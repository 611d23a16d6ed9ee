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

Sources (random access, see sources.py): TfdsSource, TextFileSource, ParallelTextSource and PydocSource
(CPython's documentation: no download). Training prints one `data:` line of counts per source and refuses
one whose sampled records are mostly unusable (TaskConfig.max_bad_fraction, default 0.5).

Tokenizer (SentencePiece): `Tokenizer.train(source, path, vocab_size=8000, num_extra_ids=0, ...)` trains and
saves (or loads an existing `path`); `Tokenizer.load(path)`. Ids: pad 0, eos 1 (= bos), unk 2, mask 3, the
pieces, then num_extra_ids sentinels: sentinel(i) = vocab_size - 1 - i.

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

Pipeline: `make_dataset(source, tokenizer, objective, *, batch_size, train=True, seed=0, ...)` is a
grain.IterDataset of batches and `make_iterator(...)` its checkpointable iterator (get_state / set_state).
Random choices (masks, spans, prefix lengths) depend only on (seed, element index): the stream is
deterministic and resumable. train=False is one ordered pass whose last batch is padded with zero rows.

Fine-tuning (classification.py): Classification(seq_len, num_classes, text_key, text_pair_key) rows of
inputs/segment_ids/positions [B, L], label [B], weights [B]; AcceptabilitySource (word-order acceptability
from a sentence-per-line file) and TfdsClassificationSource (e.g. glue/cola). T5 text-to-text: TextToTextSource
(labels as target strings) and TextToText (Seq2Seq evaluated by generation: exact match, class metrics).
BERT pre-training (nsp.py): NextSentenceSource (sentence pairs from the CPython docs, half of them random) and
BertPretraining (MaskedLM on the pair + next-sentence prediction; ModelConfig.next_sentence).

Long Range Arena, offline (lra.py): ListOpsSource (ListOps expressions drawn on demand, label = their value;
TaskConfig.tokenizer_type='word') and LanguageIdSource (text labelled by its file, e.g. Multi30K en vs de;
TaskConfig.tokenizer_type='byte': one id per UTF-8 byte, tokenizer.byte_model()).

Tokenizers of imported checkpoints (hf_tokenizer.py): load_tokenizer(path) reads an HF directory's tokenizer.json
(the `tokenizers` library) or SentencePiece model as an HFTokenizer, with this Tokenizer's interface.

Images (images.py): ImageClassification(image_size, num_channels, num_classes, augment) rows of image
[B, H, W, C] float32, label [B], weights [B], no tokenizer; DigitsSource (scikit-learn's 8x8 digits, offline) and
TfdsImageSource (mnist, cifar10, imagenet2012).

Speech (audio.py, the `speech` extra): SpeechToText(max_frames, targets_len, n_mels) rows of encoder_inputs
[B, F, n_mels] float32 log-mel frames (log_mel: librosa, 25 ms window, 10 ms hop) and encoder_segment_ids [B, F],
with Seq2Seq's decoder keys; SpeechCorpusSource (an espeak-ng corpus from launch/make_speech_corpus.py, offline)
and TfdsSpeechSource (librispeech).
"""

from t_jax.data.audio import SpeechCorpusSource, SpeechToText, TfdsSpeechSource, log_mel
from t_jax.data.classification import (
    AcceptabilitySource,
    Classification,
    TextToText,
    TextToTextSource,
    TfdsClassificationSource,
)
from t_jax.data.hf_tokenizer import HFTokenizer, load_tokenizer
from t_jax.data.images import DigitsSource, ImageClassification, TfdsImageSource
from t_jax.data.lra import LanguageIdSource, ListOpsSource
from t_jax.data.nsp import BertPretraining, NextSentenceSource
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
