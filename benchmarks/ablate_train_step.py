"""The train step with each CPU optimisation of t5mix/model.py undone, at train_throughput's shape.

    python benchmarks/ablate_train_step.py [--steps 20]

Variants: as shipped; the position-bias gradient left to autodiff (no `_add_position_bias` VJP);
projections as N-D `tensordot`s instead of `_dense`'s flattened 2-D matmuls.
Each variant is traced and compiled with its functions patched in (2 warm-up steps), then the
variants are timed interleaved, one step of each in turn, so that a slow spell on a shared machine
hits them all alike; median seconds per step.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax.numpy as jnp  # noqa: E402

import train_throughput as tt  # noqa: E402  (sets the environment, puts t5mix on the path)
from t5mix import model as model_lib  # noqa: E402


def tensordot_dense(x, w, in_dims=1, out_dtype=None):
  return jnp.tensordot(x, w, in_dims, preferred_element_type=out_dtype)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  c = model_lib.T5Config(**tt.SHAPE)
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
  times = tt.interleaved_times(steps, args.steps)
  for name, ts in times.items():
    print(f"{name:<28} {statistics.median(ts):.3f} s/step", flush=True)

if __name__ == "__main__":
  from t5mix import host_memory
  host_memory.reexec_with_hugepages()  # measure the process the `t5mix` command runs in
  main()
