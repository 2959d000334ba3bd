"""Training: the mixture's batches through a jitted train step, with checkpoints you can resume.

Read top to bottom: optimizer → loss → train step → checkpointing → the loop.

Determinism: the dropout key of step s is `fold_in(key(seed), s)` and the data stream is a
checkpointed tf.data iterator, so a run that is interrupted and resumed reaches the same
parameters as one that is not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import seqio
import tensorflow as tf
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from t5mix import config as config_lib
from t5mix import definitions, distributed, finetune, input_pipeline, partitioning, registry
from t5mix import vocab as vocab_lib
from t5mix.errors import UserError
from t5mix.model import T5, T5Config, load_model_config, save_model_config

# ---------------------------------------------------------------------------------------------
# Optimizer.


def learning_rate_schedule(c: config_lib.OptimizerConfig, total_steps: int) -> optax.Schedule:
  warmup = max(c.warmup_steps, 1)
  if c.schedule == "constant":
    return optax.linear_schedule(0.0, c.learning_rate, warmup) if c.warmup_steps else (
        lambda step: c.learning_rate)
  if c.schedule == "rsqrt":  # T5: constant for `warmup` steps, then ∝ 1/sqrt(step)
    return lambda step: c.learning_rate * jnp.minimum(1.0, jnp.sqrt(warmup / jnp.maximum(step, 1)))
  return optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, warmup, max(total_steps, warmup + 1))


def make_optimizer(c: config_lib.OptimizerConfig, total_steps: int,
                   schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
  schedule = schedule or learning_rate_schedule(c, total_steps)
  parameter_scale = c.parameter_scale is not False  # None (unresolved, see config.resolve): on
  if c.name == "adafactor":
    # T5's Adafactor: factored second moments, no first moment, update clipping at 1.0.
    opt = optax.adafactor(schedule, multiply_by_parameter_scale=parameter_scale,
                          clipping_threshold=1.0, weight_decay_rate=c.weight_decay or None)
  elif parameter_scale:
    # AdamW with each update scaled by its parameter's RMS (nanoT5's AdamWScale): T5 initialises
    # the query projection ~100x smaller than the embeddings, and a plain AdamW rate large enough
    # for the one saturates attention through the other. Weight decay stays unscaled.
    opt = optax.chain(optax.scale_by_adam(b1=c.b1, b2=c.b2), optax.scale_by_param_block_rms(),
                      optax.add_decayed_weights(c.weight_decay), optax.scale_by_learning_rate(schedule))
  else:
    opt = optax.adamw(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay)
  if c.clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(c.clip_norm), opt)
  if c.grad_accum_steps > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=c.grad_accum_steps)
  return opt


# ---------------------------------------------------------------------------------------------
# Loss.


def token_losses(logits, targets, z_loss: float = 0.0, label_smoothing: float = 0.0):
  """Per-token cross entropy (float32), with optional z-loss (PaLM/T5X) and label smoothing."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  if label_smoothing:
    confidence = 1.0 - label_smoothing
    soft = jax.nn.one_hot(targets, vocab) * confidence + label_smoothing / vocab
    loss = log_z - jnp.sum(soft * logits, axis=-1)
  else:
    loss = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  if z_loss:
    loss = loss + z_loss * jnp.square(log_z)
  return loss


def batch_metrics(batch, losses, num_tasks: int):
  """Sums for logging: loss and token count overall and per task, examples per task, and the
  non-padding tokens the step trained on (what tokens/s counts)."""
  weights = batch["decoder_loss_weights"].astype(jnp.float32)
  task_ids = batch[input_pipeline.TASK_IDS]
  one_hot = jax.nn.one_hot(task_ids, num_tasks + 1, dtype=jnp.float32)  # 0 = padding
  positions = batch.get("decoder_positions")
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(task_ids.shape[1]), task_ids.shape)
  starts = ((positions == 0) & (task_ids > 0)).astype(jnp.float32)  # one per example
  real_tokens = jnp.sum(batch["decoder_target_tokens"] != 0)  # non-padding, inputs included
  if "encoder_input_tokens" in batch:
    real_tokens += jnp.sum(batch["encoder_input_tokens"] != 0)
  return {
      "real_tokens": real_tokens.astype(jnp.float32),
      "loss_sum": jnp.sum(losses * weights),
      "tokens": jnp.sum(weights),
      "task_loss_sum": jnp.einsum("bl,blt->t", losses * weights, one_hot),
      "task_tokens": jnp.einsum("bl,blt->t", weights, one_hot),
      "task_examples": jnp.einsum("bl,blt->t", starts, one_hot),
  }


# ---------------------------------------------------------------------------------------------
# Train step.


