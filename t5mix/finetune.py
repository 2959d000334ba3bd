"""Fine-tuning strategies (T5 paper §3.5.2, plus LoRA): which parameters train, and when.

The `finetune` config section picks a strategy:

- `full` — every parameter trains (the default; the optimizer is exactly `optim.base_optimizer`'s,
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

This module decides; others carry it out: the optimizer applies the plan (t5mix/optim.py), the
train step stops gradients at the parameters that do not train (`Plan.frozen_in`), so autodiff
builds no weight gradient for them: adapters' and LoRA's base model always, gradual unfreezing's
not-yet-unfrozen blocks in each stage (one compiled step per stage; the update is the same, only
the wasted backward matmuls go). `--init-from` a base checkpoint without adapter/LoRA parameters
keeps the fresh PEFT ones (`checkpoints.init_params`); the adapter files are t5mix/adapters.py's.
"""

from __future__ import annotations

import bisect
import dataclasses
import fnmatch

import jax
import numpy as np

from t5mix import config as config_lib
from t5mix import peft
from t5mix.errors import UserError
from t5mix.model import param_path

DEFAULT_TRAINABLE = {
    "full": ["*"],
    "gradual_unfreezing": ["*"],
    "adapters": [peft.ADAPTER_PATTERN, "*norm*"],
    "lora": [peft.LORA_PATTERN],
}


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


def matches(path: str, patterns) -> bool:
  """fnmatch on the dotted path; a pattern also matches everything under it (`decoder` = `decoder.*`)."""
  return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p + ".*") for p in patterns)


def _map_paths(fn, tree):
  return jax.tree_util.tree_map_with_path(lambda p, _: fn(param_path(p)), tree)


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


def make_plan(c: config_lib.TrainConfig, params) -> Plan:
  """The plan for a model's params (an nnx.State or a nested dict; only paths and sizes are read)."""
  f = c.finetune
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  sizes = {param_path(p): int(np.prod(np.shape(v))) for p, v in leaves}
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
