"""From a task or mixture to batches of model features (tf.data, seqio feature converters).

The mixture is sampled here rather than by `seqio.Mixture.get_dataset` for one reason: every
example carries the id of its task (`task_ids`, one per target token, packed like the targets),
so training can report per-task loss and how many examples of each task it consumed. The rates
are seqio's (`Mixture.get_rate`), and sampling is tf.data's `sample_from_datasets`.

The whole pipeline is deterministic for a seed and made of checkpointable tf.data ops, so
`tf.train.Checkpoint(iterator=...)` saves and restores its position exactly.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping

import seqio
import tensorflow as tf

from t5mix import mixing
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
                architecture: str = "encoder_decoder") -> tf.data.Dataset:
  """Unbatched model features of task/mixture `name`; task ids are 1 + index in leaf_tasks."""
  provider = get_task_or_mixture(name)
  tasks = leaf_tasks(name)
  rates = mixing.leaf_rates(provider)
  lengths = dict(feature_lengths)
  datasets, weights = [], []
  for index, task in enumerate(tasks):
    if split not in task.splits:
      continue
    ds = task.get_dataset(lengths, split=split, shuffle=shuffle, seed=seed, shard_info=shard_info,
                          num_epochs=num_epochs, trim_output_features=True)
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
  rows = examples(spec, split)
  counted = rows[:limit] if limit is not None else rows
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
  return Truncation(task.name, split, dict(lengths), len(counted), len(rows), inputs, targets,
                    answers_cut if spec.kind == "qa" else None)


def _answer_past_cut(vocab: seqio.Vocabulary, ids: list[int], kept: int,
                     answers: list[str]) -> bool:
  """Whether a gold answer is in the inputs but none is in their first `kept` tokens. Compared
  as text decoded from tokens on every side, so that the vocabulary's normalisation (and its
  unknown pieces) applies alike."""
  answers = [vocab.decode(vocab.encode(a)) for a in answers]
  whole, part = vocab.decode(ids), vocab.decode(ids[:kept])
  return any(a in whole for a in answers) and not any(a in part for a in answers)
