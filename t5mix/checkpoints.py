"""The workdir and its checkpoints: this module owns their layout, and is the only one that reads
or writes checkpoints.

    WORKDIR/
      config.yaml               the run's config (config.save; absent in an imported workdir)
      model.yaml                the model's shape (model.save_model_config)
      spiece.model              the run's vocabulary (vocab.WORKDIR_VOCAB_FILE)
      run.json                  what `config.yaml` cannot say: --init-from, the mixture's rates
      checkpoints/N/state       orbax: {"step", "params"[, "opt_state"]}
      checkpoints/N/data        the tf.data iterator's position, per process, examples.json and
                                totals.json (tokens seen per task, training seconds)
      checkpoints/N/metrics     orbax: the scores keep_best ranks checkpoints by
      unreadable_checkpoints/N  damaged checkpoints, moved aside unchanged (see `resume`)
      tensorboard/, wandb/      the logs (t5mix/tracking.py); wandb_run_id names the wandb run
      eval/results.json         `t5mix eval`'s scores (t5mix/evaluate.py), which `compare` reads

Read top to bottom: the layout → the one CheckpointManager → listing and choosing steps →
restoring parameters (for eval, --init-from, export) → resuming a run (config checks, damaged
checkpoints) → saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from flax import nnx

from t5mix import config as config_lib
from t5mix import distributed, metrics, partitioning, peft
from t5mix.errors import UserError, first_line
from t5mix.model import T5, T5Config, key_names, load_model_config, param_path

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.yaml"
CHECKPOINTS_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"  # in the workdir, beside checkpoints/
RUN_FILE = "run.json"
TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_ID_FILE = "wandb_run_id"
EVAL_RESULTS_FILE = os.path.join("eval", "results.json")
EXAMPLES_FILE = "examples.json"  # in a checkpoint's data/ item
TOTALS_FILE = "totals.json"      # in a checkpoint's data/ item
ITEMS = ("state", "data")


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)


# ---------------------------------------------------------------------------------------------
# The workdir as eval, predict and embed read it.


@dataclasses.dataclass
class Run:
  workdir: str
  config: config_lib.TrainConfig | None  # None for a workdir without config.yaml
  model_config: T5Config

  @property
  def lengths(self) -> dict[str, int]:
    data = self.config.data if self.config else config_lib.DataConfig()
    return {"inputs": data.inputs_length, "targets": data.targets_length}


def check_workdir(workdir: str) -> None:
  if not os.path.exists(workdir):
    raise UserError(f"{workdir}: no such workdir")
  if not os.path.isdir(workdir):
    raise UserError(f"{workdir}: is not a directory (expected a t5mix workdir)")
  if not os.path.exists(os.path.join(workdir, MODEL_FILE)):
    raise UserError(f"{workdir}: not a t5mix workdir (no {MODEL_FILE}; train one with "
                    f"`t5mix train --workdir {workdir}`)")


def open_run(workdir: str) -> Run:
  check_workdir(workdir)
  config_path = os.path.join(workdir, CONFIG_FILE)
  config = config_lib.load(config_path) if os.path.exists(config_path) else None
  return Run(workdir, config, load_model_config(os.path.join(workdir, MODEL_FILE)))


def workdir_of(path: str | None) -> str | None:
  """The workdir that holds `path` (a workdir, a checkpoint step directory or a workdir's
  model.yaml), or None when it is none of those."""
  if not path:
    return None
  path = os.path.abspath(path)
  for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    if os.path.isfile(os.path.join(candidate, MODEL_FILE)) and (
        os.path.isdir(os.path.join(candidate, CHECKPOINTS_DIR))):
      return candidate
  return None


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def write_run_info(workdir: str, info: dict) -> None:
  """run.json: the run's --init-from and its mixture's rate table (train.write_run_files)."""
  with open(os.path.join(workdir, RUN_FILE), "w") as f:
    json.dump(info, f, indent=2)


def read_run_info(workdir: str) -> dict:
  """run.json's content; {} for a workdir without it (an import, or a run from before it)."""
  return _read_json(os.path.join(workdir, RUN_FILE)) or {}


