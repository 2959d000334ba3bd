"""Activation memory and compile time of the train step with `remat` and `scan_layers`, and the step time they cost.

    python benchmarks/memory.py [--models base,large] [--batch 32] [--inputs-length 512] [--targets-length 128]
                                [--settings none,dots_saveable,full,scan,scan+full] [--parts memory,time]
                                [--time-model small] [--time-batch 4] [--rounds 3] [--results RESULTS.md] [--json out.json]

Part `memory`: the real train step (t5mix.train.make_train_step: Adafactor, dropout, z-loss, as
`t5mix train` runs it) of each model in configs/model/ at batch × (inputs + targets) tokens, lowered
on abstract inputs and compiled, never run, so t5-large fits any machine; XLA's
`compiled.memory_analysis()` gives the temporary buffer (the activations the backward pass keeps,
and the step's scratch), the arguments (parameters, optimizer state, batch) and outputs. Each
setting compiles in its own process, so every compile starts cold; the compile seconds are its
`.compile()` alone (tracing and lowering reported apart).

Part `time`: the step time those settings cost, on a shape that runs on a few CPU cores (default
the flan-t5-small shape at batch 4 × (128 + 32)): each setting in its own process, the processes
alternated over --rounds rounds; each process warms up, then times --steps steps and reports
their median; the table gives the median over rounds and the min-max of all timed steps.

A setting is a remat policy (none | dots_saveable | full, t5mix.model.REMAT_POLICIES), prefixed
`scan+` for scanned layers (`scan` alone: scanned, no remat).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from t5mix import config as config_lib  # noqa: E402
from t5mix.model import T5, load_model_config  # noqa: E402
from t5mix.optim import base_optimizer  # noqa: E402
from t5mix.train import TrainState, make_train_step  # noqa: E402

import quality  # noqa: E402  (write_results)

SETTINGS = ("none", "dots_saveable", "full", "scan", "scan+dots_saveable", "scan+full")
MiB = 2 ** 20


def model_config(name: str, setting: str, tiny: bool):
  """The named model with the setting's remat and scan_layers (--tiny: a toy model, smoke tests only)."""
  scan = setting.startswith("scan")
  remat = setting.removeprefix("scan").removeprefix("+") or "none"
  c = load_model_config("tiny" if tiny else name)
  return dataclasses.replace(c, remat=remat, scan_layers=scan)


def abstract_step(c, batch: int, inputs_length: int, targets_length: int):
  """(jitted train step, its abstract state, batch and key): shapes only, nothing allocated."""
  tc = config_lib.load(None, [])  # the defaults: Adafactor, z-loss, as `t5mix train`
  optimizer = base_optimizer(tc.optimizer, tc.steps)

  def init():
    graphdef, params = nnx.split(T5(c, rngs=nnx.Rngs(0)), nnx.Param)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: T5(c, rngs=nnx.Rngs(0))), nnx.Param)
  state = jax.eval_shape(lambda: init()[1])
  tokens = lambda length: jax.ShapeDtypeStruct((batch, length), jnp.int32)  # noqa: E731
  batch_shapes = {"encoder_input_tokens": tokens(inputs_length), "decoder_input_tokens": tokens(targets_length),
                  "decoder_target_tokens": tokens(targets_length), "decoder_loss_weights": tokens(targets_length),
                  "task_ids": tokens(targets_length)}
  step = jax.jit(make_train_step(graphdef, optimizer, tc, num_tasks=1), donate_argnums=(0,))
  return step, state, batch_shapes, jax.eval_shape(lambda: jax.random.key(0))


