"""T5 span corruption ("random spans" denoising), as seqio preprocessors.

seqio ships no span-corruption preprocessor (the `t5` package does, but t5mix does not depend on
`t5`), so the objective of the T5 paper (§3.1.4) is written here by hand, from the paper's
description, with vectorised TensorFlow ops and stateless random ops only.

The objective: take a chunk of raw tokens, mark about `noise_density` of them as noise, grouped
into spans of mean length `mean_noise_span_length`; the inputs are the chunk with each noise span
replaced by one sentinel token, the targets are, for each noise span in order, its sentinel
followed by the span's tokens:

    chunk:    The  cute  dog  walks  in  the  park
    inputs:   The  <extra_id_0>  walks  in  <extra_id_1>  park  </s>
    targets:  <extra_id_0>  cute  dog  <extra_id_1>  the  </s>

The loss is taken on the targets only, i.e. only on the masked spans.

Data convention
---------------
A text source yields raw text; `text_to_targets` puts it under the feature "targets" (as T5 does
for unsupervised tasks: the text is what the model has to reproduce). No "inputs" feature is
created up front (it would only be tokenized and thrown away): `span_corruption` reads the
tokenized "targets" of each document, ignores any "inputs" already there, and returns exactly
two features, `inputs` (named by `input_feature_key`) and "targets", both 1-D int32 token ids
without EOS. Every other feature (e.g. the "targets_pretokenized" copy made by `tokenize`) is
dropped, since it would no longer describe the example.

Sentinels follow the T5 convention: the i-th noise span of a chunk (i = 0, 1, ...) is replaced by
the id `vocab_size - 1 - i`, which is `<extra_id_i>` of a `seqio.SentencePieceVocabulary(...,
extra_ids=100)` (with seqio's default `reverse_extra_ids=True`; the piece is spelled
`▁<extra_id_i>`) and the i-th extra id of a `seqio.ByteVocabulary(extra_ids=100)`. A chunk may
not have more noise spans than the vocabulary has extra ids (checked up front).

Recipe
------
    import functools
    import seqio
    from t5mix import span_corruption as sc

    vocab = seqio.SentencePieceVocabulary("/path/spm.model", extra_ids=100)
    # or: vocab = seqio.ByteVocabulary(extra_ids=100)
    output_features = {
        "inputs": seqio.Feature(vocab, add_eos=True),
        "targets": seqio.Feature(vocab, add_eos=True),
    }
    task = seqio.Task(
        "my_corpus_span_corruption",
        source=seqio.TextLineDataSource({"train": "/data/corpus.txt"}),  # or any text source
        preprocessors=[
            sc.text_to_targets,            # or functools.partial(sc.text_to_targets, text_key="body")
            seqio.preprocessors.tokenize,
            sc.span_corruption,            # or functools.partial(sc.span_corruption, noise_density=...)
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=output_features,
    )
    _, targets_length = sc.random_spans_helper(512)          # 114
    ds = task.get_dataset(sequence_length={"inputs": 512, "targets": targets_length},
                          split="train", shuffle=True, seed=0)

`sequence_length["targets"]` may be larger than the helper's `targets_length` (e.g. one length
shared by a mixture) but not smaller: that would cut masked spans, so it raises `UserError`.
`span_corruption` needs `sequence_length`, so it must come after any
`seqio.CacheDatasetPlaceholder` (seqio gives no sequence_length to pre-cache steps).

Chunking
--------
Each document's tokens are cut into consecutive chunks of `tokens_length` tokens, where
`tokens_length, _ = random_spans_helper(sequence_length[input_feature_key], ...)`; a full chunk
becomes inputs of exactly `sequence_length[input_feature_key]` tokens after `append_eos_after_trim`
(no padding, no truncation) and targets of at most the helper's `targets_length` tokens. The last,
shorter chunk of a document is kept (it is real text; its example is simply shorter and padded
later) unless it has fewer than 2 tokens: a chunk needs at least one noise and one non-noise token
to be corrupted, so 1-token tails and empty documents are dropped. Documents are not concatenated
with each other, so a chunk never straddles two documents.

Randomness and determinism
--------------------------
Documents are processed `CORRUPT_BATCH` at a time: each batch is chunked and its noise masks
drawn by a few vectorised tensor ops, then split back into one example per chunk, in order. The
masks are drawn with `tf.random.stateless_*` ops from a per-batch seed handed out by
`seqio.map_over_dataset(num_seeds=1)`. Under `Task.get_dataset(..., seed=s)` (which runs the
preprocessors inside `seqio.utils.map_seed_manager(s)`), the output is a deterministic function of
`s`, and the per-batch seeds come from a `tf.data.Dataset.random` stream, so the pipeline holds
no random-op state and a tf.data iterator over it (batching included) can be checkpointed with
`tf.train.Checkpoint(iterator=...)` and restored. With `seed=None` the masks are random.
"""

