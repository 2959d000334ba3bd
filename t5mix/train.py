"""Training: the mixture's batches through a jitted train step, with checkpoints you can resume.

Read top to bottom: loss → train step → stopping on signals → the run's model and vocabulary →
`train`, the whole program in one page (model, optimizer, data, state, the loop) → the named
pieces it calls. The optimizer is t5mix/optim.py's, which parameters train t5mix/finetune.py's,
and the workdir and its checkpoints t5mix/checkpoints.py's.

Determinism: the dropout key of step s is `fold_in(key(seed), s)` and the data stream is a
checkpointed tf.data iterator, so a run that is interrupted and resumed reaches the same
parameters as one that is not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from t5mix import adapters, checkpoints, definitions, distributed, evaluate, finetune
from t5mix import config as config_lib
from t5mix import input_pipeline, mixing, optim, partitioning, registry, tracking
from t5mix import vocab as vocab_lib
from t5mix.errors import UserError
from t5mix.model import T5, T5Config, load_model_config, save_model_config

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
  # Task ids mark every non-padding target token (decoder-only: every token); an encoder input
  # token belongs to the task of its example's targets.
  task_real_tokens = jnp.einsum("bl,blt->t", (task_ids > 0).astype(jnp.float32), one_hot)
  if "encoder_input_tokens" in batch:
    inputs = batch["encoder_input_tokens"]
    real_tokens += jnp.sum(inputs != 0)
    task_real_tokens += jnp.einsum("bl,blt->t", (inputs != 0).astype(jnp.float32), jax.nn.one_hot(
        input_task_ids(batch), num_tasks + 1, dtype=jnp.float32))
  return {
      "real_tokens": real_tokens.astype(jnp.float32),
      "task_real_tokens": task_real_tokens,
      "loss_sum": jnp.sum(losses * weights),
      "tokens": jnp.sum(weights),
      "task_loss_sum": jnp.einsum("bl,blt->t", losses * weights, one_hot),
      "task_tokens": jnp.einsum("bl,blt->t", weights, one_hot),
      "task_examples": jnp.einsum("bl,blt->t", starts, one_hot),
  }


def input_task_ids(batch):
  """The task id of each encoder input token (0 for padding): that of the targets of the same
  packed example (segment), or of the row's targets when rows are not packed."""
  task_ids = batch[input_pipeline.TASK_IDS]
  if "encoder_segment_ids" not in batch:  # one example per row
    row_task = jnp.max(task_ids, axis=1, keepdims=True)
    return jnp.where(batch["encoder_input_tokens"] != 0, row_task, 0)
  num_segments = task_ids.shape[1] + 1  # each packed example has at least one target token
  segment_task = jax.vmap(lambda ids, segments: jax.ops.segment_max(
      ids, segments, num_segments=num_segments))(task_ids, batch["decoder_segment_ids"])
  segment_task = jnp.maximum(segment_task, 0)  # segments without tokens: the dtype's minimum
  return jnp.take_along_axis(segment_task, batch["encoder_segment_ids"], axis=1)


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
# Stopping: a signal saves a checkpoint at the next step, or stops where the run is.


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


# ---------------------------------------------------------------------------------------------
# The run's model and vocabulary.


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
    fixed = "vocab_size" in c.model_overrides or checkpoints.workdir_of(c.model) is not None
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


def _own_vocabulary(task: seqio.Task) -> seqio.Vocabulary:
  return getattr(task, "own_vocabulary", None) or task.output_features["targets"].vocabulary


def decide_vocabulary(c: config_lib.TrainConfig, workdir: str, init_from: str | None,
                      tasks: list[seqio.Task], log=print) -> seqio.Vocabulary:
  """The run's one vocabulary: data.vocab (--vocab); else the one this workdir's run was trained
  with (resuming); else the --init-from workdir's (a pretrained model's); else the one its tasks
  name, which must then agree. t5mix tasks that name another are tokenised with it (a note says
  so); plain seqio tasks cannot be, so that is an error."""
  resumed = vocab_lib.workdir_vocabulary(workdir) if os.path.isdir(
      checkpoints.checkpoints_dir(workdir)) else None
  init_workdir = checkpoints.workdir_of(init_from)
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


