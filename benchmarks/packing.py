"""Packing: non-padding tokens trained per second, packed vs unpacked, on short examples.

    python benchmarks/packing.py [--steps 20] [--json out.json]

The demo sentiment task has SST-2-like lengths (~30 input tokens, ~5 target tokens); with
128+32-token rows, unpacked batches are mostly padding. Same model, same step function; the
only difference is seqio's packing in the feature converter.
"""

import argparse
import json
import statistics

from common import numpy_batch, pipeline, timed, train_stepper

import seqio


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--model", default="mini")
  parser.add_argument("--mixture", default="demo_sentiment")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--json")
  args = parser.parse_args()
  results = {}
  for pack in (False, True):
    ds = pipeline(args.mixture, 128, 32, args.batch, pack)
    vocab = seqio.get_mixture_or_task(args.mixture).output_features["targets"].vocabulary
    step = train_stepper(args.model, (vocab.vocab_size + 127) // 128 * 128, num_tasks=1)
    it = ds.as_numpy_iterator()
    batches = [numpy_batch(next(it)) for _ in range(args.steps + 2)]
    for b in batches[:2]:
      timed(step, b)  # compile, warm up
    times, real_tokens = [], []
    for b in batches[2:]:
      t, _ = timed(step, b)
      times.append(t)
      real_tokens.append(int((b["encoder_input_tokens"] > 0).sum() + b["decoder_loss_weights"].sum()))
    median = statistics.median(times)
    tokens = statistics.mean(real_tokens)
    results["packed" if pack else "unpacked"] = {
        "median_step_s": median, "non_padding_tokens_per_step": tokens,
        "non_padding_tokens_per_s": tokens / median}
  for name, r in results.items():
    print(f"{name:<9} {r['median_step_s']:.4f} s/step  {r['non_padding_tokens_per_step']:8.0f} "
          f"real tokens/step  {r['non_padding_tokens_per_s']:10,.0f} real tokens/s")
  ratio = results["packed"]["non_padding_tokens_per_s"] / results["unpacked"]["non_padding_tokens_per_s"]
  print(f"packed / unpacked: {ratio:.2f}x non-padding tokens/s")
  results["ratio"] = ratio
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  from t5mix import host_memory
  host_memory.reexec_with_hugepages()  # measure the process the `t5mix` command runs in
  main()