def _cpu_seconds() -> float:
  """This process's CPU time: on a shared machine it counts the compiler's work, not the waiting."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def compile_worker(args) -> dict:
  c = model_config(args.model, args.setting, args.tiny)
  step, state, batch, key = abstract_step(c, args.batch, args.inputs_length, args.targets_length)
  t = time.perf_counter()
  lowered = step.lower(state, batch, key)
  lower_s = time.perf_counter() - t
  t, cpu = time.perf_counter(), _cpu_seconds()
  compiled = lowered.compile()
  compile_s, compile_cpu_s = time.perf_counter() - t, _cpu_seconds() - cpu
  m = compiled.memory_analysis()
  return {"model": args.model, "setting": args.setting, "lower_s": lower_s, "compile_s": compile_s,
          "compile_cpu_s": compile_cpu_s,
          "temp_bytes": m.temp_size_in_bytes, "argument_bytes": m.argument_size_in_bytes,
          "output_bytes": m.output_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
          "code_bytes": m.generated_code_size_in_bytes}


def time_worker(args) -> dict:
  c = model_config(args.model, args.setting, args.tiny)
  step, state, batch, key = abstract_step(c, args.batch, args.inputs_length, args.targets_length)
  graphdef, params = nnx.split(T5(c, rngs=nnx.Rngs(0)), nnx.Param)
  state = TrainState(jnp.zeros((), jnp.int32), params, jax.jit(lambda p: base_optimizer(
      config_lib.load(None, []).optimizer, 400).init(p))(params))
  rng = np.random.default_rng(0)
  arrays = {k: rng.integers(2, c.vocab_size, v.shape).astype(np.int32) for k, v in batch.items()}
  arrays["decoder_loss_weights"] = np.ones_like(arrays["decoder_loss_weights"])
  arrays["task_ids"] = np.ones_like(arrays["task_ids"])
  arrays = jax.device_put(arrays)
  key = jax.random.key(0)
  times, cpu_times = [], []
  for i in range(args.steps + 2):  # 2 warm-up steps (the first compiles)
    t, cpu = time.perf_counter(), _cpu_seconds()
    state, metrics = step(state, arrays, key)
    metrics["loss"].block_until_ready()
    if i >= 2:
      times.append(time.perf_counter() - t)
      cpu_times.append(_cpu_seconds() - cpu)
  return {"setting": args.setting, "step_s": times, "median_s": statistics.median(times),
          "cpu_s": cpu_times, "median_cpu_s": statistics.median(cpu_times)}


def run_worker(kind: str, setting: str, model: str, batch: int, inputs_length: int, targets_length: int,
               args, env=None) -> dict:
  command = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--setting", setting,
             "--model", model, "--batch", str(batch), "--inputs-length", str(inputs_length),
             "--targets-length", str(targets_length), "--steps", str(args.steps)] + ["--tiny"] * args.tiny
  out = subprocess.run(command, capture_output=True, text=True, env=env)
  if out.returncode:
    raise RuntimeError(f"{kind} worker {model} {setting} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def memory_part(args, settings) -> tuple[list[dict], list[str]]:
  rows = []
  for model in args.models:
    for setting in settings:
      r = run_worker("compile", setting, model, args.batch, args.inputs_length, args.targets_length, args)
      rows.append(r)
      print(f"{model:<6} {setting:<18} temp {r['temp_bytes'] / MiB:>10,.0f} MiB  arguments "
            f"{r['argument_bytes'] / MiB:>8,.0f} MiB  compile {r['compile_s']:6.1f} s "
            f"({r['compile_cpu_s']:.1f} s CPU)", flush=True)
  lines = [f"Train step at batch {args.batch} × ({args.inputs_length} + {args.targets_length}) tokens "
           "(Adafactor, the configs' dropout 0.1 and bfloat16 activations), compiled, not run; "
           "XLA's `memory_analysis()`. Temp = the step's temporary buffer (the activations kept for the "
           "backward pass, and scratch); arguments = parameters, optimizer state and batch (the output "
           "is the same size, donated). Compile = `.compile()` alone, each setting in a fresh process: "
           "wall seconds, and the process's CPU seconds during it (the compiler's work, which a shared "
           "machine does not inflate as much).", "",
           "| model | setting | temp MiB | none's temp / this | arguments MiB | compile s | compile CPU s |",
           "|---|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    none = next((x for x in rows if x["model"] == r["model"] and x["setting"] == "none"), r)
    lines.append(f"| {r['model']} | {r['setting']} | {r['temp_bytes'] / MiB:,.0f} | "
                 f"{none['temp_bytes'] / r['temp_bytes']:.2f}× | {r['argument_bytes'] / MiB:,.0f} | "
                 f"{r['compile_s']:.1f} | {r['compile_cpu_s']:.1f} |")
  return rows, lines


def time_part(args, settings) -> tuple[dict, list[str]]:
  times = {s: [] for s in settings}
  medians = {s: [] for s in settings}
  cpu_medians = {s: [] for s in settings}
  with tempfile.TemporaryDirectory() as cache:
    # Every round after the first loads its program from JAX's persistent cache instead of compiling.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    for round_ in range(args.rounds):
      for setting in settings:
        r = run_worker("time", setting, args.time_model, args.time_batch, args.time_inputs_length,
                       args.time_targets_length, args, env)
        times[setting] += r["step_s"]
        medians[setting].append(r["median_s"])
        cpu_medians[setting].append(r["median_cpu_s"])
        print(f"round {round_ + 1}: {setting:<14} {r['median_s']:.3f} s/step, "
              f"{r['median_cpu_s']:.3f} CPU s/step", flush=True)
  base = statistics.median(medians[settings[0]])
  cpu_base = statistics.median(cpu_medians[settings[0]])
  lines = [f"Step time, {'tiny' if args.tiny else args.time_model} model at batch {args.time_batch} × ({args.time_inputs_length} + "
           f"{args.time_targets_length}), each setting in its own process, alternated over {args.rounds} "
           f"rounds of {args.steps} steps after 2 warm-up: median of the rounds' medians, min-max of all "
           "timed steps; and the process's CPU seconds per step (the work done, which a shared machine "
           "inflates less than the wall time), median of the rounds' medians.", "",
           f"| setting | s/step | min-max | vs {settings[0]} | CPU s/step | vs {settings[0]} |",
           "|---|---:|---:|---:|---:|---:|"]
  result = {}
  for s in settings:
    m, cpu = statistics.median(medians[s]), statistics.median(cpu_medians[s])
    result[s] = {"median_s": m, "min_s": min(times[s]), "max_s": max(times[s]), "round_medians": medians[s],
                 "median_cpu_s": cpu, "round_cpu_medians": cpu_medians[s]}
    lines.append(f"| {s} | {m:.3f} | {min(times[s]):.3f}-{max(times[s]):.3f} | {m / base:.2f}× | "
                 f"{cpu:.3f} | {cpu / cpu_base:.2f}× |")
  return result, lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="base,large", help="configs/model/ names for the memory part")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--inputs-length", type=int, default=512)
  parser.add_argument("--targets-length", type=int, default=128)
  parser.add_argument("--settings", default=",".join(SETTINGS))
  parser.add_argument("--parts", default="memory,time", help="subset of memory,time")
  parser.add_argument("--time-model", default="small")
  parser.add_argument("--time-batch", type=int, default=4)
  parser.add_argument("--time-inputs-length", type=int, default=128)
  parser.add_argument("--time-targets-length", type=int, default=32)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
  parser.add_argument("--tiny", action="store_true", help="a toy model (smoke test only)")
  parser.add_argument("--results", help="write the tables into this markdown file (RESULTS.md)")
  parser.add_argument("--json", help="write the numbers here")
  parser.add_argument("--worker", choices=("compile", "time"), help=argparse.SUPPRESS)
  parser.add_argument("--setting", help=argparse.SUPPRESS)
  parser.add_argument("--model", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps((compile_worker if args.worker == "compile" else time_worker)(args)))
    return
  args.models = args.models.split(",")
  settings = args.settings.split(",")
  parts = set(args.parts.split(","))
  results = {"machine": {"devices": str(jax.devices()), "cpu_count": os.cpu_count()},
             "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]}
  machine = (f"Measured {results['date']} on {os.cpu_count()} CPU cores ({jax.devices()[0].platform}), "
             f"jax {jax.__version__}.")
  blocks = {}  # RESULTS.md marker -> lines: one block per model list, one for the step time
  if "memory" in parts:
    results["memory"], lines = memory_part(args, settings)
    blocks["memory-" + "-".join(args.models)] = [machine, ""] + lines
  if "time" in parts:
    results["time"], lines = time_part(args, settings)
    blocks["memory-step-time"] = [machine, ""] + lines
  for lines in blocks.values():
    print("\n".join(lines) + "\n")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  if args.results:
    command = "python benchmarks/memory.py " + " ".join(sys.argv[1:])
    for marker, lines in blocks.items():
      quality.write_results(args.results, command, lines, marker=marker)


if __name__ == "__main__":
  main()
