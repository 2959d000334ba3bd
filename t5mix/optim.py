"""The optimizer, built in one place: the learning-rate schedule, Adafactor or AdamW, clipping and
gradient accumulation, then the fine-tuning plan (t5mix/finetune.py) applied to it.

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

optax has every piece but `delayed` and `zero_until` (a group that starts at a given update, and
per-parameter gradient masking until then), which are written here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from t5mix import config as config_lib
from t5mix.finetune import Plan
from t5mix.model import param_path

FROZEN = "frozen"
TRAINABLE = "trainable"


def learning_rate_schedule(c: config_lib.OptimizerConfig, total_steps: int) -> optax.Schedule:
  warmup = max(c.warmup_steps, 1)
  if c.schedule == "constant":
    return optax.linear_schedule(0.0, c.learning_rate, warmup) if c.warmup_steps else (
        lambda step: c.learning_rate)
  if c.schedule == "rsqrt":  # T5: constant for `warmup` steps, then ∝ 1/sqrt(step)
    return lambda step: c.learning_rate * jnp.minimum(1.0, jnp.sqrt(warmup / jnp.maximum(step, 1)))
  return optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, warmup, max(total_steps, warmup + 1))


def base_optimizer(c: config_lib.OptimizerConfig, total_steps: int,
                   schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
  """Every parameter trains: the optimizer of `c` with its schedule, clipping and accumulation."""
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


def make_optimizer(c: config_lib.TrainConfig, plan: Plan) -> optax.GradientTransformation:
  """The run's optimizer: `base_optimizer` for what `plan` trains (exactly it when everything
  trains from the start, so plain runs and their checkpoints are unaffected), zero updates for the
  rest; with optimizer.skip_nonfinite, a non-finite update leaves params and state as they were."""
  opt = _planned(c, plan)
  if c.optimizer.skip_nonfinite:
    opt = optax.apply_if_finite(opt, c.optimizer.skip_nonfinite)
  return opt


def _label(fn, tree):
  return jax.tree_util.tree_map_with_path(lambda p, _: fn(param_path(p)), tree)


def _planned(c: config_lib.TrainConfig, plan: Plan) -> optax.GradientTransformation:
  o = c.optimizer
  if plan.strategy != "gradual_unfreezing" and plan.all_trainable_from_start:
    return base_optimizer(o, c.steps)
  label = lambda tree: _label(lambda p: FROZEN if plan.stage_of[p] is None else TRAINABLE, tree)  # noqa: E731
  if plan.strategy != "gradual_unfreezing":
    return optax.partition({TRAINABLE: base_optimizer(o, c.steps), FROZEN: optax.set_to_zero()}, label)

  accum = o.grad_accum_steps
  schedule = learning_rate_schedule(o, c.steps)
  bare = dataclasses.replace(o, clip_norm=0.0, grad_accum_steps=1)
  starts = {s: plan.start_step(s) // accum for s in range(1, plan.num_stages + 1)}  # in optimizer updates
  groups = {}
  for s, start in starts.items():
    shifted = (lambda start: lambda n: schedule(n + start))(start)  # the global schedule
    inner = base_optimizer(bare, c.steps, schedule=shifted)
    groups[f"stage_{s}"] = delayed(inner, start) if start else inner
  stage_label = lambda tree: _label(lambda p: f"stage_{plan.stage_of[p]}", tree)  # noqa: E731
  start_of = lambda p: starts[plan.stage_of[p]]  # noqa: E731
  chain = [zero_until(start_of)]
  if o.clip_norm:
    chain.append(optax.clip_by_global_norm(o.clip_norm))
  chain.append(optax.partition(groups, stage_label))
  opt = optax.chain(*chain)
  if accum > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=accum)
  return optax.partition({TRAINABLE: opt, FROZEN: optax.set_to_zero()}, label)


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
      start = start_of(param_path(keypath))
      return g if start == 0 else jnp.where(state.count >= start, g, jnp.zeros_like(g))

    updates = jax.tree_util.tree_map_with_path(mask, updates)
    return updates, ZeroUntilState(optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init, update)