@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def make_train_step(graphdef, optimizer, c: config_lib.TrainConfig, num_tasks: int, frozen=None):
  """frozen: optional pytree like the params, True where a parameter does not train in this step's
  stage (its gradient is then a constant zero, not computed: finetune.Plan.frozen_in)."""
  def loss_fn(params, batch, dropout_key):
    if frozen is not None:
      params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    model = nnx.merge(graphdef, params)
    logits = model(batch, deterministic=False, rngs=nnx.Rngs(dropout=dropout_key))
    losses = token_losses(logits, batch["decoder_target_tokens"], c.z_loss, c.label_smoothing)
    weights = batch["decoder_loss_weights"].astype(jnp.float32)
    loss = jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)  # per target token
    return loss, losses

  def train_step(state: TrainState, batch, base_key):
    dropout_key = jax.random.fold_in(base_key, state.step)
    (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, dropout_key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = batch_metrics(batch, jax.lax.stop_gradient(losses), num_tasks)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.global_norm(grads)
    if isinstance(opt_state, optax.ApplyIfFiniteState):  # optimizer.skip_nonfinite
      metrics["nonfinite_in_a_row"] = opt_state.notfinite_count  # 0 = this update was applied
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "opt_state"],
                                 meta_fields=[])


# ---------------------------------------------------------------------------------------------
# Checkpoints: orbax for the train state, a small orbax handler for the tf.data iterator.


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves/restores a tf.data iterator's position (tf.train.Checkpoint), one file set per process.

  orbax has no handler for tf.data iterators (grain has its own); this is the whole of it.
  """

  def save(self, directory, args: "DataIteratorSave"):
    prefix = os.path.join(str(directory), f"process_{jax.process_index()}")
    tf.train.Checkpoint(iterator=args.iterator).write(prefix)
    partitioning.write_data_layout(prefix, args.layout)  # which data shard this process read
    if args.examples is not None and jax.process_index() == 0:  # global counts: one file
      with open(os.path.join(str(directory), EXAMPLES_FILE), "w") as f:
        json.dump(args.examples, f)

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


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


EXAMPLES_FILE = "examples.json"  # in a checkpoint's data/ item


def checkpoint_manager(workdir: str, keep: int, *, cleanup: bool = False) -> ocp.CheckpointManager:
  """The train run's checkpoints; `cleanup` removes partial writes (`<step>.orbax-checkpoint-tmp`)
  that a killed run left behind: orbax never reads them, and they can be as large as a checkpoint."""
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=cleanup),
      item_names=("state", "data"))


def restore_params(path: str, abstract_params):
  """Parameters only, from a workdir (latest checkpoint) or a checkpoint step directory."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise UserError(f"--init-from {path}: no such workdir or checkpoint")
  ckpt_dir = os.path.join(path, "checkpoints")
  if os.path.isdir(ckpt_dir):
    manager = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"))
    step = manager.latest_step()
    if step is None:
      raise UserError(f"--init-from {path}: workdir has no checkpoint")
    path = os.path.join(ckpt_dir, str(step))
  state_dir = os.path.join(path, "state")
  if not os.path.isdir(state_dir):
    raise UserError(f"--init-from {path}: not a t5mix checkpoint (no state/ directory)")
  abstract = {"params": abstract_params}
  try:
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise UserError(f"--init-from {path}: cannot restore parameters "
                    f"({str(e).splitlines()[0][:200]})") from None
  return restored["params"]


# ---------------------------------------------------------------------------------------------
# Resuming: the newest checkpoint that reads back whole; a damaged one is moved aside, unchanged.
#
# A checkpoint that orbax finished writing can still be damaged later (a truncated copy, a
# deleted file, a disk error). Those are skipped, newest first, with a warning naming each, and
# moved to `unreadable_checkpoints/` (never deleted or modified: they may be all there is of a
# long run), so that the run does not meet their step numbers again when it saves, and orbax's
# max_to_keep neither counts nor deletes them. A checkpoint whose saved tree differs from this
# config's (another model or optimizer) is different: that is a config mistake, and an error.

UNREADABLE_DIR = "unreadable_checkpoints"  # in the workdir, beside checkpoints/


class _Unreadable(Exception):
  """A checkpoint that cannot be read back whole (missing or truncated files)."""


def _first_line(e: BaseException, limit: int = 160) -> str:
  text = str(e).strip().split(" See full TensorStore details")[0]  # then a page of JSON spec
  line = text.splitlines()[0] if text else type(e).__name__
  return line if len(line) <= limit else line[:limit - 1] + "…"


