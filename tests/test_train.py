"""Training: loss goes down, resume equals no interruption, init-from, SIGTERM, NaN, config errors."""

import glob
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5mix import config as config_lib
from t5mix import checkpoints, definitions, optim, train
from t5mix.errors import UserError

TINY = ["model=tiny", "data.mixture=demo_supervised", "data.batch_size=8", "data.inputs_length=64",
        "data.targets_length=16", "log_every=5", "optimizer.warmup_steps=5"]


@pytest.fixture(scope="module", autouse=True)
def builtin_definitions():
  definitions.load()


def _config(*overrides):
  return config_lib.load(None, TINY + list(overrides))


def _params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(path)["params"]


def _run(workdir, *overrides, **kwargs):
  return train.train(_config(*overrides), str(workdir), quiet=True, log=lambda *a: None, **kwargs)


def _assert_params_close(a, b, **tolerances):
  """`a` and `b` hold the same parameters (the same names, nothing missing on either side) with
  values within `tolerances` (np.testing.assert_allclose's; none: equal)."""
  leaves_a, leaves_b = (jax.tree_util.tree_leaves_with_path(t) for t in (a, b))
  names_a, names_b = ([jax.tree_util.keystr(path) for path, _ in leaves] for leaves in (leaves_a, leaves_b))
  assert names_a == names_b, f"only in one: {sorted(set(names_a) ^ set(names_b))}"
  for name, (_, x), (_, y) in zip(names_a, leaves_a, leaves_b, strict=True):
    np.testing.assert_allclose(x, y, **{"rtol": 0, "atol": 0, **tolerances}, err_msg=name)


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
  full = tmp_path / "full"
  _run(full, "steps=20", "checkpoint_every=10", "log_every=10")
  # Simulate a kill between checkpoints: drop the last checkpoint and rerun the same command.
  interrupted = tmp_path / "interrupted"
  shutil.copytree(full, interrupted)
  shutil.rmtree(interrupted / "checkpoints" / "20")
  _run(interrupted, "steps=20", "checkpoint_every=10", "log_every=10")
  a, b = _params(full, 20), _params(interrupted, 20)
  _assert_params_close(a, b, atol=1e-6)


def test_rerunning_a_finished_run_does_nothing(tmp_path):
  _run(tmp_path, "steps=4", "checkpoint_every=4")
  before = _params(tmp_path, 4)
  lines = []
  summary = train.train(_config("steps=4", "checkpoint_every=4"), str(tmp_path), quiet=True, log=lines.append)
  assert summary["step"] == 4 and summary["loss"] is None
  assert any(line.startswith("done: step 4, no steps left to run;") for line in lines), lines
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
  _assert_params_close(before, _params(tmp_path, 4))


def test_loss_goes_down_and_tasks_are_counted(tmp_path):
  lines = []
  summary = train.train(_config("steps=40", "log_every=10"), str(tmp_path), quiet=False,
                        log=lines.append)
  losses = [float(line.split("loss ")[1].split()[0]) for line in lines if line.startswith("step")]
  assert len(losses) == 4
  assert losses[-1] < 0.7 * losses[0], losses
  counts = summary["task_examples"]
  assert set(counts) == {"demo_sentiment", "demo_qa", "demo_ner"}
  assert all(n > 0 for n in counts.values())
  assert os.listdir(tmp_path / "tensorboard")
  # tokens/s counts only non-padding tokens: the fill share is a real fraction of the row slots.
  fills = [float(line.split("tok/s (")[1].split("%")[0]) for line in lines if line.startswith("step")]
  assert all(0 < f < 100 for f in fills), fills


