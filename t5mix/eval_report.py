"""What `t5mix eval` reports over checkpoints: results.json's summary (task means, the best
checkpoint per task and the single best one, T5's GLUE-style averages), the table it prints and the
metrics.png plot. Pure functions of the scores; scoring is t5mix/evaluate.py's.
"""

from __future__ import annotations

import os

import numpy as np

from t5mix import metrics


def summarize(by_step: dict[int, dict[str, dict[str, float]]]) -> dict:
  """results.json's content: scores per step, task means, best checkpoints and both averages."""
  steps = sorted(by_step)
  tasks = list(dict.fromkeys(t for s in steps for t in by_step[s]))
  means = {s: {t: metrics.task_mean(by_step[s][t]) for t in by_step[s]} for s in steps}
  best = {}
  for t in tasks:
    step = max((s for s in steps if t in means[s]), key=lambda s: (means[s][t], s))
    best[t] = {"step": step, "mean": means[step][t], "metrics": by_step[step][t]}
  averages = {s: metrics.glue_average(by_step[s]) for s in steps}
  single = max(steps, key=lambda s: (averages[s], s))
  return {
      "tasks": tasks,
      "steps": {str(s): {"metrics": by_step[s], "task_means": means[s], "average": averages[s]}
                for s in steps},
      "best_per_task": best,
      "average_best_per_task": float(np.mean([best[t]["mean"] for t in tasks])),
      "single_best_checkpoint": {"step": single, "average": averages[single]},
  }


BASELINE_ROWS = {"majority_class": "majority", "best_constant": "constant"}


def format_table(results: dict) -> list[str]:
  """Steps × tasks: each task's metrics and mean (`*`: the task's best checkpoint), then rows for
  the classification tasks' constant-answer baselines."""
  tasks, steps = results["tasks"], results["steps"]
  metric_names = {t: list(dict.fromkeys(m for s in steps.values() for m in s["metrics"].get(t, {})))
                  for t in tasks}
  header2 = ["step"]
  for t in tasks:
    header2 += metric_names[t] + ["mean"]
  header2.append("average")
  rows = []
  for key, entry in steps.items():
    row = [key]
    for t in tasks:
      scores = entry["metrics"].get(t)
      row += [f"{scores[m]:.2f}" if scores and m in scores else "-" for m in metric_names[t]]
      mark = "*" if results["best_per_task"][t]["step"] == int(key) else " "
      row.append(f"{entry['task_means'][t]:.2f}{mark}" if t in entry["task_means"] else "- ")
    single = results["single_best_checkpoint"]["step"] == int(key)
    row.append(f"{entry['average']:.2f}{'*' if single else ' '}")
    rows.append(row)
  baselines = results.get("baselines", {})
  for kind, title in BASELINE_ROWS.items():
    if not any(kind in b for b in baselines.values()):
      continue
    row = [title]
    for t in tasks:
      b = baselines.get(t, {}).get(kind)
      row += [f"{b['metrics'][m]:.2f}" if b and m in b["metrics"] else "-" for m in metric_names[t]]
      row.append(f"{b['mean']:.2f} " if b else "- ")
    rows.append(row + ["- "])  # an average over only the tasks that have baselines would mislead
  widths = [max(len(str(x)) for x in col) for col in zip(header2, *rows)]
  # The first header line names each task above its group of columns.
  header1, i = [""], 1
  for t in tasks:
    span = len(metric_names[t]) + 1
    width = sum(widths[i:i + span]) + 2 * (span - 1)
    header1.append(t[:width].ljust(width))
    i += span
  header1.append("")
  widths1 = [widths[0]] + [len(h) for h in header1[1:-1]] + [widths[-1]]
  lines = ["  ".join(h.ljust(w) for h, w in zip(header1, widths1)).rstrip(),
           "  ".join(h.rjust(w) for h, w in zip(header2, widths)),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
  best = ", ".join(f"{t} at step {b['step']} ({b['mean']:.2f})"
                   for t, b in results["best_per_task"].items())
  single = results["single_best_checkpoint"]
  lines += ["",
            f"best checkpoint per task (*): {best}",
            f"average of task means, best checkpoint per task: {results['average_best_per_task']:.2f}",
            f"average of task means, single best checkpoint (step {single['step']}): "
            f"{single['average']:.2f}"]
  if baselines:
    def labels(kind):
      return ", ".join(f"{t} {b[kind]['label']}" for t, b in baselines.items() if kind in b)
    lines.append(f"baselines, one label for every example: majority = the most frequent label of "
                 f"the train split ({labels('majority_class')}); constant = the label that scores "
                 f"best on this split ({labels('best_constant')})")
  return lines


def plot(results: dict, path: str) -> None:
  """Each task's mean metric (and the average) against step; a star on each task's best
  checkpoint (and the single best), a dotted line at each best constant-answer baseline."""
  import matplotlib  # slow to import: only when plotting
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  steps = sorted(int(s) for s in results["steps"])
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for t in results["tasks"]:
    points = [(s, results["steps"][str(s)]["task_means"][t]) for s in steps
              if t in results["steps"][str(s)]["task_means"]]
    line, = ax.plot(*zip(*points), marker="o", label=t)
    best = results["best_per_task"][t]
    ax.plot(best["step"], best["mean"], "*", color=line.get_color(), markersize=16)
    constant = results.get("baselines", {}).get(t, {}).get("best_constant")
    if constant:
      ax.axhline(constant["mean"], color=line.get_color(), linestyle=":",
                 label=f"{t}: constant {constant['label']!r}")
  ax.plot(steps, [results["steps"][str(s)]["average"] for s in steps], "k--", marker="s",
          label="average")
  single = results["single_best_checkpoint"]
  ax.plot(single["step"], single["average"], "k*", markersize=16, label="best checkpoint")
  ax.set_xlabel("step")
  ax.set_ylabel("mean metric (×100)")
  ax.set_title(f"{os.path.basename(results.get('workdir', '')) or 'eval'}: {results.get('split', '')}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