def _tree_shapes(tree) -> dict[str, tuple]:
  """{dotted path: (shape, dtype)} of a state pytree, or of orbax's metadata tree of one."""
  def name(k):
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(name(k) for k in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
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
    raise _Unreadable(f"state metadata: {type(e).__name__}: {_first_line(e)}") from None
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


def read_examples(step_dir: str) -> dict[str, int]:
  """The per-task example counts saved with a checkpoint ({} for checkpoints without them)."""
  try:
    with open(os.path.join(step_dir, "data", EXAMPLES_FILE)) as f:
      return {str(k): int(v) for k, v in json.load(f).items()}
  except (OSError, ValueError, AttributeError):
    return {}


def _move_aside(workdir: str, steps: list[int]) -> dict[int, str]:
  """Renames checkpoints/<step> to unreadable_checkpoints/<step>[-n] (primary process only)."""
  root = os.path.abspath(workdir)
  moved = {}
  for step in steps:
    dest = os.path.join(root, UNREADABLE_DIR, str(step))
    n = 1
    while os.path.exists(dest):
      n += 1
      dest = os.path.join(root, UNREADABLE_DIR, f"{step}-{n}")
    if distributed.is_primary():
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      os.rename(os.path.join(root, "checkpoints", str(step)), dest)
    moved[step] = dest
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("t5mix: unreadable checkpoints moved aside")
  return moved


# ---------------------------------------------------------------------------------------------
# The loop.


class _Stop:
  """SIGTERM/SIGINT ask the loop to save a checkpoint and exit, instead of dying mid-step."""

  def __init__(self):
    self.requested = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.requested is not None:  # a second Ctrl-C: stop now
      raise Interrupted(signal.Signals(signum).name)
    self.requested = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


class Interrupted(KeyboardInterrupt):
  """A signal that stops the run where it is, without the loop's save: SIGTERM outside the loop
  (`sigterm_interrupts`), or a second signal during it."""

  def __init__(self, signal_name: str):
    super().__init__(signal_name)
    self.signal_name = signal_name


@contextlib.contextmanager
def sigterm_interrupts():
  """SIGTERM stops like Ctrl-C (an exception the CLI reports) while loading data, restoring or
  compiling, instead of ending the process without a word; the loop's _Stop takes over inside."""
  def handle(signum, frame):
    raise Interrupted("SIGTERM")
  old = signal.signal(signal.SIGTERM, handle)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, old)


