"""Input pipeline: examples/s the mixture pipeline produces vs what the train step consumes.

    python benchmarks/input_pipeline.py [--batches 50] [--windows 7] [--json out.json] [--breakdown]
        [--mixture NAME --tasks-dir F --module F --vocab V] [--cache-dir DIR]

By default at one shape (demo mixture, packed 128+32-token rows, batch 16, `mini` model).
The pipeline must stay well ahead of training, or the accelerator waits on the CPU.
The pipeline rate is the median over `--windows` windows of `--batches` batches each: one
window lasts well under a second, so a single one moves by ±20% with whatever else the
machine is doing.

--cache-dir DIR also measures the pipeline reading the caches `t5mix cache` wrote in DIR
(data.use_cached): the same mixture, only the steps after the cache run live. The real-data
mixture with T5's vocabulary, at the fine-tuning lengths:

    DEFS="--tasks-dir benchmarks/real_data/tasks.yaml --module benchmarks/real_data/wikitext.py
          --vocab ../shared/models/flan-t5-small-kd/spiece.model"
    t5mix cache real_supervised $DEFS --output-dir /tmp/real_cache --min-shards 16 \
        -- --direct_num_workers 2 --direct_running_mode multi_processing
    python benchmarks/input_pipeline.py --mixture real_supervised $DEFS \
        --inputs-length 384 --targets-length 64 --cache-dir /tmp/real_cache

--breakdown also prints where the pipeline's time goes: the examples/s of each task alone, of the
sampled mixture, then with seqio's feature converter unpacked and packed, counted inside tf.data.
"""

import argparse
import json
import statistics
import time

from common import numpy_batch, produce_rates, timed, train_stepper

import seqio
import tensorflow as tf

from t5mix import definitions, input_pipeline, mixing, registry
from t5mix import vocab as vocab_lib


def in_graph_rate(ds, examples_of=lambda ex: 1, n=20000):
  """Examples/s of an infinite dataset, counted inside tf.data (no per-element Python cost)."""
  it = iter(ds.map(examples_of).batch(1000).prefetch(2))
  next(it)
  count, t = 0, time.perf_counter()
  while count < n:
    count += int(tf.reduce_sum(next(it)))
  return count / (time.perf_counter() - t)


def breakdown(mixture, lengths):
  tasks = input_pipeline.leaf_tasks(mixture)
  rates = mixing.leaf_rates(seqio.get_mixture_or_task(mixture))
  for t in tasks:
    ds = t.get_dataset(lengths, split="train", shuffle=True, seed=0, num_epochs=None,
                       trim_output_features=True)
    print(f"  {t.name} alone (share {rates[t.name]:.2f}): {in_graph_rate(ds):,.0f} examples/s")
  sampled = seqio.get_mixture_or_task(mixture).get_dataset(lengths, split="train", shuffle=True,
                                                           seed=0, num_epochs=None)
  print(f"  the mixture, sampled: {in_graph_rate(sampled):,.0f} examples/s")
  for pack in (False, True):
    ds = input_pipeline.get_dataset(mixture, "train", lengths, seed=0, pack=pack)
    starts = lambda row: tf.reduce_sum(tf.cast((row["decoder_positions"] == 0)  # noqa: E731
                                               & (row["decoder_segment_ids"] > 0), tf.int32))
    print(f"  + feature converter, {'packed' if pack else 'unpacked'}: "
          f"{in_graph_rate(ds, starts if pack else lambda ex: 1, 5000 if pack else 20000):,.0f} examples/s")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=50)
  parser.add_argument("--windows", type=int, default=7)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--model", default="mini")
  parser.add_argument("--mixture", default="demo")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--inputs-length", type=int, default=128)
  parser.add_argument("--targets-length", type=int, default=32)
  parser.add_argument("--tasks-dir", action="append", default=[], help="as t5mix's")
  parser.add_argument("--module", action="append", default=[], help="as t5mix's")
  parser.add_argument("--vocab", help="the vocabulary every task is tokenised with, as t5mix's")
  parser.add_argument("--cache-dir", help="also measure reading the caches `t5mix cache` wrote here")
  parser.add_argument("--json")
  parser.add_argument("--breakdown", action="store_true", help="also time each stage of the pipeline")
  args = parser.parse_args()
  definitions.load(args.tasks_dir, args.module)
  with registry.run_vocabulary(vocab_lib.get_vocabulary(args.vocab) if args.vocab else None):
    measure(args)


def measure(args):
  lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
  modes = [False] + ([True] if args.cache_dir else [])
  if args.cache_dir:
    input_pipeline.use_caches(input_pipeline.leaf_tasks(args.mixture), [args.cache_dir])
  batched = {use_cached: input_pipeline.get_dataset(
      args.mixture, "train", lengths, seed=0, pack=True, use_cached=use_cached
  ).batch(args.batch, drop_remainder=True).prefetch(2) for use_cached in modes}
  produced = produce_rates(batched, args.windows, args.batches)  # uncached and cached alternate
  produce, rates, examples, first = produced[False]
  provider = seqio.get_mixture_or_task(args.mixture)
  vocab = provider.output_features["targets"].vocabulary
  step = train_stepper(args.model, (vocab.vocab_size + 127) // 128 * 128,
                       num_tasks=len(input_pipeline.leaf_tasks(args.mixture)))
  batch = numpy_batch(first)
  timed(step, batch)
  times = [timed(step, batch)[0] for _ in range(args.steps)]
  per_batch = examples / (args.batches * args.windows)
  consume = per_batch / statistics.median(times)
  shape = f"{args.inputs_length}+{args.targets_length}"
  print(f"pipeline produces {produce:,.0f} examples/s (median of {args.windows} windows, "
        f"{min(rates):,.0f}-{max(rates):,.0f}); the train step consumes {consume:,.0f} "
        f"examples/s ({per_batch:.1f} packed examples per batch of {args.batch} x {shape})")
  print(f"pipeline / train step: {produce / consume:.1f}x")
  result = {"produce_examples_per_s": produce, "consume_examples_per_s": consume,
            "ratio": produce / consume}
  if args.cache_dir:
    cached, cached_rates, _, _ = produced[True]
    print(f"reading the caches in {args.cache_dir}: {cached:,.0f} examples/s (median, "
          f"{min(cached_rates):,.0f}-{max(cached_rates):,.0f}), {cached / produce:.1f}x uncached")
    result["cached_produce_examples_per_s"] = cached
  if args.breakdown:
    print("where the pipeline's time goes (each stage with everything before it):")
    breakdown(args.mixture, lengths)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  from t5mix import host_memory
  host_memory.reexec_with_hugepages()  # measure the process the `t5mix` command runs in
  main()