from typing import Mapping, Optional, Tuple

import seqio
import tensorflow as tf

from t5mix.errors import UserError

# Chunks shorter than this cannot hold one noise and one non-noise token, and are dropped.
MIN_CHUNK_TOKENS = 2
# Documents chunked and corrupted together by one batch of tensor ops.
CORRUPT_BATCH = 64


# ----------------------------------------------------------------------------------------------
# Length arithmetic (pure Python; mirrored exactly, in float64, by `_noise_counts_tf`).
# ----------------------------------------------------------------------------------------------


def _check_noise_params(noise_density, mean_noise_span_length):
  if not 0.0 < noise_density < 1.0:
    raise UserError(f"span corruption: noise_density must be in (0, 1), got {noise_density!r}")
  if not mean_noise_span_length >= 1.0:
    raise UserError(
        f"span corruption: mean_noise_span_length must be >= 1, got {mean_noise_span_length!r}")


def noise_counts(length: int, noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0) -> Tuple[int, int]:
  """(num_noise_tokens, num_noise_spans) for a chunk of `length` >= 2 tokens.

  num_noise_tokens = round(length * noise_density), kept in [1, length - 1];
  num_noise_spans = round(num_noise_tokens / mean_noise_span_length), kept in
  [1, min(num_noise_tokens, num_nonnoise_tokens)] (each span, noise or not, has >= 1 token).
  Rounding is half-to-even on float64, exactly as `tf.round` in the TF version.
  """
  if length < MIN_CHUNK_TOKENS:
    raise ValueError(f"a chunk needs at least {MIN_CHUNK_TOKENS} tokens, got {length}")
  num_noise = min(max(round(float(length) * float(noise_density)), 1), length - 1)
  num_spans = round(float(num_noise) / float(mean_noise_span_length))
  num_spans = min(max(num_spans, 1), num_noise, length - num_noise)
  return num_noise, num_spans


def _corrupted_lengths(tokens_length, noise_density, mean_noise_span_length,
                       extra_tokens_per_span_inputs, extra_tokens_per_span_targets):
  """(inputs_length, targets_length), EOS included, produced from `tokens_length` raw tokens."""
  num_noise, num_spans = noise_counts(tokens_length, noise_density, mean_noise_span_length)
  inputs_length = (tokens_length - num_noise) + num_spans * extra_tokens_per_span_inputs + 1
  targets_length = num_noise + num_spans * extra_tokens_per_span_targets + 1
  return inputs_length, targets_length


def random_spans_helper(inputs_length: int,
                        noise_density: float = 0.15,
                        mean_noise_span_length: float = 3.0,
                        extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1) -> Tuple[int, int]:
  """How many raw tokens to corrupt so the inputs are exactly `inputs_length` long.

  Returns `(tokens_length, targets_length)`. From n raw tokens, with
  N = round(n * noise_density) noise tokens and S = round(N / mean_noise_span_length) spans
  (see `noise_counts`), span corruption produces
      inputs:  (n - N) non-noise tokens + S * extra_tokens_per_span_inputs sentinels + 1 EOS
      targets:  N noise tokens       + S * extra_tokens_per_span_targets sentinels + 1 EOS.
  The inputs length f(n) never decreases with n, so we take the largest n with
  f(n) <= inputs_length. With one sentinel per span, f grows by 0 or 1 per extra raw token
  (one more token is either non-noise (+1) or noise, which may add a span (+0 or +1)), so
  f(tokens_length) == inputs_length exactly: full chunks need no padding.
  `targets_length` is the matching targets length (EOS included); shorter chunks give
  targets no longer than that.

  E.g. inputs_length=512 (T5's setting) -> (568, 114): 568 tokens, 85 noise in 28 spans,
  inputs 483 + 28 + 1 = 512, targets 85 + 28 + 1 = 114.
  """
  _check_noise_params(noise_density, mean_noise_span_length)
  args = (noise_density, mean_noise_span_length, extra_tokens_per_span_inputs,
          extra_tokens_per_span_targets)
  if inputs_length < _corrupted_lengths(MIN_CHUNK_TOKENS, *args)[0]:
    raise UserError(
        f"span corruption: sequence length {inputs_length} for the inputs is too short; it "
        f"must be at least {_corrupted_lengths(MIN_CHUNK_TOKENS, *args)[0]}")
  # A linear scan: a few thousand cheap steps even for long sequences, and obviously right.
  n = MIN_CHUNK_TOKENS
  while _corrupted_lengths(n + 1, *args)[0] <= inputs_length:
    n += 1
  return n, _corrupted_lengths(n, *args)[1]


