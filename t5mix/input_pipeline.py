"""From a task or mixture to batches of model features (tf.data, seqio feature converters).

The mixture is sampled here rather than by `seqio.Mixture.get_dataset` for one reason: every
example carries the id of its task (`task_ids`, one per target token, packed like the targets),
so training can report per-task loss and how many examples of each task it consumed. The rates
are seqio's (`Mixture.get_rate`), and sampling is tf.data's `sample_from_datasets`.

The whole pipeline is deterministic for a seed and made of checkpointable tf.data ops, so
`tf.train.Checkpoint(iterator=...)` saves and restores its position exactly.

With `use_cached`, each task reads what `t5mix cache` (t5mix/cache.py) wrote: seqio's offline
cache of its steps before `seqio.CacheDatasetPlaceholder` (reading and formatting the data,
tokenising), so that only the steps after it (trimming, span corruption's noise) run live.
`use_caches` finds the caches and refuses a stale one: each cache records the fingerprint of the
task it was made from (`cache_fingerprint`), compared with the task's now.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Any, Mapping, Sequence

import seqio
import tensorflow as tf

from t5mix import mixing, registry, sources
from t5mix import vocab as vocab_lib
from t5mix.errors import UserError
from t5mix.registry import examples, get_task_or_mixture

TASK_IDS = "task_ids"


def leaf_tasks(name: str) -> list[seqio.Task]:
  provider = get_task_or_mixture(name)
  return [provider] if isinstance(provider, seqio.Task) else list(provider.tasks)


def feature_converter(architecture: str, pack: bool) -> seqio.FeatureConverter:
  """seqio's converter for the architecture, passing `task_ids` through (packed if packing)."""
  cls = seqio.PrefixLMFeatureConverter if architecture == "decoder_only" else seqio.EncDecFeatureConverter
  converter = cls(pack=pack)
  # seqio refuses pass-through features when packing, as it cannot know how to pack an arbitrary
  # feature. Task ids are one per (concatenated) target token, so they pack exactly like the
  # targets: seqio's own packing handles them once they are declared.
  converter._passthrough_features = {TASK_IDS: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
  return converter


def get_dataset(name: str, split: str, feature_lengths: Mapping[str, int], *, seed: int | None,
                shuffle: bool = True, pack: bool = True, num_epochs: int | None = None,
                shard_info: seqio.ShardInfo | None = None,
                architecture: str = "encoder_decoder", use_cached: bool = False) -> tf.data.Dataset:
  """Unbatched model features of task/mixture `name`; task ids are 1 + index in leaf_tasks.
  `use_cached`: read each task's cache (found and checked by `use_caches` first)."""
  provider = get_task_or_mixture(name)
  tasks = leaf_tasks(name)
  rates = mixing.leaf_rates(provider)
  lengths = dict(feature_lengths)
  datasets, weights = [], []
  for index, task in enumerate(tasks):
    if split not in task.splits:
      continue
    ds = task.get_dataset(lengths, split=split, shuffle=shuffle, seed=seed, shard_info=shard_info,
                          num_epochs=num_epochs, trim_output_features=True, use_cached=use_cached)
    datasets.append(ds.map(_tag(index + 1, architecture), num_parallel_calls=tf.data.AUTOTUNE))
    weights.append(rates[task.name])
  if not datasets:
    raise UserError(f"{name!r}: no task has a {split!r} split")
  if len(datasets) == 1:
    ds = datasets[0]
  else:
    # Each data shard (process) draws its own task sequence: with one seed for all, every shard
    # would pick the same task at the same position, and a global batch would hold k copies of
    # one shard's task mix instead of k independent draws.
    sample_seed = (seed if seed is not None else 0) + (shard_info.index if shard_info else 0)
    ds = tf.data.Dataset.sample_from_datasets(
        datasets, weights=weights, seed=sample_seed, stop_on_empty_dataset=num_epochs is None)
  task_lengths = {**lengths, TASK_IDS: _task_ids_length(lengths, architecture)}
  ds = feature_converter(architecture, pack)(ds, task_lengths)
  # seqio chains many small per-example maps (tokenise, trim, append EOS, tag, convert); fusing
  # them cuts tf.data's per-element overhead: +11% examples/s on the demo mixture
  # (benchmarks/input_pipeline.py, RESULTS.md). Same functions, same order: the same batches.
  options = tf.data.Options()
  options.experimental_optimization.map_fusion = True
  return ds.with_options(options)


def _task_ids_length(lengths, architecture):
  if architecture == "decoder_only":  # prefix LM: inputs and targets form one sequence
    return lengths["inputs"] + lengths["targets"]
  return lengths["targets"]


def _tag(task_id: int, architecture: str):
  def tag(ex):
    ex = {"inputs": ex["inputs"], "targets": ex["targets"]}
    n = tf.size(ex["targets"])
    if architecture == "decoder_only":
      n += tf.size(ex["inputs"])
    ex[TASK_IDS] = tf.fill([n], tf.constant(task_id, tf.int32))
    return ex
  return tag


# ---------------------------------------------------------------------------------------------
# Caches written by `t5mix cache`, in seqio's layout: DIR/TASK/{split}.tfrecord-*,
# info.{split}.json, stats.{split}.json, and COMPLETED, whose content is the task's fingerprint
# (written last, with the data: a cache is complete and fingerprinted, or neither).

COMPLETED_FILE = "COMPLETED"  # seqio's name: a task directory without it is not a cache
# TaskSpec fields that act after the cache (span corruption's noise, decoding, scoring) or say
# only where the definition was written: editing them leaves the cached tokens valid.
_NOT_CACHED_FIELDS = ("noise_density", "mean_noise_span_length", "metrics", "beam_size",
                      "length_penalty", "max_decode_length", "description", "base_dir", "origin",
                      "key_origins")


def cache_fingerprint(task: seqio.Task) -> dict[str, Any]:
  """What a task's cached examples are a function of, as JSON data: its definition (less
  _NOT_CACHED_FIELDS), its data (_split_data), the steps before the cache, and the vocabulary
  it tokenises with."""
  spec = _cacheable_spec(task)
  definition = {k: v for k, v in dataclasses.asdict(spec).items() if k not in _NOT_CACHED_FIELDS}
  files = {split: _split_data(spec, split) for split in spec.splits}
  steps = task.preprocessors[:next(i for i, p in enumerate(task.preprocessors)
                                   if isinstance(p, seqio.CacheDatasetPlaceholder))]
  vocab = task.output_features["targets"].vocabulary
  path = getattr(vocab, "sentencepiece_model_file", None)
  vocabulary = ({"sentencepiece": vocab_lib.file_hash(path), "extra_ids": vocab.extra_ids}
                if path is not None else {type(vocab).__name__: vocab.extra_ids})
  return json.loads(json.dumps({  # as read back from the file: lists, not tuples
      "definition": definition, "files": files, "vocabulary": vocabulary,
      "steps": [seqio.utils.function_name(p) for p in steps]}))


def _split_data(spec, split: str) -> list[str]:
  """What identifies a split's data: each file's content hash; for a glob, each matched file's
  name and size (hashing a streamed corpus would read all of it at every start); nothing for TFDS
  and HF datasets, whose name, version or revision are in the definition."""
  if spec.tfds or spec.source is not None:
    return []
  paths = spec._split_files(split)[0]
  if spec.streams(split):
    return [f"{os.path.basename(f)}:{os.path.getsize(f)}"
            for f in sources.list_files(paths[0], spec.where(f"splits.{split}"))]
  return [vocab_lib.file_hash(path) if os.path.isfile(path) else "missing" for path in paths]


def _cacheable_spec(task: seqio.Task):
  spec = getattr(task, "t5mix_spec", None)
  if spec is None or not task.supports_caching:
    raise UserError(f"task {task.name!r} is not defined through t5mix (a task file or "
                    "t5mix.add_task), so whether a cache of it is up to date cannot be known; "
                    "train it uncached")
  return spec


def cache_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
  """What differs between the fingerprint a cache was made with and a task's now, in words."""
  if not saved:
    return ["its fingerprint (it was not made by `t5mix cache`)"]
  old = saved.get("definition") or {}
  keys = sorted(k for k in set(old) | set(now["definition"]) if old.get(k) != now["definition"].get(k))
  changes = [f"definition key {', '.join(map(repr, keys))}"] if keys else []
  old = saved.get("files") or {}
  splits = sorted(s for s in set(old) | set(now["files"]) if old.get(s) != now["files"].get(s))
  changes += [f"data file of split {', '.join(map(repr, splits))}"] if splits else []
  changes += [what for what in ("vocabulary", "steps") if saved.get(what) != now[what]]
  return changes


def read_fingerprint(task_cache_dir: str) -> dict[str, Any]:
  """The fingerprint a cache was made with; {} for one without (seqio's own caches)."""
  with tf.io.gfile.GFile(os.path.join(task_cache_dir, COMPLETED_FILE)) as f:
    text = f.read()
  try:
    saved = json.loads(text)
  except ValueError:
    return {}
  return saved if isinstance(saved, dict) else {}


def use_caches(tasks: Sequence[seqio.Task], cache_dirs: Sequence[str]) -> None:
  """Registers `cache_dirs` with seqio, then checks that every task has a cache there made from
  the task as it is now (a UserError naming the task otherwise). A mixture's rates then count the
  cached examples (seqio.mixing_rate_num_examples reads a cached task's stats)."""
  if not cache_dirs:
    raise UserError("data.use_cached: no cache to read; pass --cache-dir DIR (or set "
                    "data.cache_dirs) where `t5mix cache` wrote one")
  seqio.add_global_cache_dirs(list(cache_dirs))
  for task in tasks:
    _cacheable_spec(task)
    if task.cache_dir is None:
      raise UserError(f"task {task.name!r} has no cache in {', '.join(cache_dirs)}; make it with "
                      f"`t5mix cache {task.name} --output-dir {cache_dirs[0]}`")
    changes = cache_changes(read_fingerprint(task.cache_dir), cache_fingerprint(task))
    if changes:
      output_dir = task.cache_dir[:-len(seqio.get_task_dir_from_name(task.name))].rstrip("/")
      vocab = f" --vocab {vocab_lib.describe(registry.RUN_VOCABULARY)}" if registry.RUN_VOCABULARY else ""
      raise UserError(f"task {task.name!r}: the cache {task.cache_dir} is stale (it differs in "
                      f"{'; '.join(changes)}); remake it with `t5mix cache {task.name} "
                      f"--output-dir {output_dir}{vocab} --overwrite`")


# ---------------------------------------------------------------------------------------------
# Truncation: how many examples the lengths cut (reported by `show`, `train` and `eval`).

# `show` and `train` count at most this many examples per task (the first ones of the split), so
# that a large task does not hold up the start of training: 3,000 demo QA contexts take 0.3 s.
TRUNCATION_COUNT_LIMIT = 10_000


@dataclasses.dataclass
class Truncation:
  """How many of the first `counted` (of `total`) examples of a task's split are longer than
  `lengths` (tokens with EOS, as the task makes them: seqio cuts them to length - 1, then EOS)."""
  task: str
  split: str
  lengths: dict[str, int]
  counted: int
  total: int
  inputs: int               # examples whose inputs are cut
  targets: int              # examples whose targets are cut
  answers_cut: int | None   # QA: the gold answer is in the inputs but not in the part kept

  def describe(self) -> str:
    which = (f"all {self.counted:,}" if self.counted == self.total
             else f"the first {self.counted:,} of {self.total:,}")
    share = lambda n: f"{n:,} ({100 * n / max(self.counted, 1):.1f}%)"  # noqa: E731
    text = (f"truncation of {self.task} ({which} {self.split} examples): {share(self.inputs)} "
            f"have inputs over {self.lengths['inputs']} tokens, {share(self.targets)} targets "
            f"over {self.lengths['targets']} tokens")
    if self.answers_cut is not None:
      text += f"; for {share(self.answers_cut)} the answer lies past the cut"
    return text


def count_truncation(task: seqio.Task, split: str, lengths: Mapping[str, int],
                     limit: int | None = TRUNCATION_COUNT_LIMIT) -> Truncation | None:
  """Counts the examples `lengths` cut among the first `limit` (None: all) of the split.

  None where truncation does not apply or cannot be known before training: span corruption
  (its text is cut into chunks that fit by construction) and tasks not defined through t5mix
  (plain seqio tasks, whose preprocessors may need the lengths to run).
  """
  spec = getattr(task, "t5mix_spec", None)
  if spec is None or spec.kind == "text" or split not in task.splits:
    return None
  # (a streamed split's examples are an iterator: read only the first `limit`)
  counted = list(itertools.islice(examples(spec, split), limit))
  inputs_vocab = task.output_features["inputs"].vocabulary
  targets_vocab = task.output_features["targets"].vocabulary
  kept = lengths["inputs"] - 1  # append_eos_after_trim keeps length - 1 tokens, then EOS
  inputs = targets = answers_cut = 0
  for row in counted:
    ids = inputs_vocab.encode(row["inputs"])
    if len(ids) > kept:
      inputs += 1
      if spec.kind == "qa":
        answers_cut += _answer_past_cut(inputs_vocab, ids, kept, json.loads(row["answers"]))
    targets += len(targets_vocab.encode(row["targets"])) > lengths["targets"] - 1
  return Truncation(task.name, split, dict(lengths), len(counted), task.num_input_examples(split),
                    inputs, targets, answers_cut if spec.kind == "qa" else None)


def _answer_past_cut(vocab: seqio.Vocabulary, ids: list[int], kept: int,
                     answers: list[str]) -> bool:
  """Whether a gold answer is in the inputs but none is in their first `kept` tokens. Compared
  as text decoded from tokens on every side, so that the vocabulary's normalisation (and its
  unknown pieces) applies alike."""
  answers = [vocab.decode(vocab.encode(a)) for a in answers]
  whole, part = vocab.decode(ids), vocab.decode(ids[:kept])
  return any(a in whole for a in answers) and not any(a in part for a in answers)
