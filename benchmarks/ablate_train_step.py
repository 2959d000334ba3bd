"""The train step with each CPU optimisation of t5mix/model.py undone, at train_throughput's shape.

    python benchmarks/ablate_train_step.py [--steps 20] [--xla-option NAME=VALUE ...] [--json FILE] [--tiny]

Variants: as shipped; the position-bias gradient left to autodiff (no `_add_position_bias` VJP);
projections as N-D `tensordot`s instead of `_dense`'s flattened 2-D matmuls; and, for each
--xla-option, the shipped step compiled with that XLA debug option (e.g.
`xla_cpu_copy_insertion_use_region_analysis=true`): XLA_FLAGS is read once per process, per-compile
options let one process time them against each other.
Each variant is traced and compiled with its functions patched in (2 warm-up steps), then the
variants are timed interleaved, one step of each in turn, so that a slow spell on a shared machine
hits them all alike; median seconds per step.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax.numpy as jnp  # noqa: E402

import train_throughput as tt  # noqa: E402  (sets the environment, puts t5mix on the path)
from t5mix import model as model_lib  # noqa: E402


def tensordot_dense(x, w, in_dims=1, out_dtype=None):
  return jnp.tensordot(x, w, in_dims, preferred_element_type=out_dtype)


def option_value(text: str):
  """'true' -> True, '3' -> 3, anything else stays a string (an enum's name, for instance)."""
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return int(text)
  except ValueError:
    return text


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--xla-option", action="append", default=[], metavar="NAME=VALUE",
                      help="also time the shipped step compiled with this XLA debug option")
  parser.add_argument("--json", help="write each variant's median s/step here")
  parser.add_argument("--tiny", action="store_true", help="a toy model (for the smoke test)")
  args = parser.parse_args()
  c = model_lib.T5Config(**(tt.TINY_SHAPE if args.tiny else tt.SHAPE))
  enc, dec_in, tgt = tt.batch_arrays(16, 128, 32, c.vocab_size)
  shipped = (model_lib._dense, model_lib._add_position_bias)
  plain_bias = lambda logits, b: logits + b  # noqa: E731
  variants = {"as shipped": shipped, "autodiff bias gradient": (shipped[0], plain_bias),
              "N-D tensordot projections": (tensordot_dense, shipped[1])}
  steps = {}
  for name, (model_lib._dense, model_lib._add_position_bias) in variants.items():
    steps[name] = tt.t5mix_runner(c, enc, dec_in, tgt)
    steps[name]()  # traced (with this variant's functions) and compiled here
    steps[name]()
  model_lib._dense, model_lib._add_position_bias = shipped
  for option in args.xla_option:
    name, eq, value = option.partition("=")
    if not eq or not name.startswith("xla_"):
      parser.error(f"--xla-option {option!r}: expected NAME=VALUE with an XLA option name (xla_...)")
    steps[option] = tt.t5mix_runner(c, enc, dec_in, tgt, {name: option_value(value)})
    steps[option]()
    steps[option]()
  times = tt.interleaved_times(steps, args.steps)
  medians = {name: statistics.median(ts) for name, ts in times.items()}
  width = max(28, *map(len, medians))
  for name, median in medians.items():
    print(f"{name:<{width}} {median:.3f} s/step", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"steps": args.steps, "median_step_s": medians}, f, indent=2)

if __name__ == "__main__":
  from t5mix import host_memory
  host_memory.reexec_with_hugepages()  # measure the process the `t5mix` command runs in
  main()
