"""Partitioning: the device mesh, logical-axis rules, and the shardings of state and batches.

The mesh has up to three named axes, in this order (outermost first, so that the data axes span
hosts and `model` stays inside a host where the interconnect is fastest):

  data   pure data parallelism: batches are split, parameters replicated;
  fsdp   data parallelism that also shards parameters and optimizer state (ZeRO-3 / FSDP):
         batches are split over data x fsdp, the `embed` dimension of parameters over fsdp;
  model  tensor (Megatron-style) parallelism: mlp / heads / vocab / joined_kv dimensions.

Configured by the `mesh` section of the run config (`mesh: {data: -1, fsdp: 1, model: 1}`; -1
takes the rest of the devices). Parameters carry logical axis names (model.py); `RULES` maps
them, and the activation/batch names, to mesh axes like t5x's `standard_logical_axis_rules`.
A dimension whose size the mesh axes do not divide is left unsharded (replicated) rather than
failing, so small models still run on large meshes.

Optimizer state shardings are derived from the parameters' by matching: an optimizer leaf whose
tree path ends with a parameter's path and has its shape gets the parameter's sharding; one with
a dimension removed (Adafactor's factored row/column statistics) gets it with that dimension
dropped; anything else (step counts, placeholders) is replicated.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t5mix.errors import UserError

MESH_AXES = ("data", "fsdp", "model")

# logical axis -> mesh axis (or axes, or None), first match wins; as t5x's standard rules with
# 1-D activation partitioning, plus an `fsdp` axis for 2-D parameter partitioning.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("kv", None),
    ("embed", "fsdp"),  # parameters only: activations' batch dimension already uses fsdp
    ("length", None),
    ("relpos_buckets", None),
    ("abspos_buckets", None),
    ("layers", None),
    ("stack", None),
)

BATCH_AXES = ("batch", "length")


# ---------------------------------------------------------------------------------------------
# The mesh.


def mesh_shape(mesh_config: Any, num_devices: int) -> dict[str, int]:
  """{axis: size} for all of MESH_AXES, with -1 resolved; UserError naming the bad key."""
  sizes = {axis: getattr(mesh_config, axis) if not isinstance(mesh_config, dict)
           else mesh_config.get(axis, 1) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise UserError(f"config key 'mesh.{axis}' must be a positive integer or -1, got {size!r}")
  rest = [axis for axis, size in sizes.items() if size == -1]
  if len(rest) > 1:
    raise UserError(f"config keys {', '.join(f'mesh.{a}' for a in rest)}: only one mesh axis "
                    "can be -1 (the rest of the devices)")
  product = 1
  for axis, size in sizes.items():
    if size == -1:
      continue
    product *= size
    if num_devices % product:
      raise UserError(
          f"config key 'mesh.{axis}' ({size}): the mesh "
          f"({' x '.join(f'{a}={s}' for a, s in sizes.items() if s != 1)}) does not divide the "
          f"{num_devices} devices")
  if rest:
    sizes[rest[0]] = num_devices // product
  elif product != num_devices:
    raise UserError(
        f"config key 'mesh': data x fsdp x model = {product}, but there are {num_devices} "
        f"devices; make the product {num_devices} or set one axis to -1")
  return sizes


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh for `mesh_config` over `devices` (default: all devices, of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  if len(devices) == jax.device_count():
    # Topology-aware device order (TPU torus / GPU NVLink islands); processes stay contiguous.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 3)


def describe(mesh: Mesh) -> str:
  return " x ".join(f"{name}={size}" for name, size in mesh.shape.items())


# ---------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec.


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int],
                    axis_sizes: dict[str, int], rules=RULES) -> P:
  """The PartitionSpec of an array of `shape` whose dimensions have these logical names.

  Per dimension, the first rule for its name; mesh axes of size 1, axes already used by an
  earlier dimension, and axes that would not divide the dimension are dropped.
  """
  if logical_axes is None:
    return P()
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {logical_axes} do not match shape {tuple(shape)}")
  table = {}
  for name, target in rules:
    table.setdefault(name, target)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    axes, size = [], 1
    for axis in (target,) if isinstance(target, str) else tuple(target):
      n = axis_sizes.get(axis, 1)
      if n == 1 or axis in used or dim % (size * n):
        continue
      axes.append(axis)
      size *= n
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def logical_sharding(mesh: Mesh, logical_axes, shape, rules=RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, shape, dict(mesh.shape), rules))


def _key(k) -> str:
  return jax.tree_util.keystr((k,))


def param_table(abstract_params) -> dict[tuple[str, ...], tuple[tuple[int, ...], Any]]:
  """{leaf path: (shape, logical axes)} for an nnx.State of Params (abstract or concrete)."""
  table = {}
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  for path, var in jax.tree_util.tree_flatten_with_path(abstract_params, is_leaf=is_var)[0]:
    metadata = var.get_metadata() if is_var(var) else {}
    axes = metadata.get("out_sharding") or metadata.get("sharding_names")  # flax's two names
    for sub, leaf in jax.tree_util.tree_flatten_with_path(var)[0]:
      table[tuple(_key(k) for k in path + sub)] = (tuple(leaf.shape), axes)
  return table


def tree_specs(abstract_tree, abstract_params, axis_sizes: dict[str, int], rules=RULES):
  """PartitionSpecs for every leaf of `abstract_tree` (a TrainState, an optimizer state, the
  parameters themselves), matched against the parameters by path suffix and shape."""
  table = param_table(abstract_params)
  specs = {path: logical_to_spec(axes, shape, axis_sizes, rules)
           for path, (shape, axes) in table.items()}

  def spec_of(path, leaf):
    shape = tuple(np.shape(leaf))
    keys = tuple(_key(k) for k in path)
    for i in range(len(keys)):
      match = table.get(keys[i:])
      if match is None:
        continue
      param_shape, spec = match[0], specs[keys[i:]]
      if shape == param_shape:
        return spec
      if len(shape) == len(param_shape) - 1:  # a factored statistic: one dimension reduced
        full = tuple(spec) + (None,) * (len(param_shape) - len(spec))
        for d in reversed(range(len(param_shape))):
          if param_shape[:d] + param_shape[d + 1:] == shape:
            return P(*(full[:d] + full[d + 1:]))
      return P()
    return P()

  return jax.tree_util.tree_map_with_path(spec_of, abstract_tree)


def tree_shardings(mesh: Mesh, abstract_tree, abstract_params, rules=RULES):
  """NamedShardings for every leaf of `abstract_tree`; see `tree_specs`."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                      tree_specs(abstract_tree, abstract_params, dict(mesh.shape), rules),
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, global_batch: int, rules=RULES) -> NamedSharding:
  """The sharding of [batch, length] feature arrays."""
  return NamedSharding(mesh, logical_to_spec(BATCH_AXES, (global_batch, 1),
                                             dict(mesh.shape), rules))


