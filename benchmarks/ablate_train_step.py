"""The train step with each CPU optimisation of t5mix/model.py undone, at train_throughput's shape.

    python benchmarks/ablate_train_step.py [--steps 8]

Variants: as shipped; the position-bias gradient left to autodiff (no `_add_position_bias` VJP);
projections as N-D `tensordot`s instead of `_dense`'s flattened 2-D matmuls; both undone.
Median seconds per step after 2 warm-up steps, each variant built and timed in turn.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax.numpy as jnp  # noqa: E402

import train_throughput as tt  # noqa: E402  (sets the environment, puts t5mix on the path)
from t5mix import model as model_lib  # noqa: E402


def tensordot_dense(x, w, in_dims=1, out_dtype=None):
  return jnp.tensordot(x, w, in_dims, preferred_element_type=out_dtype)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=8)
  args = parser.parse_args()
  c = model_lib.T5Config(**tt.SHAPE)
  enc, dec_in, tgt = tt.batch_arrays(16, 128, 32, c.vocab_size)
  dense, bias = model_lib._dense, model_lib._add_position_bias
  plain_bias = lambda logits, b: logits + b  # noqa: E731
  variants = {"as shipped": (dense, bias), "autodiff bias gradient": (dense, plain_bias),
              "N-D tensordot projections": (tensordot_dense, bias),
              "both undone": (tensordot_dense, plain_bias)}
  for name, (model_lib._dense, model_lib._add_position_bias) in variants.items():
    step = tt.t5mix_runner(c, enc, dec_in, tgt)
    step()
    step()
    times = []
    for _ in range(args.steps):
      t = time.perf_counter()
      step()
      times.append(time.perf_counter() - t)
    print(f"{name:<28} {statistics.median(times):.3f} s/step", flush=True)


if __name__ == "__main__":
  main()
