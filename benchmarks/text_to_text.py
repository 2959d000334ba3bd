"""Text-to-text generation from the real pretrained T5: WMT en→de translation (BLEU, chrF) and
DialogSum summarisation (ROUGE), fine-tuned from flan-t5-small-kd and, for DialogSum, from random
weights at the same budget.

    python benchmarks/text_to_text.py [--workdir /tmp/t5mix-text-to-text] [--scale 1.0]
                                      [--parts 0,w,d,m] [--max-examples N]
                                      [--results benchmarks/RESULTS.md] [--json FILE]
                                      [--report-only]

Every step is an ordinary t5mix command, printed before it runs, over the task file this script
writes, WORKDIR/tasks.yaml (kind seq2seq over ../shared/data, registered like a user's files):

  t2t_wmt_en_de  newstest2013 (format: parallel): the first 2,500 pairs train, the last 500 are
                 held out; "translate English to German: {source}"; bleu, chrf
  t2t_dialogsum  DialogSum (JSON lines): train.jsonl trains, dev.jsonl (500) is held out;
                 "summarize: {dialogue}" -> "{summary}"; rouge

  import  `t5mix import-hf ../shared/models/flan-t5-small-kd` (model.yaml, spiece.model, weights)
  0       the imported model before fine-tuning
  w       WMT fine-tuning from it (configs/finetune_pretrained.yaml's optimizer)
  d       DialogSum fine-tuning from it, and the same steps from random weights of the same shape
          and vocabulary (transfer.py's from-scratch recipe)
  m       both mixed (T=2) with transfer.py's SST-2, RTE, SQuAD and CoNLL-2003 tasks, from it;
          scored on the two generation tasks, to set beside (w) and (d) alone

WMT is scored with greedy decoding and, for 0 and w, with beam search (4 beams, length penalty
0.6); DialogSum greedily; each with `t5mix eval` on the WHOLE held-out split (--max-examples only
for a smoke run).
Step counts are fixed, so the same command gives the same numbers. They aim at 30 minutes per
run (training and evaluation) on 2 CPU cores, as estimated from a --scale 0.01 smoke run's step
times; no full-size run has checked that yet, and a run over it is flagged under the table.
--scale multiplies them (0.01 for a smoke run). Runs already
finished in --workdir are reused, and an interrupted one resumes (WORKDIR/runs.json);
--report-only runs nothing and prints (or writes, with --results) the table of those so far.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import yaml

import quality  # the sibling benchmarks (benchmarks/ is on the path when run as a script)
import transfer

WMT, DIALOGSUM, MIXTURE = "t2t_wmt_en_de", "t2t_dialogsum", "t2t_mixed"
WMT_TRAIN_PAIRS = 2500  # of newstest2013's 3,000; the rest is held out
BUDGET_MINUTES = 30  # per run, training and its evaluation
BATCH_SIZE = 8
# (inputs, targets) lengths per part: WMT sentences are ~40 T5 tokens (128 keeps nearly all whole);
# DialogSum dialogues ~200 (512 keeps nearly all), summaries ~30.
LENGTHS = {"w": (128, 128), "d": (512, 64), "m": (512, 128)}
# At --scale 1, for an otherwise idle 2-core machine, from a smoke run's step times (flan-t5-small,
# batch 8): w ~4.5 s a step (~15 minutes), d and m ~13 s (~22 minutes), leaving the rest for
# evaluation, of which WMT's beam search is the largest part (500 sentences x 4 beams, up to 128
# tokens: ~10 minutes), so the mixed run is scored greedily only.
STEPS = {"w": 200, "d": 100, "m": 100}
BEAMS = 4


def write_tasks(workdir: str) -> str:
  """WORKDIR/tasks.yaml: the two generation tasks over the shared data, transfer.py's four
  classification/NER/QA tasks, and the mixture of all six; returns its path."""
  data = os.path.join(transfer.SHARED, "data")
  wmt = {"source": os.path.join(data, "wmt", "newstest2013.en"),
         "target": os.path.join(data, "wmt", "newstest2013.de")}
  doc, _ = transfer.task_definitions(workdir)
  doc["tasks"] += [
      {"name": WMT, "kind": "seq2seq", "format": "parallel",
       "splits": {"train": {**wmt, "select": f":{WMT_TRAIN_PAIRS}"},
                  "validation": {**wmt, "select": f"{WMT_TRAIN_PAIRS}:"}},
       "template": "translate English to German: {source}", "metrics": ["bleu", "chrf"],
       "max_decode_length": LENGTHS["w"][1]},
      {"name": DIALOGSUM, "kind": "seq2seq", "format": "jsonl",
       "splits": {"train": os.path.join(data, "dialogsum", "train.jsonl"),
                  "validation": os.path.join(data, "dialogsum", "dev.jsonl")},
       "template": "summarize: {dialogue}", "target_template": "{summary}", "metrics": ["rouge"],
       "max_decode_length": LENGTHS["d"][1]}]
  # T5's multitask question: the generation tasks beside the GLUE/SQuAD/CoNLL ones, at T=2.
  doc["mixtures"] = [{"name": MIXTURE, "rate": "temperature", "temperature": 2.0,
                      "tasks": [WMT, DIALOGSUM, *transfer.TASKS]}]
  path = os.path.join(workdir, "tasks.yaml")
  with open(path, "w") as f:
    yaml.safe_dump(doc, f, sort_keys=False)
  return path


class TextToText(quality.Bench):
  """quality.Bench's bookkeeping (runs.json, reuse of finished runs) for runs that start from the
  imported model or from random weights of its shape, each evaluated once per decoding."""

  def __init__(self, args):
    super().__init__(args)
    self.pretrained = os.path.join(self.workdir, "pretrained")
    self.max_examples = args.max_examples
    self.tasks_yaml = None
    self.report_only = args.report_only

  def prepare(self):
    if self.report_only:
      return
    if not os.path.isdir(os.path.join(self.pretrained, "checkpoints")):
      quality.run(["t5mix", "import-hf", transfer.PRETRAINED_HF, "--out", self.pretrained],
                  os.path.join(self.workdir, "logs", "import.log"))
    self.tasks_yaml = write_tasks(self.workdir)
    self.runs.setdefault("pretrained", {"steps": 0, "train_seconds": 0.0})
    self.save()

  def steps(self, part: str) -> int:
    return max(1, round(STEPS[part] * self.scale))

  def train(self, name: str, part: str, mixture: str, *, scratch: bool = False) -> None:
    """A `t5mix train` run of `part`'s steps and lengths in WORKDIR/name, from the imported model
    (or, `scratch`, from random weights of its shape); skipped once it reached its steps."""
    if self.report_only:
      return
    steps, (inputs_length, targets_length) = self.steps(part), LENGTHS[part]
    workdir = os.path.join(self.workdir, name)
    before = self.runs.get(name, {})
    done = os.path.isdir(os.path.join(workdir, "checkpoints", str(steps)))
    if done and before.get("steps") == steps:
      return
    resumed = os.path.isdir(os.path.join(workdir, "checkpoints"))
    cmd = ["t5mix", "train", "--config", "configs/finetune_pretrained.yaml", "--workdir", workdir,
           "--tasks-dir", self.tasks_yaml]
    for key, value in (("data.mixture", mixture), ("steps", steps), ("checkpoint_every", steps),
                       ("keep_checkpoints", 1), ("log_every", min(25, steps)),
                       ("data.batch_size", BATCH_SIZE), ("data.inputs_length", inputs_length),
                       ("data.targets_length", targets_length)):
      cmd += ["--set", f"{key}={value}"]
    if scratch:
      for override in (f"model={os.path.join(self.pretrained, 'model.yaml')}",
                       f"data.vocab={os.path.join(self.pretrained, 'spiece.model')}",
                       *transfer.SCRATCH_OPTIMIZER,
                       # its 100 warmup steps were for 180; keep warmup a fifth of the run
                       f"optimizer.warmup_steps={max(1, steps // 5)}"):
        cmd += ["--set", override]
    else:
      cmd += ["--init-from", self.pretrained]
    log_path = os.path.join(self.workdir, "logs", f"{name}.log")
    seconds, peak_gib = quality.run_measured(cmd, log_path)
    with open(log_path) as f:  # the compiled step's rate, from the last progress line
      rates = re.findall(r"([0-9.]+) steps/s", f.read())
    earlier = before.get("train_seconds", 0) if resumed else 0  # an interrupted run's first part
    self.runs[name] = dict(steps=steps, train_seconds=round(seconds + earlier, 1),
                           seconds_per_step=round(1 / float(rates[-1]), 2) if rates else None,
                           peak_rss_gib=round(peak_gib, 2))
    self.save()

  def evaluate(self, name: str, tasks: list[str], part: str, beam_size: int = 1) -> None:
    """`t5mix eval` of the run's latest checkpoint on the whole held-out splits of `tasks` at
    `part`'s lengths, decoding with `beam_size` beams; the results of each decoding are kept
    under the run's evals["beam{beam_size}"], task by task."""
    if self.report_only:
      return
    entry, key = self.runs[name], f"beam{beam_size}"
    kept = entry.setdefault("evals", {}).setdefault(
        key, {"seconds": 0.0, "metrics": {}, "signatures": {}, "truncation": {}, "examples": {}})
    if all(task in kept["metrics"] for task in tasks):
      return
    workdir = os.path.join(self.workdir, name)
    inputs_length, targets_length = LENGTHS[part]
    cmd = ["t5mix", "eval", "--workdir", workdir, "--checkpoints", "latest", "--tasks",
           ",".join(tasks), "--tasks-dir", self.tasks_yaml, "--beam-size", str(beam_size),
           "--inputs-length", str(inputs_length), "--targets-length", str(targets_length)]
    if self.max_examples:
      cmd += ["--max-examples", str(self.max_examples)]
    log_name = f"{name}.eval.{'+'.join(tasks)}.{key}.log"
    seconds = quality.run(cmd, os.path.join(self.workdir, "logs", log_name))
    with open(os.path.join(workdir, "eval", "results.json")) as f:
      results = json.load(f)
    (scores,) = results["steps"].values()
    kept["seconds"] = round(kept["seconds"] + seconds, 1)
    kept["metrics"].update(scores["metrics"])
    for field in ("signatures", "truncation", "examples"):
      kept[field].update(results[field])
    self.save()

  def minutes(self, name: str) -> float:
    """A run's training and evaluation minutes."""
    run = self.runs.get(name, {})
    evals = sum(e["seconds"] for e in run.get("evals", {}).values())
    return (run.get("train_seconds", 0) + evals) / 60


