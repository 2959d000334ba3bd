"""From a task or mixture to batches of model features (tf.data, seqio feature converters).

The mixture is sampled here rather than by `seqio.Mixture.get_dataset` for one reason: every
example carries the id of its task (`task_ids`, one per target token, packed like the targets),
so training can report per-task loss and how many examples of each task it consumed. The rates
are seqio's (`Mixture.get_rate`), and sampling is tf.data's `sample_from_datasets`.

The whole pipeline is deterministic for a seed and made of checkpointable tf.data ops, so
`tf.train.Checkpoint(iterator=...)` saves and restores its position exactly.
"""

from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

from t5mix import mixing
from t5mix.registry import get_task_or_mixture

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
    from t5mix.errors import UserError
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