# ---------------------------------------------------------------------------------------------
# The program.


def train(c: config_lib.TrainConfig, workdir: str, *, init_from: str | None = None,
          quiet: bool = False, log=print) -> dict:
  """Trains per config `c` in `workdir` (resuming if it holds checkpoints); returns final metrics."""
  c = open_workdir(c, workdir)
  finished = checkpoints.finished_step(workdir, c.steps)
  if finished is not None:  # a rerun of a finished run builds no model, data or step
    examples = checkpoints.read_examples(os.path.join(checkpoints.checkpoints_dir(workdir), str(finished)))
    return log_done(workdir, finished, None, examples, log)
  tracking.check(c)  # wandb asked for without the extra: before anything loads
  c, vocab, tasks = choose_data(c, workdir, init_from, log)
  model_config = build_model(c, vocab)
  if not distributed.is_primary():  # one process writes files and reports for all
    log, quiet = (lambda *a, **k: None), True
  with registry.run_vocabulary(vocab):
    if c.data.use_cached:  # before rates are computed: they count the cached examples
      input_pipeline.use_caches(tasks, c.data.cache_dirs)
    # The model and which of its parameters train; the optimizer that trains them.
    mesh = partitioning.make_mesh(c.mesh)  # see partitioning.py: data x fsdp x model
    partitioning.check_batch_size(mesh, c.data.batch_size)
    new_model = lambda: T5(model_config, rngs=nnx.Rngs(c.seed))  # noqa: E731
    graphdef, abstract_params = nnx.split(nnx.eval_shape(new_model), nnx.Param)
    plan = finetune.make_plan(c, abstract_params)
    optimizer = optim.make_optimizer(c, plan)
    shard = Shardings.of(mesh, c.data.batch_size, optimizer, abstract_params)
    # The state: fresh (or --init-from's parameters), then the newest readable checkpoint's.
    state = init_state(new_model, optimizer, shard, init_from, log)
    manager = open_checkpoints(workdir, c, log)
    data_iterator = functools.partial(training_batches, c, model_config.architecture, shard.data_layout)
    resumed = checkpoints.resume(manager, workdir, state, data_iterator, shard.data_layout, c.seed, log)
    log_resumed(resumed, c, workdir, log)
    run_info = {}
    if distributed.is_primary():  # only now: a run that cannot start leaves the workdir as it was
      run_info = describe_run(c, workdir, init_from, resumed)
      write_run_files(c, model_config, vocab, run_info, workdir)
    # The loop.
    with tracking.Tracker.open(c, workdir, run_info, log) as tracker:
      progress = Progress(c, tasks, plan, workdir, resumed, tracker, quiet, log)
      evaluator = evaluate.DuringTraining(c, graphdef, tracker, log) if c.eval_every else None
      log_start(c, model_config, mesh, plan, tasks, abstract_params, workdir, log)
      steps = TrainSteps(graphdef, optimizer, c, len(tasks), plan, abstract_params, shard)
      state = loop(c, resumed.state, resumed.data_iter, steps, plan, progress, manager, shard,
                   evaluator, workdir, log)
      adapters.write_run_adapters(plan, workdir, state.params, model_config, int(state.step), log)
  final = progress.history[-1] if progress.history else {}
  return log_done(workdir, int(state.step), final.get("loss"), progress.examples(), log)