def read_eval_results(workdir: str) -> dict | None:
  """eval/results.json of the last `t5mix eval`, or None when the run was never evaluated."""
  return _read_json(os.path.join(workdir, EVAL_RESULTS_FILE))


# ---------------------------------------------------------------------------------------------
# The one CheckpointManager, and a small orbax handler for the tf.data iterator.


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves/restores a tf.data iterator's position (tf.train.Checkpoint), one file set per process.

  orbax has no handler for tf.data iterators (grain has its own); this is the whole of it.
  """

  def save(self, directory, args: "DataIteratorSave"):
    prefix = os.path.join(str(directory), f"process_{jax.process_index()}")
    tf.train.Checkpoint(iterator=args.iterator).write(prefix)
    partitioning.write_data_layout(prefix, args.layout)  # which data shard this process read
    if jax.process_index() == 0:  # global counts: one file each
      for name, value in ((EXAMPLES_FILE, args.examples), (TOTALS_FILE, args.totals)):
        if value is not None:
          with open(os.path.join(str(directory), name), "w") as f:
            json.dump(value, f)

  def restore(self, directory, args: "DataIteratorRestore"):
    tf.train.Checkpoint(iterator=args.iterator).read(
        os.path.join(str(directory), f"process_{jax.process_index()}")).assert_consumed()
    return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any
  layout: dict | None = None
  examples: dict | None = None  # {task: examples trained on so far}, for the run's report
  totals: dict | None = None    # {"tokens": {task: tokens seen}, "seconds": training time so far}


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


def manager(workdir: str, keep: int | None = None, *,
            keep_best: config_lib.KeepBestConfig | None = None,
            cleanup: bool = False) -> ocp.CheckpointManager:
  """The workdir's checkpoints: the latest `keep` (None: all) and, with `keep_best.metric`, the
  keep_best.n best by the scores saved with them (`save`'s; orbax writes them into the step's
  directory and reads them back when a run resumes, so the choice survives it). `cleanup` removes
  partial writes (`<step>.orbax-checkpoint-tmp`) that a killed run left behind: orbax never reads
  them, and they can be as large as a checkpoint."""
  options = dict(create=True, cleanup_tmp_directories=cleanup)
  if keep_best is not None and keep_best.metric:
    # best_fn makes orbax save and load the scores; the policy keeps the latest and the best
    options.update(best_fn=score_of(keep_best), best_mode=keep_best.mode,
                   preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
                       [ocp.checkpoint_managers.LatestN(keep), best_policy(keep_best)]))
  else:
    options.update(max_to_keep=keep)
  return ocp.CheckpointManager(checkpoints_dir(workdir),
                               options=ocp.CheckpointManagerOptions(**options), item_names=ITEMS)


def score_of(keep_best: config_lib.KeepBestConfig) -> Callable[[dict], float]:
  """A checkpoint's score by keep_best.metric, from its saved scores (`scores`); one saved
  without that score (the metric was changed) ranks last."""
  worst = -np.inf if keep_best.mode == "max" else np.inf
  return lambda saved: float(saved.get(keep_best.metric, worst))


def best_policy(keep_best: config_lib.KeepBestConfig) -> ocp.checkpoint_managers.BestN:
  return ocp.checkpoint_managers.BestN(
      get_metric_fn=score_of(keep_best), reverse=keep_best.mode == "min", n=keep_best.n,
      keep_checkpoints_without_metrics=False)  # those are LatestN's to keep or drop


def scores(results: dict[str, dict[str, float]]) -> dict[str, float]:
  """What a checkpoint is saved with, from evaluation during training ({task: {metric: value}}):
  the names keep_best.metric takes, `average` and TASK/METRIC (and TASK/mean)."""
  flat = {"average": metrics.glue_average(results)}
  for task, values in results.items():
    flat.update({f"{task}/{name}": float(v) for name, v in values.items()})
    flat[f"{task}/mean"] = metrics.task_mean(values)
  return flat


# ---------------------------------------------------------------------------------------------
# Listing and choosing steps.


def steps(workdir: str) -> list[int]:
  """Steps of the checkpoint directories (orbax's unfinished `N.orbax-checkpoint-tmp-*` excluded)."""
  ckpt_dir = checkpoints_dir(workdir)
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(n) for n in os.listdir(ckpt_dir)
                if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n)))