# The table's columns: (task, metric, decoding, title).
COLUMNS = [(WMT, "bleu", "beam1", "WMT BLEU greedy"),
           (WMT, "bleu", f"beam{BEAMS}", f"WMT BLEU beam {BEAMS}"),
           (WMT, "chrf", "beam1", "WMT chrF greedy"),
           (DIALOGSUM, "rouge1", "beam1", "DialogSum R-1"),
           (DIALOGSUM, "rouge2", "beam1", "DialogSum R-2"),
           (DIALOGSUM, "rougeLsum", "beam1", "DialogSum R-Lsum")]


def table(bench: TextToText, rows: list[tuple[str, str]]) -> list[str]:
  """Markdown: one row per (label, run) with its steps, the columns' scores and its minutes."""
  lines = ["| run | steps | " + " | ".join(c[3] for c in COLUMNS) + " | train + eval min |",
           "|---|---:|" + "---:|" * (len(COLUMNS) + 1)]
  for label, name in rows:
    run = bench.runs.get(name, {})
    evals = run.get("evals", {})
    cells = [evals.get(decoding, {}).get("metrics", {}).get(task, {}).get(metric)
             for task, metric, decoding, _ in COLUMNS]
    lines.append(f"| {label} | {run.get('steps', 0)} | "
                 + " | ".join("" if v is None else f"{v:.1f}" for v in cells)
                 + f" | {bench.minutes(name):.1f} |")
  return lines


