"""Transfer from a real pretrained T5: the real-data mixture fine-tuned from flan-t5-small-kd,
against the same budget from random weights.

    python benchmarks/transfer.py [--workdir /tmp/t5mix-transfer] [--steps 180] [--rte-steps 30]
                                  [--parts 0,a,s,r,c] [--max-examples N]
                                  [--results benchmarks/RESULTS.md] [--json FILE]

Every step is an ordinary t5mix command, printed before it runs:

  import   `t5mix import-hf ../shared/models/flan-t5-small-kd` (model.yaml, spiece.model, weights)
  heldout  held-out splits that share no text with training, written to WORKDIR/data with a task
           file WORKDIR/tasks.yaml: SST-2's last 1,000 rows, with every training row that contains
           or is contained in a held-out row dropped (SST-2 holds many sub-phrases of the same
           reviews); RTE's last 250 pairs; SQuAD's last 20% of articles; CoNLL-2003's valid.txt
  0        the imported model before fine-tuning
  a        T=2 multitask fine-tuning from it (configs/finetune_pretrained.yaml)
  s        the same steps and batch from random weights of the same shape and vocabulary, with the
           from-scratch recipe of benchmarks/quality.py (AdamW x parameter scale, cosine)
  r        RTE alone from the imported model, and from (a): T5's "multi-task, then fine-tune"
  c        (a)'s earlier checkpoints (every CURVE_EVERY steps) scored too: the metric against steps

Each model is scored with `t5mix eval` on the WHOLE held-out splits (--max-examples only for a smoke
run); classification scores come with their majority-class baseline. Each training run's step time
(its last logged rate) and peak resident memory are printed under the table. Runs already finished
in --workdir are reused, and an interrupted one resumes, so an interrupted benchmark goes on.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys

import yaml

import quality  # the sibling benchmark (run as a script, benchmarks/ is on the path): its runner

ROOT = quality.ROOT
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
PRETRAINED_HF = os.path.join(SHARED, "models", "flan-t5-small-kd")
TASKS = ["transfer_sst2", "transfer_rte", "transfer_squad", "transfer_conll"]
MIXTURE = "transfer_supervised"
INPUTS_LENGTH, TARGETS_LENGTH = 384, 64  # as in configs/finetune_pretrained.yaml
CURVE_EVERY = 50  # the training runs' checkpoint interval: the points of the metric-against-steps curve
# The from-scratch recipe (benchmarks/real_data/supervised.yaml's optimizer): the best this project
# found for random weights; the fine-tuning recipe (Adafactor 1e-3, constant) suits pretrained ones.
SCRATCH_OPTIMIZER = ["optimizer.name=adamw", "optimizer.learning_rate=0.03",
                     "optimizer.parameter_scale=true", "optimizer.schedule=cosine",
                     "optimizer.warmup_steps=100", "optimizer.weight_decay=0.01"]


def _normalise(text: str) -> str:
  return " ".join(text.lower().split())


def carve_sst2(out_dir: str, held_out_rows: int = 1000) -> dict:
  """SST-2 train.tsv → train/held-out TSVs with no shared text: the last rows are held out, and a
  training row that contains a held-out row or is contained in one is dropped."""
  with open(os.path.join(SHARED, "data", "sst2", "train.tsv"), newline="") as f:
    rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  header, rows = rows[0], rows[1:]
  train, held = rows[:-held_out_rows], rows[-held_out_rows:]
  held_texts = [_normalise(r[0]) for r in held]
  # Padded with spaces so that containment is of whole words.
  held_padded = [f" {t} " for t in held_texts]
  kept = []
  for row in train:
    text = f" {_normalise(row[0])} "
    if any(h in text or text in h for h in held_padded):
      continue
    kept.append(row)
  for name, part in (("train", kept), ("heldout", held)):
    with open(os.path.join(out_dir, f"sst2_{name}.tsv"), "w") as f:  # unquoted, as the source
      f.writelines("\t".join(row) + "\n" for row in [header, *part])
  return {"sst2_train_rows": len(train), "sst2_train_kept": len(kept), "sst2_heldout": len(held)}


def task_definitions(workdir: str) -> tuple[dict, dict]:
  """The four tasks and their T=2 mixture over SST-2 carved into WORKDIR/data and the shared data,
  as a task file's document; returns (document, carve stats)."""
  data_dir = os.path.join(workdir, "data")
  os.makedirs(data_dir, exist_ok=True)
  stats = carve_sst2(data_dir)
  shared = os.path.join(SHARED, "data")
  squad = os.path.join(shared, "squad", "squad-v1.1-part-a.json")
  rte = os.path.join(shared, "rte", "train.tsv")
  doc = {"tasks": [
      {"name": "transfer_sst2", "kind": "classification", "format": "tsv",
       "splits": {"train": os.path.join(data_dir, "sst2_train.tsv"),
                  "validation": os.path.join(data_dir, "sst2_heldout.tsv")},
       "template": "sst2 sentence: {text}", "label_words": ["negative", "positive"],
       "metrics": ["accuracy"]},
      {"name": "transfer_rte", "kind": "classification", "format": "tsv",
       "splits": {"train": {"path": rte, "select": ":-250"},
                  "validation": {"path": rte, "select": "-250:"}},
       "template": "rte sentence1: {sentence1} sentence2: {sentence2}",
       "label_words": ["entailment", "not_entailment"], "metrics": ["accuracy"]},
      {"name": "transfer_squad", "kind": "qa", "format": "squad_json",
       "splits": {"train": {"path": squad, "select": ":80%"},
                  "validation": {"path": squad, "select": "80%:"}}},
      {"name": "transfer_conll", "kind": "ner", "format": "conll", "scheme": "iob2",
       "splits": {"train": os.path.join(shared, "conll2003", "train.txt"),
                  "validation": os.path.join(shared, "conll2003", "valid.txt")}},
  ], "mixtures": [{"name": MIXTURE, "rate": "temperature", "temperature": 2.0, "tasks": TASKS}]}
  return doc, stats


