"""`t5mix compare W1 W2 …`: runs side by side, from what their workdirs hold.

For each run: each task's score and the GLUE-style average at its best checkpoint (by average)
and its latest evaluated one, from its last `t5mix eval` (eval/results.json; a run without it is
listed as not evaluated); the steps, tokens seen and training minutes of its newest checkpoint
(checkpoints.read_totals). Then the settings in which the runs differ: config.yaml's keys, and
run.json's --init-from and mixture (rate, temperature, cap and each task's rate). Optionally a
markdown report and a grouped bar chart of the best checkpoints' scores.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

from t5mix import checkpoints
from t5mix import config as config_lib
from t5mix.errors import UserError


@dataclasses.dataclass
class RunSummary:
  name: str
  results: dict | None            # eval/results.json; None: never evaluated
  settings: dict[str, Any]        # {dotted key: value}: config.yaml's and run.json's
  step: int | None                # the newest checkpoint's (None: no checkpoint)
  tokens: int | None              # non-padding tokens trained on, all tasks (None: not recorded)
  seconds: float | None           # training time, over all sessions (None: not recorded)

  def checkpoint_rows(self) -> list[tuple[str, dict]]:
    """[(label, results.json's entry of that step)]: the best checkpoint by average and the
    latest evaluated one (one row when they are the same)."""
    steps = self.results["steps"]
    best, latest = str(self.results["single_best_checkpoint"]["step"]), max(steps, key=int)
    if best == latest:
      return [(f"best, latest {best}", steps[best])]
    return [(f"best {best}", steps[best]), (f"latest {latest}", steps[latest])]


def read_run(workdir: str, name: str) -> RunSummary:
  checkpoints.check_workdir(workdir)
  settings = config_lib.flat_settings(
      config_lib.read_saved(os.path.join(workdir, checkpoints.CONFIG_FILE)))
  info = checkpoints.read_run_info(workdir)
  if info:
    mixture = info.get("mixture") or {}
    settings["init_from"] = info.get("init_from")
    for key in ("rate", "temperature", "maximum"):
      settings[f"mixture.{key}"] = mixture.get(key)
    for task, row in (mixture.get("tasks") or {}).items():
      settings[f"mixture.rates.{task}"] = f"{100 * row['rate']:.1f}%"
  done = checkpoints.steps(workdir)
  step = done[-1] if done else None
  totals = checkpoints.read_totals(os.path.join(checkpoints.checkpoints_dir(workdir), str(step))
                                   ) if step is not None else {}
  tokens = sum(totals["tokens"].values()) if "tokens" in totals else None
  return RunSummary(name, checkpoints.read_eval_results(workdir), settings, step, tokens,
                    totals.get("seconds"))


def run_names(workdirs: list[str]) -> list[str]:
  """Each workdir's directory name, or the path as given where two names would be the same."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return [name if names.count(name) == 1 else w for name, w in zip(names, workdirs)]


def tasks_of(runs: list[RunSummary]) -> list[str]:
  return list(dict.fromkeys(t for r in runs if r.results for t in r.results["tasks"]))


def score_table(runs: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
  """(header, rows): per run, each task's mean and the average at its best and latest checkpoint,
  then its steps, tokens and minutes (on its first row)."""
  tasks = tasks_of(runs)
  header = ["run", "checkpoint", *tasks, "average", "steps", "tokens", "train min"]
  rows = []
  for run in runs:
    totals = [_count(run.step), _tokens(run.tokens),
              f"{run.seconds / 60:.1f}" if run.seconds is not None else "-"]
    if run.results is None:
      rows.append([run.name, "not evaluated", *["-"] * (len(tasks) + 1), *totals])
      continue
    for i, (label, entry) in enumerate(run.checkpoint_rows()):
      means = [f"{entry['task_means'][t]:.2f}" if t in entry["task_means"] else "-" for t in tasks]
      rows.append([run.name if i == 0 else "", label, *means, f"{entry['average']:.2f}",
                   *(totals if i == 0 else [""] * 3)])
  return header, rows


def settings_table(runs: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
  """(header, rows): the settings whose values are not the same in every run."""
  keys = list(dict.fromkeys(k for r in runs for k in r.settings))
  missing = object()
  rows = []
  for key in keys:
    values = [r.settings.get(key, missing) for r in runs]
    if any(v != values[0] for v in values):
      rows.append([key, *("-" if v is missing or v is None else str(v) for v in values)])
  return ["setting", *(r.name for r in runs)], rows


def format_table(header: list[str], rows: list[list[str]], *, right: range | tuple = (),
                 markdown: bool) -> list[str]:
  """Plain text as `t5mix eval` prints it, or a markdown table; columns `right` right-aligned."""
  if markdown:
    return ["| " + " | ".join(header) + " |",
            "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]
  widths = [max(len(c) for c in column) for column in zip(header, *rows)]

  def line(cells):
    return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
  return [line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]


def report(runs: list[RunSummary], *, markdown: bool = False, plot_path: str | None = None) -> list[str]:
  scores, settings = score_table(runs), settings_table(runs)
  lines = ["# t5mix compare", ""] if markdown else []
  lines += ["Scores (x100): each task's mean metric and their average (the GLUE-style score) at "
            "each run's best checkpoint (by average) and its latest evaluated one; steps, tokens "
            "seen and training minutes of its newest checkpoint.", ""]
  lines += format_table(*scores, right=range(2, len(scores[0])), markdown=markdown) + [""]
  if settings[1]:
    lines += ["Settings that differ:", ""] + format_table(*settings, markdown=markdown)
  else:
    lines.append("The runs' settings are the same.")
  if markdown and plot_path:
    lines += ["", f"![best checkpoint's scores]({plot_path})"]
  return lines


def plot(runs: list[RunSummary], path: str) -> None:
  """A bar per run for each task's mean and the average, at each run's best checkpoint."""
  import matplotlib  # slow to import: only when plotting
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  evaluated = [r for r in runs if r.results]
  if not evaluated:
    raise UserError("--plot: none of the runs was evaluated (no eval/results.json); run "
                    "`t5mix eval --workdir W` first")
  categories = tasks_of(evaluated) + ["average"]
  width = 0.8 / len(evaluated)
  fig, ax = plt.subplots(figsize=(max(6.0, len(categories) * (0.6 + 0.3 * len(evaluated))), 4.5))
  for i, run in enumerate(evaluated):
    best = run.results["steps"][str(run.results["single_best_checkpoint"]["step"])]
    values = [best["task_means"].get(t, math.nan) for t in categories[:-1]] + [best["average"]]
    x = [j - 0.4 + width * (i + 0.5) for j in range(len(categories))]
    ax.bar(x, values, width, label=f"{run.name} (step {run.results['single_best_checkpoint']['step']})")
  ax.set_xticks(range(len(categories)), categories)
  ax.set_ylabel("mean metric (x100), best checkpoint")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def compare(workdirs: list[str], *, out: str | None = None, plot_path: str | None = None,
            log: Callable[[str], None] = print) -> list[RunSummary]:
  """Prints the comparison; writes the markdown report to `out` and the chart to `plot_path`."""
  runs = [read_run(w, name) for w, name in zip(workdirs, run_names(workdirs))]
  for line in report(runs):
    log(line)
  if plot_path:
    plot(runs, plot_path)
  if out:
    link = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(out))) if plot_path else None
    with open(out, "w") as f:
      f.write("\n".join(report(runs, markdown=True, plot_path=link)) + "\n")
  written = [p for p in (out, plot_path) if p]
  if written:
    log(f"wrote {' and '.join(written)}")
  return runs


def _count(n: int | None) -> str:
  return f"{n:,}" if n is not None else "-"


def _tokens(n: int | None) -> str:
  return "-" if n is None else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"
