"""Adapter files: the trained parameters of an adapters / LoRA run on their own (safetensors).

At the end of an `adapters` or `lora` run the parameters that trained (adapters, LoRA, and e.g.
the layer norms) are written to `WORKDIR/adapters.safetensors`; `t5mix adapters export` writes
them for any checkpoint, and `t5mix adapters merge` combines them with a base workdir into a
workdir for `t5mix eval` / `export-hf` / `--init-from` (LoRA folded into the weights).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from t5mix import checkpoints, distributed
from t5mix import config as config_lib
from t5mix import vocab as vocab_lib
from t5mix.errors import UserError
from t5mix.finetune import Plan, make_plan
from t5mix.model import T5, merge_lora_model, param_path, save_model_config

ADAPTERS_FILE = "adapters.safetensors"
PEFT_FIELDS = ("adapter_size", "adapter_after_attention", "lora_rank", "lora_alpha", "lora_targets")


def _flat_pure(params) -> dict[str, np.ndarray]:
  state = params if isinstance(params, nnx.State) else nnx.State(params)
  return {".".join(map(str, path)): v.get_value() if hasattr(v, "get_value") else v
          for path, v in nnx.to_flat_state(state)}


def save_adapters(path: str, plan: Plan, params, model_config, *, step: int | None = None) -> int:
  """Writes the parameters that `plan` trains (adapters, LoRA, and e.g. layer norms) as safetensors,
  with the PEFT fields of the model config and the run's config in the metadata. Returns the size."""
  flat = _flat_pure(params)
  tensors = {p: np.ascontiguousarray(np.asarray(flat[p], np.float32))
             for p, s in plan.stage_of.items() if s is not None}
  metadata = {
      "format": "t5mix-adapters",
      "strategy": plan.strategy,
      "peft": json.dumps({k: getattr(model_config, k) for k in PEFT_FIELDS}),
      "config": json.dumps(config_lib.to_dict(plan.config)),
      "step": str(step if step is not None else ""),
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file(tensors, path, metadata=metadata)
  return os.path.getsize(path)


def load_adapters(path: str) -> tuple[dict[str, np.ndarray], dict]:
  if not os.path.exists(path):
    raise UserError(f"{path}: adapter file not found")
  try:
    with safe_open(path, framework="numpy") as f:
      metadata = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # not a safetensors file
    raise UserError(f"{path}: not a safetensors file ({str(e).splitlines()[0][:120]})") from None
  if metadata.get("format") != "t5mix-adapters":
    raise UserError(f"{path}: not a t5mix adapter file (written by `t5mix adapters export`)")
  return tensors, metadata


def write_run_adapters(plan: Plan, workdir: str, params, model_config, step: int, log=print) -> None:
  """At the end of an adapters / LoRA run: WORKDIR/adapters.safetensors."""
  if plan.strategy not in ("adapters", "lora"):
    return
  trained = {p for p, s in plan.stage_of.items() if s is not None}
  # Sharded over several processes: gather (every process takes part), then one writes.
  params = _map_leaves_by_path(
      lambda p, x: multihost_utils.process_allgather(x, tiled=True)
      if p in trained and not getattr(x, "is_fully_addressable", True) else x, params)
  if not distributed.is_primary():
    return
  path = os.path.join(workdir, ADAPTERS_FILE)
  size = save_adapters(path, plan, params, model_config, step=step)
  log(f"wrote {path} ({size / 1e6:.2f} MB: the {plan.trainable_count():,} trained parameters); "
      f"combine with the base model: t5mix adapters merge --base BASE_WORKDIR --adapters {path} --out DIR")


def _map_leaves_by_path(fn, tree):
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(param_path(p), x), tree)


def export_adapters(workdir: str, out: str, checkpoint: str | None = None) -> tuple[int, int]:
  """`t5mix adapters export`: (number of tensors, bytes) written from a workdir's checkpoint."""
  config_path = os.path.join(workdir, checkpoints.CONFIG_FILE)
  if not os.path.exists(config_path):
    raise UserError(f"{workdir}: no config.yaml (not a t5mix training workdir)")
  c = config_lib.load(config_path)
  model_config, model = checkpoints.load_workdir_params(workdir, checkpoint)
  params = nnx.state(model, nnx.Param)
  plan = make_plan(c, params)
  if plan.strategy not in ("adapters", "lora") and plan.all_trainable_from_start:
    raise UserError(f"{workdir}: a {plan.strategy} run trains every parameter; there are no adapters to "
                    f"export (use the workdir itself, or export-hf)")
  size = save_adapters(out, plan, params, model_config, step=_step_of(workdir, checkpoint))
  return sum(s is not None for s in plan.stage_of.values()), size


def _step_of(workdir, checkpoint):
  if checkpoint:
    return int(checkpoint)
  done = checkpoints.steps(workdir)
  return done[-1] if done else None


def merge_adapters(base_workdir: str, adapters_path: str, out_workdir: str, *, fold_lora: bool = True) -> str:
  """`t5mix adapters merge`: a workdir holding base parameters + adapter file (LoRA folded in unless
  `fold_lora=False`), with model.yaml, config.yaml (the fine-tuning run's) and a step-0 checkpoint,
  ready for `t5mix eval` / `export-hf` / `--init-from`. Returns the checkpoint path."""
  tensors, metadata = load_adapters(adapters_path)
  if checkpoints.steps(out_workdir) or checkpoints.partial_writes(out_workdir):
    raise UserError(f"{out_workdir}: already holds checkpoints; merge into a new directory")
  base_config, base_model = checkpoints.load_workdir_params(base_workdir)
  if base_config.adapter_size or base_config.lora_rank:
    raise UserError(f"{base_workdir}: the base model already has adapters/LoRA; merge into a plain model")
  config = dataclasses.replace(base_config, **json.loads(metadata["peft"]))
  params = nnx.to_pure_dict(nnx.state(base_model, nnx.Param))
  expected = _flat_pure(nnx.state(nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0))), nnx.Param))
  flat = _flat_pure(params)
  for name, value in tensors.items():
    if name not in expected:
      raise UserError(f"{adapters_path}: tensor {name!r} is not a parameter of the base model with "
                      f"these adapters (another model size?)")
    if tuple(value.shape) != tuple(expected[name].shape):
      raise UserError(f"{adapters_path}: tensor {name!r} has shape {tuple(value.shape)}, the model "
                      f"expects {tuple(expected[name].shape)} (another model size?)")
    flat[name] = value
  for name in expected.keys() - flat.keys():
    raise UserError(f"{adapters_path}: has no tensor {name!r}")
  model = T5.from_params(config, _unflatten(flat))
  if fold_lora:
    model = merge_lora_model(model)
  os.makedirs(out_workdir, exist_ok=True)
  save_model_config(model.config, os.path.join(out_workdir, checkpoints.MODEL_FILE))
  run_config = json.loads(metadata.get("config") or "{}")
  if run_config:
    with open(os.path.join(out_workdir, checkpoints.CONFIG_FILE), "w") as f:
      yaml.safe_dump(run_config, f, sort_keys=False)
  vocab = os.path.join(base_workdir, vocab_lib.WORKDIR_VOCAB_FILE)
  if os.path.exists(vocab):
    shutil.copy(vocab, os.path.join(out_workdir, vocab_lib.WORKDIR_VOCAB_FILE))
  return checkpoints.save_params(out_workdir, model)


def _unflatten(flat: dict[str, Any]) -> dict:
  out: dict = {}
  for name, value in flat.items():
    node = out
    *parents, leaf = [int(k) if k.isdigit() else k for k in name.split(".")]
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = value
  return out
