"""Weights & Biases (logging.wandb), run offline: the same scalars and samples as TensorBoard, the
resolved config and the mixture's rates, one run continued across a resume; and the one-line error
when the extra is not installed."""

import glob

import pytest

from t5mix import config as config_lib
from t5mix import checkpoints, definitions, tracking, train

TINY = ["model=tiny", "data.mixture=demo_supervised", "data.batch_size=8", "data.inputs_length=64",
        "data.targets_length=16", "optimizer.warmup_steps=2", "log_every=2", "checkpoint_every=2",
        "eval_every=2", "eval_examples=2", "eval_samples=2",
        "logging.wandb.project=t5mix-test", "logging.wandb.mode=offline"]


@pytest.fixture(scope="module", autouse=True)
def builtin_definitions():
  definitions.load()


@pytest.fixture
def wandb_calls(monkeypatch, tmp_path):
  """What reaches wandb: each wandb.init's arguments and each run.log's (step, keys); wandb's own
  files (settings, caches) kept in tmp_path."""
  wandb = pytest.importorskip("wandb")  # the optional extra: pip install -e ".[wandb]"
  for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
    monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
  calls = {"init": [], "log": []}
  real_init = wandb.init

  def init(**kwargs):
    calls["init"].append(kwargs)
    run = real_init(**kwargs)
    real_log = run.log

    def log(data, step=None, **more):
      calls["log"].append((step, set(data)))
      return real_log(data, step=step, **more)
    run.log = log
    return run
  monkeypatch.setattr(wandb, "init", init)
  return calls


def _tensorboard_tags(workdir):
  import tensorflow as tf
  tags = set()
  for path in glob.glob(str(workdir / "tensorboard" / "events.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags.update(value.tag for value in event.summary.value)
  return tags


@pytest.mark.slow
def test_wandb_offline_logs_what_tensorboard_logs_and_resumes_the_same_run(tmp_path, wandb_calls):
  workdir = tmp_path / "run"
  lines = []
  train.train(config_lib.load(None, TINY + ["steps=4"]), str(workdir), quiet=True, log=lines.append)
  run_id = (workdir / checkpoints.WANDB_RUN_ID_FILE).read_text()
  started = [line for line in lines if line.startswith("wandb: ")]
  assert len(started) == 1 and started[0].startswith(
      f"wandb: started run {run_id} of project t5mix-test (offline, files in {workdir}/wandb/offline-run-"), lines

  # The same keys as TensorBoard: scalars, eval scores, samples, tokens seen per task.
  logged = set().union(*(keys for _, keys in wandb_calls["log"]))
  assert logged == _tensorboard_tags(workdir)
  assert {"loss", "learning_rate", "padding_share", "eval/average", "eval/demo_qa/f1",
          "samples/demo_qa", "tokens_seen/demo_qa", "task_loss/demo_ner"} <= logged
  assert {step for step, _ in wandb_calls["log"]} == {2, 4}
  # the resolved config and the mixture's rate table
  (init,) = wandb_calls["init"]
  assert (init["project"], init["mode"], init["id"], init["dir"]) == (
      "t5mix-test", "offline", None, str(workdir))
  assert init["config"]["steps"] == 4 and init["config"]["optimizer"]["parameter_scale"] is True
  rates = init["config"]["run"]["mixture"]["tasks"]
  assert set(rates) == {"demo_ner", "demo_qa", "demo_sentiment"}
  assert sum(r["rate"] for r in rates.values()) == pytest.approx(1.0)
  # offline: written to local files only, every key in them
  (log_file,) = glob.glob(str(workdir / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))
  data = open(log_file, "rb").read()
  assert all(key.encode() in data for key in logged | {"t5mix-test", "demo_sentiment"})

  # Resumed: the same wandb run goes on.
  lines.clear()
  first_session = len(wandb_calls["log"])
  train.train(config_lib.load(None, TINY + ["steps=6"]), str(workdir), quiet=True, log=lines.append)
  assert any(line.startswith(f"wandb: resumed run {run_id} of project t5mix-test") for line in lines)
  assert wandb_calls["init"][1]["id"] == run_id and wandb_calls["init"][1]["resume"] == "allow"
  assert {step for step, _ in wandb_calls["log"][first_session:]} == {6}
  assert len(glob.glob(str(workdir / "wandb" / "offline-run-*" / f"run-{run_id}.wandb"))) == 2


def test_wandb_without_the_extra_is_a_one_line_error(cli, expect_error, tmp_path, monkeypatch):
  monkeypatch.setattr(tracking, "wandb", None)
  rc, out, err = cli("train", "--workdir", tmp_path, "--set", "logging.wandb.project=p")
  expect_error(rc, err, "'logging.wandb': wandb is not installed; install it with "
                        "pip install -e \".[wandb]\"")
  rc, out, err = cli("train", "--workdir", tmp_path, "--set", "logging.wandb.mode=cloud")
  expect_error(rc, err, "'logging.wandb.mode': 'cloud' is not one of online, offline, disabled")