def partial_writes(workdir: str) -> list[str]:
  """Checkpoint directories whose write did not finish (the run was killed, or the disk full)."""
  ckpt_dir = checkpoints_dir(workdir)
  return sorted(n for n in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])
                if ".orbax-checkpoint-tmp" in n)


def choose_steps(workdir: str, which: str | None) -> list[int]:
  """`all`, `latest` (the default), `best` (those keep_best keeps) or a comma-separated list of
  steps."""
  available = steps(workdir)
  if not available:
    raise UserError(f"{workdir}: no checkpoints (nothing under {workdir}/checkpoints); train first")
  which = (which or "latest").strip()
  if which == "all":
    return available
  if which == "latest":
    return available[-1:]
  if which == "best":
    return best_steps(workdir)
  chosen = []
  for item in which.split(","):
    item = item.strip()
    if not item.isdigit():
      raise UserError(f"--checkpoints {which!r}: expected all, latest, best or steps such as 100,200")
    if int(item) not in available:
      raise UserError(f"{workdir}: no checkpoint at step {item}; there are "
                      f"{', '.join(map(str, available))}")
    chosen.append(int(item))
  return sorted(set(chosen))


@dataclasses.dataclass
class _Scored:
  """A checkpoint as orbax's preservation policies see it (PolicyCheckpointInfo)."""
  step: int
  metrics: dict | None
  time: Any = None


def best_steps(workdir: str) -> list[int]:
  """The checkpoints that the run's keep_best (in its config.yaml) keeps for their saved scores,
  chosen as training chose them: by the same orbax policy."""
  config_path = os.path.join(workdir, CONFIG_FILE)
  keep_best = config_lib.load(config_path).keep_best if os.path.exists(config_path) else None
  if keep_best is None or not keep_best.metric:
    raise UserError(f"--checkpoints best: {workdir} was trained without keep_best (its config sets "
                    "no keep_best.metric); choose all, latest or steps such as 100,200")
  with contextlib.closing(manager(workdir, keep_best=keep_best)) as m:
    scored = [_Scored(step, m.metrics(step)) for step in m.all_steps()]
  scored = [s for s in scored if s.metrics is not None]
  if not scored:
    raise UserError(f"--checkpoints best: no checkpoint in {checkpoints_dir(workdir)} was saved "
                    f"with a score (keep_best.metric {keep_best.metric!r}); choose all or latest")
  kept = best_policy(keep_best).should_preserve(
      scored, context=ocp.checkpoint_managers.PreservationContext())
  return [s.step for s, keep in zip(scored, kept) if keep]


def finished_step(workdir: str, total_steps: int) -> int | None:
  """The step of the newest checkpoint, when it is at or past `total_steps` and its state reads
  back whole: a rerun of a finished run then builds no model, data or step. Anything else (no
  checkpoint, an unfinished run, a damaged last checkpoint) is left to `resume`."""
  done = steps(workdir)
  if not done or done[-1] < total_steps:
    return None
  try:  # every array read back (the data position matters only to a run that goes on)
    ocp.StandardCheckpointer().restore(os.path.join(checkpoints_dir(workdir), str(done[-1]), "state"))
  except Exception:  # noqa: BLE001 - damaged in any way: `resume` reports and handles it
    return None
  return done[-1]


def read_examples(step_dir: str) -> dict[str, int]:
  """The per-task example counts saved with a checkpoint ({} for checkpoints without them)."""
  try:
    with open(os.path.join(step_dir, "data", EXAMPLES_FILE)) as f:
      return {str(k): int(v) for k, v in json.load(f).items()}
  except (OSError, ValueError, AttributeError):
    return {}