def test_batch_metrics_count_non_padding_tokens_and_examples():
  # Two packed rows: row 0 holds two examples (task 1, then task 2), row 1 one example of task 1.
  batch = {
      "encoder_input_tokens": np.array([[5, 6, 1, 7, 1, 0], [8, 1, 0, 0, 0, 0]]),
      "decoder_target_tokens": np.array([[3, 1, 4, 1], [9, 9, 1, 0]]),
      "decoder_loss_weights": np.array([[1, 1, 1, 1], [1, 1, 1, 0]]),
      "decoder_positions": np.array([[0, 1, 0, 1], [0, 1, 2, 0]]),
      "encoder_segment_ids": np.array([[1, 1, 1, 2, 2, 0], [1, 1, 0, 0, 0, 0]]),
      "decoder_segment_ids": np.array([[1, 1, 2, 2], [1, 1, 1, 0]]),
      "task_ids": np.array([[1, 1, 2, 2], [1, 1, 1, 0]]),
  }
  losses = np.ones((2, 4), np.float32)
  m = jax.device_get(train.batch_metrics(batch, losses, num_tasks=2))
  assert m["real_tokens"] == 5 + 2 + 4 + 3  # non-zero input and target tokens, padding not counted
  assert m["tokens"] == 7
  np.testing.assert_array_equal(m["task_examples"], [0, 2, 1])
  np.testing.assert_array_equal(m["task_tokens"], [0, 5, 2])
  # tokens seen per task, inputs included: each input token counts for its example's task
  np.testing.assert_array_equal(m["task_real_tokens"], [0, (3 + 2) + (2 + 3), 2 + 2])
  assert m["task_real_tokens"].sum() == m["real_tokens"]
  # unpacked rows (no segment ids): one example per row
  unpacked = {k: v[1:] for k, v in batch.items() if "segment" not in k}
  m = jax.device_get(train.batch_metrics(unpacked, losses[1:], num_tasks=2))
  np.testing.assert_array_equal(m["task_real_tokens"], [0, 2 + 3, 0])


def test_init_from_loads_parameters_only(tmp_path):
  _run(tmp_path / "base", "steps=10", "checkpoint_every=10")
  base = _params(tmp_path / "base", 10)
  seen = []
  train.train(_config("steps=1", "optimizer.learning_rate=1e-9", "optimizer.schedule=constant",
                      "optimizer.warmup_steps=0", "model_overrides={dropout_rate: 0.0}"),
              str(tmp_path / "ft"), init_from=str(tmp_path / "base"), quiet=True, log=seen.append)
  assert any("initialised parameters" in line for line in seen)
  tuned = _params(tmp_path / "ft", 1)  # step 1: one tiny update on top of the base parameters
  _assert_params_close(base, tuned, rtol=1e-7, atol=1e-5)
  with pytest.raises(UserError, match="no such workdir"):
    _run(tmp_path / "x", "steps=1", init_from=str(tmp_path / "missing"))


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
  adamw = ["optimizer.name=adamw", "optimizer.clip_norm=0", "optimizer.schedule=constant",
           "optimizer.warmup_steps=0"]
  _run(tmp_path, "steps=5", "checkpoint_every=5", *adamw)
  with pytest.raises(UserError, match=r"non-finite loss at step \d+"):
    _run(tmp_path, "steps=40", "checkpoint_every=5", "optimizer.learning_rate=1e30", *adamw)
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  for step in steps:  # every kept checkpoint holds finite parameters
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(tmp_path, step)))