def loop(c, state, data_iter, steps: "TrainSteps", plan, progress: "Progress", manager, shard,
         evaluator, workdir: str, log) -> TrainState:
  """Steps until c.steps: logs every log_every, saves every checkpoint_every (and last), evaluates
  every eval_every; a signal saves and exits at the next log step (all processes together)."""
  step = int(state.step)
  batches = functools.partial(next_batch, data_iter, shard, c)
  progress.start(step)
  try:
    with _Stop() as stop:
      while step < c.steps:
        stage = plan.stage_at(step + 1) or 1  # the stage this update runs in
        state = steps.run(stage, step, state, batches, progress)
        step += 1
        if step % c.log_every == 0 or step == c.steps:
          progress.flush(step)
        evaluated = {}  # before saving: keep_best ranks the checkpoint by these scores
        if evaluator is not None and step % c.eval_every == 0:
          evaluated = evaluator(step, state.params)
        if step % c.checkpoint_every == 0 or step == c.steps:
          save(manager, step, state, data_iter, shard, progress, evaluated.get("scores"))
        if partitioning.stop_agreed(stop.requested is not None,
                                    step % c.log_every == 0 or step == c.steps):
          requested = stop.requested or "SIGTERM"
          save(manager, step, state, data_iter, shard, progress, evaluated.get("scores"))
          checkpoints.wait_until_saved(manager, step)
          log(f"{requested}: saved checkpoint at step {step} in {workdir}; rerun to resume")
          raise SystemExit(143 if requested == "SIGTERM" else 130)
  except UserError:  # a stop (non-finite loss, data ran out): first finish a save in flight
    with contextlib.suppress(Exception):
      manager.wait_until_finished()
    raise
  checkpoints.wait_until_saved(manager, step)
  return state


def save(manager, step: int, state, data_iter, shard: "Shardings", progress: "Progress",
         step_scores: dict[str, float] | None) -> None:
  progress.flush(step)  # never checkpoint a state whose loss went non-finite
  checkpoints.save(manager, step, state, data_iter, shard.data_layout, progress.examples(),
                   progress.totals(), step_scores)


# ---------------------------------------------------------------------------------------------
# The pieces `train` calls, in its order.


def open_workdir(c: config_lib.TrainConfig, workdir: str) -> config_lib.TrainConfig:
  """Creates the workdir, checks it is writable, resolves the defaults a resumed run keeps."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"{workdir}: cannot use as workdir ({e.strerror})") from None
  c = config_lib.resolve(c, os.path.join(workdir, checkpoints.CONFIG_FILE))  # see config.resolve
  for path in (workdir, *(os.path.join(workdir, d)
                          for d in (checkpoints.CHECKPOINTS_DIR, checkpoints.TENSORBOARD_DIR))):
    if os.path.exists(path) and not os.access(path, os.W_OK):  # found out now, not at the first save
      raise UserError(f"{path}: {'workdir' if path == workdir else 'directory'} is not writable")
  return c


def choose_data(c: config_lib.TrainConfig, workdir: str, init_from: str | None, log):
  """(config, vocabulary, tasks): the model a --init-from workdir brings, the run's one
  vocabulary (decide_vocabulary), and the definitions' hashes recorded in the config."""
  init_workdir = checkpoints.workdir_of(init_from)
  if c.model is None and init_workdir is not None:  # fine-tuning: the pretrained model's shape
    c = dataclasses.replace(c, model=os.path.join(init_workdir, checkpoints.MODEL_FILE))
  tasks = input_pipeline.leaf_tasks(c.data.mixture)
  vocab = decide_vocabulary(c, workdir, init_from, tasks, log)
  hashes = definitions.file_hashes(c.data.tasks_dir, c.data.module,
                                   getattr(vocab, "sentencepiece_model_file", None))
  saved = config_lib.read_saved(os.path.join(workdir, checkpoints.CONFIG_FILE))
  edited = definitions.changed_files((saved.get("data") or {}).get("hashes") or {})
  if edited:
    log(f"note: edited since this workdir's run last trained: {', '.join(edited)}")
  c = dataclasses.replace(c, data=dataclasses.replace(c.data, vocab=vocab_lib.describe(vocab),
                                                      hashes=hashes))
  return c, vocab, tasks


@dataclasses.dataclass
class Shardings:
  """Where the state and the batches live on the mesh, and which batch rows this process reads."""
  replicated: NamedSharding
  batch: NamedSharding
  state: Any  # a TrainState of shardings
  data_layout: dict

  @classmethod
  def of(cls, mesh, batch_size: int, optimizer, abstract_params) -> "Shardings":
    batch = partitioning.batch_sharding(mesh, batch_size)
    abstract_state = jax.eval_shape(lambda p: new_state(p, optimizer), abstract_params)
    return cls(NamedSharding(mesh, P()), batch,
               partitioning.tree_shardings(mesh, abstract_state, abstract_params),
               partitioning.data_layout(batch, batch_size))


