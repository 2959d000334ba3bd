"""Reliability: `kill -9` at any point and rerunning the same command gives the uninterrupted run's
result; damaged checkpoints are skipped (moved aside, unchanged) or, when none can be read,
refused; a full disk is one line.

Runs that train are real `t5mix train` subprocesses sharing a JAX compilation cache (a run then
takes ~10 s instead of ~20 s on two cores); the error cases run in-process through `cli`."""

import ast
import hashlib
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import assert_one_error

ROOT = pathlib.Path(__file__).resolve().parent.parent
SETTINGS = ["model=tiny", "data.mixture=demo_supervised", "data.batch_size=4",
            "data.inputs_length=32", "data.targets_length=8", "log_every=1"]
KILL = SETTINGS + ["steps=12", "checkpoint_every=2"]  # saves at 2, 4, …, 12; keeps the last 3
EIGHT = SETTINGS + ["steps=8", "checkpoint_every=2", "keep_checkpoints=5"]  # keeps 2, 4, 6, 8


def _command(workdir, overrides):
  return [sys.executable, "-m", "t5mix.cli", "train", "--workdir", str(workdir)] + [
      x for o in overrides for x in ("--set", o)]


def _flags(overrides):
  return [x for o in overrides for x in ("--set", o)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The subprocesses' environment: unbuffered, and one compilation cache for all of them."""
  return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT),
              TF_CPP_MIN_LOG_LEVEL="3",  # importing TensorFlow here set 1, which the CLI keeps
              JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _run(env, workdir, overrides=KILL, timeout=300):
  """Runs `t5mix train` to the end; (exit code, stdout, stderr)."""
  p = subprocess.run(_command(workdir, overrides), capture_output=True, text=True, env=env,
                     cwd=ROOT, timeout=timeout)
  return p.returncode, p.stdout, p.stderr


def _done(out):
  """(final loss, examples per task) from the run's `done:` line; the loss is None if the run had
  no steps left (it was killed after its last checkpoint)."""
  m = re.search(r"^done: step \d+, (?:loss (\S+)|no steps left to run); examples seen per task: (\{.*?\});",
                out, re.M)
  assert m, out
  return m.group(1), ast.literal_eval(m.group(2))


def _state(workdir, step):
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state"))


