"""Fine-tuning strategies (T5 paper §3.5.2, plus LoRA): which parameters train, and when.

The `finetune` config section picks a strategy:

- `full` — every parameter trains (the default; the optimizer is exactly `train.make_optimizer`'s,
  so existing runs and checkpoints are unaffected).
- `gradual_unfreezing` — stage 1 trains the top encoder and the top decoder block plus
  `always_trainable` (embedding, lm_head, final norms); every `steps_per_stage` steps one more
  block unfreezes, top-down, in encoder and decoder together, until all train. A stack's
  `relpos_bias` unfreezes with its block 0 (where HF/Mesh TF keep it). With `steps_per_stage` 0
  the run's steps are split into stages differing by at most one optimizer update, the last
  ending with the run.
- `adapters` — adds a bottleneck adapter of width `adapter_size` after each FFN (and attention,
  with `adapter_after_attention`; see t5mix/peft.py) and trains only the adapters and layer norms.
- `lora` — adds LoRA (rank `lora_rank`, scale `lora_alpha / lora_rank`) to `lora_targets` and
  trains only the LoRA matrices.

`trainable` (glob patterns over dotted parameter paths such as `decoder.layers.3.mlp.wi_0`;
`decoder` alone means everything under it) overrides the strategy's set; anything it does not
match is frozen.

How freezing is done (in the optimizer; the train step only skips the gradients it would waste):

- Parameters are labelled by path and split with `optax.partition`. Frozen parameters go to
  `optax.set_to_zero()`: their update is exactly zero after the *whole* chain (clipping, Adafactor
  or AdamW with weight decay run only on the trainable group), so they stay bit-identical, and the
  optimizer keeps no state for them (nor a gradient accumulator with `grad_accum_steps`).
- Gradual unfreezing is computed inside the optimizer from its own step counter: every stage is
  its own partition group whose optimizer (Adafactor/AdamW, learning-rate schedule shifted to the
  global step) is wrapped in `delayed(start)`, a `lax.cond` that returns zero updates and leaves
  the group's state untouched until the stage starts. So a block's optimizer statistics start
  fresh when it unfreezes (Adam's bias correction included), and the gradients of still-frozen
  blocks are zeroed before global-norm clipping so that they do not shrink the update of the
  training ones. Every stage group that will train has its optimizer state from the start (it
  needs it later); groups that never train have none.

The train step also stops gradients at the parameters that do not train (`Plan.frozen_in`), so
autodiff builds no weight gradient for them: adapters' and LoRA's base model always, gradual
unfreezing's not-yet-unfrozen blocks in each stage (one compiled step per stage; the update is the
same, only the wasted backward matmuls go).

`--init-from` a base checkpoint without adapter/LoRA parameters restores the base parameters and
keeps the fresh PEFT ones (`init_params`). The trained PEFT parameters (and whatever else trained,
e.g. the layer norms) are written to `WORKDIR/adapters.safetensors` at the end of an `adapters` or
`lora` run; `t5mix adapters export` writes them for any checkpoint and `t5mix adapters merge`
combines them with a base workdir into a workdir for `t5mix eval` / `export-hf` (LoRA folded into
the weights).
"""

from __future__ import annotations

import bisect
import dataclasses
import fnmatch
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5mix import config as config_lib
from t5mix import vocab as vocab_lib
from t5mix import peft
from t5mix.errors import UserError

STRATEGIES = ("full", "gradual_unfreezing", "adapters", "lora")
DEFAULT_TRAINABLE = {
    "full": ["*"],
    "gradual_unfreezing": ["*"],
    "adapters": [peft.ADAPTER_PATTERN, "*norm*"],
    "lora": [peft.LORA_PATTERN],
}
ADAPTERS_FILE = "adapters.safetensors"
FROZEN = "frozen"
TRAINABLE = "trainable"


# ---------------------------------------------------------------------------------------------
# Config.


