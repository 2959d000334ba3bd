"""`t5mix cache`: the deterministic part of tasks' preprocessing, done once, offline, on Apache Beam.

seqio's offline cache, as t5x users make it with `seqio_cache_tasks`: every split of a task runs
through its steps before `seqio.CacheDatasetPlaceholder` (reading and formatting the records,
tokenising) in a Beam pipeline (DirectRunner on this machine; Dataflow, Flink or Spark on a
cluster) and is written in seqio's layout: DIR/TASK/{split}.tfrecord-NNNNN-of-MMMMM shards of
tf.Examples, info.{split}.json (features), stats.{split}.json (exact example and token counts)
and COMPLETED. Training with `data.use_cached` reads them (input_pipeline.use_caches) and runs
only the steps after the placeholder: trimming to the run's lengths and span corruption, whose
noise is drawn anew for every run and epoch.

The pipeline is seqio's (`seqio.beam_utils`: PreprocessTask, WriteExampleTfRecord, GetInfo,
GetStats, WriteJson), assembled per task as `seqio.scripts.cache_tasks_main.run_pipeline` does,
with two differences: Beam workers are fresh processes, so each registers the run's definitions
before reading a task (PreprocessTask's setup_fn; run_pipeline takes module names only), and
COMPLETED holds the task's fingerprint (input_pipeline.cache_fingerprint), so a cache made from
an older definition, data file or vocabulary is refused rather than read.

Apache Beam is the optional `cache` extra (pip install -e ".[cache]"): only this module imports
it, and only `t5mix cache` imports this module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Sequence

import seqio
import tensorflow as tf
from absl import logging as absl_logging

from t5mix import definitions, input_pipeline, registry
from t5mix import vocab as vocab_lib
from t5mix.errors import UserError

try:
  import apache_beam as beam
  from seqio import beam_utils
except ImportError as e:
  raise UserError(f"`t5mix cache` needs Apache Beam ({e.name} is not installed): "
                  "pip install -e \".[cache]\" && pip install --no-deps apache-beam==2.78.0 "
                  "(README, Scaling out: Beam's declared protobuf cap is not kept)") from None

RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner")
# seqio_cache_tasks' default: more shards shuffle better when read (files are interleaved).
MIN_SHARDS = 64


@dataclasses.dataclass(frozen=True)
class Definitions:
  """What registers the tasks, for workers to do as the command did: --tasks-dir files,
  --module names, --vocab, --tfds-data-dir (absolute paths)."""
  tasks_dir: tuple[str, ...] = ()
  modules: tuple[str, ...] = ()
  vocab: str | None = None
  tfds_data_dir: str | None = None

  def register(self) -> None:
    """Registers the built-in and the user's definitions (once per process)."""
    absl_logging.set_verbosity(absl_logging.ERROR)  # as the command: no per-example log lines
    registry.TFDS_DATA_DIR = self.tfds_data_dir or registry.TFDS_DATA_DIR
    definitions.load(list(self.tasks_dir), list(self.modules))
    if self.vocab:
      registry.RUN_VOCABULARY = vocab_lib.get_vocabulary(self.vocab)


def cache_tasks(names: Sequence[str], output_dir: str, defs: Definitions, *,
                runner: str = "DirectRunner", beam_options: Sequence[str] = (),
                overwrite: bool = False, min_shards: int = MIN_SHARDS, log=print) -> list[str]:
  """Caches the tasks of `names` (tasks or mixtures) under `output_dir`; returns the cache
  directories written. A task already cached there from its current definition is left as it
  is; one cached from another is an error unless `overwrite`."""
  if runner not in RUNNERS:
    raise UserError(f"--runner {runner!r} is not one of {', '.join(RUNNERS)}")
  if min_shards < 1:
    raise UserError(f"--min-shards must be at least 1, got {min_shards}")
  tasks = list({t.name: t for name in names for t in input_pipeline.leaf_tasks(name)}.values())
  todo = []
  for task in tasks:
    fingerprint = input_pipeline.cache_fingerprint(task)
    task_dir = os.path.join(output_dir, seqio.get_task_dir_from_name(task.name))
    if tf.io.gfile.exists(os.path.join(task_dir, input_pipeline.COMPLETED_FILE)) and not overwrite:
      changes = input_pipeline.cache_changes(input_pipeline.read_fingerprint(task_dir), fingerprint)
      if changes:
        raise UserError(f"task {task.name!r}: {task_dir} holds a cache of another definition "
                        f"({'; '.join(changes)}); pass --overwrite to replace it")
      log(f"{task.name}: up to date in {task_dir}")
      continue
    if tf.io.gfile.exists(task_dir):  # replaced, or what a failed run left
      tf.io.gfile.rmtree(task_dir)
    todo.append((task, task_dir, fingerprint))
  if not todo:
    return []
  options = beam.options.pipeline_options.PipelineOptions([f"--runner={runner}", *beam_options])
  tf.io.gfile.makedirs(output_dir)
  with beam.Pipeline(options=options) as pipeline:
    for task, task_dir, fingerprint in todo:
      _cache_task(pipeline, task, task_dir, fingerprint, defs, min_shards)
  for task, task_dir, _ in todo:
    counts = ", ".join(f"{split} {_stats(task_dir, split)['examples']:,}" for split in task.splits)
    log(f"{task.name}: cached in {task_dir} ({counts} examples)")
  return [task_dir for _, task_dir, _ in todo]


def _cache_task(pipeline, task: seqio.Task, task_dir: str, fingerprint: dict, defs: Definitions,
                min_shards: int) -> None:
  """Adds the steps that cache `task` to `pipeline`: cache_tasks_main.run_pipeline's, for one
  task, with a setup_fn that registers the definitions in each worker."""
  done = []
  for split in task.splits:
    label = re.sub(r"\W", "_", f"{task.name}_{split}")
    preprocess = beam_utils.PreprocessTask(task, split, setup_fn=defs.register,
                                           tfds_data_dir=defs.tfds_data_dir)
    num_shards = max(len(preprocess.shards), min_shards)
    # The reshuffle spreads examples over workers and shards (and shuffles them globally).
    examples = (pipeline | f"{label}_preprocess" >> preprocess
                | f"{label}_shuffle" >> beam.Reshuffle())
    done.append(examples | f"{label}_write" >> beam_utils.WriteExampleTfRecord(
        seqio.get_cached_tfrecord_prefix(task_dir, split), num_shards=num_shards))
    done.append(examples | f"{label}_info" >> beam_utils.GetInfo(num_shards)
                | f"{label}_write_info" >> beam_utils.WriteJson(
                    seqio.get_cached_info_path(task_dir, split)))
    done.append(examples | f"{label}_stats" >> beam_utils.GetStats(task.output_features)
                | f"{label}_write_stats" >> beam_utils.WriteJson(
                    seqio.get_cached_stats_path(task_dir, split)))
  label = re.sub(r"\W", "_", task.name)
  # COMPLETED, written once every split is: it holds the fingerprint that readers compare.
  _ = (done | f"{label}_all_written" >> beam.Flatten()
       | f"{label}_nothing" >> beam.Filter(lambda _: False)
       | f"{label}_completed" >> beam.io.textio.WriteToText(
           os.path.join(task_dir, input_pipeline.COMPLETED_FILE), num_shards=1,
           shard_name_template="", append_trailing_newlines=False,
           header=json.dumps(fingerprint, sort_keys=True)))


def _stats(task_dir: str, split: str) -> dict:
  with tf.io.gfile.GFile(seqio.get_cached_stats_path(task_dir, split)) as f:
    return json.load(f)