def new_state(params, optimizer) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def init_state(new_model, optimizer, shard: Shardings, init_from: str | None, log) -> TrainState:
  """The step-0 state, created sharded (jit with out_shardings: the whole model never sits on one
  device); with --init-from, its parameters (adapters/LoRA missing from it stay fresh)."""
  params = jax.jit(lambda: nnx.split(new_model(), nnx.Param)[1], out_shardings=shard.state.params)()
  if init_from:
    params = checkpoints.init_params(init_from, params, log)
    log(f"initialised parameters from {init_from}")
  return jax.jit(lambda p: new_state(p, optimizer), out_shardings=shard.state, donate_argnums=0)(params)


def open_checkpoints(workdir: str, c: config_lib.TrainConfig, log):
  partial = checkpoints.partial_writes(workdir)
  if partial:
    log(f"removing {', '.join(partial)} in {checkpoints.checkpoints_dir(workdir)}: checkpoint writes "
        "that did not finish (the run was killed or the disk was full while saving)")
  checkpoints.quiet_background_save_errors()
  return checkpoints.manager(workdir, c.keep_checkpoints, keep_best=c.keep_best, cleanup=True)


def training_batches(c: config_lib.TrainConfig, architecture: str, data_layout: dict, seed: int):
  """An iterator over this process's rows of the mixture's training batches."""
  lengths = {"inputs": c.data.inputs_length, "targets": c.data.targets_length}
  dataset = input_pipeline.get_dataset(
      c.data.mixture, "train", lengths, seed=seed, shuffle=c.data.shuffle, pack=c.data.pack,
      architecture=architecture, shard_info=partitioning.shard_info(data_layout),
      use_cached=c.data.use_cached)
  return iter(dataset.batch(data_layout["batch"], drop_remainder=True).prefetch(2))


def next_batch(data_iter, shard: Shardings, c: config_lib.TrainConfig):
  try:
    batch = next(data_iter)
  except StopIteration:
    raise UserError(f"mixture {c.data.mixture!r} ran out of training examples") from None
  return partitioning.global_batch(shard.batch, {k: v.numpy() for k, v in batch.items()},
                                   c.data.batch_size)  # this process's rows -> global arrays


def log_resumed(resumed: checkpoints.Resumed, c: config_lib.TrainConfig, workdir: str, log) -> None:
  if resumed.step is None:
    return
  log(f"resumed from checkpoint at step {resumed.step}" + ("" if resumed.same_data else (
      f" (its data position is for another data sharding or batch size: the data stream "
      f"restarts with seed {c.seed + resumed.step})")))
  changed = config_lib.changes_since(os.path.join(workdir, checkpoints.CONFIG_FILE), c)
  if changed:  # e.g. a default that changed between t5mix versions
    log("note: the config differs from the one this workdir last ran with: " + "; ".join(changed))


def describe_run(c: config_lib.TrainConfig, workdir: str, init_from: str | None,
                 resumed: checkpoints.Resumed) -> dict:
  """run.json's content: what the run started from (--init-from; a resumed run keeps the one it
  began with) and its mixture's rate table, for `t5mix compare` and wandb's config."""
  previous = checkpoints.read_run_info(workdir)
  if resumed.step is not None and "init_from" in previous:
    started_from = previous["init_from"]
  else:
    started_from = os.path.abspath(init_from) if init_from else None
  provider = registry.get_task_or_mixture(c.data.mixture)
  spec = getattr(provider, "t5mix_spec", None)
  mixture = {"name": c.data.mixture, "rate": None, "temperature": None, "maximum": None}
  if isinstance(spec, mixing.MixtureSpec):
    mixture.update(rate=spec.rate, maximum=spec.maximum,
                   temperature=spec.temperature if spec.rate == "temperature" else None)
  mixture["tasks"] = {row.task: {"examples": row.examples, "capped": row.capped, "rate": row.rate}
                      for row in mixing.rate_table(provider)}
  return {"init_from": started_from, "mixture": mixture}


