"""Real-data quality: does t5mix learn SST-2, RTE, SQuAD and CoNLL-2003, and does transfer help?

    python benchmarks/quality.py [--workdir /tmp/t5mix-quality] [--scale 1.0] [--parts a,b,c,d]
                                 [--results benchmarks/RESULTS.md] [--json FILE]

Every step is an ordinary t5mix command, printed before it runs, over the task files in
benchmarks/real_data/ (tasks.yaml: the shared data in ../shared/data, registered like a user's
files; wikitext.py: the cleaned WikiText-2 text task):

  vocab  `t5mix vocab train` on all the text (SentencePiece, 8,000 pieces + T5's 100 sentinels)
  a      from scratch on the supervised mixture (T=2)                     supervised.yaml
  b      span-corruption pretraining, then the supervised mixture from it pretrain.yaml, --init-from
         (pretraining + fine-tuning steps = part a's steps: the same budget)
  c      RTE alone (2,240 training pairs) from scratch, and from part b's multitask model
  d      mixing ablation on part a's budget: equal and examples-proportional (T=2 is part a),
         reported by `t5mix compare` (WORKDIR/mixing.md, mixing.png): scores and the rates

Each trained model is scored with `t5mix eval --checkpoints latest` on the held-out splits carved
in tasks.yaml. Step counts are fixed (not wall-clock), so the same command gives the same numbers;
--scale multiplies them all (0.1 for a smoke run). Runs already finished in --workdir are reused,
so an interrupted benchmark resumes (WORKDIR/runs.json keeps their times and metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join("benchmarks", "real_data")
DEFINITIONS = ["--tasks-dir", f"{DATA}/tasks.yaml", "--module", f"{DATA}/wikitext.py"]
SUPERVISED = ["real_sst2", "real_rte", "real_squad", "real_conll"]
STEPS = {"supervised": 700, "pretrain": 200, "rte": 150}  # at --scale 1
MAX_EVAL_EXAMPLES = 500


def run(cmd: list[str], log_path: str) -> float:
  """Runs a t5mix command from the project root, its output to log_path; returns seconds."""
  return run_measured(cmd, log_path)[0]


def run_measured(cmd: list[str], log_path: str) -> tuple[float, float]:
  """As run; returns (seconds, the command's peak resident memory in GiB)."""
  print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
  start = time.time()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
    proc.returncode = os.waitstatus_to_exitcode(status)
  seconds = time.time() - start
  if proc.returncode:
    with open(log_path) as f:
      tail = f.read().splitlines()[-5:]
    sys.exit(f"command failed (exit {proc.returncode}); end of {log_path}:\n" + "\n".join(tail))
  return seconds, usage.ru_maxrss / 2**20  # Linux reports KiB


class Bench:
  def __init__(self, args):
    self.workdir = os.path.abspath(args.workdir)
    self.scale = args.scale
    self.vocab = os.path.join(self.workdir, "spm.model")
    # Every run's steps, times and metrics, kept in the workdir so that a rerun reuses them.
    self.runs_path = os.path.join(self.workdir, "runs.json")
    self.runs: dict[str, dict] = {}
    if os.path.exists(self.runs_path):
      with open(self.runs_path) as f:
        self.runs = json.load(f)
    os.makedirs(os.path.join(self.workdir, "logs"), exist_ok=True)

  def save(self):
    with open(self.runs_path, "w") as f:
      json.dump(self.runs, f, indent=2)

  def steps(self, name: str) -> int:
    return max(1, round(STEPS[name] * self.scale))

  def train_vocab(self):
    if not os.path.exists(self.vocab):
      run(["t5mix", "vocab", "train", "--mixture", "real_all", "--out", self.vocab, *DEFINITIONS],
          os.path.join(self.workdir, "logs", "vocab.log"))

  def train(self, name: str, config: str, steps: int, *, init_from: str | None = None,
            overrides: tuple[str, ...] = ()) -> str:
    """A `t5mix train` run in WORKDIR/name (skipped if it already reached `steps`)."""
    workdir = os.path.join(self.workdir, name)
    done = os.path.join(workdir, "checkpoints", str(steps))
    if not os.path.isdir(done) or self.runs.get(name, {}).get("steps") != steps:
      self.runs.pop(name, None)
      cmd = ["t5mix", "train", "--config", f"{DATA}/{config}", "--workdir", workdir, "--vocab",
             self.vocab, "--quiet", "--set", f"steps={steps}",
             "--set", f"checkpoint_every={max(1, steps // 2)}"]
      for o in overrides:
        cmd += ["--set", o]
      if init_from:
        cmd += ["--init-from", os.path.join(self.workdir, init_from)]
      seconds = run(cmd, os.path.join(self.workdir, "logs", f"{name}.log"))
      self.runs[name] = dict(steps=steps, train_seconds=round(seconds, 1))
      self.save()
    return workdir

  def evaluate(self, name: str, tasks: list[str]) -> dict:
    """`t5mix eval` of the run's latest checkpoint: {task: mean metric} and the metrics."""
    if "metrics" in self.runs[name]:
      return self.runs[name]
    workdir = os.path.join(self.workdir, name)
    seconds = run(["t5mix", "eval", "--workdir", workdir, "--checkpoints", "latest", "--tasks",
                   ",".join(tasks), "--max-examples", str(MAX_EVAL_EXAMPLES), "--vocab", self.vocab,
                   *DEFINITIONS], os.path.join(self.workdir, "logs", f"{name}.eval.log"))
    with open(os.path.join(workdir, "eval", "results.json")) as f:
      results = json.load(f)
    (entry,) = results["steps"].values()
    self.runs[name].update(eval_seconds=round(seconds, 1), metrics=entry["metrics"],
                           task_means=entry["task_means"], average=entry["average"])
    self.save()
    return self.runs[name]

  def compare(self, names: list[str], stem: str) -> list[str]:
    """`t5mix compare` of the runs: writes WORKDIR/STEM.md and STEM.png; returns the report's
    tables (markdown, without its title and chart link, which is relative to the workdir)."""
    out = os.path.join(self.workdir, f"{stem}.md")
    run(["t5mix", "compare", *(os.path.join(self.workdir, n) for n in names), "--out", out,
         "--plot", os.path.join(self.workdir, f"{stem}.png")],
        os.path.join(self.workdir, "logs", f"{stem}.log"))
    with open(out) as f:
      return [line for line in f.read().splitlines()[2:] if not line.startswith("![")]


COLUMNS = [("real_sst2", "accuracy", "SST-2 acc"), ("real_rte", "accuracy", "RTE acc"),
           ("real_squad", "f1", "SQuAD F1"), ("real_squad", "em", "SQuAD EM"),
           ("real_conll", "f1", "CoNLL F1")]


def table(bench: Bench, rows: list[tuple], columns=COLUMNS) -> list[str]:
  """Markdown rows: one per (label, run[, runs before it]), columns = (task, metric, title) of each
  task's main metrics + average; steps and minutes include the runs before it (part b's
  pretraining)."""
  lines = ["| run | steps | " + " | ".join(c[2] for c in columns) + " | average | train min |",
           "|---|---:|" + "---:|" * (len(columns) + 2)]
  for label, name, *before in rows:
    r = bench.runs.get(name)
    if not r or "metrics" not in r:
      continue
    steps = r["steps"] + sum(bench.runs[b]["steps"] for b in before)
    minutes = (r["train_seconds"] + sum(bench.runs[b]["train_seconds"] for b in before)) / 60
    cells = []
    for task, metric, _ in columns:
      value = r["metrics"].get(task, {}).get(metric)
      cells.append("" if value is None else f"{value:.1f}")
    lines.append(f"| {label} | {steps} | " + " | ".join(cells) + f" | {r['average']:.1f} | {minutes:.1f} |")
  return lines


def write_results(path: str, command: str, lines: list[str], marker: str = "quality") -> None:
  """Replaces the part of `path` between the `marker` comments (appends it the first time)."""
  begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
  block = "\n".join([begin, f"Command: `{command}`", "", *lines, end])
  text = open(path).read() if os.path.exists(path) else ""
  if begin in text:
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
  else:
    text = text.rstrip() + "\n\n" + block + "\n"
  with open(path, "w") as f:
    f.write(text)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/t5mix-quality")
  parser.add_argument("--scale", type=float, default=1.0, help="multiplies every step count")
  parser.add_argument("--parts", default="a,b,c,d", help="subset of a,b,c,d")
  parser.add_argument("--results", help="write the table into this markdown file (RESULTS.md)")
  parser.add_argument("--json", help="write every run's steps, times and metrics here")
  args = parser.parse_args()
  parts = set(args.parts.split(","))
  bench = Bench(args)
  bench.train_vocab()
  sup, pre, rte = bench.steps("supervised"), bench.steps("pretrain"), bench.steps("rte")
  rows = []
  if parts & {"a", "d"}:
    bench.train("a_scratch_t2", "supervised.yaml", sup)
    bench.evaluate("a_scratch_t2", SUPERVISED)
    rows.append(("(a) from scratch, T=2", "a_scratch_t2"))
  if parts & {"b", "c"}:
    bench.train("b_pretrain", "pretrain.yaml", pre)
    bench.train("b_pretrain_finetune", "supervised.yaml", sup - pre, init_from="b_pretrain")
    bench.evaluate("b_pretrain_finetune", SUPERVISED)
    rows.append((f"(b) span-corruption {pre} + supervised {sup - pre}", "b_pretrain_finetune", "b_pretrain"))
  if "c" in parts:
    bench.train("c_rte_scratch", "rte.yaml", rte)
    bench.evaluate("c_rte_scratch", ["real_rte"])
    rows.append(("(c) RTE alone, from scratch", "c_rte_scratch"))
    bench.train("c_rte_from_b", "rte.yaml", rte, init_from="b_pretrain_finetune")
    bench.evaluate("c_rte_from_b", ["real_rte"])
    rows.append(("(c) RTE alone, from (b)", "c_rte_from_b"))
  mixing = []
  if "d" in parts:
    names = ["a_scratch_t2"]
    for rate in ("equal", "proportional"):
      name = f"d_scratch_{rate}"
      bench.train(name, "supervised.yaml", sup, overrides=(f"data.mixture=real_supervised_{rate}",))
      bench.evaluate(name, SUPERVISED)
      names.append(name)
    mixing = ["", "(d) Mixing ablation on (a)'s budget, by `t5mix compare` (task scores: the mean "
              "of each task's metrics):", "", *bench.compare(names, "mixing")]
  # Recorded times, so that a rerun that reuses finished runs reports the same total.
  minutes = sum(r.get("train_seconds", 0) + r.get("eval_seconds", 0) for r in bench.runs.values()) / 60
  command = "python benchmarks/quality.py" + (f" --scale {args.scale:g}" if args.scale != 1 else "")
  lines = table(bench, rows) + mixing
  lines += ["", f"Total {minutes:.0f} min of training and evaluation on {os.cpu_count()} CPU cores."]
  print("\n".join(lines))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"scale": args.scale, "minutes": minutes, "runs": bench.runs}, f, indent=2)
  if args.results:
    write_results(args.results, command, lines)


if __name__ == "__main__":
  main()