def validate(c: config_lib.TrainConfig) -> None:
  f = c.finetune
  if f.strategy not in STRATEGIES:
    raise UserError(f"config key 'finetune.strategy': {f.strategy!r} is not one of {', '.join(STRATEGIES)}")
  for key in ("trainable", "always_trainable", "lora_targets"):
    value = getattr(f, key)
    if not all(isinstance(x, str) for x in value):
      raise UserError(f"config key 'finetune.{key}': expected a list of strings, got {value!r}")
  if f.steps_per_stage < 0:
    raise UserError("config key 'finetune.steps_per_stage' must be >= 0")
  accum = c.optimizer.grad_accum_steps
  if f.strategy == "gradual_unfreezing" and f.steps_per_stage % accum:
    raise UserError(f"config key 'finetune.steps_per_stage' ({f.steps_per_stage}) must be a multiple "
                    f"of optimizer.grad_accum_steps ({accum})")
  if f.strategy == "adapters" and f.adapter_size <= 0:
    raise UserError("config key 'finetune.adapter_size' must be positive for strategy adapters")
  if f.strategy == "lora":
    if f.lora_rank <= 0:
      raise UserError("config key 'finetune.lora_rank' must be positive for strategy lora")
    if f.lora_alpha <= 0:
      raise UserError("config key 'finetune.lora_alpha' must be positive")
    known = peft.ATTENTION_TARGETS + peft.MLP_TARGETS + tuple(peft.SHORTHANDS)
    for name in f.lora_targets:  # gated vs relu MLP names are checked against the model (T5Config)
      if name not in known:
        raise UserError(f"config key 'finetune.lora_targets': unknown target {name!r} "
                        f"(known: {', '.join(known)})")
    if not f.lora_targets:
      raise UserError("config key 'finetune.lora_targets' is empty")


def apply_to_model_config(f: config_lib.FinetuneConfig, model_config):
  """The model config with the adapters / LoRA that the strategy adds."""
  if f.strategy == "adapters":
    return dataclasses.replace(model_config, adapter_size=f.adapter_size,
                               adapter_after_attention=f.adapter_after_attention)
  if f.strategy == "lora":
    return dataclasses.replace(model_config, lora_rank=f.lora_rank, lora_alpha=float(f.lora_alpha),
                               lora_targets=",".join(f.lora_targets))
  return model_config


# ---------------------------------------------------------------------------------------------
# Parameter paths.


def _key_name(k):
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def path_str(keypath) -> str:
  """A jax key path → `encoder.layers.0.mlp.wi_0` (an nnx Variable's trailing `.value` dropped)."""
  keys = list(keypath)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey):
    keys = keys[:-1]
  return ".".join(str(_key_name(k)) for k in keys)


def param_paths(params) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def matches(path: str, patterns) -> bool:
  """fnmatch on the dotted path; a pattern also matches everything under it (`decoder` = `decoder.*`)."""
  return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p + ".*") for p in patterns)


def _map_paths(fn, tree):
  return jax.tree_util.tree_map_with_path(lambda p, _: fn(path_str(p)), tree)


def _num_layers(paths, stack):
  layers = {int(p.split(".")[2]) for p in paths if p.startswith(f"{stack}.layers.")}
  return max(layers) + 1 if layers else 0


# ---------------------------------------------------------------------------------------------
# The plan: which parameters train, and from which step.


