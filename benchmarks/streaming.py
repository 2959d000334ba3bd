"""Streaming: span-corruption training on a synthetic text corpus larger than memory, in shards.

    python benchmarks/streaming.py [--gib 2] [--shards 32] [--steps 100] [--model mini] [--dir /tmp]

1. Writes the corpus: `--gib` GiB of text (uncompressed) in `--shards` gzip files, deterministic
   (seeded numpy: documents of sentences drawn from a fixed pool of random words), and a task file
   naming it as one glob split, `corpus/*.txt.gz` (kind text, byte vocabulary).
2. In a subprocess: the one-pass count mixing needs (timed fresh, then from its cache), then the
   examples/s of the input pipeline alone (median of windows, as benchmarks/input_pipeline.py:
   packed 128+32-token rows, batch 16) and the examples/s the `--model` train step consumes (the
   same batches, median of `--steps-timed` steps).
3. `t5mix train` on the task for `--steps` steps in another subprocess, its count cache removed
   first so that it makes the count pass too: its peak resident memory (the process's own
   rusage, ru_maxrss) and its last logged steps/s.
4. Deletes the corpus (and the run's workdir).

Both subprocesses' peak memory is printed: the train step's own arrays are most of it; the
corpus is never held (a file split read whole would be several GB in Python).
"""

import argparse
import gzip
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TASK = "streaming_corpus"
LENGTHS = {"inputs": 128, "targets": 32}
BATCH = 16
WORDS, SENTENCES = 20_000, 200_000


def write_corpus(directory: str, gib: float, shards: int, seed: int = 0) -> tuple[int, int]:
  """Writes the shards; returns (text bytes, bytes on disk)."""
  rng = np.random.default_rng(seed)
  letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
  words = [bytes(letters[rng.integers(0, 26, rng.integers(2, 11))]) for _ in range(WORDS)]
  zipf = 1.0 / np.arange(1, WORDS + 1)
  picks = rng.choice(WORDS, size=(SENTENCES, 12), p=zipf / zipf.sum())
  lengths = rng.integers(4, 13, SENTENCES)
  pool = np.array([b" ".join(words[w] for w in row[:n]) + b"." for row, n in zip(picks, lengths)],
                  dtype=object)
  per_shard = int(gib * 2**30) // shards + 1
  text_bytes = disk_bytes = 0
  os.makedirs(directory, exist_ok=True)
  for shard in range(shards):
    shard_rng = np.random.default_rng([seed, shard])
    path = os.path.join(directory, f"part-{shard:05d}.txt.gz")
    written = 0
    with gzip.open(path, "wb", compresslevel=1) as f:
      while written < per_shard:
        n = 20_000  # sentences per piece (~1 MB); a document (line) is about 8 of them
        parts = np.empty(2 * n, dtype=object)
        parts[0::2] = pool[shard_rng.integers(0, SENTENCES, n)]
        parts[1::2] = np.where(shard_rng.random(n) < 1 / 8, b"\n", b" ")
        piece = b"".join(parts.tolist())
        f.write(piece)
        written += len(piece)
    text_bytes += written
    disk_bytes += os.path.getsize(path)
  return text_bytes, disk_bytes


def write_task_file(path: str) -> None:
  with open(path, "w") as f:
    f.write(f"tasks:\n  - name: {TASK}\n    kind: text\n    format: text\n    vocabulary: byte\n"
            f"    splits: {{train: corpus/*.txt.gz}}\n")


def remove_counts(corpus: str) -> None:
  counts = os.path.join(corpus, ".t5mix-record-counts.json")  # t5mix.sources.COUNTS_FILE
  if os.path.exists(counts):
    os.remove(counts)


