"""Run configuration: YAML files in configs/, dotted `--set key=value` overrides, strict checking.

One dataclass per section; a YAML key that is not a field, or a value of the wrong type, is an
error naming the key. The resolved config is written to the workdir as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from t5mix import peft
from t5mix.definitions import read_yaml
from t5mix.errors import UserError, check_keys

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclasses.dataclass
class OptimizerConfig:
  name: str = "adafactor"          # adafactor (T5's) | adamw
  learning_rate: float = 1e-2      # peak rate of the schedule
  schedule: str = "rsqrt"          # constant | rsqrt (T5: lr * min(1, sqrt(warmup/step))) | cosine
  warmup_steps: int = 100
  weight_decay: float = 0.0
  b1: float = 0.9                  # adamw
  b2: float = 0.999                # adamw
  parameter_scale: bool | None = None  # scale each update by its parameter's RMS (floor 1e-3), so
                                   # the rate is relative to the weight: T5's Adafactor
                                   # (multiply_by_parameter_scale), nanoT5's AdamWScale for adamw.
                                   # None (default): as the workdir's run had it when resuming one
                                   # (see `resolve`), else on, except for finetune.strategy adapters
                                   # and lora, whose zero-initialised weights would move lr x 1e-3 a step
  clip_norm: float = 1.0           # global gradient-norm clipping; 0 disables
  grad_accum_steps: int = 1        # gradient accumulation (optax.MultiSteps)
  skip_nonfinite: int = 0          # skip up to N updates in a row whose gradients are not finite
                                   # (optax.apply_if_finite); 0 = stop at the first non-finite loss


@dataclasses.dataclass
class DataConfig:
  mixture: str = "demo"            # task or mixture name
  inputs_length: int = 128
  targets_length: int = 32
  batch_size: int = 16             # global batch, in (packed) sequences
  pack: bool = True
  shuffle: bool = True
  tasks_dir: list = dataclasses.field(default_factory=list)  # extra definitions, like --tasks-dir
  module: list = dataclasses.field(default_factory=list)     # like --module
  vocab: str | None = None         # the run's one vocabulary, like --vocab: a SentencePiece .model,
                                   # "byte", "demo" or "t5"; default: the --init-from workdir's,
                                   # else the one its tasks name (they must agree)
  hashes: dict = dataclasses.field(default_factory=dict)  # written by train: {file: content hash}
                                   # of the definitions and vocabulary, to notice later edits
  use_cached: bool = False         # read each task from the cache `t5mix cache` wrote (tokenised
                                   # examples: only trimming and span corruption's noise run live)
  cache_dirs: list = dataclasses.field(default_factory=list)  # where those caches are, like --cache-dir


STRATEGIES = ("full", "gradual_unfreezing", "adapters", "lora")


@dataclasses.dataclass
class FinetuneConfig:
  """Fine-tuning strategies of the T5 paper (§3.5.2) and LoRA; see t5mix/finetune.py."""
  strategy: str = "full"           # one of STRATEGIES
  trainable: list = dataclasses.field(default_factory=list)  # globs over dotted param paths
  #                                  ([] = the strategy's: everything; adapters: *_adapter.*, *norm*; lora: *_lora.*)
  always_trainable: list = dataclasses.field(  # gradual_unfreezing: trained from stage 1
      default_factory=lambda: ["embedding", "lm_head", "*.final_norm.*"])
  steps_per_stage: int = 0         # gradual_unfreezing: 0 = steps / number of stages
  adapter_size: int = 32           # adapters: bottleneck width d
  adapter_after_attention: bool = False  # adapters: also after each attention sublayer
  lora_rank: int = 8               # lora: r
  lora_alpha: float = 8.0          # lora: scale alpha / r
  lora_targets: list = dataclasses.field(default_factory=lambda: ["query", "value"])  # or attention, mlp, all


@dataclasses.dataclass
class MeshConfig:
  """Device mesh (t5mix/partitioning.py): data x fsdp x model = all devices; -1 = the rest."""
  data: int = -1                   # data parallelism (batch split, parameters replicated)
  fsdp: int = 1                    # data parallelism that also shards parameters / optimizer state
  model: int = 1                   # tensor parallelism (mlp, heads, vocab split)


@dataclasses.dataclass
class KeepBestConfig:
  """Checkpoints kept for their score in evaluation during training, besides the latest
  keep_checkpoints (orbax's BestN preservation policy; `t5mix eval --checkpoints best`)."""
  metric: str | None = None        # "average" (the GLUE-style average of the task means) or
                                   # TASK/METRIC, e.g. demo_qa/f1 or demo_qa/mean; None = off
  mode: str = "max"                # max | min: which end of the score is best
  n: int = 1                       # how many of the best checkpoints to keep


@dataclasses.dataclass
class WandbConfig:
  """Weights & Biases (the optional extra: pip install -e ".[wandb]"); t5mix/tracking.py."""
  project: str | None = None       # None = off
  entity: str | None = None        # the team or user; None = wandb's default
  mode: str = "online"             # online | offline (files under WORKDIR/wandb only) | disabled


@dataclasses.dataclass
class LoggingConfig:
  wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)