def interrupted_message(workdir: str, signal_name: str) -> str:
  """The line for a run stopped without saving: what a rerun of the same command starts from."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  saved = [int(n) for n in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])
           if n.isdigit() and os.path.exists(os.path.join(ckpt_dir, n, "_CHECKPOINT_METADATA"))]
  if not saved:
    return (f"interrupted ({signal_name}): nothing was saved; rerunning the same command starts "
            "from step 0")
  return (f"interrupted ({signal_name}): nothing was saved since the checkpoint at step "
          f"{max(saved)}; rerunning the same command resumes from it ({ckpt_dir}/{max(saved)})")


def build_model(c: config_lib.TrainConfig, vocab: seqio.Vocabulary | None = None) -> T5Config:
  """The run's model config: the named size (default mini), its overrides, then adapters/LoRA.

  vocab: the run's vocabulary. A model of a named size gets its vocab_size from it (padded to a
  multiple of 128 for fast matmuls); a model read from a workdir (an imported or trained one)
  keeps its own, which the vocabulary must fit.
  """
  model_config = load_model_config(c.model or "mini")
  if c.model_overrides:
    model_config = dataclasses.replace(model_config, **_checked_overrides(model_config, c.model_overrides))
  if vocab is not None:
    fixed = "vocab_size" in c.model_overrides or _workdir_of(c.model) is not None
    if not fixed:
      model_config = dataclasses.replace(model_config, vocab_size=_round_up(vocab.vocab_size, 128))
    elif vocab.vocab_size > model_config.vocab_size:
      first_sentinel = vocab.vocab_size - 1  # seqio: <extra_id_0> is the top id
      raise UserError(
          f"the vocabulary {vocab_lib.describe(vocab)} has {vocab.vocab_size} ids (sentinels "
          f"<extra_id_0..99> are ids {first_sentinel - 99}..{first_sentinel}) but the model "
          f"{c.model} has vocab_size {model_config.vocab_size}; use the model's own vocabulary "
          "(leave --vocab / data.vocab unset) or a model of a named size")
  return finetune.apply_to_model_config(c.finetune, model_config)  # adapters / LoRA


def _checked_overrides(model_config, overrides):
  fields = {f.name for f in dataclasses.fields(model_config)}
  for key in overrides:
    if key not in fields:
      raise UserError(f"unknown config key 'model_overrides.{key}'")
  return overrides


def _workdir_of(path: str | None) -> str | None:
  """The workdir that holds `path` (a workdir, a checkpoint step directory or a workdir's
  model.yaml), or None when it is none of those."""
  if not path:
    return None
  path = os.path.abspath(path)
  for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    if os.path.isfile(os.path.join(candidate, "model.yaml")) and (
        os.path.isdir(os.path.join(candidate, "checkpoints"))):
      return candidate
  return None


def _own_vocabulary(task: seqio.Task) -> seqio.Vocabulary:
  return getattr(task, "own_vocabulary", None) or task.output_features["targets"].vocabulary


def decide_vocabulary(c: config_lib.TrainConfig, workdir: str, init_from: str | None,
                      tasks: list[seqio.Task], log=print) -> seqio.Vocabulary:
  """The run's one vocabulary: data.vocab (--vocab); else the one this workdir's run was trained
  with (resuming); else the --init-from workdir's (a pretrained model's); else the one its tasks
  name, which must then agree. t5mix tasks that name another are tokenised with it (a note says
  so); plain seqio tasks cannot be, so that is an error."""
  resumed = vocab_lib.workdir_vocabulary(workdir) if os.path.isdir(
      os.path.join(workdir, "checkpoints")) else None
  init_workdir = _workdir_of(init_from)
  pretrained = vocab_lib.workdir_vocabulary(init_workdir) if init_workdir else None
  spec, source = c.data.vocab, "data.vocab"
  if spec is not None and resumed is not None and not vocab_lib.same(
      vocab_lib.get_vocabulary(spec), vocab_lib.get_vocabulary(resumed)):
    raise UserError(f"data.vocab {spec} is not the vocabulary {workdir} was trained with "
                    f"({resumed}); leave it unset to resume, or use a new --workdir")
  for candidate, where in ((resumed, f"the run in {workdir}"),
                           (pretrained, f"the --init-from model {init_workdir}")):
    if spec is None and candidate is not None:
      spec, source = candidate, where
  if spec is None:  # the tasks decide: they must agree
    named = {t.name: _own_vocabulary(t) for t in tasks}
    distinct = []
    for v in named.values():
      if not any(vocab_lib.same(v, d) for d in distinct):
        distinct.append(v)
    if len(distinct) > 1:
      listing = "; ".join(f"{n}: {vocab_lib.describe(v)}" for n, v in named.items())
      raise UserError(f"the tasks of {c.data.mixture!r} name different vocabularies ({listing}); "
                      "a run tokenises with one: choose it with --vocab (or data.vocab), or give "
                      "the tasks the same `vocabulary:`")
    vocab = distinct[0]
  else:
    vocab = vocab_lib.get_vocabulary(spec)
    if pretrained is not None and source == "data.vocab" and not vocab_lib.same(
        vocab, vocab_lib.get_vocabulary(pretrained)):
      log(f"warning: data.vocab {spec} is not the vocabulary of the --init-from model "
          f"({pretrained}): its embeddings were trained for that one")
    others = [t for t in tasks if not vocab_lib.same(_own_vocabulary(t), vocab)]
    foreign = [t.name for t in others if not hasattr(t, "own_vocabulary")]
    if foreign:
      raise UserError(f"seqio task(s) {', '.join(foreign)} have their own vocabulary, not the "
                      f"run's {vocab_lib.describe(vocab)} ({source}); register them with that "
                      "vocabulary or train without --vocab / --init-from")
    if others:
      log(f"note: tokenising {', '.join(t.name for t in others)} with the vocabulary of "
          f"{source}, {vocab_lib.describe(vocab)} (not the one they name: "
          f"{', '.join(sorted({vocab_lib.describe(_own_vocabulary(t)) for t in others}))})")
  vocab_lib.check_vocabulary(vocab)
  return vocab


def _keep_vocabulary(vocab: seqio.Vocabulary, workdir: str) -> None:
  """A copy of the run's SentencePiece model in the workdir (spiece.model, HF's name): eval,
  predict, export-hf and runs that start from this one find it there."""
  path = getattr(vocab, "sentencepiece_model_file", None)
  dest = os.path.join(workdir, vocab_lib.WORKDIR_VOCAB_FILE)
  if path is not None and os.path.realpath(path) != os.path.realpath(dest):
    shutil.copyfile(path, dest)


def _finished_step(workdir: str, steps: int) -> int | None:
  """The step of the newest checkpoint, when it is at or past `steps` and its state reads back
  whole: a rerun of a finished run then builds no model, data or step. Anything else (no
  checkpoint, an unfinished run, a damaged last checkpoint) is left to the resuming code."""
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps_done = [int(n) for n in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])
                if n.isdigit()]
  if not steps_done or max(steps_done) < steps:
    return None
  step_dir = os.path.join(ckpt_dir, str(max(steps_done)))
  try:  # every array read back (the data position matters only to a run that goes on)
    ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
  except Exception:  # noqa: BLE001 - damaged in any way: the resuming code reports and handles it
    return None
  return max(steps_done)


def train(c: config_lib.TrainConfig, workdir: str, *, init_from: str | None = None,
          quiet: bool = False, log=print) -> dict:
  """Trains per config `c` in `workdir` (resuming if it holds checkpoints); returns final metrics."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"{workdir}: cannot use as workdir ({e.strerror})") from None
  saved_config = os.path.join(workdir, "config.yaml")
  c = config_lib.resolve(c, saved_config)  # defaults a resumed run keeps: see config.resolve
  for path in (workdir, *(os.path.join(workdir, d) for d in ("checkpoints", "tensorboard"))):
    if os.path.exists(path) and not os.access(path, os.W_OK):  # found out now, not at the first save
      raise UserError(f"{path}: {'workdir' if path == workdir else 'directory'} is not writable")
  finished = _finished_step(workdir, c.steps)
  if finished is not None:
    summary = {"step": finished, "loss": None, "task_examples": read_examples(
        os.path.join(workdir, "checkpoints", str(finished))),
               "checkpoints": os.path.join(workdir, "checkpoints")}
    _log_done(summary, workdir, log)
    return summary
  init_workdir = _workdir_of(init_from)
  if c.model is None and init_workdir is not None:  # fine-tuning: the pretrained model's shape
    c = dataclasses.replace(c, model=os.path.join(init_workdir, "model.yaml"))
  tasks = input_pipeline.leaf_tasks(c.data.mixture)
  vocab = decide_vocabulary(c, workdir, init_from, tasks, log)
  vocab_file = getattr(vocab, "sentencepiece_model_file", None)
  hashes = definitions.file_hashes(c.data.tasks_dir, c.data.module, vocab_file)
  edited = definitions.changed_files(
      (config_lib.read_saved(saved_config).get("data") or {}).get("hashes") or {})
  if edited:
    log(f"note: edited since this workdir's run last trained: {', '.join(edited)}")
  c = dataclasses.replace(c, data=dataclasses.replace(c.data, vocab=vocab_lib.describe(vocab),
                                                      hashes=hashes))
  model_config = build_model(c, vocab)
  with registry.run_vocabulary(vocab):
    return _train(c, model_config, vocab, tasks, workdir, saved_config, init_from, quiet, log)