def _assert_same_state(a, b):
  """Parameters, optimizer state and step agree (to 1e-6; in practice bit for bit)."""
  (la, ta), (lb, tb) = jax.tree_util.tree_flatten_with_path(a), jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def _steps(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _digest(root) -> dict:
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _losses(out):
  return dict(re.findall(r"^step +(\d+)/\d+ +loss (\S+)", out, re.M))


# ---------------------------------------------------------------------------------------------
# kill -9, then the same command again.


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """The uninterrupted run: (workdir, stdout)."""
  workdir = tmp_path_factory.mktemp("reference")
  rc, out, err = _run(env, workdir)
  assert rc == 0, out + err
  return workdir, out


def _kill_when(env, workdir, ready, timeout=300):
  """Starts the run, polls `ready(log text, names in checkpoints/)` every millisecond or so and
  SIGKILLs the run as soon as it returns True; returns the names it saw then, or None if the run
  ended first."""
  log_path = pathlib.Path(str(workdir) + ".log")
  with open(log_path, "w") as log:
    proc = subprocess.Popen(_command(workdir, KILL), stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT)
  ckpt_dir = pathlib.Path(workdir) / "checkpoints"
  deadline = time.time() + timeout
  try:
    while proc.poll() is None and time.time() < deadline:
      names = os.listdir(ckpt_dir) if ckpt_dir.is_dir() else []
      if ready(log_path.read_text(), names):
        proc.kill()
        proc.wait()
        return names
      time.sleep(0.001)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return None


KILL_POINTS = {
    # while orbax writes checkpoint 4, 6 or 8 (or a later one): while `<step>.orbax-checkpoint-tmp`
    # exists, with complete checkpoints before it
    "during_checkpoint_write": lambda: (lambda k: lambda text, names: any(
        "tmp" in n and int(n.split(".")[0]) >= k for n in names))(random.choice([4, 6, 8])),
    # right after the log line of a random step (a checkpoint may be on its way)
    "after_a_step_log_line": lambda: (lambda k: lambda text, names: re.search(
        rf"^step +{k}/12 ", text, re.M) is not None)(random.randint(1, 11)),
    # at a random moment: maybe before the first step or the first checkpoint
    "at_a_random_time": lambda: (lambda t: lambda text, names: time.time() > t)(
        time.time() + random.uniform(0, 15)),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_then_rerun_equals_the_uninterrupted_run(point, env, reference, tmp_path):
  ref_dir, ref_out = reference
  workdir = tmp_path / "run"
  seen = _kill_when(env, workdir, KILL_POINTS[point]())
  if point != "at_a_random_time":
    assert seen is not None, f"the run ended before the kill point {point}"
  complete = _steps(workdir)  # what a rerun may resume from
  ckpt_dir = workdir / "checkpoints"
  partial = [n for n in os.listdir(ckpt_dir) if "tmp" in n] if ckpt_dir.is_dir() else []

  rc, out, err = _run(env, workdir)
  assert rc == 0, out + err
  if complete:
    assert f"resumed from checkpoint at step {complete[-1]}\n" in out, out
  else:
    assert "resumed from" not in out, out
  if partial:  # a half-written checkpoint is removed, never read
    assert f"removing {partial[0]}" in out, out
  assert not [n for n in os.listdir(ckpt_dir) if "tmp" in n]
  # The same parameters and optimizer state, and the same data: no example repeated or skipped
  # (the per-task counts are saved with each checkpoint; every step's loss is the reference's).
  _assert_same_state(_state(workdir, 12), _state(ref_dir, 12))
  loss, examples = _done(out)
  assert examples == _done(ref_out)[1]
  if complete and complete[-1] == 12:  # killed after the last checkpoint: the rerun has nothing to do
    assert loss is None and not _losses(out), out
    return
  assert loss == _done(ref_out)[0]
  ref_losses = _losses(ref_out)
  assert _losses(out) and all(ref_losses[k] == v for k, v in _losses(out).items()), out


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints.


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
  """A run to step 8 keeping checkpoints 2, 4, 6, 8: (workdir, stdout)."""
  workdir = tmp_path_factory.mktemp("trained")
  rc, out, err = _run(env, workdir, EIGHT)
  assert rc == 0, out + err
  assert _steps(workdir) == [2, 4, 6, 8]
  return workdir, out


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _largest(d, pattern):
  return max(pathlib.Path(d).glob(pattern), key=os.path.getsize)


DAMAGE = {  # step: (what, how)
    8: ("truncated parameter file", lambda d: _truncate(_largest(d, "state/ocdbt.process_0/d/*"))),
    6: ("missing metadata file", lambda d: os.remove(d / "state" / "_METADATA")),
    4: ("truncated data iterator file", lambda d: _truncate(_largest(d, "data/process_0.data-*"))),
}


def test_damaged_checkpoints_are_skipped_and_moved_aside_unchanged(env, trained, tmp_path):
  """Checkpoints 8, 6 and 4 damaged three ways: the run resumes from 2, moves them (byte for
  byte) to unreadable_checkpoints/, saves 4, 6, 8 anew, and ends as the undamaged run did."""
  ref_dir, ref_out = trained
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  damaged = {}
  for step, (_, damage) in DAMAGE.items():
    damage(workdir / "checkpoints" / str(step))
    damaged[step] = _digest(workdir / "checkpoints" / str(step))
  rc, out, err = _run(env, workdir, EIGHT)
  assert rc == 0, out + err
  ckpt = workdir / "checkpoints"
  warnings = [line for line in out.splitlines() if "unreadable" in line]
  assert len(warnings) == 3, out
  for line, step in zip(warnings, (8, 6, 4)):
    assert line.startswith(f"warning: {ckpt}/{step} is unreadable ("), line
    assert f"resuming from {ckpt}/2;" in line and f"unreadable_checkpoints/{step}" in line, line
  assert "resumed from checkpoint at step 2\n" in out
  for step, digest in damaged.items():
    assert _digest(workdir / "unreadable_checkpoints" / str(step)) == digest
  assert _steps(workdir) == [2, 4, 6, 8]
  _assert_same_state(_state(workdir, 8), _state(ref_dir, 8))
  assert _done(out) == _done(ref_out)


def test_no_readable_checkpoint_is_an_error_and_changes_nothing(trained, tmp_path, cli):
  ref_dir, _ = trained
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  for step in _steps(workdir):
    os.remove(workdir / "checkpoints" / str(step) / "state" / "_METADATA")
  before = _digest(workdir)
  rc, _, err = cli("train", "--workdir", workdir, *_flags(EIGHT), "--set", "steps=10")
  assert_one_error(rc, err, f"{workdir}/checkpoints: no checkpoint can be read back", "8: ",
                   "2: ", "use a new --workdir")
  assert _digest(workdir) == before


def test_latest_checkpoint_of_another_config_is_an_error_not_a_fallback(trained, tmp_path, cli):
  """Skipping it for an older one would hide a config mistake (another model or optimizer)."""
  ref_dir, _ = trained
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  shutil.copytree(workdir / "checkpoints" / "8" / "data", workdir / "checkpoints" / "10" / "data")
  state = _state(workdir, 8)  # step 10: the state of a model with d_ff 96 instead of 128
  mlp = state["params"]["decoder"]["layers"]["0"]["mlp"]
  mlp["wi_0"]["value"] = mlp["wi_0"]["value"][:, :96]
  with ocp.StandardCheckpointer() as checkpointer:  # waits for the (asynchronous) write
    checkpointer.save(workdir / "checkpoints" / "10" / "state", state)
  before = _digest(workdir)
  rc, _, err = cli("train", "--workdir", workdir, *_flags(EIGHT), "--set", "steps=12")
  assert_one_error(rc, err, f"{workdir}/checkpoints/10: does not match this config",
                   "decoder.layers.0.mlp.wi_0.value is (64, 96) float32 there, (64, 128) float32 here")
  assert _digest(workdir) == before


# ---------------------------------------------------------------------------------------------
# Disk full.


@pytest.mark.slow
def test_disk_full_is_one_line_and_keeps_the_complete_checkpoints(env, trained, tmp_path):
  """A tmpfs (in a private mount namespace) with room for one checkpoint and a half."""
  size = sum(p.stat().st_size for p in (trained[0] / "checkpoints" / "2").rglob("*") if p.is_file())
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"],
                         capture_output=True)
  if probe.returncode:
    pytest.skip("cannot mount a tmpfs in a private mount namespace here")
  workdir, after = mnt / "run", tmp_path / "after"
  script = (f"mount -t tmpfs -o size={size * 3 // 2} tmpfs {mnt} && "
            + " ".join(_command(workdir, EIGHT)) + f"; rc=$?; cp -r {workdir} {after}; exit $rc")
  p = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                     env=env, cwd=ROOT, timeout=300)
  assert_one_error(p.returncode, p.stderr, f"{workdir}/checkpoints: writing a checkpoint failed "
                   "at step 4 (No space left on device)", "rerun the same command")
  assert _steps(after) == [2]
  assert int(_state(after, 2)["step"]) == 2


