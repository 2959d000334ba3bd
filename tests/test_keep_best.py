"""keep_best: the best checkpoints by their score in evaluation during training stay next to the
latest keep_checkpoints, across a resume; `t5mix eval --checkpoints best` scores them."""

import contextlib
import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5mix import checkpoints, definitions, evaluate, train
from t5mix import config as config_lib
from t5mix.errors import UserError

TINY = ["model=tiny", "data.mixture=demo_supervised", "data.batch_size=8", "data.inputs_length=64",
        "data.targets_length=16", "log_every=5", "optimizer.warmup_steps=5", "eval_examples=2",
        "eval_samples=0"]
KEEP_BEST = ["checkpoint_every=5", "eval_every=5", "keep_checkpoints=1",
             "keep_best.metric=demo_sentiment/accuracy", "keep_best.mode=max", "keep_best.n=1"]


@pytest.fixture(scope="module", autouse=True)
def builtin_definitions():
  definitions.load()


def _train(workdir, *overrides, log=lambda *a: None):
  c = config_lib.load(None, TINY + list(overrides))
  return train.train(c, str(workdir), quiet=True, log=log)


def _scripted_scores(monkeypatch, by_step):
  """Evaluation during training scores demo_sentiment by_step[step] (accuracy and f1_macro):
  a run whose best step is chosen, not left to a tiny model's noise."""
  def evaluate_(self, params, step=None):
    return {"demo_sentiment": {"accuracy": by_step[step], "f1_macro": by_step[step] / 2}}
  monkeypatch.setattr(evaluate.Evaluator, "evaluate", evaluate_)


@pytest.mark.slow
def test_keep_best_keeps_the_best_checkpoint_beside_the_latest_across_a_resume(
    tmp_path, monkeypatch, cli):
  by_step = {5: 30.0, 10: 50.0, 15: 20.0, 20: 10.0}  # the best, step 10, is not the last
  with monkeypatch.context() as m:
    _scripted_scores(m, by_step)
    _train(tmp_path, "steps=10", *KEEP_BEST)
    assert checkpoints.steps(str(tmp_path)) == [10]  # the latest is also the best
    # Resumed: a fresh manager reads step 10's saved score back, else saving 15 would delete it.
    _train(tmp_path, "steps=20", *KEEP_BEST)
  assert checkpoints.steps(str(tmp_path)) == [10, 20]
  saved = ocp.CheckpointManager(checkpoints.checkpoints_dir(str(tmp_path))).metrics(10)
  assert saved["demo_sentiment/accuracy"] == 50.0 and saved["demo_sentiment/mean"] == 37.5
  assert saved["average"] == 37.5
  assert checkpoints.choose_steps(str(tmp_path), "best") == [10]

  rc, out, err = cli("eval", "--workdir", tmp_path, "--checkpoints", "best", "--max-examples", 2)
  assert rc == 0, err
  assert list(json.loads((tmp_path / "eval" / "results.json").read_text())["steps"]) == ["10"]


def test_best_steps_follow_mode_and_n_and_ignore_unscored_checkpoints(tmp_path):
  """keep_best.mode min over TASK/METRIC, n=2: the two lowest scores, beside the latest (which
  was saved without a score)."""
  c = config_lib.load(None, ["eval_every=10", "checkpoint_every=10", "keep_checkpoints=1",
                             "keep_best.metric=demo_qa/f1", "keep_best.mode=min", "keep_best.n=2"])
  config_lib.save(c, str(tmp_path / checkpoints.CONFIG_FILE))
  f1 = {10: 40.0, 20: 10.0, 30: 30.0, 40: 20.0, 50: None}  # 50: saved without a score
  with contextlib.closing(checkpoints.manager(str(tmp_path), c.keep_checkpoints,
                                              keep_best=c.keep_best)) as m:
    for step, value in f1.items():
      m.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.zeros(2)})),
             metrics=None if value is None else {"demo_qa/f1": value, "average": 99.0})
      m.wait_until_finished()
  assert checkpoints.steps(str(tmp_path)) == [20, 40, 50]
  assert checkpoints.choose_steps(str(tmp_path), "best") == [20, 40]


def test_keep_best_config_errors():
  def error(*overrides):
    with pytest.raises(UserError) as e:
      config_lib.load(None, list(overrides))
    return str(e.value)
  assert "set eval_every" in error("keep_best.metric=average")
  assert "checkpoint_every (100) must be a multiple of eval_every (30)" in error(
      "keep_best.metric=average", "eval_every=30")
  assert "is not 'average' or TASK/METRIC" in error("keep_best.metric=f1", "eval_every=100")
  assert "'keep_best.mode': 'best' is not max or min" in error("keep_best.mode=best")
  assert "'keep_best.n' must be positive" in error("keep_best.n=0")


@pytest.mark.slow
def test_keep_best_errors_of_a_run(tmp_path, cli, expect_error):
  # --checkpoints best on a run trained without keep_best
  _train(tmp_path, "steps=2", "checkpoint_every=2")
  rc, out, err = cli("eval", "--workdir", tmp_path, "--checkpoints", "best")
  expect_error(rc, err, "--checkpoints best:", "was trained without keep_best")
  # a task that evaluation during training does not score: before the first step
  with pytest.raises(UserError, match="names task 'demo_nli', which is not evaluated; the "
                                      "evaluated tasks are demo_ner, demo_qa, demo_sentiment"):
    _train(tmp_path / "other", "steps=10", "checkpoint_every=5", "eval_every=5",
           "keep_best.metric=demo_nli/accuracy")