def _train(c, model_config, vocab, tasks, workdir, saved_config, init_from, quiet, log) -> dict:
  if not distributed.is_primary():  # one process writes files and reports for all
    log, quiet = (lambda *a, **k: None), True

  mesh = partitioning.make_mesh(c.mesh)  # see partitioning.py: data x fsdp x model
  partitioning.check_batch_size(mesh, c.data.batch_size)
  replicated = NamedSharding(mesh, P())
  batch_sharding = partitioning.batch_sharding(mesh, c.data.batch_size)
  data_layout = partitioning.data_layout(batch_sharding, c.data.batch_size)  # this process's rows

  def new_model():
    return T5(model_config, rngs=nnx.Rngs(c.seed))
  graphdef, params = nnx.split(nnx.eval_shape(new_model), nnx.Param)
  plan = finetune.make_plan(c, params)  # which parameters train, and when (finetune.py)
  optimizer = plan.make_optimizer()
  if c.optimizer.skip_nonfinite:  # a non-finite update leaves params and optimizer state as they were
    optimizer = optax.apply_if_finite(optimizer, c.optimizer.skip_nonfinite)
  new_state = lambda p: TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p))  # noqa: E731
  state_shardings = partitioning.tree_shardings(mesh, jax.eval_shape(new_state, params), params)
  # Created sharded (jit with out_shardings): the whole model never sits on one device.
  params = jax.jit(lambda: nnx.split(new_model(), nnx.Param)[1],
                   out_shardings=state_shardings.params)()
  if init_from:
    # onto the shardings of `params`; adapters/LoRA missing from a base checkpoint stay fresh
    params = finetune.init_params(init_from, params, log)
    log(f"initialised parameters from {init_from}")
  state = jax.jit(new_state, out_shardings=state_shardings, donate_argnums=0)(params)

  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  partial = sorted(n for n in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])
                   if ".orbax-checkpoint-tmp" in n)
  if partial:
    log(f"removing {', '.join(partial)} in {ckpt_dir}: checkpoint writes that did not finish "
        "(the run was killed or the disk was full while saving)")
  manager = checkpoint_manager(workdir, c.keep_checkpoints, cleanup=True)
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxThreadErrors) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxThreadErrors())

  lengths = {"inputs": c.data.inputs_length, "targets": c.data.targets_length}

  def data_iterator(seed):
    dataset = input_pipeline.get_dataset(
        c.data.mixture, "train", lengths, seed=seed, shuffle=c.data.shuffle, pack=c.data.pack,
        architecture=model_config.architecture, shard_info=partitioning.shard_info(data_layout))
    return iter(dataset.batch(data_layout["batch"], drop_remainder=True).prefetch(2))

  # Resume from the newest checkpoint that reads back whole (see "Resuming" above).
  start, unreadable, examples, data_iter, same_data = None, {}, {}, None, True
  steps = sorted(manager.all_steps(), reverse=True)
  if steps:
    from t5mix.evaluate import _ignore_closed_event_loop_errors
    _ignore_closed_event_loop_errors()  # tensorstore's late callbacks after a failed read
  for step in steps:
    step_dir = os.path.join(ckpt_dir, str(step))
    try:
      check_matches_config(step_dir, state)  # another model/optimizer: UserError, no fallback
      # The data position restores only where this process reads the same shard as when it saved.
      data_dir = os.path.join(step_dir, "data")
      prefix = os.path.join(data_dir, f"process_{jax.process_index()}")
      if os.path.exists(prefix + ".json") and not os.path.exists(prefix + ".index"):
        raise _Unreadable(f"data/{os.path.basename(prefix)}.index is missing")
      same_data = partitioning.same_data_layout(data_dir, data_layout)
      data_iter = data_iterator(c.seed if same_data else c.seed + step)
      items = {"state": ocp.args.StandardRestore(state)}  # onto this mesh's shardings
      if same_data:
        items["data"] = DataIteratorRestore(data_iter)
      try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # noqa: BLE001 - orbax/tensorstore/tf raise many kinds on damaged files
        raise _Unreadable(f"{type(e).__name__}: {_first_line(e)}") from None
    except _Unreadable as e:
      unreadable[step] = str(e)
      continue
    state, start, examples = restored["state"], step, read_examples(step_dir)
    break
  if unreadable and start is None:
    raise UserError(
        f"{ckpt_dir}: no checkpoint can be read back ("
        + "; ".join(f"{s}: {why}" for s, why in unreadable.items()) + "); not starting over "
        "from step 0 on top of them: move them away or use a new --workdir")
  if unreadable:  # moved aside, so that saving never meets their step numbers (see above)
    moved = _move_aside(workdir, list(unreadable))
    manager.reload()
    for bad, why in unreadable.items():
      log(f"warning: {ckpt_dir}/{bad} is unreadable ({why}); resuming from {ckpt_dir}/{start}; "
          f"moved the unreadable one, unchanged, to {moved[bad]}")
  if data_iter is None:
    data_iter = data_iterator(c.seed)
  if start is not None:
    log(f"resumed from checkpoint at step {start}" + ("" if same_data else (
        f" (its data position is for another data sharding or batch size: the data stream "
        f"restarts with seed {c.seed + start})")))
    changed = config_lib.changes_since(saved_config, c)
    if changed:  # e.g. a default that changed between t5mix versions
      log("note: the config differs from the one this workdir last ran with: " + "; ".join(changed))
  if distributed.is_primary():  # only now: a run that cannot start leaves the workdir as it was
    _keep_vocabulary(vocab, workdir)
    config_lib.save(c, os.path.join(workdir, "config.yaml"))
    save_model_config(model_config, os.path.join(workdir, "model.yaml"))
  start = int(state.step)

  compiled_steps = {}  # by stage: gradual unfreezing compiles one step per stage (Plan.frozen_in)

  def compiled_step(stage):
    if stage not in compiled_steps:
      compiled_steps[stage] = jax.jit(
          make_train_step(graphdef, optimizer, c, len(tasks), plan.frozen_in(params, stage)),
          donate_argnums=(0,), in_shardings=(state_shardings, batch_sharding, replicated),
          out_shardings=(state_shardings, replicated))
    return compiled_steps[stage]

  base_key = jax.jit(lambda: jax.random.key(c.seed), out_shardings=replicated)()
  writer = (tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
            if distributed.is_primary() else tf.summary.create_noop_writer())
  if c.eval_every:  # validation metrics every eval_every steps (evaluate.py)
    from t5mix import evaluate
    evaluator = evaluate.DuringTraining(c, graphdef, writer, log)
  names = [t.name for t in tasks]
  totals = {"task_examples": np.zeros(len(names) + 1)}  # since step 0, across resumptions
  for i, n in enumerate(names):
    totals["task_examples"][i + 1] = examples.get(n, 0)
  pending, history = [], []
  tokens_per_step = c.data.batch_size * (c.data.inputs_length + c.data.targets_length)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  log(f"training {model_config.architecture} ({num_params / 1e6:.2f}M parameters) on "
      f"{c.data.mixture!r} for {c.steps} steps, batch {c.data.batch_size} x "
      f"({c.data.inputs_length}+{c.data.targets_length}) tokens, {jax.device_count()} "
      f"{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es), mesh "
      f"{partitioning.describe(mesh)}; workdir {workdir}")
  if plan.describe():
    log(plan.describe())
  for task in tasks:  # on each task's first examples (input_pipeline.TRUNCATION_COUNT_LIMIT)
    truncation = input_pipeline.count_truncation(task, "train", lengths)
    if truncation:
      log(truncation.describe())

  def flush(step):
    """Fetches pending step metrics (one host sync per log period), logs, checks for NaN."""
    fetched = jax.device_get(pending)
    allowed = c.optimizer.skip_nonfinite
    for i, m in enumerate(fetched):
      in_a_row = int(m.get("nonfinite_in_a_row", 0))  # optax.apply_if_finite's own count
      if np.isfinite(m["loss"]) and not in_a_row:
        continue
      bad = step - len(fetched) + i + 1
      task_hint = ", ".join(n for n, t in zip(names, m["task_tokens"][1:]) if t > 0)
      if 0 < in_a_row <= allowed:
        log(f"warning: non-finite gradients at step {bad} (batch had tasks: {task_hint}); update "
            f"skipped ({in_a_row}/{allowed} in a row)")
        continue
      what = f"gradients at step {bad} ({in_a_row} in a row, optimizer.skip_nonfinite={allowed})" \
          if in_a_row else f"loss at step {bad}"
      raise UserError(f"non-finite {what} (batch had tasks: {task_hint}); "
                      f"stopped; the last good checkpoint is kept in {workdir}/checkpoints")
    real_tokens = float(sum(m["real_tokens"] for m in fetched))  # skipped steps read them too
    fill = real_tokens / max(len(fetched) * tokens_per_step, 1)  # non-padding / row slots
    fetched = [m for m in fetched if np.isfinite(m["loss"])]  # skipped steps: not in the averages
    pending.clear()
    if not fetched:
      return None
    loss_sum = sum(m["loss_sum"] for m in fetched)
    tokens = sum(m["tokens"] for m in fetched)
    task_loss = sum(m["task_loss_sum"] for m in fetched)
    task_tokens = sum(m["task_tokens"] for m in fetched)
    for m in fetched:
      totals["task_examples"] += m["task_examples"]
    # Speed without the steps that compiled (timed apart in the loop): the compiled step's.
    now, compile_s = time.time(), untimed["seconds"]
    timed_steps = step - last["step"] - untimed["steps"]
    elapsed = max(now - last["time"] - compile_s, 1e-9)
    steps_per_s = timed_steps / elapsed if timed_steps else None  # None: only a compiling step
    tokens_per_s = (real_tokens - untimed["tokens"]) / elapsed if timed_steps else None
    last.update(time=now, step=step, steps_per_s=steps_per_s or last["steps_per_s"])
    untimed.update(seconds=0.0, steps=0, tokens=0.0)
    record = {"step": step, "loss": float(loss_sum / max(tokens, 1)), "steps_per_s": steps_per_s,
              "tokens_per_s": tokens_per_s,  # non-padding tokens
              "fill": fill,
              # the rate of this step's update (optax counts updates from 0)
              "learning_rate": float(schedule((step - 1) // c.optimizer.grad_accum_steps)),
              "grad_norm": float(fetched[-1]["grad_norm"]),
              "task_loss": {n: float(task_loss[i + 1] / task_tokens[i + 1])
                            for i, n in enumerate(names) if task_tokens[i + 1] > 0},
              "task_examples": {n: int(totals["task_examples"][i + 1]) for i, n in enumerate(names)}}
    stage = plan.stage_at(step)  # gradual unfreezing
    if stage is not None:
      record["stage"] = stage
    history.append(record)
    with writer.as_default(step=step):
      tf.summary.scalar("loss", record["loss"])
      if steps_per_s is not None:
        tf.summary.scalar("steps_per_s", steps_per_s)
        tf.summary.scalar("tokens_per_s", tokens_per_s)
      tf.summary.scalar("learning_rate", record["learning_rate"])
      tf.summary.scalar("padding_share", 1 - fill)  # of the batch's row slots
      tf.summary.scalar("grad_norm", record["grad_norm"])
      if stage is not None:
        tf.summary.scalar("finetune/stage", stage)
      for n, v in record["task_loss"].items():
        tf.summary.scalar(f"task_loss/{n}", v)
      for n, v in record["task_examples"].items():
        tf.summary.scalar(f"task_examples/{n}", v)
    if not quiet:
      if steps_per_s is None:
        speed = f"first step {compile_s:.1f} s (compiling)  {fill:.0%} non-padding"
      else:
        speed = (f"{steps_per_s:.2f} steps/s"
                 + (f" ({compile_s:.1f} s compiling not counted)" if compile_s else "")
                 + f"  {tokens_per_s:,.0f} tok/s ({fill:.0%} non-padding)")
      rate = last["steps_per_s"]  # the latest measured; none yet after only a compiling step
      eta = f"  eta {_duration((c.steps - step) / rate)}" if rate else ""
      per_task = " ".join(f"{n}={v:.2f}" for n, v in record["task_loss"].items())
      log(f"step {step:>6}/{c.steps}  loss {record['loss']:.4f}  {speed}{eta}  | {per_task}"
          + (f"  | stage {stage}/{plan.num_stages}" if stage is not None else ""))
    return record

  def save(step):
    flush(step)  # never checkpoint a state whose loss went non-finite
    examples = {n: int(totals["task_examples"][i + 1]) for i, n in enumerate(names)}
    with _checkpoint_errors(ckpt_dir, step):
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=DataIteratorSave(data_iter, data_layout, examples)),
                   force=True)

  schedule = learning_rate_schedule(c.optimizer, c.steps)  # the optimizer's, for TensorBoard
  # The first step of each compiled train step (with its batch: the first one waits for the
  # input pipeline) is timed apart, so that steps/s and the ETA are the compiled step's.
  untimed = {"seconds": 0.0, "steps": 0, "tokens": 0.0}
  last = {"time": time.time(), "step": start, "steps_per_s": None}
  step = start
  try:
    with _Stop() as stop:
      while step < c.steps:
        stage = plan.stage_at(step + 1) or 1  # the stage this update runs in
        compiles = stage not in compiled_steps
        if compiles:
          jax.block_until_ready(state)  # the steps before it end inside their own timing
          began = time.time()
          if step == plan.start_step(stage) > 0 and not quiet:  # gradual unfreezing's next stage
            log(plan.describe_stage(stage))
        try:
          batch = next(data_iter)
        except StopIteration:
          raise UserError(f"mixture {c.data.mixture!r} ran out of training examples") from None
        batch = partitioning.global_batch(batch_sharding, {k: v.numpy() for k, v in batch.items()},
                                          c.data.batch_size)  # this process's rows -> global arrays
        state, metrics = compiled_step(stage)(state, batch, base_key)
        if compiles:
          untimed["tokens"] += float(metrics["real_tokens"])  # waits for the step
          untimed["seconds"] += time.time() - began
          untimed["steps"] += 1
        pending.append(metrics)
        step += 1
        if step % c.log_every == 0 or step == c.steps:
          flush(step)
        if step % c.checkpoint_every == 0 or step == c.steps:
          save(step)
        if c.eval_every and step % c.eval_every == 0:
          evaluator(step, state.params)
        # Several processes stop together, at the next log step after any of them got a signal.
        if partitioning.stop_agreed(stop.requested is not None,
                                    step % c.log_every == 0 or step == c.steps):
          requested = stop.requested or "SIGTERM"
          save(step)
          with _checkpoint_errors(ckpt_dir, step):
            manager.wait_until_finished()
          log(f"{requested}: saved checkpoint at step {step} in {workdir}; rerun to resume")
          raise SystemExit(143 if requested == "SIGTERM" else 130)
  except UserError:  # a stop (non-finite loss, data ran out): first finish a save in flight
    with contextlib.suppress(Exception):
      manager.wait_until_finished()
    raise
  with _checkpoint_errors(ckpt_dir, step):
    manager.wait_until_finished()
  finetune.write_run_adapters(plan, workdir, state.params, model_config, step, log)  # adapters/LoRA
  writer.flush()
  final = history[-1] if history else {}
  summary = {"step": step, "loss": final.get("loss"),
             "task_examples": {n: int(totals["task_examples"][i + 1]) for i, n in enumerate(names)},
             "checkpoints": os.path.join(workdir, "checkpoints")}
  _log_done(summary, workdir, log)
  return summary