def write_tasks(workdir: str) -> tuple[str, dict]:
  """WORKDIR/tasks.yaml of task_definitions; returns (path, carve stats)."""
  doc, stats = task_definitions(workdir)
  path = os.path.join(workdir, "tasks.yaml")
  with open(path, "w") as f:
    yaml.safe_dump(doc, f, sort_keys=False)
  return path, stats


class Transfer(quality.Bench):
  """quality.Bench's bookkeeping (runs.json, reuse of finished runs) for runs that take their
  vocabulary from the imported model rather than a trained one."""

  def __init__(self, args):
    super().__init__(args)
    self.pretrained = os.path.join(self.workdir, "pretrained")
    self.tasks_yaml = None
    self.max_examples = args.max_examples

  def prepare(self):
    if not os.path.isdir(os.path.join(self.pretrained, "checkpoints")):
      quality.run(["t5mix", "import-hf", PRETRAINED_HF, "--out", self.pretrained],
                  os.path.join(self.workdir, "logs", "import.log"))
    self.tasks_yaml, stats = write_tasks(self.workdir)
    self.runs.setdefault("carve", {}).update(stats)
    self.runs.setdefault("pretrained", {"steps": 0, "train_seconds": 0.0})
    self.save()

  def train(self, name, steps, *, init_from=None, overrides=()):
    """A `t5mix train` run in WORKDIR/name, checkpointed every CURVE_EVERY steps; an interrupted
    one resumes (t5mix's resume is exact), its training seconds summed over the invocations."""
    workdir = os.path.join(self.workdir, name)
    done = os.path.join(workdir, "checkpoints", str(steps))
    before = self.runs.get(name, {})
    if os.path.isdir(done) and before.get("steps") == steps:
      return workdir
    resumed = os.path.isdir(os.path.join(workdir, "checkpoints"))
    cmd = ["t5mix", "train", "--config", "configs/finetune_pretrained.yaml", "--workdir", workdir,
           "--tasks-dir", self.tasks_yaml, "--set", f"data.mixture={MIXTURE}",
           "--set", f"steps={steps}", "--set", f"checkpoint_every={min(CURVE_EVERY, steps)}",
           "--set", "keep_checkpoints=10"]
    for o in overrides:
      cmd += ["--set", o]
    if init_from:
      cmd += ["--init-from", os.path.join(self.workdir, init_from)]
    log_path = os.path.join(self.workdir, "logs", f"{name}.log")
    seconds, peak_gib = quality.run_measured(cmd, log_path)
    with open(log_path) as f:  # the compiled step's rate, from the last progress line
      rates = re.findall(r"([0-9.]+) steps/s", f.read())
    self.runs[name] = dict(
        steps=steps, train_seconds=round(seconds + (before.get("train_seconds", 0) if resumed else 0), 1),
        seconds_per_step=round(1 / float(rates[-1]), 2) if rates else None,
        peak_rss_gib=round(max(peak_gib, before.get("peak_rss_gib", 0) if resumed else 0), 2))
    self.save()
    return workdir

  def checkpoints(self, name) -> list[int]:
    directory = os.path.join(self.workdir, name, "checkpoints")
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())

  def evaluate(self, name, tasks, checkpoints="latest"):
    """Scores run `name` on the whole held-out splits: its last checkpoint (the table's row), or
    `checkpoints` (the curve's points, kept under the run's "curve")."""
    entry = self.runs[name]
    key = "metrics" if checkpoints == "latest" else "curve"
    if key in entry:
      return entry
    workdir = os.path.join(self.workdir, name)
    # The fine-tuning recipe's lengths for every model, the imported one (no config.yaml) too.
    cmd = ["t5mix", "eval", "--workdir", workdir, "--checkpoints", checkpoints, "--tasks",
           ",".join(tasks), "--tasks-dir", self.tasks_yaml, "--inputs-length", str(INPUTS_LENGTH),
           "--targets-length", str(TARGETS_LENGTH)]
    if self.max_examples:
      cmd += ["--max-examples", str(self.max_examples)]
    suffix = "eval" if checkpoints == "latest" else "curve"
    seconds = quality.run(cmd, os.path.join(self.workdir, "logs", f"{name}.{suffix}.log"))
    with open(os.path.join(workdir, "eval", "results.json")) as f:
      results = json.load(f)
    if checkpoints == "latest":
      (scores,) = results["steps"].values()
      entry.update(eval_seconds=round(seconds, 1), metrics=scores["metrics"],
                   task_means=scores["task_means"], average=scores["average"],
                   baselines=results.get("baselines", {}))
    else:
      entry.update(curve_eval_seconds=round(seconds, 1),
                   curve={step: scores["metrics"] for step, scores in results["steps"].items()})
    self.save()
    return entry