# ---------------------------------------------------------------------------------------------
# Ctrl-C or SIGTERM before the loop's save-and-exit handling (loading data, restoring, compiling).


def test_ctrl_c_while_loading_data_says_nothing_was_saved(tmp_path, cli, monkeypatch):
  from t5mix import input_pipeline

  def ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(input_pipeline, "get_dataset", ctrl_c)
  rc, _, err = cli("train", "--workdir", tmp_path / "run", *_flags(EIGHT))
  assert rc == 130
  assert err.strip().splitlines() == ["t5mix: interrupted (SIGINT): nothing was saved; rerunning the "
                                      "same command starts from step 0"], err


def test_sigterm_while_loading_data_is_reported_and_names_the_checkpoint_a_rerun_resumes_from(
    trained, tmp_path, cli, monkeypatch):
  from t5mix import input_pipeline
  workdir = tmp_path / "run"
  shutil.copytree(trained[0], workdir)

  def sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)  # the handler interrupts this
  monkeypatch.setattr(input_pipeline, "get_dataset", sigterm)

  def unhandled(signum, frame):  # instead of this test process ending, as the run's did
    raise AssertionError("t5mix train left SIGTERM to the default handler")
  previous = signal.signal(signal.SIGTERM, unhandled)
  try:
    rc, _, err = cli("train", "--workdir", workdir, *_flags(EIGHT), "--set", "steps=10")
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert rc == 143
  assert err.strip().splitlines() == [
      "t5mix: interrupted (SIGTERM): nothing was saved since the checkpoint at step 8; rerunning "
      f"the same command resumes from it ({workdir}/checkpoints/8)"], err
  assert _steps(workdir) == [2, 4, 6, 8]