def write_run_files(c, model_config: T5Config, vocab: seqio.Vocabulary, run_info: dict,
                    workdir: str) -> None:
  """config.yaml, model.yaml, run.json (describe_run) and a copy of the SentencePiece model
  (spiece.model, HF's name): eval, predict, export-hf, compare and runs that start from this one
  find them there."""
  path = getattr(vocab, "sentencepiece_model_file", None)
  dest = os.path.join(workdir, vocab_lib.WORKDIR_VOCAB_FILE)
  if path is not None and os.path.realpath(path) != os.path.realpath(dest):
    shutil.copyfile(path, dest)
  config_lib.save(c, os.path.join(workdir, checkpoints.CONFIG_FILE))
  save_model_config(model_config, os.path.join(workdir, checkpoints.MODEL_FILE))
  checkpoints.write_run_info(workdir, run_info)


def log_start(c, model_config, mesh, plan, tasks, params, workdir: str, log) -> None:
  num_params = sum(x.size for x in jax.tree.leaves(params))
  log(f"training {model_config.architecture} ({num_params / 1e6:.2f}M parameters) on "
      f"{c.data.mixture!r} for {c.steps} steps, batch {c.data.batch_size} x "
      f"({c.data.inputs_length}+{c.data.targets_length}) tokens, {jax.device_count()} "
      f"{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es), mesh "
      f"{partitioning.describe(mesh)}; workdir {workdir}")
  if plan.describe():
    log(plan.describe())
  lengths = {"inputs": c.data.inputs_length, "targets": c.data.targets_length}
  for task in tasks:  # on each task's first examples (input_pipeline.TRUNCATION_COUNT_LIMIT)
    truncation = input_pipeline.count_truncation(task, "train", lengths)
    if truncation:
      log(truncation.describe())


class TrainSteps:
  """The jitted train step, one per stage (gradual unfreezing compiles one per stage:
  Plan.frozen_in), and the time of each first (compiling) call, which progress leaves out."""

  def __init__(self, graphdef, optimizer, c, num_tasks: int, plan, params, shard: Shardings):
    self.graphdef, self.optimizer, self.c, self.num_tasks = graphdef, optimizer, c, num_tasks
    self.plan, self.params, self.shard = plan, params, shard
    self.compiled = {}
    self.base_key = jax.jit(lambda: jax.random.key(c.seed), out_shardings=shard.replicated)()

  def run(self, stage: int, step: int, state, batches, progress: "Progress"):
    """One update; the first in a stage compiles its step and is timed apart, with its batch (the
    first one waits for the input pipeline)."""
    compiling = stage not in self.compiled
    if compiling:
      jax.block_until_ready(state)  # the steps before it end inside their own timing
      began = time.time()
      if step == self.plan.start_step(stage) > 0:  # gradual unfreezing's next stage
        progress.log_stage(stage)
      self.compiled[stage] = jax.jit(
          make_train_step(self.graphdef, self.optimizer, self.c, self.num_tasks,
                          self.plan.frozen_in(self.params, stage)),
          donate_argnums=(0,), in_shardings=(self.shard.state, self.shard.batch, self.shard.replicated),
          out_shardings=(self.shard.state, self.shard.replicated))
    state, metrics = self.compiled[stage](state, batches(), self.base_key)
    if compiling:
      progress.untimed(float(metrics["real_tokens"]), time.time() - began)  # waits for the step
    progress.add(metrics)
    return state