COLUMNS = [(task.replace("real_", "transfer_"), metric, title)
           for task, metric, title in quality.COLUMNS]


def table(bench: Transfer, rows: list[tuple]) -> list[str]:
  """quality.py's table over this benchmark's tasks, and the majority-class baselines."""
  lines = quality.table(bench, rows, COLUMNS)
  baselines = {}
  for _, name, *_ in rows:
    baselines.update(bench.runs.get(name, {}).get("baselines", {}))
  majority = []
  for task, metric, title in COLUMNS[:2]:
    value = baselines.get(task, {}).get("majority_class", {}).get("metrics", {}).get(metric)
    if value is not None:
      majority.append(f"{title} {value:.1f}")
  if majority:
    lines += ["", "Majority class (the training split's most frequent label, on the held-out "
              "split): " + ", ".join(majority) + "."]
  return lines


def curve_table(bench: Transfer, name: str) -> list[str]:
  """The run's main metrics at each checkpoint: its curve points and its final row."""
  run = bench.runs[name]
  points = {int(step): scores for step, scores in run.get("curve", {}).items()}
  points[run["steps"]] = run["metrics"]
  if "metrics" in bench.runs.get("pretrained", {}):  # step 0: the imported model itself
    points[0] = bench.runs["pretrained"]["metrics"]
  lines = ["| step | " + " | ".join(title for _, _, title in COLUMNS) + " |",
           "|---:|" + "---:|" * len(COLUMNS)]
  for step in sorted(points):
    cells = [points[step].get(task, {}).get(metric) for task, metric, _ in COLUMNS]
    lines.append(f"| {step} | " + " | ".join("" if v is None else f"{v:.1f}" for v in cells) + " |")
  return lines


