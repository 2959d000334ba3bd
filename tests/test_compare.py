"""`t5mix compare`: runs side by side from their workdirs' files (config.yaml, run.json,
eval/results.json, the newest checkpoint's totals), as text, markdown and a grouped bar chart."""

import json
import shutil

import pytest

from t5mix import checkpoints, compare, eval_report
from t5mix import config as config_lib

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _workdir(root, name, *, mixture, rate, temperature, rates, by_step=None, step=400,
             tokens=None, seconds=None, overrides=()):
  """A workdir as train and eval leave it: config.yaml, model.yaml, run.json, the newest
  checkpoint's totals.json, and (by_step: {step: {task: {metric: value}}}) eval/results.json."""
  workdir = root / name
  (workdir / "checkpoints" / str(step) / "data").mkdir(parents=True)
  shutil.copy(f"{config_lib.CONFIG_DIR}/model/tiny.yaml", workdir / checkpoints.MODEL_FILE)
  config_lib.save(config_lib.load(None, [f"data.mixture={mixture}", *overrides]),
                  str(workdir / checkpoints.CONFIG_FILE))
  checkpoints.write_run_info(str(workdir), {"init_from": None, "mixture": {
      "name": mixture, "rate": rate, "temperature": temperature, "maximum": None,
      "tasks": {t: {"examples": 3000, "capped": 3000, "rate": r} for t, r in rates.items()}}})
  if tokens is not None:
    (workdir / "checkpoints" / str(step) / "data" / checkpoints.TOTALS_FILE).write_text(
        json.dumps({"tokens": tokens, "seconds": seconds}))
  if by_step:
    (workdir / "eval").mkdir()
    (workdir / checkpoints.EVAL_RESULTS_FILE).write_text(json.dumps(eval_report.summarize(by_step)))
  return workdir


@pytest.fixture
def three_runs(tmp_path):
  """T=1 and equal mixing, evaluated (T=1's best checkpoint is not its latest), and a run that
  was never evaluated."""
  t1 = _workdir(tmp_path, "t1", mixture="demo_t1", rate="temperature", temperature=1.0,
                rates={"qa": 0.25, "ner": 0.75}, tokens={"qa": 1_000_000, "ner": 3_000_000},
                seconds=150.0, by_step={200: {"qa": {"em": 10.0, "f1": 20.0}, "ner": {"f1": 60.0}},
                                        400: {"qa": {"em": 8.0, "f1": 12.0}, "ner": {"f1": 58.0}}})
  equal = _workdir(tmp_path, "equal", mixture="demo_equal", rate="equal", temperature=None,
                   rates={"qa": 0.5, "ner": 0.5}, tokens={"qa": 2_000_000, "ner": 2_000_000},
                   seconds=162.0, by_step={400: {"qa": {"em": 20.0, "f1": 30.0}, "ner": {"f1": 40.0}}})
  fresh = _workdir(tmp_path, "fresh", mixture="demo_equal", rate="equal", temperature=None,
                   rates={"qa": 0.5, "ner": 0.5}, step=100, overrides=["optimizer.learning_rate=0.003"])
  return t1, equal, fresh


def test_compare_prints_scores_totals_and_the_settings_that_differ(three_runs):
  lines = []
  runs = compare.compare([str(w) for w in three_runs], log=lines.append)
  assert [r.name for r in runs] == ["t1", "equal", "fresh"]
  text = "\n".join(lines)
  table = lines[lines.index("") + 1:]
  assert table[:6] == [
      "run    checkpoint           qa    ner  average  steps  tokens  train min",
      "-----  ----------------  -----  -----  -------  -----  ------  ---------",
      "t1     best 200          15.00  60.00    37.50    400   4.00M        2.5",
      "       latest 400        10.00  58.00    34.00",
      "equal  best, latest 400  25.00  40.00    32.50    400   4.00M        2.7",
      "fresh  not evaluated         -      -        -    100       -          -"], text
  settings = table[table.index("Settings that differ:") + 2:]
  rows = {line.split()[0]: line.split()[1:] for line in settings[2:]}
  assert rows == {"optimizer.learning_rate": ["0.01", "0.01", "0.003"],
                  "data.mixture": ["demo_t1", "demo_equal", "demo_equal"],
                  "mixture.rate": ["temperature", "equal", "equal"],
                  "mixture.temperature": ["1.0", "-", "-"],
                  "mixture.rates.qa": ["25.0%", "50.0%", "50.0%"],
                  "mixture.rates.ner": ["75.0%", "50.0%", "50.0%"]}, text


def test_compare_writes_markdown_and_a_grouped_bar_chart(three_runs, tmp_path, cli, monkeypatch):
  import matplotlib.figure
  figures = []
  real_savefig = matplotlib.figure.Figure.savefig
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                      lambda self, *a, **k: (figures.append(self), real_savefig(self, *a, **k)))
  out, png = tmp_path / "report" / "report.md", tmp_path / "report" / "fig.png"
  out.parent.mkdir()
  rc, stdout, err = cli("compare", *three_runs, "--out", out, "--plot", png)
  assert rc == 0, err
  assert stdout.strip().endswith(f"wrote {out} and {png}")
  markdown = out.read_text().splitlines()
  assert markdown[0] == "# t5mix compare"
  assert "| run | checkpoint | qa | ner | average | steps | tokens | train min |" in markdown
  assert "|---|---|---:|---:|---:|---:|---:|---:|" in markdown
  assert "| t1 | best 200 | 15.00 | 60.00 | 37.50 | 400 | 4.00M | 2.5 |" in markdown
  assert "| fresh | not evaluated | - | - | - | 100 | - | - |" in markdown
  assert "| mixture.rate | temperature | equal | equal |" in markdown
  assert markdown[-1] == "![best checkpoint's scores](fig.png)"
  assert png.read_bytes()[:8] == PNG_MAGIC
  # one bar per evaluated run for each task and the average, at its best checkpoint
  ax = figures[0].axes[0]
  heights = {label: [bar.get_height() for bar in bars] for bars, label in
             zip(ax.containers, [t.get_text() for t in ax.get_legend().get_texts()])}
  assert heights == {"t1 (step 200)": [15.0, 60.0, 37.5], "equal (step 400)": [25.0, 40.0, 32.5]}
  assert [t.get_text() for t in ax.get_xticklabels()] == ["qa", "ner", "average"]


def test_compare_errors(three_runs, tmp_path, cli, expect_error):
  rc, out, err = cli("compare", three_runs[0], tmp_path / "missing")
  expect_error(rc, err, "missing: no such workdir")
  rc, out, err = cli("compare", three_runs[2], "--plot", tmp_path / "fig.png")
  expect_error(rc, err, "--plot: none of the runs was evaluated")