def measure(args) -> None:
  """The subprocess of step 2: prints one JSON line."""
  sys.path.insert(0, HERE)
  from common import numpy_batch, pipeline, produce_rates, timed, train_stepper

  import seqio

  from t5mix import definitions, registry

  definitions.load([args.task_file], builtin=False)
  task = seqio.get_mixture_or_task(TASK)
  t = time.perf_counter()
  count = task.num_input_examples("train")
  count_s = time.perf_counter() - t
  t = time.perf_counter()  # a task built afresh reads the count from the file beside the data
  assert registry.build_task(task.t5mix_spec).num_input_examples("train") == count
  cached_s = time.perf_counter() - t
  ((_, rates, examples, first),) = produce_rates(
      {TASK: pipeline(TASK, LENGTHS["inputs"], LENGTHS["targets"], BATCH, pack=True)},
      args.windows, args.batches).values()
  vocab = task.output_features["targets"].vocabulary
  step = train_stepper(args.model, (vocab.vocab_size + 127) // 128 * 128, num_tasks=1)
  batch = numpy_batch(first)
  timed(step, batch)  # compiles
  times = [timed(step, batch)[0] for _ in range(args.steps_timed)]
  per_batch = examples / (args.batches * args.windows)
  print(json.dumps({
      "records": count, "count_s": count_s, "cached_count_s": cached_s,
      "pipeline_examples_per_s": statistics.median(rates), "pipeline_range": [min(rates), max(rates)],
      "step_s": statistics.median(times), "examples_per_batch": per_batch,
      "consume_examples_per_s": per_batch / statistics.median(times),
      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def run_measured(argv, log_path):
  """Runs argv, its output to log_path; returns (exit code, seconds, its peak RSS in GiB (its own
  rusage), its peak anonymous RSS in GiB (RssAnon, sampled every 0.1 s: the rest of RSS is
  file-backed, mostly the shared libraries' code: TensorFlow's and XLA's))."""
  t, peak_anon = time.perf_counter(), 0
  with open(log_path, "w") as log:
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    while True:
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      try:
        with open(f"/proc/{proc.pid}/status") as f:
          anon = next(line for line in f if line.startswith("RssAnon:"))
        peak_anon = max(peak_anon, int(anon.split()[1]))
      except (OSError, StopIteration):  # exiting
        pass
      time.sleep(0.1)
  proc.returncode = os.waitstatus_to_exitcode(status)
  return proc.returncode, time.perf_counter() - t, usage.ru_maxrss / 2**20, peak_anon / 2**20


def train(args, tasks_file, mixture, workdir, log_path):
  """`t5mix train` for args.steps steps, in a subprocess; returns run_measured's tuple and the
  last logged steps/s."""
  argv = [sys.executable, "-m", "t5mix.cli", "train", "--workdir", workdir,
          "--set", f"model={args.model}", "--set", f"steps={args.steps}",
          "--set", f"data.mixture={mixture}", "--set", f"data.inputs_length={LENGTHS['inputs']}",
          "--set", f"data.targets_length={LENGTHS['targets']}", "--set", f"data.batch_size={BATCH}",
          "--set", f"checkpoint_every={args.steps}", "--set", "log_every=50"]
  rc, seconds, rss, anon = run_measured(argv + (["--tasks-dir", tasks_file] if tasks_file else []),
                                        log_path)
  with open(log_path) as f:
    log = f.read()
  if rc != 0:
    sys.exit(f"t5mix train failed ({rc}):\n{log[-3000:]}")
  speeds = re.findall(r"([\d.]+) steps/s", log)
  return seconds, rss, anon, float(speeds[-1]) if speeds else float("nan")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gib", type=float, default=2.0, help="text size, uncompressed")
  parser.add_argument("--shards", type=int, default=32)
  parser.add_argument("--steps", type=int, default=100, help="steps of each `t5mix train` run")
  parser.add_argument("--model", default="mini")
  parser.add_argument("--dir", default="/tmp", help="where the corpus is written (then deleted)")
  parser.add_argument("--batches", type=int, default=50)
  parser.add_argument("--windows", type=int, default=7)
  parser.add_argument("--steps-timed", type=int, default=10)
  parser.add_argument("--json")
  parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--task-file", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure:
    from t5mix import host_memory
    host_memory.reexec_with_hugepages()  # measure the process the `t5mix` command runs in
    return measure(args)

  base = os.path.join(args.dir, "t5mix-streaming-benchmark")
  corpus, task_file = os.path.join(base, "corpus"), os.path.join(base, "tasks.yaml")
  shutil.rmtree(base, ignore_errors=True)
  try:
    t = time.perf_counter()
    text_bytes, disk_bytes = write_corpus(corpus, args.gib, args.shards)
    print(f"corpus: {text_bytes / 2**30:.2f} GiB of text ({disk_bytes / 2**30:.2f} GiB gzipped) in "
          f"{args.shards} shards, written in {time.perf_counter() - t:.0f} s; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    write_task_file(task_file)

    rc, _, measure_rss, measure_anon = run_measured(
        [sys.executable, os.path.abspath(__file__), "--measure", "--task-file", task_file,
         "--model", args.model, "--batches", str(args.batches), "--windows", str(args.windows),
         "--steps-timed", str(args.steps_timed)], os.path.join(base, "measure.log"))
    with open(os.path.join(base, "measure.log")) as f:
      log = f.read()
    if rc != 0:
      sys.exit(f"the measuring subprocess failed ({rc}):\n{log[-3000:]}")
    m = json.loads(log.strip().splitlines()[-1])
    print(f"count: {m['records']:,} documents; the one pass took {m['count_s']:.1f} s, "
          f"{m['cached_count_s'] * 1000:.0f} ms from its cache")
    ratio = m["pipeline_examples_per_s"] / m["consume_examples_per_s"]
    print(f"pipeline produces {m['pipeline_examples_per_s']:,.0f} examples/s (median of "
          f"{args.windows} windows, {m['pipeline_range'][0]:,.0f}-{m['pipeline_range'][1]:,.0f}); "
          f"the {args.model} train step consumes {m['consume_examples_per_s']:,.0f} examples/s "
          f"({m['examples_per_batch']:.1f} packed examples per batch of {BATCH}, "
          f"{m['step_s'] * 1000:.0f} ms a step)")
    print(f"pipeline / train step: {ratio:.1f}x")

    remove_counts(corpus)  # so that the training process makes the count pass too
    runs = {"corpus": train(args, task_file, TASK, os.path.join(base, "workdir"),
                            os.path.join(base, "train.log")),
            "demo_text": train(args, None, "demo_text", os.path.join(base, "workdir_demo"),
                               os.path.join(base, "train_demo.log"))}
    print(f"t5mix train, {args.steps} steps of {args.model} (batch {BATCH} x {LENGTHS['inputs']}+"
          f"{LENGTHS['targets']} packed tokens):")
    for name, (seconds, rss, anon, speed) in runs.items():
      what = ("the corpus, streamed (count pass included)" if name == "corpus" else
              "demo_text, the demo tasks' text (read whole): the baseline")
      print(f"  {what}: peak RSS {rss:.2f} GiB (anonymous {anon:.2f} GiB), {seconds:.0f} s, "
            f"last logged {speed:.2f} steps/s")
    print(f"peak RSS of the measuring process (count, pipeline windows, train step): "
          f"{measure_rss:.2f} GiB (anonymous {measure_anon:.2f} GiB)")
    if args.json:
      with open(args.json, "w") as f:
        json.dump({**m, "ratio": ratio, "text_gib": text_bytes / 2**30,
                   "disk_gib": disk_bytes / 2**30, "shards": args.shards,
                   "measure_peak_rss_gib": measure_rss, "measure_peak_anon_gib": measure_anon,
                   "train": {name: dict(zip(("seconds", "peak_rss_gib", "peak_anon_gib",
                                             "steps_per_s"), run)) for name, run in runs.items()}},
                  f, indent=2)
  finally:
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
  main()
