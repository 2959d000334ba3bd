"""Fine-tuning strategies from a real pretrained T5, side by side (the T5 paper's Table 10 on this
machine's budget), and feature-based transfer: a linear probe on frozen encoder features.

    python benchmarks/finetune_strategies.py [--from W] [--workdir /tmp/t5mix-strategies]
        [--steps 60] [--strategies full,gradual_unfreezing,adapters_32,...]
        [--parts sweep,timing,probe]
        [--max-examples N] [--results benchmarks/RESULTS.md] [--json FILE]

W is a `t5mix import-hf ../shared/models/flan-t5-small-kd --out W` workdir; without --from that
import is made in WORKDIR/pretrained. Every step is an ordinary t5mix command, printed before it
runs:

  data   SST-2 carved as benchmarks/transfer.py does (no held-out row shares text with training)
         and CoNLL-2003 (train.txt; held out: valid.txt), mixed at equal rates; RTE (its last 250
         pairs held out) for the probe only. WORKDIR/tasks.yaml.
  sweep  each strategy fine-tunes W at each rate of its sweep (STRATEGIES), with the same steps,
         batch and lengths (configs/finetune_pretrained.yaml's Adafactor at a constant rate, batch
         8 x (128+48) packed). The rate kept is the one with the lowest training loss over the last
         LAST_LOGS progress lines: a run this short sees every example once, so the loss of a batch
         before its update is a held-out loss (and the held-out splits stay unseen until the end).
  eval   `t5mix eval` of each strategy's kept run on the WHOLE held-out splits.
  timing each strategy's seconds per step in short runs of their own, alternated (TIMING_*): run
         it on an idle machine.
  probe  `t5mix probe` (logistic regression on mean-pooled encoder features) on SST-2 and RTE for
         three encoders: W's, a random one of the same shape (--random-init), and the encoder
         that full fine-tuning produced in the sweep.

The table has each strategy's trainable parameters, step time and peak resident memory. Finished
runs in --workdir are reused, so an interrupted benchmark goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys

import yaml

import quality  # sibling benchmarks (benchmarks/ is on the path when run as a script)
import transfer

ROOT = quality.ROOT
MIXTURE = "strategies_mix"
TASKS = ["strategies_sst2", "strategies_conll"]
COLUMNS = [("strategies_sst2", "accuracy", "SST-2 acc"), ("strategies_conll", "f1", "CoNLL F1")]
INPUTS_LENGTH, TARGETS_LENGTH, BATCH = 128, 48, 8  # 0% of inputs and 0.6% of CoNLL targets cut
LAST_LOGS = 3  # progress lines (of LOG_EVERY steps) whose mean loss chooses the rate
LOG_EVERY = 5
# Step times come from short runs of their own, strategies alternated, on an otherwise idle
# machine (the sweep's own rates are not: its runs are long and may share the CPU).
TIMING_STEPS, TIMING_LOG_EVERY, TIMING_ROUNDS = 16, 4, 2
# Gradual unfreezing is not timed: its step cost changes with its stage (from about adapters' to
# full's), and 16 steps would be mostly its 8 compilations.
TIMED = ["full", "adapters_32", "adapters_128", "adapters_512", "lora"]
PROBE_TRAIN_EXAMPLES = 10_000  # SST-2 training rows the probe fits on (RTE: all 2,240)
# name → (--set overrides, the learning rates of its sweep, or the strategy whose chosen rate it
# takes). On this machine's budget not every strategy gets a sweep of its own: gradual unfreezing
# trains the same parameters as full fine-tuning and takes full's rate; the wider adapters take
# the rate of adapters_32's sweep.
STRATEGIES = {
    "full": ([], (1e-3, 3e-3)),
    "gradual_unfreezing": (["finetune.strategy=gradual_unfreezing"], "full"),
    "adapters_32": (["finetune.strategy=adapters", "finetune.adapter_size=32"], (3e-3, 1e-2)),
    "adapters_128": (["finetune.strategy=adapters", "finetune.adapter_size=128"], "adapters_32"),
    "adapters_512": (["finetune.strategy=adapters", "finetune.adapter_size=512"], "adapters_32"),
    "lora": (["finetune.strategy=lora"], (1e-2, 3e-2)),  # r=8 on query and value
}
# The T5 paper's Table 10 (T5-Base, GLUE average), for the comparison in RESULTS.md.
PAPER_GLUE = {"full": 83.28, "gradual_unfreezing": 82.50, "adapters_32": 80.52, "adapters_512": 81.54}


def write_tasks(workdir: str) -> str:
  data_dir = os.path.join(workdir, "data")
  os.makedirs(data_dir, exist_ok=True)
  transfer.carve_sst2(data_dir)
  shared = os.path.join(transfer.SHARED, "data")
  conll, rte = os.path.join(shared, "conll2003"), os.path.join(shared, "rte", "train.tsv")
  doc = {"tasks": [
      {"name": "strategies_sst2", "kind": "classification", "format": "tsv",
       "splits": {"train": os.path.join(data_dir, "sst2_train.tsv"),
                  "validation": os.path.join(data_dir, "sst2_heldout.tsv")},
       "template": "sst2 sentence: {text}", "label_words": ["negative", "positive"],
       "metrics": ["accuracy"]},
      {"name": "strategies_conll", "kind": "ner", "format": "conll", "scheme": "iob2",
       "splits": {"train": os.path.join(conll, "train.txt"),
                  "validation": os.path.join(conll, "valid.txt")}},
      {"name": "strategies_rte", "kind": "classification", "format": "tsv",
       "splits": {"train": {"path": rte, "select": ":-250"},
                  "validation": {"path": rte, "select": "-250:"}},
       "template": "rte sentence1: {sentence1} sentence2: {sentence2}",
       "label_words": ["entailment", "not_entailment"], "metrics": ["accuracy"]},
  ], "mixtures": [{"name": MIXTURE, "rate": "equal", "tasks": TASKS}]}
  path = os.path.join(workdir, "tasks.yaml")
  with open(path, "w") as f:
    yaml.safe_dump(doc, f, sort_keys=False)
  return path


def rate_name(rate: float) -> str:
  return f"{rate:.0e}".replace("e-0", "e-")


class Strategies(quality.Bench):
  """quality.Bench's bookkeeping (runs.json, reuse of finished runs) for this benchmark's runs."""

  def __init__(self, args):
    args.scale = 1.0
    super().__init__(args)
    self.base = os.path.abspath(args.base) if args.base else os.path.join(self.workdir, "pretrained")
    self.max_examples = args.max_examples
    self.tasks_yaml = None

  def prepare(self):
    if not os.path.isdir(os.path.join(self.base, "checkpoints")):
      if not os.path.isdir(transfer.PRETRAINED_HF):
        sys.exit(f"{transfer.PRETRAINED_HF}: not found (the shared pretrained T5); pass --from W")
      quality.run(["t5mix", "import-hf", transfer.PRETRAINED_HF, "--out", self.base],
                  os.path.join(self.workdir, "logs", "import.log"))
    self.tasks_yaml = write_tasks(self.workdir)

  def train(self, name: str, steps: int, overrides: list[str]) -> dict:
    """A `t5mix train` run from the base model in WORKDIR/name (reused when it finished)."""
    run = self.runs.get(name, {})
    if run.get("steps") == steps and os.path.isdir(os.path.join(self.workdir, name, "checkpoints", str(steps))):
      return run
    workdir = os.path.join(self.workdir, name)
    if os.path.isdir(workdir):  # an unfinished run: start again (its times would not add up)
      shutil.rmtree(workdir)
    seconds, peak_gib, log = self.run_train(workdir, steps, LOG_EVERY, overrides, f"{name}.log")
    losses = [float(x) for x in re.findall(r"^step\s+\d+/\d+\s+loss ([0-9.]+)", log, re.M)]
    counted = re.search(r"([\d,]+) of ([\d,]+) parameters", log)  # gradual: stage 1's
    total = re.search(r"\(([\d.]+)M parameters\)", log)
    self.runs[name] = dict(
        steps=steps, train_seconds=round(seconds, 1), peak_rss_gib=round(peak_gib, 2),
        final_loss=round(statistics.mean(losses[-LAST_LOGS:]), 4),
        trainable=int(counted.group(1).replace(",", "")) if counted else None,
        total=int(counted.group(2).replace(",", "")) if counted else round(float(total.group(1)) * 1e6))
    self.save()
    return self.runs[name]

  def run_train(self, workdir: str, steps: int, log_every: int, overrides, log_name: str):
    """`t5mix train` from the base model with this benchmark's data and shapes: (seconds, peak
    resident GiB, the log's text)."""
    cmd = ["t5mix", "train", "--config", "configs/finetune_pretrained.yaml", "--workdir", workdir,
           "--init-from", self.base, "--tasks-dir", self.tasks_yaml]
    for o in [f"data.mixture={MIXTURE}", f"steps={steps}", f"checkpoint_every={steps}",
              "keep_checkpoints=1", f"log_every={log_every}", f"data.batch_size={BATCH}",
              f"data.inputs_length={INPUTS_LENGTH}", f"data.targets_length={TARGETS_LENGTH}",
              *overrides]:
      cmd += ["--set", o]
    log_path = os.path.join(self.workdir, "logs", log_name)
    seconds, peak_gib = quality.run_measured(cmd, log_path)
    with open(log_path) as f:
      return seconds, peak_gib, f.read()

  def time_steps(self, strategy: str, round_: int) -> list[float]:
    """Seconds per step of `strategy` in one short run of its own: one value per progress line
    after the first (compiling steps are not in the logged rates)."""
    key = f"timing:{strategy}:{round_}"
    if key not in self.runs:
      workdir = os.path.join(self.workdir, "timing", f"{strategy}_{round_}")
      shutil.rmtree(workdir, ignore_errors=True)
      _, _, log = self.run_train(workdir, TIMING_STEPS, TIMING_LOG_EVERY, STRATEGIES[strategy][0],
                                 f"timing.{strategy}.{round_}.log")
      shutil.rmtree(workdir)
      rates = [float(r) for r in re.findall(r"([0-9.]+) steps/s", log)]
      self.runs[key] = [round(1 / r, 3) for r in rates[1:]]
      self.save()
    return self.runs[key]

  def evaluate(self, name: str) -> dict:
    entry = self.runs[name]
    if "metrics" in entry:
      return entry
    cmd = ["t5mix", "eval", "--workdir", os.path.join(self.workdir, name), "--checkpoints", "latest",
           "--tasks", ",".join(TASKS), "--tasks-dir", self.tasks_yaml]
    if self.max_examples:
      cmd += ["--max-examples", str(self.max_examples)]
    seconds = quality.run(cmd, os.path.join(self.workdir, "logs", f"{name}.eval.log"))
    with open(os.path.join(self.workdir, name, "eval", "results.json")) as f:
      results = json.load(f)
    (scores,) = results["steps"].values()
    entry.update(eval_seconds=round(seconds, 1), metrics=scores["metrics"],
                 average=scores["average"], baselines=results.get("baselines", {}))
    self.save()
    return entry

  def probe(self, encoder: str, workdir: str, task: str, extra=()) -> dict:
    key = f"probe:{encoder}:{task}"
    if key in self.runs:
      return self.runs[key]
    out = os.path.join(self.workdir, "probes", f"{encoder}.{task}.json")
    cmd = ["t5mix", "probe", "--workdir", workdir, "--task", task, "--tasks-dir", self.tasks_yaml,
           "--inputs-length", str(INPUTS_LENGTH * 2), "--out", out, *extra]
    if task == "strategies_sst2":
      cmd += ["--max-train-examples", str(PROBE_TRAIN_EXAMPLES)]
    if self.max_examples:
      cmd += ["--max-examples", str(self.max_examples)]
    if not os.path.exists(out):  # else a probe run before (its file is written last)
      os.makedirs(os.path.dirname(out), exist_ok=True)
      quality.run(cmd, os.path.join(self.workdir, "logs", f"probe.{encoder}.{task}.log"))
    with open(out) as f:
      self.runs[key] = json.load(f)
    self.save()
    return self.runs[key]