def costs(bench: Transfer, names: list[str]) -> list[str]:
  """A line per training run: its step time (the last logged rate) and the peak memory."""
  out = []
  for name in names:
    run = bench.runs.get(name, {})
    if run.get("seconds_per_step"):
      out.append(f"- {name}: {run['seconds_per_step']:.1f} s a step (the recipe's batch of "
                 f"{INPUTS_LENGTH}+{TARGETS_LENGTH} tokens, packed), "
                 f"peak resident memory {run['peak_rss_gib']:.1f} GiB")
  return ["", "Cost of each training run on this machine:", *out] if out else []


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/t5mix-transfer")
  # 180 steps of 16 x (384+64) tokens: ~45 minutes on 2 CPU cores (14.5 s a step, RESULTS.md).
  parser.add_argument("--steps", type=int, default=180, help="multitask fine-tuning steps (a, s)")
  parser.add_argument("--rte-steps", type=int, default=30, help="RTE-alone steps (r)")
  parser.add_argument("--parts", default="0,a,s,r,c",
                      help="subset of 0,a,s,r,c (c: the curve of a)")
  parser.add_argument("--max-examples", type=int, help="score at most N examples per task "
                                                       "(a smoke run; the table is for whole splits)")
  parser.add_argument("--results", help="write the table into this markdown file (RESULTS.md)")
  parser.add_argument("--json", help="write every run's steps, times and metrics here")
  args = parser.parse_args()
  args.scale = 1.0  # quality.Bench's step multiplier; this benchmark takes step counts
  if not os.path.isdir(PRETRAINED_HF):
    sys.exit(f"{PRETRAINED_HF}: not found (the shared pretrained T5)")
  parts = set(args.parts.split(","))
  bench = Transfer(args)
  bench.prepare()
  rows = []
  if "0" in parts:
    bench.evaluate("pretrained", TASKS)
    rows.append(("imported, before fine-tuning", "pretrained"))
  if parts & {"a", "r"}:
    bench.train("a_pretrained_t2", args.steps, init_from="pretrained")
    bench.evaluate("a_pretrained_t2", TASKS)
    rows.append(("(a) from the pretrained T5, T=2", "a_pretrained_t2"))
  if "s" in parts:
    bench.train("s_scratch_t2", args.steps, overrides=(
        f"model={os.path.join(bench.pretrained, 'model.yaml')}",
        f"data.vocab={os.path.join(bench.pretrained, 'spiece.model')}", *SCRATCH_OPTIMIZER))
    bench.evaluate("s_scratch_t2", TASKS)
    rows.append(("(s) from random weights, T=2", "s_scratch_t2"))
  if "r" in parts:
    rte = ("data.mixture=transfer_rte",)
    bench.train("r_rte_from_pretrained", args.rte_steps, init_from="pretrained", overrides=rte)
    bench.evaluate("r_rte_from_pretrained", ["transfer_rte"])
    rows.append(("(r) RTE alone, from the pretrained T5", "r_rte_from_pretrained"))
    bench.train("r_rte_from_a", args.rte_steps, init_from="a_pretrained_t2", overrides=rte)
    bench.evaluate("r_rte_from_a", ["transfer_rte"])
    rows.append(("(r) RTE alone, from (a)", "r_rte_from_a", "a_pretrained_t2"))
  curve = []
  if "c" in parts:  # last: the points before (a)'s final checkpoint
    earlier = [s for s in bench.checkpoints("a_pretrained_t2") if s < args.steps]
    if earlier:
      bench.evaluate("a_pretrained_t2", TASKS, checkpoints=",".join(map(str, earlier)))
      curve = curve_table(bench, "a_pretrained_t2")
  shown = {name for _, *names in rows for name in names}  # the table's runs and those before them
  minutes = sum(bench.runs[n].get("train_seconds", 0) + bench.runs[n].get("eval_seconds", 0)
                + bench.runs[n].get("curve_eval_seconds", 0) for n in shown) / 60
  carve = bench.runs["carve"]
  lines = table(bench, rows) + [
      "", f"SST-2: {carve['sst2_train_kept']:,} of {carve['sst2_train_rows']:,} training rows kept "
      f"(the others contain, or are contained in, one of the {carve['sst2_heldout']:,} held-out "
      f"rows). Total {minutes:.0f} min of training and evaluation on {os.cpu_count()} CPU cores."]
  lines += costs(bench, [name for _, name, *_ in rows])
  if curve:
    lines += ["", "(a) against its steps, on the same whole held-out splits:", "", *curve]
  print("\n".join(lines))
  command = "python benchmarks/transfer.py"
  command += f" --parts {args.parts}" if args.parts != "0,a,s,r,c" else ""
  command += f" --steps {args.steps}" if args.steps != 180 else ""
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"minutes": minutes, "runs": bench.runs}, f, indent=2)
  if args.results:
    quality.write_results(args.results, command, lines, marker="transfer")


if __name__ == "__main__":
  main()
