"""Where the t5mix train step's time goes on this machine, at train_throughput's shape.

    python benchmarks/profile_train_step.py [--steps 3] [--top 15] [--tiny]

Prints: the compiled step's temporary buffer (XLA's memory analysis); page faults per step (the
process's minor faults over --steps steps, from getrusage); how much of the step one / both / no
XLA worker threads were busy; and the ops that took the most time, each with the jax operation it
came from (op_name in the optimised HLO). The times come from a `jax.profiler` trace of --steps
steps (its Perfetto JSON), summed per op over the trace's worker threads.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402

import train_throughput as tt  # noqa: E402  (sets the environment, puts t5mix on the path)
from t5mix.model import T5Config  # noqa: E402


def op_names(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (result shape, jax op_name) from the compiled module's text."""
  pattern = r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?metadata=\{op_name="([^"]*)"'
  return {m[1]: (m[2], m[3]) for m in re.finditer(pattern, hlo_text, re.M)}


def trace_events(trace_dir: str):
  """(thread name, event) of every complete event in the trace's Perfetto JSON."""
  (path,) = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  return [(threads.get((e["pid"], e["tid"]), ""), e) for e in events if e.get("ph") == "X"]


def busy_shares(spans) -> dict[int, float]:
  """Seconds during which exactly n of the spans [(start, end)] overlap, for each n."""
  points = sorted([(s, 1) for s, _ in spans] + [(t, -1) for _, t in spans])
  busy, level, last = collections.Counter(), 0, points[0][0] if points else 0
  for time, delta in points:
    busy[level] += time - last
    level, last = level + delta, time
  return busy


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--tiny", action="store_true", help="a toy model (for the smoke test)")
  args = parser.parse_args()
  c = T5Config(**(tt.TINY_SHAPE if args.tiny else tt.SHAPE))
  step, state, batch, key = tt.t5mix_step(c, *tt.batch_arrays(16, 128, 32, c.vocab_size))
  compiled = step.lower(state, batch, key).compile()
  names = op_names(compiled.as_text())
  memory = compiled.memory_analysis()
  for _ in range(2):  # warm up
    state, metrics = compiled(state, batch, key)
  jax.block_until_ready(metrics)

  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(args.steps):
      state, metrics = compiled(state, batch, key)
      jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
    events = trace_events(trace_dir)

  ops = [(thread, e) for thread, e in events if thread.startswith("tf_XLAEigen")
         and not e["name"].startswith(("ThunkExecutor", "Slinky", "Threadpool", "end:"))]
  per_op = collections.Counter()
  for _, e in ops:
    per_op[e["name"]] += e["dur"] / 1e6 / args.steps
  busy = busy_shares([(e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6) for _, e in ops])
  step_s = sum(busy.values()) / args.steps
  print(f"temporary buffer per step: {memory.temp_size_in_bytes / 2**20:,.0f} MiB; "
        f"page faults per step: {faults:,.0f} (traced steps)")
  print(f"traced step {step_s:.3f} s: " + ", ".join(
      f"{n} thread(s) busy {100 * busy[n] / args.steps / step_s:.0f}%" for n in sorted(busy)))
  print(f"{'ms/step':>8}  {'op':<28} {'shape':<22} jax op")
  for name, seconds in per_op.most_common(args.top):
    shape, op = names.get(name, ("", ""))
    print(f"{1e3 * seconds:>8.1f}  {name:<28} {shape[:22]:<22} {op[-60:]}")


if __name__ == "__main__":
  from t5mix import host_memory
  host_memory.reexec_with_hugepages()  # measure the process the `t5mix` command runs in
  main()