# ---------------------------------------------------------------------------------------------
# The report.


def count(n: int, total: int) -> str:
  return f"{n / 1e6:.2f}M ({100 * n / total:.1f}%)" if n >= 1e5 else f"{n / 1e3:.0f}K ({100 * n / total:.2f}%)"


def step_time(bench: Strategies, strategy: str) -> str:
  """Median seconds per step over the timing runs' progress lines, with their min-max."""
  times = [t for r in range(1, TIMING_ROUNDS + 1) for t in bench.runs.get(f"timing:{strategy}:{r}", [])]
  if not times:
    return "—"
  return f"{statistics.median(times):.2f} ({min(times):.2f}–{max(times):.2f})"


def strategy_table(bench: Strategies, chosen: dict[str, str], sweeps: dict[str, dict]) -> list[str]:
  head = ["strategy", "trainable", "rate (sweep: loss)", *[t for _, _, t in COLUMNS], "average",
          "s/step (min–max)", "peak RSS", "paper: GLUE avg"]
  lines = ["| " + " | ".join(head) + " |", "|---|---:|---|" + "---:|" * (len(head) - 3)]
  for strategy, name in chosen.items():
    run = bench.runs[name]
    if strategy == "gradual_unfreezing":
      trainable = f"{count(run['trainable'], run['total'])} → all"
    else:
      trainable = count(run["trainable"] or run["total"], run["total"])
    sweep = ", ".join(f"{'**' if n == name else ''}{rate_name(r)}: {bench.runs[n]['final_loss']:.3f}"
                      f"{'**' if n == name else ''}" for r, n in sweeps[strategy].items())
    scores = [run["metrics"][task][metric] for task, metric, _ in COLUMNS]
    lines.append(f"| {strategy.replace('_', ' ')} | {trainable} | {sweep} | "
                 f"{' | '.join(f'{v:.1f}' for v in scores)} | "
                 f"{statistics.mean(scores):.1f} | {step_time(bench, strategy)} | "
                 f"{run['peak_rss_gib']:.1f} GiB | {PAPER_GLUE.get(strategy, '—')} |")
  return lines