def read_totals(step_dir: str) -> dict:
  """The tokens seen per task and training seconds saved with a checkpoint (DataIteratorSave's
  totals; {} for checkpoints without them)."""
  return _read_json(os.path.join(step_dir, "data", TOTALS_FILE)) or {}


def interrupted_message(workdir: str, signal_name: str) -> str:
  """The line for a run stopped without saving: what a rerun of the same command starts from."""
  ckpt_dir = checkpoints_dir(workdir)
  saved = [s for s in steps(workdir)
           if os.path.exists(os.path.join(ckpt_dir, str(s), "_CHECKPOINT_METADATA"))]
  if not saved:
    return (f"interrupted ({signal_name}): nothing was saved; rerunning the same command starts "
            "from step 0")
  return (f"interrupted ({signal_name}): nothing was saved since the checkpoint at step "
          f"{max(saved)}; rerunning the same command resumes from it ({ckpt_dir}/{max(saved)})")


# ---------------------------------------------------------------------------------------------
# Parameters only: for eval, --init-from and export.


def ignore_closed_event_loop_errors() -> None:
  """When one read of a damaged checkpoint fails, orbax closes its event loop while tensorstore
  still completes the other reads; their callbacks then raise 'Event loop is closed' as
  unraisable exceptions, dozens of tracebacks after our one-line message. Drop just those."""
  previous = sys.unraisablehook
  if getattr(previous, "_t5mix", False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    previous(unraisable)

  hook._t5mix = True
  sys.unraisablehook = hook


def _state_dir(path: str) -> str | None:
  """The state/ item of a checkpoint step directory, or of a workdir's latest checkpoint."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    done = steps(path)
    if not done:
      return None
    path = os.path.join(path, CHECKPOINTS_DIR, str(done[-1]))
  state_dir = os.path.join(path, "state")
  return state_dir if os.path.isdir(state_dir) else None


def restore_params(path: str, abstract_params):
  """Parameters only, from a workdir (latest checkpoint) or a checkpoint step directory, onto the
  shardings of `abstract_params` (--init-from's semantics)."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise UserError(f"--init-from {path}: no such workdir or checkpoint")
  state_dir = _state_dir(path)
  if state_dir is None:
    if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
      raise UserError(f"--init-from {path}: workdir has no checkpoint")
    raise UserError(f"--init-from {path}: not a t5mix checkpoint (no state/ directory)")
  abstract = {"params": abstract_params}
  try:
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise UserError(f"--init-from {os.path.dirname(state_dir)}: cannot restore parameters "
                    f"({str(e).splitlines()[0][:200]})") from None
  return restored["params"]


def restore_step_params(workdir: str, step: int, abstract_params):
  """The parameters of checkpoint `step` (only those: no optimizer state, no data iterator).

  Any failure (a partial or corrupt checkpoint, another model) is a UserError of one line.
  """
  path = os.path.join(checkpoints_dir(workdir), str(step))
  ignore_closed_event_loop_errors()
  try:
    return restore_params(path, abstract_params)
  except UserError as e:
    reason = str(e).split(f"{path}: ", 1)[-1]
  except Exception as e:  # orbax/tensorstore raise many kinds on damaged files
    reason = f"cannot restore parameters ({type(e).__name__}: {first_line(e)})"
  raise UserError(f"checkpoint {step}: {reason}")


def abstract_model(model_config: T5Config):
  """(graphdef, abstract params): the model's structure without allocating its parameters."""
  model = nnx.eval_shape(lambda: T5(model_config, rngs=nnx.Rngs(0)))
  return nnx.split(model, nnx.Param)


def load_workdir_params(workdir: str, checkpoint: str | None = None) -> tuple[T5Config, T5]:
  """The model of a workdir (model.yaml) with the parameters of a checkpoint (default: latest)."""
  model_yaml = os.path.join(workdir, MODEL_FILE)
  if not os.path.exists(model_yaml):
    raise UserError(f"{workdir}: not a t5mix workdir (no {MODEL_FILE})")
  config = load_model_config(model_yaml)
  graphdef, abstract_params = abstract_model(config)
  path = os.path.join(workdir, CHECKPOINTS_DIR, checkpoint) if checkpoint else workdir
  return config, nnx.merge(graphdef, restore_params(path, abstract_params))


def _param_keys(state_dir: str) -> set[tuple[str, ...]] | None:
  try:
    tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
  except Exception:  # noqa: BLE001 - unreadable: let restore_params report it
    return None
  if not isinstance(tree, dict) or not isinstance(tree.get("params"), dict):
    return None
  return {key_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree["params"])[0]}


def init_params(init_from: str, params, log=print):
  """`params` (an nnx.State of a fresh model) with every parameter that the checkpoint at `init_from`
  (a workdir or a checkpoint step directory) holds restored from it; adapter/LoRA parameters that
  it lacks keep their fresh initialisation. Any other missing parameter is an error
  (`restore_params`'s)."""
  state_dir = _state_dir(init_from) if os.path.exists(init_from) else None
  present = _param_keys(state_dir) if state_dir else None
  if present is None:
    return restore_params(init_from, params)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  ours = {key_names(p) for p, _ in flat}
  dropped = sorted(".".join(k[:-1]) for k in present - ours if peft.is_peft_path(".".join(k[:-1])))
  if dropped:
    log(f"warning: {init_from} has {len(dropped)} adapter/LoRA parameter arrays (e.g. {dropped[0]}) that this "
        f"model does not have; they are ignored. To start from the adapted model, merge them first: "
        f"t5mix adapters merge (LoRA is folded into the weights)")
  missing = [param_path(p) for p, _ in flat if key_names(p) not in present]
  if not missing or not all(peft.is_peft_path(p) for p in missing):
    return restore_params(init_from, params)
  missing_set = set(missing)
  subset = nnx.from_flat_state([(path, v) for path, v in nnx.to_flat_state(params)
                                if ".".join(map(str, path)) not in missing_set])
  restored = restore_params(init_from, subset)
  merged = jax.tree.map(lambda x: x, params)  # a copy: new Variables, same arrays
  nnx.replace_by_pure_dict(merged, nnx.to_pure_dict(restored))
  log(f"{len(missing)} adapter/LoRA parameter arrays are not in {init_from}: initialised fresh")
  return merged


def save_params(workdir: str, model: T5) -> str:
  """A step-0 checkpoint of the model's parameters only (an import or a merge): what eval,
  export-hf and --init-from read. Returns its path."""
  with contextlib.closing(manager(workdir)) as m:
    m.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(
        {"step": 0, "params": nnx.state(model, nnx.Param)})))
    m.wait_until_finished()
  return os.path.join(checkpoints_dir(workdir), "0")