def test_skip_nonfinite_skips_updates_then_stops(tmp_path):
  """optimizer.skip_nonfinite=N: up to N non-finite steps in a row are skipped (warned about, the
  parameters untouched); one more stops the run like the default policy."""
  adamw = ["optimizer.name=adamw", "optimizer.clip_norm=0", "optimizer.schedule=constant",
           "optimizer.warmup_steps=0", "optimizer.skip_nonfinite=3"]
  _run(tmp_path, "steps=5", "checkpoint_every=5", *adamw)
  lines = []
  # lr 1e30: step 6 sends the parameters to ~1e30, so every later loss is non-finite and skipped.
  with pytest.raises(UserError, match=r"non-finite gradients at step 10 \(4 in a row, optimizer.skip_nonfinite=3\)"):
    train.train(_config("steps=40", "checkpoint_every=8", "optimizer.learning_rate=1e30", *adamw),
                str(tmp_path), quiet=True, log=lines.append)
  warnings = [line for line in lines if line.startswith("warning: non-finite")]
  assert [w.split(" (")[0] for w in warnings] == [f"warning: non-finite gradients at step {s}" for s in (7, 8, 9)]
  assert "update skipped (3/3 in a row)" in warnings[-1]
  # saved after the skipped steps 7 and 8: still step 6's finite parameters (an applied update would be NaN)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(tmp_path, 8)))


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_parameter_scale_makes_updates_relative_to_the_weight(name):
  """optimizer.parameter_scale: the same gradient moves a weight 100x larger 100x further (T5's
  Adafactor, nanoT5's AdamWScale); without it, both move by the same absolute step."""
  base = ["optimizer.schedule=constant", "optimizer.warmup_steps=0", "optimizer.clip_norm=0",
          f"optimizer.name={name}", "optimizer.learning_rate=1e-2"]
  params = {"small": jnp.full((4, 8), 0.01), "large": jnp.full((4, 8), 1.0)}
  grads = {"small": jnp.ones((4, 8)), "large": jnp.ones((4, 8))}

  def first_update(*overrides):
    opt = optim.base_optimizer(_config(*base, *overrides).optimizer, 10)
    updates, _ = opt.update(grads, opt.init(params), params)
    return {k: float(jnp.abs(v).mean()) for k, v in updates.items()}

  plain, scaled = first_update("optimizer.parameter_scale=false"), first_update()  # on by default
  assert first_update("optimizer.parameter_scale=true") == scaled
  assert plain["large"] == pytest.approx(plain["small"], rel=1e-3)
  assert scaled["large"] / scaled["small"] == pytest.approx(100.0, rel=1e-3)
  assert scaled["large"] == pytest.approx(plain["large"], rel=1e-3)  # RMS 1: the rate itself


def test_parameter_scale_default_is_on_except_for_zero_initialised_adapters_and_lora(tmp_path):
  def scale(*overrides, saved=None):
    return config_lib.resolve(_config(*overrides), saved).optimizer.parameter_scale
  assert _config().optimizer.parameter_scale is None  # resolved when a run starts
  assert scale() is True and scale("finetune.strategy=gradual_unfreezing") is True
  for strategy in ("adapters", "lora"):
    assert scale(f"finetune.strategy={strategy}") is False
    assert scale(f"finetune.strategy={strategy}", "optimizer.parameter_scale=true") is True
  assert scale("optimizer.parameter_scale=false") is False
  # a workdir saved with it off (every run before it became the default) keeps it off, unless set
  old = tmp_path / "config.yaml"
  config_lib.save(_config("optimizer.parameter_scale=false"), old)
  assert scale(saved=str(old)) is False
  assert scale("optimizer.parameter_scale=true", saved=str(old)) is True
  assert scale(saved=str(tmp_path / "missing.yaml")) is True


def test_an_old_run_resumes_with_its_optimizer_and_a_changed_one_is_a_clear_error(tmp_path):
  _run(tmp_path, "steps=2", "checkpoint_every=2", "optimizer.parameter_scale=false")  # the old default
  lines = []
  train.train(_config("steps=3", "optimizer.clip_norm=0.5"), str(tmp_path), quiet=True, log=lines.append)
  assert "parameter_scale: false" in (tmp_path / "config.yaml").read_text()
  notes = [line for line in lines if line.startswith("note: the config differs")]
  assert len(notes) == 1 and "optimizer.clip_norm: 1.0 -> 0.5; steps: 2 -> 3" in notes[0], lines
  # the other optimizer chain, asked for explicitly: an error naming the key, and nothing moved aside
  with pytest.raises(UserError, match="does not match this config.*optimizer.parameter_scale"):
    _run(tmp_path, "steps=4", "optimizer.parameter_scale=true")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
  assert not (tmp_path / checkpoints.UNREADABLE_DIR).exists()


def test_resuming_with_another_optimizer_is_a_clear_error(tmp_path):
  _run(tmp_path, "steps=2", "checkpoint_every=2")
  with pytest.raises(UserError, match="does not match this config"):
    _run(tmp_path, "steps=4", "optimizer.name=adamw")