def _log_done(summary: dict, workdir: str, log) -> None:
  ran = "no steps left to run" if summary["loss"] is None else f"loss {summary['loss']}"
  log(f"done: step {summary['step']}, {ran}; examples seen per task: "
      f"{summary['task_examples']}; checkpoints in {summary['checkpoints']}, TensorBoard logs in "
      f"{os.path.join(workdir, 'tensorboard')}")


@contextlib.contextmanager
def _checkpoint_errors(ckpt_dir: str, step: int):
  """A failed checkpoint write (disk full, permissions) as one line; orbax writes to a temporary
  directory and renames it when complete, so the checkpoints before it stay whole."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 - orbax/tensorstore/tf raise many kinds
    why = "No space left on device" if "No space left on device" in str(e) else (
        getattr(e, "strerror", None) or f"{type(e).__name__}: {_first_line(e)}")
    raise UserError(f"{ckpt_dir}: writing a checkpoint failed at step {step} ({why}); the "
                    "complete checkpoints are kept: free space (or fix the cause) and rerun the "
                    "same command to resume") from None


class _OrbaxThreadErrors(logging.Filter):
  """Drops orbax's log record (with a traceback) of a save that failed in a background thread:
  the same error reaches the loop and is reported there, in one line (_checkpoint_errors)."""

  def filter(self, record):
    return "raised an exception" not in str(record.msg)


def _round_up(n: int, multiple: int) -> int:
  return (n + multiple - 1) // multiple * multiple


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

