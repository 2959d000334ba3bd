"""Scaling out: the same training on any mesh shape, checkpoints across meshes, two processes.

Several CPU devices need XLA_FLAGS set before JAX starts, so those runs are subprocesses; the
one-device runs happen in this (pytest's) process, which has one CPU device. All slow: about
two minutes of CPU together (mostly compiling); the fast checks are in test_partitioning.py.
"""

import base64
import collections
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from t5mix import config as config_lib
from t5mix import checkpoints, definitions, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny model with one layer per stack (compiling is most of these runs' time).
TINY = ["model=tiny", "model_overrides={num_encoder_layers: 1, num_decoder_layers: 1}",
        "data.mixture=demo_supervised", "data.batch_size=8", "data.inputs_length=64",
        "data.targets_length=16", "log_every=1", "optimizer.warmup_steps=2", "steps=5",
        "checkpoint_every=3"]
MESHES = {"8x1": ["mesh.data=8"], "4x2": ["mesh.data=4", "mesh.model=2"],
          "2x2x2": ["mesh.data=2", "mesh.fsdp=2", "mesh.model=2"]}


@pytest.fixture(scope="module", autouse=True)
def builtin_definitions():
  definitions.load()


def _run_here(workdir, *overrides):
  c = config_lib.load(None, TINY + list(overrides))
  return train.train(c, str(workdir), quiet=True, log=lambda *a: None)


def _env(devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def _python(script, devices, timeout=400):
  """Runs script in a subprocess with `devices` CPU devices (it shares the suite's compilation
  cache, tests/conftest.py, through the environment)."""
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO,
                        env=_env(devices),
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc.stdout


def _losses(workdir):
  """Per-step losses from the TensorBoard logs (log_every=1)."""
  losses = {}
  for path in glob.glob(os.path.join(str(workdir), "tensorboard", "events.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == "loss":
          losses[event.step] = float(tf.make_ndarray(value.tensor))
  return [losses[s] for s in sorted(losses)]


def _params(workdir, step):
  """The saved parameters, on this process's one device whatever mesh wrote them."""
  path = os.path.join(str(workdir), "checkpoints", str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        checkpointer.metadata(path).item_metadata.tree)
  return checkpointer.restore(path, target)["params"]


def _saved_specs(workdir, step):
  """{dotted path: partition spec} of the arrays as they were sharded when saved."""
  path = os.path.join(str(workdir), "checkpoints", str(step), "state", "_sharding")
  with open(path) as f:
    table = json.load(f)
  specs = {}
  for key, value in table.items():
    spec = json.loads(value)["partition_spec"]
    specs[base64.b64decode(key).decode()] = tuple(tuple(a) if isinstance(a, list) else a
                                                  for a in spec)
  return specs


def _assert_close_trees(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def _resume_copy(src, dst, drop_step):
  shutil.copytree(src, dst)
  shutil.rmtree(os.path.join(str(dst), "checkpoints", str(drop_step)))
  shutil.rmtree(os.path.join(str(dst), "tensorboard"))


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
  """One-device run here; 8x1, 4x2, 2x2x2 and a 4x2 resume of the one-device checkpoint in an
  8-device subprocess; then a one-device resume of the 4x2 checkpoint here."""
  root = tmp_path_factory.mktemp("meshes")
  _run_here(root / "1")
  _resume_copy(root / "1", root / "1_to_4x2", drop_step=5)
  runs = {name: [str(root / name)] + overrides for name, overrides in MESHES.items()}
  runs["1_to_4x2"] = [str(root / "1_to_4x2")] + MESHES["4x2"]
  _python(f"""
      from t5mix import config, definitions, train
      definitions.load()
      for workdir, *overrides in {list(runs.values())!r}:
        c = config.load(None, {TINY!r} + overrides)
        train.train(c, workdir, quiet=True, log=lambda *a: None)
      """, devices=8)
  _resume_copy(root / "4x2", root / "4x2_to_1", drop_step=5)
  _run_here(root / "4x2_to_1")
  return root


@pytest.mark.slow
def test_same_losses_on_every_mesh(mesh_runs):
  reference = _losses(mesh_runs / "1")
  assert len(reference) == 5 and reference[-1] < reference[0]
  for name in MESHES:
    np.testing.assert_allclose(_losses(mesh_runs / name), reference, rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_parameters_are_sharded_on_the_model_axis(mesh_runs):
  specs = _saved_specs(mesh_runs / "4x2", 5)
  wi = "params.decoder.layers.0.mlp.wi_0.value"
  assert specs[wi] == (None, "model")  # [embed, mlp]
  assert specs["params.decoder.layers.0.self_attention.query.value"] == (None, "model")  # heads
  assert specs["params.lm_head.value"] == (None, "model")  # [embed, vocab]
  assert specs["params.decoder.final_norm.scale.value"] == ()
  specs = _saved_specs(mesh_runs / "2x2x2", 5)
  assert specs[wi] == ("fsdp", "model")
  # Optimizer state follows its parameter (Adafactor keeps full second moments for tiny kernels).
  assert specs["opt_state.1.0.v." + wi.split(".", 1)[1]] == ("fsdp", "model")
  assert specs["step"] == ()


@pytest.mark.slow
def test_checkpoints_restore_onto_another_mesh(mesh_runs):
  # 1 device, checkpoint at 3 -> resumed on 4x2 to step 5 == 5 steps on 1 device; and back.
  _assert_close_trees(_params(mesh_runs / "1_to_4x2", 5), _params(mesh_runs / "1", 5), atol=1e-5)
  _assert_close_trees(_params(mesh_runs / "4x2_to_1", 5), _params(mesh_runs / "4x2", 5), atol=1e-5)
  np.testing.assert_allclose(_losses(mesh_runs / "4x2_to_1"), _losses(mesh_runs / "4x2")[3:],
                             rtol=1e-5)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


PROCESS_SCRIPT = """
    import json, sys
    from t5mix import cli, input_pipeline, partitioning, train
    summaries = []
    run = train.train
    train.train = lambda *a, **k: summaries.append(run(*a, **k)) or summaries[-1]
    rc = cli.main(sys.argv[1:])
    assert rc == 0, rc
    # The examples of this process's data shard, in the order train reads them (unshuffled).
    import jax
    layout = json.load(open(f"{sys.argv[sys.argv.index('--workdir') + 1]}/checkpoints/4/data/"
                            f"process_{jax.process_index()}.json"))
    ds = input_pipeline.get_dataset("demo_sentiment", "train", {"inputs": 64, "targets": 16},
                                    seed=0, shuffle=False, pack=False, num_epochs=1,
                                    shard_info=partitioning.shard_info(layout))
    inputs = [ex["encoder_input_tokens"].tolist() for ex in ds.as_numpy_iterator()]
    print("RESULT " + json.dumps({"process": jax.process_index(), "loss": summaries[-1]["loss"],
                                  "layout": layout, "inputs": inputs}))
"""


@pytest.mark.slow
def test_two_processes(tmp_path):
  workdir = tmp_path / "pair"
  port = _free_port()
  args = ["train", "--workdir", str(workdir), "--coordinator-address", f"127.0.0.1:{port}",
          "--num-processes", "2"] + [x for o in TINY + ["steps=4", "checkpoint_every=2",
                                                        "mesh.model=2"] for x in ("--set", o)]
  logs = [(tmp_path / f"stdout_{i}", tmp_path / f"stderr_{i}") for i in range(2)]
  procs = []
  try:
    for i, (out, err) in enumerate(logs):  # files, not pipes: a full pipe would stall a process
      with open(out, "w") as out_file, open(err, "w") as err_file:
        procs.append(subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(PROCESS_SCRIPT)] + args +
            ["--process-id", str(i)], cwd=REPO, env=_env(2), stdout=out_file, stderr=err_file))
    for proc in procs:
      proc.wait(timeout=400)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  outs = [out.read_text() for out, _ in logs]
  for proc, out, (_, err) in zip(procs, outs, logs):
    assert proc.returncode == 0, out[-3000:] + err.read_text()[-5000:]
  results = [json.loads(line[len("RESULT "):]) for out in outs for line in out.splitlines()
             if line.startswith("RESULT ")]
  assert [r["process"] for r in results] == [0, 1]
  # One loss for the pair (a global batch of 8, 4 rows from each process, on a 2x2 mesh).
  assert results[0]["loss"] == results[1]["loss"] and np.isfinite(results[0]["loss"])
  assert "mesh data=2 x fsdp=1 x model=2" in outs[0] and "2 process(es)" in outs[0]
  assert "step " in outs[0] and "step " not in outs[1]  # only process 0 reports
  assert len(glob.glob(str(workdir / "tensorboard" / "events.*"))) == 1
  # Each process read its own shard: together exactly the whole task, no example twice (as
  # multisets: the demo data has duplicate sentences of its own).
  assert [r["layout"] for r in results] == [{"shard": i, "num_shards": 2, "batch": 4}
                                            for i in range(2)]
  shards = [collections.Counter(tuple(x) for x in r["inputs"]) for r in results]
  from t5mix import input_pipeline
  whole = input_pipeline.get_dataset("demo_sentiment", "train", {"inputs": 64, "targets": 16},
                                     seed=0, shuffle=False, pack=False, num_epochs=1)
  whole = collections.Counter(tuple(ex["encoder_input_tokens"].tolist())
                              for ex in whole.as_numpy_iterator())
  assert shards[0].total() == shards[1].total() == whole.total() // 2
  assert shards[0] + shards[1] == whole
  # The pair's checkpoint restores in one process, on one device, and training goes on.
  saved = _params(workdir, 4)
  lines = []
  c = config_lib.load(None, TINY + ["steps=5", "mesh.model=1"])
  train.train(c, str(workdir), quiet=True, log=lines.append)
  assert any(line.startswith("resumed from checkpoint at step 4 (its data position is for "
                             "another data sharding") for line in lines), lines
  restored = checkpoints.restore_params(str(workdir / "checkpoints" / "4"), saved)
  _assert_close_trees(restored, saved, atol=0)