def test_config_errors():
  with pytest.raises(UserError, match="unknown config key 'optimizer.lerning_rate'.*learning_rate"):
    config_lib.load(None, ["optimizer.lerning_rate=1"])
  with pytest.raises(UserError, match="'data.batch_size' must be positive"):
    config_lib.load(None, ["data.batch_size=-4"])
  with pytest.raises(UserError, match="'steps': expected int"):
    config_lib.load(None, ["steps=many"])
  with pytest.raises(UserError, match="'optimizer.name'"):
    config_lib.load(None, ["optimizer.name=sgd"])


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint(tmp_path):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "-m", "t5mix.cli", "train", "--workdir", str(tmp_path), "--set",
         "steps=100000", "--set", "checkpoint_every=100000", "--set", "log_every=2"] + [
             x for o in TINY for x in ("--set", o)]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  deadline = time.time() + 240
  for line in proc.stdout:
    if line.startswith("step") or time.time() > deadline:
      break
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143, out
  assert "SIGTERM: saved checkpoint at step" in out
  assert any(s.isdigit() for s in os.listdir(tmp_path / "checkpoints"))


# ---------------------------------------------------------------------------------------------
# What a run reports: progress lines and TensorBoard.

COMPILE_S = 5.0  # added to the tracing of every compiled train step


@pytest.fixture(scope="module")
def slow_compile_run(tmp_path_factory):
  """10 steps of gradual unfreezing (2 stages, so 2 compiled train steps, the second at step 6),
  each compilation made COMPILE_S slower: (workdir, log lines)."""
  make_train_step = train.make_train_step

  def slow_to_compile(*args, **kwargs):
    step = make_train_step(*args, **kwargs)

    def traced(*a):
      time.sleep(COMPILE_S)  # runs while jax.jit traces the step, not when it runs
      return step(*a)
    return traced

  workdir, lines = tmp_path_factory.mktemp("slow_compile"), []
  with pytest.MonkeyPatch.context() as m:
    m.setattr(train, "make_train_step", slow_to_compile)
    train.train(_config("steps=10", "log_every=5", "checkpoint_every=10", "optimizer.schedule=cosine",
                        "finetune.strategy=gradual_unfreezing"), str(workdir), log=lines.append)
  return workdir, lines


@pytest.mark.slow
def test_steps_per_s_and_eta_leave_out_compilation(slow_compile_run):
  _, lines = slow_compile_run
  progress = [line for line in lines if line.startswith("step ")]
  assert len(progress) == 2, lines
  for line in progress:  # each period holds one compiling step (steps 1 and 6)
    m = re.search(r"  ([\d.]+) steps/s \(([\d.]+) s compiling not counted\)  .* eta (\d+):(\d\d):(\d\d)  ", line)
    assert m, line
    steps_per_s, compile_s = float(m.group(1)), float(m.group(2))
    eta = int(m.group(3)) * 3600 + int(m.group(4)) * 60 + int(m.group(5))
    assert compile_s >= COMPILE_S, line
    # counting the compiling step, 5 steps take more than COMPILE_S: < 1 step/s, an ETA for the
    # 5 steps left of COMPILE_S or more
    assert steps_per_s > 1 and eta < COMPILE_S, line
  # the stage that compiled at step 6 is announced when it begins
  after = lines[lines.index(progress[0]) + 1]
  assert after.startswith("stage 2/2, steps 6-10: training everything ("), lines


@pytest.mark.slow
def test_tensorboard_has_learning_rate_and_padding_share(slow_compile_run):
  import tensorflow as tf
  workdir, lines = slow_compile_run
  scalars = {}
  for path in glob.glob(str(workdir / "tensorboard" / "events.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        scalars[value.tag, event.step] = float(tf.make_ndarray(value.tensor))
  # optimizer.schedule=cosine, learning_rate 1e-2, warmup_steps 5, steps 10: step s's update uses
  # the rate at optax's count s - 1: a linear warmup to 1e-2 at 5, then a cosine to 0 at 10.
  assert scalars["learning_rate", 5] == pytest.approx(1e-2 * 4 / 5)
  assert scalars["learning_rate", 10] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))
  fills = [float(re.search(r"\((\d+)% non-padding\)", line).group(1)) / 100
           for line in lines if line.startswith("step ")]
  shares = [scalars["padding_share", s] for s in (5, 10)]
  assert all(0 < share < 1 for share in shares), shares
  for share, fill in zip(shares, fills, strict=True):  # the line's non-padding share, rounded to a percent
    assert share == pytest.approx(1 - fill, abs=0.0051)
  assert ("steps_per_s", 5) in scalars and ("tokens_per_s", 10) in scalars
