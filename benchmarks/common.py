"""Shared by the benchmark scripts: a jitted t5mix train step over real pipeline batches."""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from t5mix import config as config_lib, definitions, input_pipeline  # noqa: E402
from t5mix.model import T5, load_model_config  # noqa: E402
from t5mix.optim import base_optimizer  # noqa: E402
from t5mix.train import TrainState, make_train_step  # noqa: E402


def pipeline(mixture: str, inputs_length: int, targets_length: int, batch: int, pack: bool,
             seed: int = 0):
  definitions.load()
  ds = input_pipeline.get_dataset(mixture, "train", {"inputs": inputs_length, "targets": targets_length},
                                  seed=seed, pack=pack)
  return ds.batch(batch, drop_remainder=True).prefetch(2)


def train_stepper(model_name: str, vocab_size: int, num_tasks: int):
  """Returns step(batch) running one jitted AdamW train step of model `model_name`."""
  c = dataclasses.replace(load_model_config(model_name), vocab_size=vocab_size, dropout_rate=0.0)
  graphdef, params = nnx.split(T5(c, rngs=nnx.Rngs(0)), nnx.Param)
  tc = config_lib.load(None, ["optimizer.name=adamw", "optimizer.learning_rate=1e-4",
                              "optimizer.parameter_scale=false"])
  optimizer = base_optimizer(tc.optimizer, 1000)
  box = [TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))]
  step_fn = jax.jit(make_train_step(graphdef, optimizer, tc, num_tasks), donate_argnums=(0,))
  key = jax.random.key(0)

  def step(batch):
    box[0], metrics = step_fn(box[0], batch, key)
    return metrics
  return step


def numpy_batch(batch) -> dict:
  return {k: np.asarray(v) for k, v in batch.items()}


def timed(fn, *args) -> tuple[float, object]:
  t = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  return time.perf_counter() - t, out


def produce_rates(datasets: dict, windows: int, batches: int) -> dict:
  """{name: (median examples/s, each window's, examples counted, the first batch)} of datasets of
  packed batches: `windows` windows of `batches` batches each, alternating between the datasets
  window by window (so that a change in the machine's load falls on all of them), after each one's
  first batch (which builds its pipeline). An example is a packed row's segment, counted where its
  decoder positions restart."""
  iterators = {name: ds.as_numpy_iterator() for name, ds in datasets.items()}
  firsts = {name: next(it) for name, it in iterators.items()}
  rates, examples = {name: [] for name in datasets}, dict.fromkeys(datasets, 0)
  for _ in range(windows):
    for name, it in iterators.items():
      window, t = 0, time.perf_counter()
      for _ in range(batches):
        b = next(it)
        window += int(((b["decoder_positions"] == 0) & (b["decoder_segment_ids"] > 0)).sum())
      rates[name].append(window / (time.perf_counter() - t))
      examples[name] += window
  return {name: (statistics.median(r), r, examples[name], firsts[name]) for name, r in rates.items()}