@dataclasses.dataclass
class TrainConfig:
  model: str | None = None         # configs/model/<name>.yaml or a path; default: the
                                   # --init-from workdir's model.yaml, else "mini"
  model_overrides: dict = dataclasses.field(default_factory=dict)  # e.g. {dropout_rate: 0.0}
  steps: int = 400
  seed: int = 0
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  checkpoint_every: int = 100
  keep_checkpoints: int = 3        # the latest N checkpoints (and keep_best's)
  keep_best: KeepBestConfig = dataclasses.field(default_factory=KeepBestConfig)
  log_every: int = 25
  eval_every: int = 0              # evaluate the validation split every N steps; 0 = off
  eval_examples: int = 200         # at most this many examples per task when evaluating
  eval_samples: int = 3            # examples per task (input, target, prediction) logged as text
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)


def _check_type(value, annotation, key):
  # Annotations are strings here (from __future__ import annotations): "int", "str | None", …
  allowed = {"int": int, "float": (int, float), "str": str, "bool": bool, "list": list,
             "dict": dict}
  names = [a.strip() for a in str(annotation).split("|")]
  if value is None and "None" in names:
    return value
  for name in names:
    kind = allowed.get(name)
    if kind is None:
      continue
    if kind is int and isinstance(value, bool):
      continue
    if isinstance(value, kind):
      return float(value) if name == "float" else value
    if name == "float" and isinstance(value, str):  # YAML 1.1 reads "1e-9" as a string
      try:
        return float(value)
      except ValueError:
        pass
  raise UserError(f"config key {key!r}: expected {annotation}, got {value!r}")


