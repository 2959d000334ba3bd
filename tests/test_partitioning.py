"""Partitioning without devices: mesh shapes, logical-axis rules, optimizer-state matching, and
the distributed start-up's decisions. The runs on several devices are in test_distributed.py."""

import dataclasses

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from t5mix import config as config_lib
from t5mix import distributed, optim, partitioning, train
from t5mix.errors import UserError
from t5mix.model import T5, load_model_config


def _mesh(**kwargs):
  return config_lib.MeshConfig(**kwargs)


def test_mesh_shape_fills_in_the_rest_and_names_the_bad_key():
  assert partitioning.mesh_shape(_mesh(), 8) == {"data": 8, "fsdp": 1, "model": 1}
  assert partitioning.mesh_shape(_mesh(model=2), 8) == {"data": 4, "fsdp": 1, "model": 2}
  assert partitioning.mesh_shape(_mesh(data=2, fsdp=-1, model=2), 8) == {
      "data": 2, "fsdp": 2, "model": 2}
  assert partitioning.mesh_shape({"data": 1, "model": 1}, 1)["data"] == 1
  with pytest.raises(UserError, match=r"'mesh\.model' \(3\).*does not divide the 8 devices"):
    partitioning.mesh_shape(_mesh(model=3), 8)
  with pytest.raises(UserError, match=r"'mesh\.model' \(16\)"):
    partitioning.mesh_shape(_mesh(model=16), 8)
  with pytest.raises(UserError, match=r"'mesh': data x fsdp x model = 4, but there are 8"):
    partitioning.mesh_shape(_mesh(data=2, model=2), 8)
  with pytest.raises(UserError, match=r"mesh\.data, mesh\.model: only one mesh axis can be -1"):
    partitioning.mesh_shape(_mesh(model=-1), 8)
  with pytest.raises(UserError, match=r"'mesh\.fsdp' must be a positive integer or -1"):
    partitioning.mesh_shape(_mesh(fsdp=0), 8)


def test_mesh_config_keys_are_checked():
  c = config_lib.load(None, ["mesh.model=2", "mesh.data=-1"])
  assert (c.mesh.data, c.mesh.fsdp, c.mesh.model) == (-1, 1, 2)
  with pytest.raises(UserError, match=r"unknown config key 'mesh\.modle'.*'mesh\.model'"):
    config_lib.load(None, ["mesh.modle=2"])
  with pytest.raises(UserError, match=r"'mesh\.model': expected int"):
    config_lib.load(None, ["mesh.model=two"])


def test_make_mesh_on_this_process():
  mesh = partitioning.make_mesh(_mesh())
  assert mesh.axis_names == ("data", "fsdp", "model")
  assert mesh.devices.size == jax.device_count()


def test_logical_rules():
  sizes = {"data": 4, "fsdp": 2, "model": 2}
  spec = lambda axes, shape: partitioning.logical_to_spec(axes, shape, sizes)  # noqa: E731
  assert spec(("embed", "mlp"), (64, 128)) == P("fsdp", "model")
  assert spec(("mlp", "embed"), (128, 64)) == P("model", "fsdp")
  assert spec(("embed", "heads", "kv"), (64, 4, 16)) == P("fsdp", "model")
  assert spec(("vocab", "embed"), (384, 64)) == P("model", "fsdp")
  assert spec(("relpos_buckets", "heads"), (32, 4)) == P(None, "model")
  assert spec(("embed",), (64,)) == P("fsdp")
  # Activations: the batch takes data and fsdp, so embed stays whole; vocab/mlp on model.
  assert spec(("batch", "length", "embed"), (16, 64, 64)) == P(("data", "fsdp"))
  assert spec(("batch", "length", "vocab"), (16, 64, 384)) == P(("data", "fsdp"), None, "model")
  assert spec(("batch", "length", "mlp"), (16, 64, 128)) == P(("data", "fsdp"), None, "model")
  # A dimension the mesh axes do not divide is replicated, not an error.
  assert spec(("embed", "heads", "kv"), (64, 3, 16)) == P("fsdp")
  assert spec(("batch", "length"), (4, 8)) == P("data")
  # Axes of size 1 are left out; no names -> replicated.
  assert partitioning.logical_to_spec(("embed", "mlp"), (64, 128), {"data": 8}) == P()
  assert spec(None, (3, 3)) == P()


def _abstract(model_name="mini", **overrides):
  config = dataclasses.replace(load_model_config(model_name), vocab_size=512, **overrides)
  return nnx.split(nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0))), nnx.Param)[1]


def test_optimizer_state_follows_the_parameters():
  """Adafactor's factored statistics (mini: d_model 128, d_ff 512) drop the reduced dimension."""
  params = _abstract()
  optimizer = optim.base_optimizer(config_lib.OptimizerConfig(), 100)
  state = jax.eval_shape(
      lambda p: train.TrainState(jax.numpy.zeros((), jax.numpy.int32), p, optimizer.init(p)), params)
  specs = partitioning.tree_specs(state, params, {"data": 2, "fsdp": 2, "model": 2})
  wi = ("decoder", "layers", 0, "mlp", "wi_0")

  def at(tree, path):
    for key in path:
      tree = tree[key]
    return tree.get_value() if isinstance(tree, nnx.Variable) else tree

  assert specs.step == P()
  assert at(specs.params, wi) == P("fsdp", "model")
  factored = specs.opt_state[1][0]  # clip_by_global_norm, then adafactor's scale_by_factored_rms
  shapes = state.opt_state[1][0]
  # wi_0 is [embed 128, mlp 512]: one statistic keeps embed, the other mlp, with their specs.
  kept = {at(shapes.v_row, wi).shape: at(factored.v_row, wi),
          at(shapes.v_col, wi).shape: at(factored.v_col, wi)}
  assert kept == {(128,): P("fsdp"), (512,): P("model")}
  assert at(factored.v, wi) == P()  # a (1,) placeholder when factored
  norm = ("decoder", "final_norm", "scale")  # not factored: v has the parameter's shape
  assert at(factored.v, norm) == P("fsdp")
  assert factored.count == P()