class Progress:
  """The run's metrics: pending step metrics fetched once per log period, the non-finite check,
  speed without compiling steps, per-task losses, examples and tokens, the logs (tracker) and the
  progress line."""

  def __init__(self, c, tasks, plan, workdir: str, resumed: checkpoints.Resumed,
               tracker: tracking.Tracker, quiet: bool, log):
    self.c, self.plan, self.workdir, self.quiet, self.log = c, plan, workdir, quiet, log
    self.tracker = tracker
    self.names = [t.name for t in tasks]
    # since step 0, across resumptions (what the resumed checkpoint saved)
    tokens = resumed.totals.get("tokens") or {}
    self.task_examples = np.zeros(len(self.names) + 1)
    self.task_tokens_seen = np.zeros(len(self.names) + 1)  # non-padding, inputs and targets
    for i, n in enumerate(self.names):
      self.task_examples[i + 1] = resumed.examples.get(n, 0)
      self.task_tokens_seen[i + 1] = tokens.get(n, 0)
    self.seconds_before = float(resumed.totals.get("seconds") or 0.0)  # of the earlier sessions
    self.pending, self.history = [], []
    self.tokens_per_step = c.data.batch_size * (c.data.inputs_length + c.data.targets_length)
    self.schedule = optim.learning_rate_schedule(c.optimizer, c.steps)  # for TensorBoard
    self._untimed = {"seconds": 0.0, "steps": 0, "tokens": 0.0}
    self._last = {"time": time.time(), "step": 0, "steps_per_s": None}
    self._started = time.time()

  def start(self, step: int) -> None:
    """The loop begins at `step`: speed and training time count from now."""
    self._started = time.time()
    self._last.update(time=self._started, step=step)

  def examples(self) -> dict[str, int]:
    return {n: int(self.task_examples[i + 1]) for i, n in enumerate(self.names)}

  def tokens_seen(self) -> dict[str, int]:
    return {n: int(self.task_tokens_seen[i + 1]) for i, n in enumerate(self.names)}

  def totals(self) -> dict:
    """Saved with each checkpoint: tokens seen per task, and the seconds the training loop has
    run (compiling and evaluation during training included) over all sessions of the run."""
    return {"tokens": self.tokens_seen(), "seconds": self.seconds_before + time.time() - self._started}

  def add(self, metrics) -> None:
    """A step's metrics, still on the device: fetched together at the next flush."""
    self.pending.append(metrics)

  def untimed(self, tokens: float, seconds: float) -> None:
    self._untimed["tokens"] += tokens
    self._untimed["seconds"] += seconds
    self._untimed["steps"] += 1

  def log_stage(self, stage: int) -> None:
    if not self.quiet:
      self.log(self.plan.describe_stage(stage))

  def flush(self, step: int) -> dict | None:
    """Fetches pending step metrics (one host sync per log period), logs, checks for NaN."""
    c, names = self.c, self.names
    fetched = jax.device_get(self.pending)
    self._check_finite(fetched, step)
    real_tokens = float(sum(m["real_tokens"] for m in fetched))  # skipped steps read them too
    fill = real_tokens / max(len(fetched) * self.tokens_per_step, 1)  # non-padding / row slots
    fetched = [m for m in fetched if np.isfinite(m["loss"])]  # skipped steps: not in the averages
    self.pending.clear()
    if not fetched:
      return None
    task_loss = sum(m["task_loss_sum"] for m in fetched)
    task_tokens = sum(m["task_tokens"] for m in fetched)
    for m in fetched:
      self.task_examples += m["task_examples"]
      self.task_tokens_seen += m["task_real_tokens"]
    steps_per_s, tokens_per_s, compile_s = self._speed(step, real_tokens)
    record = {"step": step,
              "loss": float(sum(m["loss_sum"] for m in fetched) / max(sum(m["tokens"] for m in fetched), 1)),
              "steps_per_s": steps_per_s, "tokens_per_s": tokens_per_s,  # non-padding tokens
              "fill": fill,
              # the rate of this step's update (optax counts updates from 0)
              "learning_rate": float(self.schedule((step - 1) // c.optimizer.grad_accum_steps)),
              "grad_norm": float(fetched[-1]["grad_norm"]),
              "task_loss": {n: float(task_loss[i + 1] / task_tokens[i + 1])
                            for i, n in enumerate(names) if task_tokens[i + 1] > 0},
              "task_examples": self.examples(), "tokens_seen": self.tokens_seen()}
    stage = self.plan.stage_at(step)  # gradual unfreezing
    if stage is not None:
      record["stage"] = stage
    self.history.append(record)
    self._write(record)
    if not self.quiet:
      self.log(self._line(record, compile_s))
    return record

  def _check_finite(self, fetched, step: int) -> None:
    allowed = self.c.optimizer.skip_nonfinite
    for i, m in enumerate(fetched):
      in_a_row = int(m.get("nonfinite_in_a_row", 0))  # optax.apply_if_finite's own count
      if np.isfinite(m["loss"]) and not in_a_row:
        continue
      bad = step - len(fetched) + i + 1
      task_hint = ", ".join(n for n, t in zip(self.names, m["task_tokens"][1:]) if t > 0)
      if 0 < in_a_row <= allowed:
        self.log(f"warning: non-finite gradients at step {bad} (batch had tasks: {task_hint}); "
                 f"update skipped ({in_a_row}/{allowed} in a row)")
        continue
      what = f"gradients at step {bad} ({in_a_row} in a row, optimizer.skip_nonfinite={allowed})" \
          if in_a_row else f"loss at step {bad}"
      raise UserError(f"non-finite {what} (batch had tasks: {task_hint}); "
                      f"stopped; the last good checkpoint is kept in {self.workdir}/checkpoints")

  def _speed(self, step: int, real_tokens: float):
    """(steps/s, tokens/s, compile seconds) since the last flush, without the steps that compiled
    (timed apart by TrainSteps): the compiled step's speed; None when only a compiling step ran."""
    last, untimed = self._last, self._untimed
    now, compile_s = time.time(), untimed["seconds"]
    timed_steps = step - last["step"] - untimed["steps"]
    elapsed = max(now - last["time"] - compile_s, 1e-9)
    steps_per_s = timed_steps / elapsed if timed_steps else None
    tokens_per_s = (real_tokens - untimed["tokens"]) / elapsed if timed_steps else None
    last.update(time=now, step=step, steps_per_s=steps_per_s or last["steps_per_s"])
    untimed.update(seconds=0.0, steps=0, tokens=0.0)
    return steps_per_s, tokens_per_s, compile_s

  def _write(self, record: dict) -> None:
    scalars = {"loss": record["loss"]}
    if record["steps_per_s"] is not None:
      scalars.update(steps_per_s=record["steps_per_s"], tokens_per_s=record["tokens_per_s"])
    scalars.update(learning_rate=record["learning_rate"],
                   padding_share=1 - record["fill"],  # of the batch's row slots
                   grad_norm=record["grad_norm"])
    if "stage" in record:
      scalars["finetune/stage"] = record["stage"]
    for key in ("task_loss", "task_examples", "tokens_seen"):
      scalars.update({f"{key}/{n}": v for n, v in record[key].items()})
    scalars["tokens_seen/all"] = sum(record["tokens_seen"].values())
    self.tracker.scalars(record["step"], scalars)

  def _line(self, record: dict, compile_s: float) -> str:
    steps_per_s, fill = record["steps_per_s"], record["fill"]
    if steps_per_s is None:
      speed = f"first step {compile_s:.1f} s (compiling)  {fill:.0%} non-padding"
    else:
      speed = (f"{steps_per_s:.2f} steps/s"
               + (f" ({compile_s:.1f} s compiling not counted)" if compile_s else "")
               + f"  {record['tokens_per_s']:,.0f} tok/s ({fill:.0%} non-padding)")
    rate = self._last["steps_per_s"]  # the latest measured; none yet after only a compiling step
    eta = f"  eta {_duration((self.c.steps - record['step']) / rate)}" if rate else ""
    per_task = " ".join(f"{n}={v:.2f}" for n, v in record["task_loss"].items())
    stage = f"  | stage {record['stage']}/{self.plan.num_stages}" if "stage" in record else ""
    return (f"step {record['step']:>6}/{self.c.steps}  loss {record['loss']:.4f}  {speed}{eta}  "
            f"| {per_task}{stage}")


def log_done(workdir: str, step: int, loss: float | None, examples: dict[str, int], log) -> dict:
  summary = {"step": step, "loss": loss, "task_examples": examples,
             "checkpoints": os.path.join(workdir, checkpoints.CHECKPOINTS_DIR)}
  ran = "no steps left to run" if loss is None else f"loss {loss}"
  log(f"done: step {step}, {ran}; examples seen per task: {examples}; checkpoints in "
      f"{summary['checkpoints']}, TensorBoard logs in {os.path.join(workdir, checkpoints.TENSORBOARD_DIR)}")
  return summary


def _round_up(n: int, multiple: int) -> int:
  return (n + multiple - 1) // multiple * multiple


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