def probe_table(bench: Strategies, encoders: list[tuple[str, str]], tasks: list[tuple[str, str]]) -> list[str]:
  lines = ["| encoder | " + " | ".join(f"{title} probe" for _, title in tasks) + " |",
           "|---|" + "---:|" * len(tasks)]
  for encoder, title in encoders:
    cells = [f"{bench.runs[f'probe:{encoder}:{task}']['accuracy']:.1f}" for task, _ in tasks]
    lines.append(f"| {title} | " + " | ".join(cells) + " |")
  majority = [f"{title} {bench.runs[f'probe:{encoders[0][0]}:{task}']['majority']:.1f}"
              for task, title in tasks]
  lines += ["", "Majority class (the training split's most frequent label, on the held-out split): "
            + ", ".join(majority) + "."]
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--from", dest="base", metavar="W",
                      help="an imported pretrained workdir (default: import the shared one)")
  parser.add_argument("--workdir", default="/tmp/t5mix-strategies")
  parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps of every run")
  parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"of {', '.join(STRATEGIES)}")
  parser.add_argument("--parts", default="sweep,timing,probe", help="subset of sweep,timing,probe")
  parser.add_argument("--max-examples", type=int, help="score at most N examples per task "
                                                       "(a smoke run; the tables are for whole splits)")
  parser.add_argument("--results", help="write the tables into this markdown file (RESULTS.md)")
  parser.add_argument("--json", help="write every run's numbers here")
  args = parser.parse_args()
  parts = set(args.parts.split(","))
  strategies = [s for s in args.strategies.split(",") if s]
  unknown = [s for s in strategies if s not in STRATEGIES]
  if unknown:
    sys.exit(f"--strategies: unknown {', '.join(unknown)} (known: {', '.join(STRATEGIES)})")
  bench = Strategies(args)
  bench.prepare()
  lines, chosen, sweeps = [], {}, {}
  if "sweep" in parts or "probe" in parts:  # the probe's fine-tuned encoder is full's run
    for strategy in strategies if "sweep" in parts else ["full"]:
      overrides, rates = STRATEGIES[strategy]
      if isinstance(rates, str):  # the rate another strategy's sweep chose
        if rates not in chosen:
          sys.exit(f"--strategies: {strategy} takes {rates}'s rate; list {rates} before it")
        rates = [r for r, n in sweeps[rates].items() if n == chosen[rates]]
      sweeps[strategy] = {}
      for rate in rates:
        name = f"{strategy}_{rate_name(rate)}"
        bench.train(name, args.steps, [*overrides, f"optimizer.learning_rate={rate}"])
        sweeps[strategy][rate] = name
      chosen[strategy] = min(sweeps[strategy].values(), key=lambda n: bench.runs[n]["final_loss"])
      bench.evaluate(chosen[strategy])
  if "timing" in parts:  # strategies alternated, round after round
    for round_ in range(1, TIMING_ROUNDS + 1):
      for strategy in [s for s in strategies if s in TIMED]:
        bench.time_steps(strategy, round_)
  if "sweep" in parts:
    minutes = sum(bench.runs[n]["train_seconds"] for s in sweeps.values() for n in s.values()) / 60
    minutes += sum(bench.runs[n]["eval_seconds"] for n in chosen.values()) / 60
    baselines = bench.runs[chosen[strategies[0]]]["baselines"]
    majority = baselines.get("strategies_sst2", {}).get("majority_class", {}).get("metrics", {})
    lines += strategy_table(bench, chosen, sweeps) + [
        "", f"{args.steps} steps of batch {BATCH} x ({INPUTS_LENGTH}+{TARGETS_LENGTH}) tokens, packed, "
        f"SST-2 and CoNLL-2003 at equal rates; in bold the rate kept (lowest loss over the last "
        f"{LAST_LOGS * LOG_EVERY} steps). SST-2 majority class: {majority.get('accuracy', float('nan')):.1f}. "
        f"Step times: {TIMING_ROUNDS} runs of {TIMING_STEPS} steps per strategy, alternated, "
        f"median of their {TIMING_LOG_EVERY}-step periods (compiling steps excluded); gradual "
        f"unfreezing is not timed (see TIMED). Peak RSS: of the sweep's kept run. "
        f"{minutes:.0f} min of training and evaluation on {os.cpu_count()} CPU cores."]
  if "probe" in parts:
    full = os.path.join(bench.workdir, chosen["full"])
    encoders = [("pretrained", "pretrained (imported)", bench.base, ()),
                ("random", "random, same shape", bench.base, ("--random-init",)),
                ("full", f"fine-tuned in full ({args.steps} steps, SST-2 + CoNLL)", full, ())]
    probe_tasks = [("strategies_sst2", "SST-2"), ("strategies_rte", "RTE")]
    for encoder, _, workdir, extra in encoders:
      for task, _ in probe_tasks:
        bench.probe(encoder, workdir, task, extra)
    lines += ["", "Feature-based transfer: logistic regression (scikit-learn) on mean-pooled encoder "
              f"outputs; SST-2 fits on its first {PROBE_TRAIN_EXAMPLES:,} training rows, RTE on all "
              "2,240 training pairs; accuracy on the same held-out splits:", "",
              *probe_table(bench, [(e, t) for e, t, *_ in encoders], probe_tasks)]
  print("\n".join(lines))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(bench.runs, f, indent=2)
  if args.results:
    command = "python benchmarks/finetune_strategies.py"
    command += f" --parts {args.parts}" if args.parts != "sweep,timing,probe" else ""
    command += f" --steps {args.steps}" if args.steps != 60 else ""
    quality.write_results(args.results, command, lines, marker="strategies")


if __name__ == "__main__":
  main()
