"""Input pipeline: examples/s the mixture pipeline produces vs what the train step consumes.

    python benchmarks/input_pipeline.py [--batches 50] [--windows 7] [--json out.json] [--breakdown]

Both at the same shape (demo mixture, packed 128+32-token rows, batch 16, `mini` model).
The pipeline must stay well ahead of training, or the accelerator waits on the CPU.
The pipeline rate is the median over `--windows` windows of `--batches` batches each: one
window lasts well under a second, so a single one moves by ±20% with whatever else the
machine is doing.

--breakdown also prints where the pipeline's time goes: the examples/s of each task alone, of the
sampled mixture, then with seqio's feature converter unpacked and packed, counted inside tf.data.
"""

import argparse
import json
import statistics
import time

from common import numpy_batch, pipeline, timed, train_stepper

import seqio
import tensorflow as tf

from t5mix import input_pipeline, mixing


def in_graph_rate(ds, examples_of=lambda ex: 1, n=20000):
  """Examples/s of an infinite dataset, counted inside tf.data (no per-element Python cost)."""
  it = iter(ds.map(examples_of).batch(1000).prefetch(2))
  next(it)
  count, t = 0, time.perf_counter()
  while count < n:
    count += int(tf.reduce_sum(next(it)))
  return count / (time.perf_counter() - t)


def breakdown(mixture):
  lengths = {"inputs": 128, "targets": 32}
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
  parser.add_argument("--json")
  parser.add_argument("--breakdown", action="store_true", help="also time each stage of the pipeline")
  args = parser.parse_args()
  ds = pipeline(args.mixture, 128, 32, args.batch, pack=True)
  it = ds.as_numpy_iterator()
  first = next(it)  # builds the pipeline
  rates, examples = [], 0
  for _ in range(args.windows):
    window, t = 0, time.perf_counter()
    for _ in range(args.batches):
      b = next(it)
      window += int(((b["decoder_positions"] == 0) & (b["decoder_segment_ids"] > 0)).sum())
    rates.append(window / (time.perf_counter() - t))
    examples += window
  produce = statistics.median(rates)
  vocab = seqio.get_mixture_or_task(args.mixture).output_features["targets"].vocabulary
  n_tasks = len(seqio.get_mixture_or_task(args.mixture).tasks)
  step = train_stepper(args.model, (vocab.vocab_size + 127) // 128 * 128, num_tasks=n_tasks)
  batch = numpy_batch(first)
  timed(step, batch)
  times = [timed(step, batch)[0] for _ in range(args.steps)]
  per_batch = examples / (args.batches * args.windows)
  consume = per_batch / statistics.median(times)
  print(f"pipeline produces {produce:,.0f} examples/s (median of {args.windows} windows, "
        f"{min(rates):,.0f}-{max(rates):,.0f}); the train step consumes {consume:,.0f} "
        f"examples/s ({per_batch:.1f} packed examples per batch of {args.batch})")
  print(f"pipeline / train step: {produce / consume:.1f}x")
  if args.breakdown:
    print("where the pipeline's time goes (each stage with everything before it):")
    breakdown(args.mixture)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"produce_examples_per_s": produce, "consume_examples_per_s": consume,
                 "ratio": produce / consume}, f, indent=2)


if __name__ == "__main__":
  from t5mix import host_memory
  host_memory.reexec_with_hugepages()  # measure the process the `t5mix` command runs in
  main()