def notes(bench: TextToText, rows: list[tuple[str, str]]) -> list[str]:
  """The sacrebleu signatures, how many held-out inputs the lengths cut, each run's cost, and any
  run over the budget."""
  evals = [e for _, name in rows for e in bench.runs.get(name, {}).get("evals", {}).values()]
  signatures, cut = {}, {}
  for e in evals:
    for task_signatures in e["signatures"].values():
      signatures.update(task_signatures)
    for task, t in e["truncation"].items():
      cut[task, t["lengths"]["inputs"]] = t
  lines = []
  if signatures:
    lines += ["", "sacrebleu signatures: " + "; ".join(f"{m} `{s}`" for m, s in signatures.items())]
  if cut:
    lines += ["", "Held-out inputs cut by the inputs length:"]
    lines += [f"- {task} at {length} tokens: {t['inputs']:,} of {t['counted']:,}"
              for (task, length), t in cut.items()]
  lines += ["", "Cost of each run on this machine:"]
  for _, name in rows:
    run = bench.runs.get(name, {})
    step = (f"{run['seconds_per_step']:.1f} s a step (batch {BATCH_SIZE}, packed), peak resident "
            f"memory {run['peak_rss_gib']:.1f} GiB, " if run.get("seconds_per_step") else "")
    over = (f" (over the {BUDGET_MINUTES}-minute budget)"
            if bench.minutes(name) > BUDGET_MINUTES else "")
    lines.append(f"- {name}: {step}{bench.minutes(name):.1f} min in all{over}")
    seen = examples_seen(bench, name)
    if len(seen) > 1:  # a mixture: how its examples were shared out
      total = sum(seen.values())
      lines.append("  examples trained on, per task: " + ", ".join(
          f"{task} {n:,} ({100 * n / total:.0f}%)" for task, n in seen.items()))
  return lines