# ---------------------------------------------------------------------------------------------
# Batches: which part of the global batch this process loads.


def check_batch_size(mesh: Mesh, global_batch: int) -> None:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % shards:
    raise UserError(f"config key 'data.batch_size' ({global_batch}) must be divisible by the "
                    f"data-parallel size of the mesh (data x fsdp = {shards}; mesh "
                    f"{describe(mesh)})")


def data_layout(sharding: NamedSharding, global_batch: int) -> dict[str, int]:
  """{"shard", "num_shards", "batch"}: which shard of the data this process reads, and how many
  rows of each global batch it loads.

  Processes whose devices hold the same rows (replicas: a model axis spanning hosts) read the
  same shard of the data; otherwise each process reads its own (shard = process index in the
  usual layout). One process: shard 0 of 1, the whole batch.
  """
  rows_of: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map((global_batch, 1)).items():
    rows = range(global_batch)[index[0]]
    rows_of.setdefault(device.process_index, set()).update(rows)
  groups = sorted({tuple(sorted(rows)) for rows in rows_of.values()})
  mine = tuple(sorted(rows_of[jax.process_index()]))
  if len({len(g) for g in groups}) != 1 or len(groups) * len(mine) != global_batch:
    raise UserError(f"the mesh's data axes do not split the batch evenly across the "
                    f"{jax.process_count()} processes; use mesh.data = a multiple of the number "
                    f"of processes")
  return {"shard": groups.index(mine), "num_shards": len(groups), "batch": len(mine)}


def shard_info(layout: dict[str, int]):
  """The seqio.ShardInfo for `layout`, or None when there is a single shard."""
  if layout["num_shards"] == 1:
    return None
  import seqio
  return seqio.ShardInfo(layout["shard"], layout["num_shards"])


def write_data_layout(prefix: str, layout: dict[str, int] | None) -> None:
  if layout is not None:
    with open(prefix + ".json", "w") as f:
      json.dump(layout, f)


def same_data_layout(data_dir: str, layout: dict[str, int]) -> bool:
  """Whether the data iterator saved in `data_dir` by this process read the shard it reads now.

  Checkpoints without a layout file come from single-process runs (t5mix before sharding).
  """
  prefix = os.path.join(data_dir, f"process_{jax.process_index()}")
  if not os.path.exists(prefix + ".index"):
    return False
  if not os.path.exists(prefix + ".json"):
    return layout["num_shards"] == 1
  with open(prefix + ".json") as f:
    saved = json.load(f)
  return all(saved.get(k) == layout[k] for k in ("shard", "num_shards", "batch"))


def global_batch(sharding: NamedSharding, local: dict[str, np.ndarray], global_size: int):
  """Global jax.Arrays from this process's rows of every feature."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (global_size,) + v.shape[1:])
          for k, v in local.items()}


# ---------------------------------------------------------------------------------------------
# Multi-process agreement.


def stop_agreed(requested: bool, at_sync_point: bool) -> bool:
  """Whether to stop now. One process: as soon as asked. Several: only at sync points (log
  steps), and then on all of them if any was asked, so that they save the same step together
  (a checkpoint is collective). Every process must call it at the same steps."""
  if jax.process_count() == 1:
    return bool(requested)
  if not at_sync_point:
    return False
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(requested, np.int32))))