def from_dict(cls, d: dict, prefix: str = ""):
  """Builds dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
  if not isinstance(d, dict):
    raise UserError(f"config key {prefix.rstrip('.') or '<top>'!r}: expected a mapping, got {d!r}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  check_keys(d, fields, what="config key", prefix=prefix)
  kwargs = {}
  for key, value in d.items():
    f = fields[key]
    if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
      kwargs[key] = from_dict(f.default_factory, value, prefix + key + ".")
    else:
      kwargs[key] = _check_type(value, f.type, prefix + key)
  return cls(**kwargs)


def _set(d: dict, dotted: str, value: Any) -> None:
  parts = dotted.split(".")
  for part in parts[:-1]:
    d = d.setdefault(part, {})
    if not isinstance(d, dict):
      raise UserError(f"--set {dotted}: {part!r} is not a section")
  d[parts[-1]] = value


def load(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
  """Config from a YAML file (or the defaults) plus `key.sub=value` overrides."""
  d: dict = {}
  if path:
    if not os.path.exists(path) and os.path.exists(os.path.join(CONFIG_DIR, path + ".yaml")):
      path = os.path.join(CONFIG_DIR, path + ".yaml")
    d = read_yaml(path) or {}
    if not isinstance(d, dict):
      raise UserError(f"{path}: a config must be a mapping of keys")
    _resolve_paths(d, os.path.dirname(os.path.abspath(path)))
  for item in overrides:
    if "=" not in item:
      raise UserError(f"--set {item!r}: expected key=value")
    key, text = item.split("=", 1)
    try:
      value = yaml.safe_load(text)
    except yaml.YAMLError:
      value = text
    _set(d, key.strip(), value)
  try:
    config = from_dict(TrainConfig, d)
  except UserError as e:
    raise UserError(f"{path}: {e}" if path else str(e)) from None
  validate(config)
  return config


def _is_path(value) -> bool:
  return isinstance(value, str) and (os.sep in value or value.endswith((".yaml", ".yml", ".py",
                                                                         ".model")))


def _resolve_paths(d: dict, base_dir: str) -> None:
  """Relative paths in a config file name files beside it (as in task files); --set values and
  names (a model size, a dotted module, "byte"/"demo"/"t5") are left as they are."""
  def resolve(value, always=False):
    if isinstance(value, str) and (always or _is_path(value)):
      return os.path.join(base_dir, os.path.expanduser(value))
    return value
  if "model" in d:
    d["model"] = resolve(d["model"])
  data = d.get("data")
  if isinstance(data, dict):
    if isinstance(data.get("tasks_dir"), list):
      data["tasks_dir"] = [resolve(v, always=True) for v in data["tasks_dir"]]
    if isinstance(data.get("module"), list):
      data["module"] = [resolve(v) for v in data["module"]]
    if isinstance(data.get("cache_dirs"), list):  # local ones; gs:// and the like as they are
      data["cache_dirs"] = [v if "://" in str(v) else resolve(v, always=True)
                            for v in data["cache_dirs"]]
    if data.get("vocab") not in ("byte", "demo", "t5"):
      data["vocab"] = resolve(data.get("vocab"), always=True)


def validate(c: TrainConfig) -> None:
  def positive(key, value):
    if value <= 0:
      raise UserError(f"config key {key!r} must be positive, got {value}")
  positive("steps", c.steps)
  positive("data.batch_size", c.data.batch_size)
  positive("data.inputs_length", c.data.inputs_length)
  positive("data.targets_length", c.data.targets_length)
  positive("checkpoint_every", c.checkpoint_every)
  positive("log_every", c.log_every)
  positive("keep_checkpoints", c.keep_checkpoints)
  positive("eval_examples", c.eval_examples)
  if c.eval_every < 0:
    raise UserError(f"config key 'eval_every' must be >= 0 (0 = off), got {c.eval_every}")
  if c.eval_samples < 0:
    raise UserError(f"config key 'eval_samples' must be >= 0 (0 = none), got {c.eval_samples}")
  _validate_keep_best(c)
  if c.logging.wandb.mode not in WANDB_MODES:
    raise UserError(f"config key 'logging.wandb.mode': {c.logging.wandb.mode!r} is not one of "
                    f"{', '.join(WANDB_MODES)}")
  positive("optimizer.learning_rate", c.optimizer.learning_rate)
  positive("optimizer.grad_accum_steps", c.optimizer.grad_accum_steps)
  if c.optimizer.name not in ("adafactor", "adamw"):
    raise UserError(f"config key 'optimizer.name': {c.optimizer.name!r} is not adafactor or adamw")
  if c.optimizer.schedule not in ("constant", "rsqrt", "cosine"):
    raise UserError(f"config key 'optimizer.schedule': {c.optimizer.schedule!r} is not "
                    "constant, rsqrt or cosine")
  if c.optimizer.warmup_steps < 0:
    raise UserError("config key 'optimizer.warmup_steps' must be >= 0")
  _validate_finetune(c)


WANDB_MODES = ("online", "offline", "disabled")


def _validate_keep_best(c: TrainConfig) -> None:
  best = c.keep_best
  if best.mode not in ("max", "min"):
    raise UserError(f"config key 'keep_best.mode': {best.mode!r} is not max or min")
  if best.n <= 0:
    raise UserError(f"config key 'keep_best.n' must be positive, got {best.n}")
  if best.metric is None:
    return
  task, _, metric = best.metric.partition("/")
  if best.metric != "average" and not (task and metric and "/" not in metric):
    raise UserError(f"config key 'keep_best.metric': {best.metric!r} is not 'average' or "
                    "TASK/METRIC (e.g. demo_qa/f1, or demo_qa/mean for the task's mean)")
  if not c.eval_every:
    raise UserError("config key 'keep_best.metric': keeping the best checkpoints needs their "
                    "scores from evaluation during training: set eval_every (e.g. to checkpoint_every)")
  if c.checkpoint_every % c.eval_every:
    raise UserError(f"config key 'keep_best.metric': checkpoint_every ({c.checkpoint_every}) must "
                    f"be a multiple of eval_every ({c.eval_every}), so that every checkpoint is scored")


def _validate_finetune(c: TrainConfig) -> None:
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


def to_dict(c) -> dict:
  return dataclasses.asdict(c)


def save(c: TrainConfig, path: str) -> None:
  with open(path, "w") as f:
    yaml.safe_dump(to_dict(c), f, sort_keys=False)


def read_saved(path: str) -> dict:
  """The config saved at `path` (a workdir's config.yaml) as a mapping; {} if none or unreadable."""
  try:
    with open(path) as f:
      saved = yaml.safe_load(f)
  except (OSError, yaml.YAMLError):
    return {}
  return saved if isinstance(saved, dict) else {}


def resolve(c: TrainConfig, saved_path: str | None = None) -> TrainConfig:
  """`c` with the defaults that depend on the run filled in (saved to config.yaml as such).

  optimizer.parameter_scale None: the choice saved at `saved_path` (the config.yaml of the workdir
  being resumed), so that a run keeps its optimizer when the default changes (it was off before
  2026-12-07, and the optimizer state differs); for a new run, on except for adapters and LoRA.
  """
  if c.optimizer.parameter_scale is not None:
    return c
  saved = (read_saved(saved_path).get("optimizer") or {}) if saved_path else {}
  scale = saved.get("parameter_scale") if isinstance(saved, dict) else None
  if not isinstance(scale, bool):
    scale = c.finetune.strategy not in ("adapters", "lora")
  return dataclasses.replace(c, optimizer=dataclasses.replace(c.optimizer, parameter_scale=scale))


def flat_settings(d: dict | None, prefix: str = "") -> dict[str, Any]:
  """A config mapping as {dotted key: value}, e.g. optimizer.learning_rate (model_overrides as
  one value; data.hashes left out: files, not settings)."""
  out = {}
  for k, v in (d or {}).items():
    if k == "hashes":  # train notes edited files by name
      continue
    if isinstance(v, dict) and v and k != "model_overrides":
      out.update(flat_settings(v, f"{prefix}{k}."))
    else:
      out[prefix + str(k)] = v
  return out


def changes_since(path: str, c: TrainConfig) -> list[str]:
  """`key: saved -> now` for each key where `c` differs from the config saved at `path` (a
  workdir's config.yaml); [] when there is none or it cannot be read."""
  saved = flat_settings(read_saved(path))
  if not saved:
    return []
  now = flat_settings(to_dict(c))
  return [f"{k}: {saved.get(k, '(unset)')} -> {now.get(k, '(unset)')}"
          for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