def examples_seen(bench: TextToText, name: str) -> dict[str, int]:
  """{task: examples} a run trained on, from the last line of its `t5mix train` log."""
  path = os.path.join(bench.workdir, "logs", f"{name}.log")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    found = re.findall(r"examples seen per task: (\{.*?\})", f.read())
  return json.loads(found[-1].replace("'", '"')) if found else {}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/t5mix-text-to-text")
  parser.add_argument("--scale", type=float, default=1.0, help="multiplies every step count")
  parser.add_argument("--parts", default="0,w,d,m", help="subset of 0,w,d,m")
  parser.add_argument("--max-examples", type=int, help="score at most N examples per task "
                                                       "(a smoke run; the table is for whole splits)")
  parser.add_argument("--results", help="write the table into this markdown file (RESULTS.md)")
  parser.add_argument("--json", help="write every run's steps, times and metrics here")
  parser.add_argument("--report-only", action="store_true",
                      help="run nothing: the table of what --workdir holds so far")
  args = parser.parse_args()
  if not os.path.isdir(transfer.PRETRAINED_HF):
    sys.exit(f"{transfer.PRETRAINED_HF}: not found (the shared pretrained T5)")
  parts = set(args.parts.split(","))
  bench = TextToText(args)
  bench.prepare()
  rows = []
  if "0" in parts:
    bench.evaluate("pretrained", [WMT], "w")
    bench.evaluate("pretrained", [DIALOGSUM], "d")
    rows.append(("imported flan-t5-small-kd, before fine-tuning", "pretrained"))
  if "w" in parts:
    bench.train("w_wmt", "w", WMT)
    bench.evaluate("w_wmt", [WMT], "w")
    rows.append(("(w) WMT en→de from the pretrained T5", "w_wmt"))
  if "d" in parts:
    bench.train("d_dialogsum", "d", DIALOGSUM)
    bench.evaluate("d_dialogsum", [DIALOGSUM], "d")
    rows.append(("(d) DialogSum from the pretrained T5", "d_dialogsum"))
    bench.train("d_dialogsum_scratch", "d", DIALOGSUM, scratch=True)
    bench.evaluate("d_dialogsum_scratch", [DIALOGSUM], "d")
    rows.append(("(d) DialogSum from random weights, same budget", "d_dialogsum_scratch"))
  if "m" in parts:
    bench.train("m_mixed", "m", MIXTURE)
    bench.evaluate("m_mixed", [WMT, DIALOGSUM], "m")
    rows.append(("(m) WMT + DialogSum + SST-2/RTE/SQuAD/CoNLL mixed (T=2) from the pretrained T5",
                 "m_mixed"))
  # Beam search last: it is the slowest scoring, and the greedy rows answer the main questions.
  for name, part in (("pretrained", "0"), ("w_wmt", "w")):
    if part in parts:
      bench.evaluate(name, [WMT], "w", beam_size=BEAMS)
  if args.report_only:  # the rows finished so far
    rows = [(label, name) for label, name in rows if bench.runs.get(name, {}).get("evals")]
  minutes = sum(bench.minutes(name) for _, name in rows)
  lines = table(bench, rows) + notes(bench, rows) + [
      "", f"Total {minutes:.0f} min of training and evaluation on {os.cpu_count()} CPU cores."]
  print("\n".join(lines))
  command = "python benchmarks/text_to_text.py"
  command += f" --parts {args.parts}" if args.parts != "0,w,d,m" else ""
  command += f" --scale {args.scale:g}" if args.scale != 1 else ""
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"minutes": minutes, "runs": bench.runs}, f, indent=2)
  if args.results:
    quality.write_results(args.results, command, lines, marker="text-to-text")


if __name__ == "__main__":
  main()