@dataclasses.dataclass
class Plan:
  """Labels of a model's parameters: stage (1-based) from which each trains, or None (frozen)."""
  config: config_lib.TrainConfig
  stage_of: dict[str, int | None]  # dotted path → stage or None
  sizes: dict[str, int]  # dotted path → number of elements
  stage_starts: tuple[int, ...]  # train steps before each stage: (0,) unless gradual_unfreezing

  @property
  def strategy(self) -> str:
    return self.config.finetune.strategy

  @property
  def num_stages(self) -> int:
    return len(self.stage_starts)

  @property
  def all_trainable_from_start(self) -> bool:
    return all(s == 1 for s in self.stage_of.values())

  def trainable_count(self, stage: int | None = None) -> int:
    """Trainable parameters in `stage` (default: the last, i.e. ever trainable)."""
    stage = self.num_stages if stage is None else stage
    return sum(n for p, n in self.sizes.items() if self.stage_of[p] is not None and self.stage_of[p] <= stage)

  def stage_at(self, step: int) -> int | None:
    """The stage that train step `step` (1-based: the step-th update) ran in; None unless gradual."""
    if self.strategy != "gradual_unfreezing":
      return None
    return max(bisect.bisect_left(self.stage_starts, step), 1)  # stages begun before `step`

  def start_step(self, stage: int) -> int:
    return self.stage_starts[stage - 1]

  def describe(self) -> str | None:
    total = sum(self.sizes.values())
    count = lambda n: f"{n:,} of {total:,} parameters ({100 * n / total:.2f}%)"  # noqa: E731
    if self.strategy == "gradual_unfreezing":
      return "\n".join([f"fine-tuning: gradual unfreezing in {self.num_stages} stages (one compiled "
                        "train step each):"] + [f"  {self.describe_stage(s)}"
                                                for s in range(1, self.num_stages + 1)])
    if self.strategy == "full" and self.all_trainable_from_start:
      return None
    return f"fine-tuning ({self.strategy}): training {count(self.trainable_count())}"

  def describe_stage(self, stage: int) -> str:
    """`stage 2/3, steps 4-6: training <blocks> + <the rest> (N of M parameters); frozen: …`."""
    steps, first = self.config.steps, self.start_step(stage) + 1
    last = min(self.start_step(stage + 1), steps) if stage < self.num_stages else steps
    if first > steps:  # an explicit steps_per_stage longer than the run
      when = f"from step {first}, after this run's {steps} steps"
    else:
      when = f"step {first}" if first == last else f"steps {first}-{last}"
    total, n = sum(self.sizes.values()), self.trainable_count(stage)
    if n == total:
      return f"stage {stage}/{self.num_stages}, {when}: training everything ({total:,} parameters)"
    trains = {p for p, s in self.stage_of.items() if s is not None and s <= stage}
    return (f"stage {stage}/{self.num_stages}, {when}: training {_name_parts(trains, self.sizes)} "
            f"({n:,} of {total:,} parameters, {100 * n / total:.2f}%); frozen: "
            f"{_name_parts(set(self.sizes) - trains, self.sizes)}")

  def frozen_in(self, params, stage: int | None = None):
    """A pytree like params: True where the parameter does not train in `stage` (gradual
    unfreezing's 1-based stage; None: the last), else False; None if every parameter trains then.

    The train step stops gradients at these parameters, so autodiff never builds their weight
    gradients: for adapters and LoRA that is most of the backward pass's weight matmuls."""
    stage = self.num_stages if stage is None else stage
    frozen = lambda p: self.stage_of[p] is None or self.stage_of[p] > stage  # noqa: E731
    if not any(frozen(p) for p in self.stage_of):
      return None
    return _map_paths(frozen, params)

  # --- the optimizer ---

  def make_optimizer(self) -> optax.GradientTransformation:
    from t5mix import train  # train imports this module
    c = self.config
    o = c.optimizer
    if self.strategy != "gradual_unfreezing" and self.all_trainable_from_start:
      return train.make_optimizer(o, c.steps)
    label = lambda tree: _map_paths(lambda p: FROZEN if self.stage_of[p] is None else TRAINABLE, tree)  # noqa: E731
    if self.strategy != "gradual_unfreezing":
      return optax.partition({TRAINABLE: train.make_optimizer(o, c.steps), FROZEN: optax.set_to_zero()}, label)

    accum = o.grad_accum_steps
    schedule = train.learning_rate_schedule(o, c.steps)
    bare = dataclasses.replace(o, clip_norm=0.0, grad_accum_steps=1)
    starts = {s: self.start_step(s) // accum for s in range(1, self.num_stages + 1)}  # in optimizer updates
    groups = {}
    for s, start in starts.items():
      shifted = (lambda start: lambda n: schedule(n + start))(start)  # the global schedule
      inner = train.make_optimizer(bare, c.steps, schedule=shifted)
      groups[f"stage_{s}"] = delayed(inner, start) if start else inner
    stage_label = lambda tree: _map_paths(lambda p: f"stage_{self.stage_of[p]}", tree)  # noqa: E731
    start_of = lambda p: starts[self.stage_of[p]]  # noqa: E731
    chain = [zero_until(start_of)]
    if o.clip_norm:
      chain.append(optax.clip_by_global_norm(o.clip_norm))
    chain.append(optax.partition(groups, stage_label))
    opt = optax.chain(*chain)
    if accum > 1:
      opt = optax.MultiSteps(opt, every_k_schedule=accum)
    return optax.partition({TRAINABLE: opt, FROZEN: optax.set_to_zero()}, label)


def make_plan(c: config_lib.TrainConfig, params) -> Plan:
  """The plan for a model's params (an nnx.State or a nested dict; only paths and sizes are read)."""
  f = c.finetune
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  sizes = {path_str(p): int(np.prod(np.shape(v))) for p, v in leaves}
  paths = list(sizes)
  patterns = f.trainable or DEFAULT_TRAINABLE[f.strategy]
  for pattern in patterns:
    if not any(matches(p, [pattern]) for p in paths):
      raise UserError(f"config key 'finetune.trainable': {pattern!r} matches no parameter "
                      f"(parameters look like {paths[0]}, encoder.layers.0.mlp.wi_0)")
  trainable = {p: matches(p, patterns) for p in paths}
  if not any(trainable.values()):
    raise UserError("config key 'finetune.trainable': no parameter is trainable")
  if f.strategy != "gradual_unfreezing":
    return Plan(c, {p: 1 if t else None for p, t in trainable.items()}, sizes, (0,))

  n_enc, n_dec = _num_layers(paths, "encoder"), _num_layers(paths, "decoder")
  num_stages = max(n_enc, n_dec)
  stage_of = {}
  for p in paths:
    if not trainable[p]:
      stage_of[p] = None
    elif matches(p, f.always_trainable):
      stage_of[p] = 1
    else:
      stage_of[p] = _unfreeze_stage(p, {"encoder": n_enc, "decoder": n_dec}, num_stages)
  if f.steps_per_stage:
    return Plan(c, stage_of, sizes, tuple(s * f.steps_per_stage for s in range(num_stages)))
  # steps / stages, in whole optimizer updates: stages differ by at most one update, and the last
  # one ends with the run.
  accum = c.optimizer.grad_accum_steps
  updates = c.steps // accum
  if updates < num_stages:
    need = f"{num_stages} steps" if accum == 1 else \
        f"{num_stages * accum} steps ({num_stages} x optimizer.grad_accum_steps {accum})"
    raise UserError(f"config key 'steps' ({c.steps}) is too few for gradual unfreezing: this model "
                    f"has {num_stages} stages (one per block) and needs at least {need}, so that "
                    "every stage trains; raise steps or set finetune.steps_per_stage")
  return Plan(c, stage_of, sizes, tuple(s * updates // num_stages * accum for s in range(num_stages)))


STACKS = ("encoder", "decoder")
SHARED_PARTS = {"final_norm": ("final norm", "final norms"),  # a stack's non-block parameters
                "relpos_bias": ("relative position bias", "relative position biases")}


def _name_parts(chosen: set[str], sizes: dict[str, int]) -> str:
  """Words for a set of parameter paths: whole stacks (`encoder`), block ranges (`decoder blocks
  0-3`), then the other parameters (`embedding, lm_head, final norms`) after a `+`."""
  groups: dict[tuple, list[str]] = {}  # (stack, block number) or (stack, name) or (name,) → paths
  for p in sizes:
    parts = p.split(".")
    if parts[0] in STACKS:
      groups.setdefault((parts[0], int(parts[2]) if parts[1] == "layers" else parts[1]), []).append(p)
    else:
      groups.setdefault((parts[0],), []).append(p)
  whole = {g for g, paths in groups.items() if all(p in chosen for p in paths)}
  blocks, others = [], []
  for stack in STACKS:
    mine = [g for g in groups if g[0] == stack and len(g) == 2]
    if mine and all(g in whole for g in mine):
      blocks.append(stack)
      continue
    numbers = sorted(g[1] for g in mine if isinstance(g[1], int) and g in whole)
    if numbers:
      blocks.append(f"{stack} {_block_range(numbers)}")
    partly = sorted(g[1] for g in mine if isinstance(g[1], int) and g not in whole
                    and any(p in chosen for p in groups[g]))
    if partly:  # `finetune.trainable` globs that cut through blocks
      blocks.append(f"part of {stack} {_block_range(partly)}")
    others += [f"{stack} {SHARED_PARTS.get(g[1], (g[1],))[0]}" for g in mine
               if not isinstance(g[1], int) and any(p in chosen for p in groups[g])]
  others = [g[0] for g in groups if len(g) == 1 and g in whole] + others
  for part, (one, both) in SHARED_PARTS.items():  # "encoder final norm, decoder final norm"
    pair = [f"{stack} {one}" for stack in STACKS]
    if all(x in others for x in pair):
      others = [x for x in others if x != pair[1]]
      others[others.index(pair[0])] = both
  if blocks and others:
    return f"{', '.join(blocks)} + {', '.join(others)}"
  return ", ".join(blocks or others)


def _block_range(numbers: list[int]) -> str:
  if len(numbers) == 1:
    return f"block {numbers[0]}"
  if numbers == list(range(numbers[0], numbers[-1] + 1)):
    return f"blocks {numbers[0]}-{numbers[-1]}"
  return "blocks " + ", ".join(map(str, numbers))


def _unfreeze_stage(path: str, layers: dict[str, int], num_stages: int) -> int:
  """Top block (and the final norm, lm_head) → 1; block i of L → L - i; relpos_bias and embedding last."""
  parts = path.split(".")
  if parts[0] in layers:
    n = layers[parts[0]]
    if parts[1] == "layers":
      return n - int(parts[2])
    if parts[1] == "relpos_bias":
      return n
    return 1  # final_norm
  if parts[0] == "embedding":
    return num_stages
  return 1  # lm_head


# ---------------------------------------------------------------------------------------------
# optax pieces for gradual unfreezing.


class DelayedState(NamedTuple):
  count: jax.Array
  inner: Any


def delayed(inner: optax.GradientTransformation, start: int) -> optax.GradientTransformation:
  """`inner` from its `start`-th update on; before, zero updates and its state untouched."""

  def init(params):
    return DelayedState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    def run(_):
      return inner.update(updates, state.inner, params)

    def skip(_):
      return jax.tree.map(jnp.zeros_like, updates), state.inner

    new_updates, new_inner = jax.lax.cond(state.count >= start, run, skip, None)
    return new_updates, DelayedState(optax.safe_int32_increment(state.count), new_inner)

  return optax.GradientTransformation(init, update)


class ZeroUntilState(NamedTuple):
  count: jax.Array


def zero_until(start_of) -> optax.GradientTransformation:
  """Zeroes the gradient of a parameter (by dotted path) until update `start_of(path)`."""

  def init(params):
    del params
    return ZeroUntilState(jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params

    def mask(keypath, g):
      start = start_of(path_str(keypath))
      return g if start == 0 else jnp.where(state.count >= start, g, jnp.zeros_like(g))

    updates = jax.tree_util.tree_map_with_path(mask, updates)
    return updates, ZeroUntilState(optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------
# --init-from: base parameters from a checkpoint, fresh adapters / LoRA.


def _checkpoint_state_dir(path: str) -> str | None:
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  ckpt_dir = os.path.join(path, "checkpoints")
  if os.path.isdir(ckpt_dir):
    step = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data")).latest_step()
    if step is None:
      return None
    path = os.path.join(ckpt_dir, str(step))
  state_dir = os.path.join(path, "state")
  return state_dir if os.path.isdir(state_dir) else None


def _checkpoint_param_keys(state_dir: str) -> set[tuple[str, ...]] | None:
  import orbax.checkpoint as ocp
  try:
    tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
  except Exception:  # unreadable: let restore_params report it
    return None
  if not isinstance(tree, dict) or not isinstance(tree.get("params"), dict):
    return None
  return {tuple(str(_key_name(k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree["params"])[0]}


def is_peft_path(path: str) -> bool:
  return matches(path, [peft.ADAPTER_PATTERN, peft.LORA_PATTERN])


def init_params(init_from: str, params, log=print):
  """`params` (an nnx.State of a fresh model) with every parameter that the checkpoint at `init_from`
  (a workdir or a checkpoint step directory) holds restored from it; adapter/LoRA parameters that
  it lacks keep their fresh initialisation. Any other missing parameter is an error
  (`train.restore_params`'s)."""
  from flax import nnx

  from t5mix import train
  state_dir = _checkpoint_state_dir(init_from)
  present = _checkpoint_param_keys(state_dir) if state_dir else None
  if present is None:
    return train.restore_params(init_from, params)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  ours = {tuple(str(_key_name(k)) for k in p) for p, _ in flat}
  dropped = sorted(".".join(k[:-1]) for k in present - ours if is_peft_path(".".join(k[:-1])))
  if dropped:
    log(f"warning: {init_from} has {len(dropped)} adapter/LoRA parameter arrays (e.g. {dropped[0]}) that this "
        f"model does not have; they are ignored. To start from the adapted model, merge them first: "
        f"t5mix adapters merge (LoRA is folded into the weights)")
  missing = [path_str(p) for p, _ in flat if tuple(str(_key_name(k)) for k in p) not in present]
  if not missing or not all(is_peft_path(p) for p in missing):
    return train.restore_params(init_from, params)
  missing_set = set(missing)
  subset = nnx.from_flat_state([(path, v) for path, v in nnx.to_flat_state(params)
                                if ".".join(map(str, path)) not in missing_set])
  restored = train.restore_params(init_from, subset)
  merged = jax.tree.map(lambda x: x, params)  # a copy: new Variables, same arrays
  nnx.replace_by_pure_dict(merged, nnx.to_pure_dict(restored))
  log(f"{len(missing)} adapter/LoRA parameter arrays are not in {init_from}: initialised fresh")
  return merged


# ---------------------------------------------------------------------------------------------
# Adapter files: the trained parameters of an adapters / LoRA run on their own.


PEFT_FIELDS = ("adapter_size", "adapter_after_attention", "lora_rank", "lora_alpha", "lora_targets")


def _flat_pure(params) -> dict[str, np.ndarray]:
  from flax import nnx
  state = params if isinstance(params, nnx.State) else nnx.State(params)
  return {".".join(map(str, path)): v.get_value() if hasattr(v, "get_value") else v
          for path, v in nnx.to_flat_state(state)}


def save_adapters(path: str, plan: Plan, params, model_config, *, step: int | None = None) -> int:
  """Writes the parameters that `plan` trains (adapters, LoRA, and e.g. layer norms) as safetensors,
  with the PEFT fields of the model config and the run's config in the metadata. Returns the size."""
  from safetensors.numpy import save_file
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
  from safetensors import safe_open
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
  from jax.experimental import multihost_utils

  from t5mix import distributed
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
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def export_adapters(workdir: str, out: str, checkpoint: str | None = None) -> tuple[int, int]:
  """`t5mix adapters export`: (number of tensors, bytes) written from a workdir's checkpoint."""
  from flax import nnx

  from t5mix import convert
  config_path = os.path.join(workdir, "config.yaml")
  if not os.path.exists(config_path):
    raise UserError(f"{workdir}: no config.yaml (not a t5mix training workdir)")
  c = config_lib.load(config_path)
  model_config, model = convert.load_workdir_params(workdir, checkpoint)
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
  ckpts = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(ckpts) if n.isdigit()] if os.path.isdir(ckpts) else []
  return max(steps) if steps else None


def merge_adapters(base_workdir: str, adapters_path: str, out_workdir: str, *, fold_lora: bool = True) -> str:
  """`t5mix adapters merge`: a workdir holding base parameters + adapter file (LoRA folded in unless
  `fold_lora=False`), with model.yaml, config.yaml (the fine-tuning run's) and a step-0 checkpoint,
  ready for `t5mix eval` / `export-hf` / `--init-from`. Returns the checkpoint path."""
  import orbax.checkpoint as ocp
  import yaml
  from flax import nnx

  from t5mix import convert
  from t5mix.model import T5, save_model_config
  tensors, metadata = load_adapters(adapters_path)
  ckpt_dir = os.path.join(os.path.abspath(out_workdir), "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise UserError(f"{out_workdir}: already holds checkpoints; merge into a new directory")
  base_config, base_model = convert.load_workdir_params(base_workdir)
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
    model = peft.merge_lora_model(model)
  os.makedirs(out_workdir, exist_ok=True)
  save_model_config(model.config, os.path.join(out_workdir, "model.yaml"))
  run_config = json.loads(metadata.get("config") or "{}")
  if run_config:
    with open(os.path.join(out_workdir, "config.yaml"), "w") as f:
      yaml.safe_dump(run_config, f, sort_keys=False)
  vocab = os.path.join(base_workdir, vocab_lib.WORKDIR_VOCAB_FILE)
  if os.path.exists(vocab):
    import shutil
    shutil.copy(vocab, os.path.join(out_workdir, vocab_lib.WORKDIR_VOCAB_FILE))
  manager = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"))
  manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(
      {"step": 0, "params": nnx.state(model, nnx.Param)})))
  manager.wait_until_finished()
  return os.path.join(ckpt_dir, "0")


def _unflatten(flat: dict[str, Any]) -> dict:
  out: dict = {}
  for name, value in flat.items():
    node = out
    *parents, leaf = [int(k) if k.isdigit() else k for k in name.split(".")]
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = value
  return out