def test_optimizer_state_with_gradient_accumulation_and_adamw():
  params = _abstract("tiny")
  c = config_lib.OptimizerConfig(name="adamw", grad_accum_steps=2)
  state = jax.eval_shape(optim.base_optimizer(c, 10).init, params)
  specs = partitioning.tree_specs(state, params, {"data": 1, "fsdp": 1, "model": 2})
  leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
  by_path = {jax.tree_util.keystr(p): s for p, s in leaves}
  mlp = [s for p, s in by_path.items() if p.endswith("['wi_0'].value")]
  assert len(mlp) >= 4 and all(s == P(None, "model") for s in mlp)  # acc_grads, mu, nu, ...
  assert all(s == P() for p, s in by_path.items() if "count" in p or "step" in p)


def test_data_layout_on_one_process():
  mesh = partitioning.make_mesh(_mesh())
  sharding = partitioning.batch_sharding(mesh, 8)
  assert partitioning.data_layout(sharding, 8) == {"shard": 0, "num_shards": 1, "batch": 8}
  assert partitioning.shard_info({"shard": 0, "num_shards": 1, "batch": 8}) is None
  assert partitioning.shard_info({"shard": 1, "num_shards": 2, "batch": 4}).index == 1
  assert not partitioning.stop_agreed(False, True) and partitioning.stop_agreed(True, False)


def test_batch_size_must_split_over_the_data_axes():
  mesh = partitioning.make_mesh(_mesh())
  partitioning.check_batch_size(mesh, 3)  # one device: anything goes


def test_distributed_environment_detection():
  detect = distributed.detected_environment
  assert detect({}) is None
  assert detect({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "JAX_COORDINATOR_ADDRESS"
  slurm = {"SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_STEP_ID": "0"}
  assert detect(slurm) == "SLURM"
  assert detect({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: nothing to coordinate
  assert detect({k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}) is None  # sbatch script
  assert detect({"OMPI_COMM_WORLD_SIZE": "2"}) == "Open MPI"
  assert detect({"TPU_WORKER_HOSTNAMES": "t-0,t-1"}) == "Cloud TPU"
  assert detect({"TPU_WORKER_HOSTNAMES": "localhost"}) is None  # a single TPU VM
  assert distributed.initialize(None, env={}) is False
  assert distributed.initialize(False, env={"JAX_COORDINATOR_ADDRESS": "x:1"}) is False
  with pytest.raises(UserError, match="--no-distributed contradicts"):
    distributed.initialize(False, "127.0.0.1:1234", env={})


def test_cli_reports_a_bad_mesh(cli, expect_error, tmp_path):
  rc, out, err = cli("train", "--workdir", tmp_path, "--set", "model=tiny", "--set",
                     "data.mixture=demo_supervised", "--set", "mesh.model=3")
  expect_error(rc, err, "'mesh.model' (3)", f"{jax.device_count()} devices")
  rc, out, err = cli("train", "--workdir", tmp_path, "--no-distributed", "--process-id", "1")
  expect_error(rc, err, "--no-distributed contradicts")


class _FakeDevice:
  def __init__(self, id, process_index):
    self.id, self.process_index = id, process_index


class _FakeSharding:
  """devices_indices_map of a batch sharding: {device: rows} over fake multi-process devices."""

  def __init__(self, rows):
    self.rows = rows

  def devices_indices_map(self, shape):
    return {device: (slice(a, b), slice(None)) for device, (a, b) in self.rows.items()}


def _layouts(monkeypatch, rows, batch=8):
  processes = sorted({d.process_index for d in rows})
  out = []
  for p in processes:
    monkeypatch.setattr(partitioning.jax, "process_index", lambda p=p: p)
    out.append(partitioning.data_layout(_FakeSharding(rows), batch))
  return out


def test_data_layout_across_processes(monkeypatch):
  # 2 processes x 2 devices, data=4: each process its own half.
  rows = {_FakeDevice(i, i // 2): (2 * i, 2 * i + 2) for i in range(4)}
  assert _layouts(monkeypatch, rows) == [{"shard": 0, "num_shards": 2, "batch": 4},
                                         {"shard": 1, "num_shards": 2, "batch": 4}]
  # 4 processes x 1 device, data=2 x model=2 (a model pair spans two processes): the pair are
  # replicas and read the same shard.
  rows = {_FakeDevice(i, i): (4 * (i // 2), 4 * (i // 2) + 4) for i in range(4)}
  assert [l["shard"] for l in _layouts(monkeypatch, rows)] == [0, 0, 1, 1]
  assert {l["num_shards"] for l in _layouts(monkeypatch, rows)} == {2}
  # Interleaved rows (a topology-aware TPU device order): still one shard per process.
  rows = {_FakeDevice(i, i % 2): (2 * i, 2 * i + 2) for i in range(4)}
  assert _layouts(monkeypatch, rows) == [{"shard": 0, "num_shards": 2, "batch": 4},
                                         {"shard": 1, "num_shards": 2, "batch": 4}]
  # Processes holding different numbers of rows cannot each read a shard.
  rows = {_FakeDevice(0, 0): (0, 2), _FakeDevice(1, 1): (2, 8)}
  with pytest.raises(UserError, match="do not split the batch evenly"):
    _layouts(monkeypatch, rows)