# ---------------------------------------------------------------------------------------------
# Resuming: the newest checkpoint that reads back whole; a damaged one is moved aside, unchanged.
#
# A checkpoint that orbax finished writing can still be damaged later (a truncated copy, a
# deleted file, a disk error). Those are skipped, newest first, with a warning naming each, and
# moved to `unreadable_checkpoints/` (never deleted or modified: they may be all there is of a
# long run), so that the run does not meet their step numbers again when it saves, and orbax's
# max_to_keep neither counts nor deletes them. A checkpoint whose saved tree differs from this
# config's (another model or optimizer) is different: that is a config mistake, and an error.


class _Unreadable(Exception):
  """A checkpoint that cannot be read back whole (missing or truncated files)."""


def _tree_shapes(tree) -> dict[str, tuple]:
  """{dotted path: (shape, dtype)} of a state pytree, or of orbax's metadata tree of one."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(key_names(path)): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
          for path, leaf in leaves if hasattr(leaf, "shape")}


def _containers(tree) -> dict[str, str]:
  """{dotted path: "mapping of k1, k2" | "sequence of N" | "empty"} for the containers and empty
  nodes of a serialized tree (orbax's metadata tree, or `ocp.tree.serialize_tree(...,
  keep_empty_nodes=True)`). Arrays are left to _tree_shapes. An optimizer chain's stateless
  elements (e.g. parameter scaling) are empty nodes: they change no array, only the chain's length.
  """
  out = {}

  def walk(node, path):
    if isinstance(node, dict):
      out[path] = "mapping of " + ", ".join(sorted(map(str, node)))
      items = node.items()
    elif isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
      out[path] = f"sequence of {len(node)}"
      items = enumerate(node)
    else:
      if not hasattr(node, "shape"):  # None in metadata, EmptyState() in the state
        out[path] = "empty"
      return
    for k, v in items:
      walk(v, f"{path}.{k}" if path else str(k))
  walk(tree, "")
  return out


def check_matches_config(step_dir: str, state) -> None:
  """UserError if the checkpoint in `step_dir` holds another model's or optimizer's state than
  `state`; _Unreadable if its tree metadata cannot be read. Reads no arrays."""
  try:
    metadata = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state")).item_metadata
    saved = _tree_shapes(metadata)
  except Exception as e:  # noqa: BLE001 - orbax raises many kinds on damaged files
    raise _Unreadable(f"state metadata: {type(e).__name__}: {first_line(e, 160)}") from None
  if not saved:
    raise _Unreadable("no tree metadata in state/: missing or damaged files")
  expected = _tree_shapes(state)
  if saved == expected:
    # Same arrays; the structure around them can still differ (an optimizer chain with another
    # stateless element), which orbax would only report as a failed restore.
    there = _containers(getattr(metadata, "tree", metadata))
    here = _containers(ocp.tree.serialize_tree(state, keep_empty_nodes=True))
    if there == here:
      return
    key = min(k for k in set(there) | set(here) if there.get(k) != here.get(k))
    raise UserError(
        f"{step_dir}: does not match this config (other optimizer settings, e.g. "
        f"optimizer.parameter_scale?): state.{key} is a {there.get(key, 'nothing')} there, a "
        f"{here.get(key, 'nothing')} here; use the settings it was trained with, a new --workdir, "
        "or --init-from to start from its parameters")
  # The first difference, parameters before optimizer state: the likelier config mistake.
  diffs = sorted((k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k)),
                 key=lambda k: (not k.startswith("params."), k))
  key = diffs[0]
  if key not in saved:
    what = f"it has no {key}"
  elif key not in expected:
    what = f"it has {key}, which this config does not"
  else:
    what = (f"{key} is {saved[key][0]} {saved[key][1]} there, "
            f"{expected[key][0]} {expected[key][1]} here")
  what += f" (and {len(diffs) - 1} more differences)" if len(diffs) > 1 else ""
  raise UserError(f"{step_dir}: does not match this config (different model or optimizer?): "
                  f"{what}; use a new --workdir or --init-from to start from its parameters")


def _move_aside(workdir: str, bad_steps: list[int]) -> dict[int, str]:
  """Renames checkpoints/<step> to unreadable_checkpoints/<step>[-n] (primary process only)."""
  root = os.path.abspath(workdir)
  moved = {}
  for step in bad_steps:
    dest = os.path.join(root, UNREADABLE_DIR, str(step))
    n = 1
    while os.path.exists(dest):
      n += 1
      dest = os.path.join(root, UNREADABLE_DIR, f"{step}-{n}")
    if distributed.is_primary():
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      os.rename(os.path.join(root, CHECKPOINTS_DIR, str(step)), dest)
    moved[step] = dest
  distributed.sync("t5mix: unreadable checkpoints moved aside")
  return moved


@dataclasses.dataclass
class Resumed:
  """Where a run goes on from: its state, data iterator, per-task example counts and totals
  (read_totals; step None and the fresh state when there is no checkpoint)."""
  state: Any
  step: int | None
  data_iter: Any
  examples: dict[str, int]
  same_data: bool  # the data position was restored (else the stream restarted with another seed)
  totals: dict = dataclasses.field(default_factory=dict)


def resume(m: ocp.CheckpointManager, workdir: str, state, data_iterator: Callable[[int], Any],
           data_layout: dict, seed: int, log=print) -> Resumed:
  """The newest checkpoint that reads back whole, onto `state`'s shardings, with its data position
  where this process reads the same data shard as when it saved (else `data_iterator(seed + step)`).
  A checkpoint of another model or optimizer is a UserError; damaged ones are moved aside."""
  ckpt_dir = checkpoints_dir(workdir)
  unreadable, found = {}, None
  candidates = sorted(m.all_steps(), reverse=True)
  if candidates:
    ignore_closed_event_loop_errors()  # tensorstore's late callbacks after a failed read
  for step in candidates:
    step_dir = os.path.join(ckpt_dir, str(step))
    try:
      check_matches_config(step_dir, state)  # another model/optimizer: UserError, no fallback
      data_dir = os.path.join(step_dir, "data")
      prefix = os.path.join(data_dir, f"process_{jax.process_index()}")
      if os.path.exists(prefix + ".json") and not os.path.exists(prefix + ".index"):
        raise _Unreadable(f"data/{os.path.basename(prefix)}.index is missing")
      same_data = partitioning.same_data_layout(data_dir, data_layout)
      data_iter = data_iterator(seed if same_data else seed + step)
      items = {"state": ocp.args.StandardRestore(state)}  # onto this mesh's shardings
      if same_data:
        items["data"] = DataIteratorRestore(data_iter)
      try:
        restored = m.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # noqa: BLE001 - orbax/tensorstore/tf raise many kinds on damaged files
        raise _Unreadable(f"{type(e).__name__}: {first_line(e, 160)}") from None
    except _Unreadable as e:
      unreadable[step] = str(e)
      continue
    found = Resumed(restored["state"], step, data_iter, read_examples(step_dir), same_data,
                    read_totals(step_dir))
    break
  if unreadable and found is None:
    raise UserError(
        f"{ckpt_dir}: no checkpoint can be read back ("
        + "; ".join(f"{s}: {why}" for s, why in unreadable.items()) + "); not starting over "
        "from step 0 on top of them: move them away or use a new --workdir")
  if unreadable:  # moved aside, so that saving never meets their step numbers (see above)
    moved = _move_aside(workdir, list(unreadable))
    m.reload()
    for bad, why in unreadable.items():
      log(f"warning: {ckpt_dir}/{bad} is unreadable ({why}); resuming from {ckpt_dir}/{found.step}; "
          f"moved the unreadable one, unchanged, to {moved[bad]}")
  return found or Resumed(state, None, data_iterator(seed), {}, True)


# ---------------------------------------------------------------------------------------------
# Saving.


def save(m: ocp.CheckpointManager, step: int, state, data_iter, data_layout: dict,
         examples: dict[str, int], totals: dict, step_scores: dict[str, float] | None = None) -> None:
  """step_scores: `scores` of this step's evaluation, for keep_best (None: not evaluated)."""
  with checkpoint_errors(m.directory, step):
    m.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=DataIteratorSave(data_iter, data_layout, examples, totals)),
           metrics=step_scores, force=True)


def wait_until_saved(m: ocp.CheckpointManager, step: int) -> None:
  with checkpoint_errors(m.directory, step):
    m.wait_until_finished()


@contextlib.contextmanager
def checkpoint_errors(ckpt_dir, step: int):
  """A failed checkpoint write (disk full, permissions) as one line; orbax writes to a temporary
  directory and renames it when complete, so the checkpoints before it stay whole."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 - orbax/tensorstore/tf raise many kinds
    why = "No space left on device" if "No space left on device" in str(e) else (
        getattr(e, "strerror", None) or f"{type(e).__name__}: {first_line(e, 160)}")
    raise UserError(f"{ckpt_dir}: writing a checkpoint failed at step {step} ({why}); the "
                    "complete checkpoints are kept: free space (or fix the cause) and rerun the "
                    "same command to resume") from None


class _OrbaxThreadErrors(logging.Filter):
  """Drops orbax's log record (with a traceback) of a save that failed in a background thread:
  the same error reaches the loop and is reported there, in one line (checkpoint_errors)."""

  def filter(self, record):
    return "raised an exception" not in str(record.msg)


def quiet_background_save_errors() -> None:
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxThreadErrors) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxThreadErrors())