# ----------------------------------------------------------------------------------------------
# Noise mask (TensorFlow, stateless).
# ----------------------------------------------------------------------------------------------


def _noise_counts_tf(length, noise_density, mean_noise_span_length):
  """TF twin of `noise_counts` for int32 `length` >= 2, elementwise (same float64 rounding)."""
  num_noise = tf.cast(tf.round(tf.cast(length, tf.float64) * float(noise_density)), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = tf.cast(
      tf.round(tf.cast(num_noise, tf.float64) / float(mean_noise_span_length)), tf.int32)
  num_spans = tf.maximum(num_spans, 1)
  num_spans = tf.minimum(num_spans, tf.minimum(num_noise, length - num_noise))
  return num_noise, num_spans


def _random_partitions(totals, num_parts, width, seed):
  """Part index [B, width] of each of the first totals[i] slots of row i: a uniformly random
  partition of totals[i] slots into num_parts[i] consecutive, non-empty parts.

  A partition is a choice of num_parts - 1 distinct cut points among the total - 1 gaps between
  slots; taking the gaps whose iid uniform scores rank among the num_parts - 1 largest of the row's
  valid gaps picks such a subset uniformly at random. Slots at or beyond totals[i] get garbage
  part indices (callers mask them). Needs 1 <= num_parts <= totals.
  """
  gaps = tf.range(width - 1)
  scores = tf.random.stateless_uniform([tf.size(totals), width - 1], seed=seed)
  # Invalid gaps (beyond the row's total - 1) score -1, below every valid one.
  scores = tf.where(gaps[None, :] < totals[:, None] - 1, scores, -1.0)
  order = tf.argsort(scores, axis=1, direction="DESCENDING", stable=True)
  rank = tf.argsort(order, axis=1, stable=True)  # the inverse permutation: each gap's rank
  cut = tf.cast(rank < num_parts[:, None] - 1, tf.int32)
  # The slot after gap g starts a new part if g is a cut: slot j's part = cuts among gaps < j.
  return tf.pad(tf.cumsum(cut, axis=1), [[0, 0], [1, 0]])


def random_spans_noise_masks(lengths, width, seed, noise_density: float = 0.15,
                             mean_noise_span_length: float = 3.0) -> tf.Tensor:
  """Boolean [B, width] masks, True on noise tokens; row i is a chunk of lengths[i] >= 2 tokens
  (positions from lengths[i] on are False).

  Each chunk is split into 2*S alternating spans, non-noise first: non-noise, noise, non-noise,
  noise, ... (so it always ends on a noise span), where its N noise tokens and its length - N
  non-noise tokens are each randomly partitioned into S positive parts (N, S from
  `noise_counts`). `seed` is a stateless-op seed (shape [2] integer tensor).

  Vectorised over the batch, so the per-chunk cost is a few tensor ops on a batch rather than a
  few dozen small ops per chunk: interleaving the two partitions is a stable sort of the slots by
  (part, non-noise before noise).
  """
  lengths = tf.convert_to_tensor(lengths, tf.int32)
  num_noise, num_spans = _noise_counts_tf(lengths, noise_density, mean_noise_span_length)
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
  nonnoise_part = _random_partitions(lengths - num_noise, num_spans, width, seeds[0])
  noise_part = _random_partitions(num_noise, num_spans, width, seeds[1])
  slot = tf.range(width)[None, :]
  beyond = 4 * width  # sorts after every real key (parts < width)
  keys = tf.concat([tf.where(slot < (lengths - num_noise)[:, None], 2 * nonnoise_part, beyond),
                    tf.where(slot < num_noise[:, None], 2 * noise_part + 1, beyond)], axis=1)
  # Position p of the chunk holds the p-th slot in key order; it is noise if that slot came from
  # the noise half.
  order = tf.argsort(keys, axis=1, stable=True)[:, :width]
  return (order >= width) & (slot < lengths[:, None])


def random_spans_noise_mask(length, seed, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tf.Tensor:
  """Boolean [length] mask of one chunk of `length` >= 2 tokens (`random_spans_noise_masks`)."""
  length = tf.convert_to_tensor(length, tf.int32)
  return random_spans_noise_masks(length[None], length, seed, noise_density,
                                  mean_noise_span_length)[0]


def corrupt_spans_batch(tokens: tf.Tensor, lengths: tf.Tensor, noise_mask: tf.Tensor,
                        vocab_size: int) -> Tuple[tf.RaggedTensor, tf.RaggedTensor]:
  """(inputs, targets), ragged [B, None], of chunks tokens [B, W] (row i: its first lengths[i]
  tokens) with noise masks [B, W]; the sentinel of span i is vocab_size-1-i.

  Every token becomes 1 or 2 slots: [sentinel?, token]. The sentinel slot exists on the first
  token of each noise span; inputs keep the sentinel slots and the non-noise tokens, targets keep
  the sentinel slots and the noise tokens.
  """
  tokens = tf.convert_to_tensor(tokens)
  noise_mask = tf.convert_to_tensor(noise_mask, tf.bool)
  valid = tf.range(tf.shape(tokens)[1])[None, :] < lengths[:, None]
  previous_is_noise = tf.pad(noise_mask[:, :-1], [[0, 0], [1, 0]])
  span_start = noise_mask & ~previous_is_noise
  span_index = tf.cumsum(tf.cast(span_start, tokens.dtype), axis=1) - 1
  sentinels = tf.cast(vocab_size - 1, tokens.dtype) - span_index
  interleave = lambda a, b: tf.reshape(tf.stack([a, b], axis=2), [tf.shape(a)[0], -1])  # noqa: E731
  slots = interleave(sentinels, tokens)
  inputs = tf.ragged.boolean_mask(slots, interleave(span_start, ~noise_mask & valid))
  targets = tf.ragged.boolean_mask(slots, interleave(span_start, noise_mask))
  return inputs, targets


def corrupt_spans(tokens: tf.Tensor, noise_mask: tf.Tensor,
                  vocab_size: int) -> Tuple[tf.Tensor, tf.Tensor]:
  """(inputs, targets) of one chunk given its noise mask (`corrupt_spans_batch`)."""
  tokens = tf.convert_to_tensor(tokens)
  inputs, targets = corrupt_spans_batch(tokens[None], tf.size(tokens)[None], noise_mask[None],
                                        vocab_size)
  return inputs[0], targets[0]


# ----------------------------------------------------------------------------------------------
# Preprocessors.
# ----------------------------------------------------------------------------------------------


@seqio.map_over_dataset
def text_to_targets(x, text_key: str = "text"):
  """Text source -> {"targets": text}, the input convention of `span_corruption`.

  Accepts either a scalar string element (e.g. `seqio.TextLineDataSource`) or a dict holding the
  text under `text_key` (e.g. TFDS / `seqio.FunctionDataSource` examples); other features dropped.
  """
  if isinstance(x, Mapping):
    if text_key not in x:
      raise UserError(
          f"text_to_targets: the source has no feature {text_key!r} "
          f"(it has: {', '.join(sorted(x)) or 'none'})")
    text = x[text_key]
  else:
    text = x
  text = tf.convert_to_tensor(text)
  if text.dtype != tf.string or text.shape.rank not in (0, None):
    raise UserError(
        f"text_to_targets: feature {text_key!r} must be a scalar string, got "
        f"{text.dtype.name} of shape {text.shape}")
  return {"targets": text}


def _chunk_rows(docs: tf.RaggedTensor, chunk_length: int) -> Tuple[tf.Tensor, tf.Tensor]:
  """Documents ragged [B, None] -> (rows [R, chunk_length], lengths [R]): every document cut into
  consecutive chunks of `chunk_length` tokens (zero-padded), tail chunks kept if they have at
  least MIN_CHUNK_TOKENS tokens, in document order."""
  doc_lengths = docs.row_lengths()
  rows_per_doc = (doc_lengths + chunk_length - 1) // chunk_length
  first_row = tf.cumsum(rows_per_doc, exclusive=True)
  position = tf.ragged.range(doc_lengths).flat_values
  row = tf.gather(first_row, docs.value_rowids()) + position // chunk_length
  chunks = tf.RaggedTensor.from_value_rowids(docs.flat_values, row,
                                             nrows=tf.reduce_sum(rows_per_doc))
  lengths = tf.cast(chunks.row_lengths(), tf.int32)
  keep = lengths >= MIN_CHUNK_TOKENS
  rows = chunks.to_tensor(shape=[None, chunk_length])
  return tf.boolean_mask(rows, keep), tf.boolean_mask(lengths, keep)


def span_corruption(dataset: tf.data.Dataset,
                    sequence_length: Optional[Mapping[str, int]],
                    output_features: Mapping[str, seqio.Feature],
                    noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0,
                    input_feature_key: str = "inputs") -> tf.data.Dataset:
  """T5 span corruption: tokenized {"targets": doc} -> {input_feature_key: ..., "targets": ...}.

  Put it after `seqio.preprocessors.tokenize` and before `seqio.preprocessors.append_eos[_after_trim]`
  (see the module docstring). Documents are cut into chunks of
  `random_spans_helper(sequence_length[input_feature_key], noise_density,
  mean_noise_span_length)[0]` tokens, and each chunk is corrupted with a fresh random noise mask.
  Sentinels are taken from `output_features[input_feature_key].vocabulary` (which must have
  enough extra ids, and be the vocabulary of "targets" too).
  """
  _check_noise_params(noise_density, mean_noise_span_length)
  if input_feature_key == "targets":
    raise UserError("span_corruption: input_feature_key cannot be 'targets'")
  if not sequence_length or sequence_length.get(input_feature_key) is None:
    raise UserError(
        f"span_corruption needs sequence_length[{input_feature_key!r}] (it sets the chunk size); "
        "call get_dataset with a sequence_length, and put span_corruption after any "
        "CacheDatasetPlaceholder")
  for key in (input_feature_key, "targets"):
    if key not in output_features:
      raise UserError(f"span_corruption: the task has no output feature {key!r}")
  vocabulary = output_features[input_feature_key].vocabulary
  if output_features["targets"].vocabulary != vocabulary:
    raise UserError(
        f"span_corruption: output features {input_feature_key!r} and 'targets' must share one "
        "vocabulary (the targets tokens are copied into the inputs)")

  inputs_length = sequence_length[input_feature_key]
  tokens_length, targets_length = random_spans_helper(inputs_length, noise_density,
                                                      mean_noise_span_length)
  max_spans = noise_counts(tokens_length, noise_density, mean_noise_span_length)[1]
  extra_ids = getattr(vocabulary, "extra_ids", 0) or 0
  if max_spans > extra_ids:
    raise UserError(
        f"span_corruption: chunks of {tokens_length} tokens have up to {max_spans} noise spans, "
        f"but the vocabulary of {input_feature_key!r} has only {extra_ids} extra ids for "
        "sentinels; use a vocabulary with more extra_ids or a shorter sequence length")
  requested_targets = sequence_length.get("targets")
  if requested_targets is not None and requested_targets < targets_length:
    raise UserError(
        f"span_corruption: sequence_length['targets']={requested_targets} would truncate the "
        f"masked spans; inputs length {inputs_length} needs targets length {targets_length} "
        "(see random_spans_helper)")
  vocab_size = vocabulary.vocab_size

  spec = dataset.element_spec
  if not isinstance(spec, Mapping) or "targets" not in spec or spec["targets"].shape.rank != 1:
    raise UserError("span_corruption: feature 'targets' must be 1-D token ids; put "
                    "span_corruption after seqio.preprocessors.tokenize")

  # Documents are chunked and corrupted CORRUPT_BATCH at a time (one seed per batch), then split
  # into examples again: the same chunks in the same order, for a fraction of the per-example
  # cost of small tf.data ops (benchmarks/RESULTS.md).
  @seqio.map_over_dataset(num_seeds=1)
  def corrupt(docs, seed):
    docs = tf.RaggedTensor.from_tensor(docs["tokens"], lengths=docs["length"])
    rows, lengths = _chunk_rows(docs, tokens_length)
    mask = random_spans_noise_masks(lengths, tokens_length, seed, noise_density,
                                    mean_noise_span_length)
    inputs, targets = corrupt_spans_batch(rows, lengths, mask, vocab_size)
    return {input_feature_key: inputs, "targets": targets}

  @seqio.map_over_dataset
  def as_dense(x):  # unbatched ragged rows are plain 1-D tensors; say so in the element spec
    return {key: tf.identity(value) for key, value in x.items()}

  # (padded_batch with the lengths costs less per document than ragged_batch)
  docs = dataset.map(lambda x: {"tokens": x["targets"], "length": tf.size(x["targets"])},
                     num_parallel_calls=tf.data.AUTOTUNE).padded_batch(CORRUPT_BATCH)
  return as_dense(corrupt(docs).unbatch())
