"""Evaluation: decode a run's tasks on its checkpoints and score them with the tasks' metrics.

Read top to bottom: batched decoding → the evaluator (seqio.Evaluator per task) → `t5mix eval`
over checkpoints (results.json, with the table and plot of t5mix/eval_report.py) → the hook that
evaluates during training. The workdir and its checkpoints are t5mix/checkpoints.py's.

Scoring is seqio's: `seqio.Evaluator` builds each task's validation examples once (tokenized,
feature-converted, cached in memory) and postprocesses the gold targets once, on the first
checkpoint; every later checkpoint only decodes. Its `predict_fn` is ours: the jitted KV-cache
decoding of t5mix/decode.py (greedy, or beam search), fed fixed-shape batches so that it compiles
once; each task decodes with its definition's settings (beam size, length penalty, maximum
length) unless --beam-size overrides them. Decoded text goes through the task's postprocessor
(label word → label, NER string → entities, generated text → itself; an unreadable prediction
scores as wrong) and its metric functions (t5mix/metrics.py).

A task's score is the mean of its metrics, and the run's score is the mean of the task scores
(`metrics.glue_average`, T5's GLUE average); `t5mix eval` reports it for the best checkpoint of
each task and for the single best checkpoint. Beside them it reports what a constant answer scores
on each classification task (`Evaluator.baselines`), warns when a checkpoint answers one label for
every example, and counts the examples that `inputs_length`/`targets_length` cut
(`input_pipeline.count_truncation`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import seqio
from flax import nnx

from t5mix import checkpoints, decode, eval_report, input_pipeline, metrics, registry
from t5mix import config as config_lib
from t5mix import vocab as vocab_lib
from t5mix.errors import UserError, first_line
from t5mix.model import T5Config, with_dtype

DEFAULT_BATCH_SIZE = 64
DECODE_DTYPES = ("float32", "bfloat16")  # --decode-dtype

# ---------------------------------------------------------------------------------------------
# The model and its vocabulary.


def check_vocabulary(task: seqio.Task, model_config: T5Config) -> None:
  vocab = task.output_features["targets"].vocabulary
  vocab_lib.check_vocabulary(vocab)
  if vocab.vocab_size > model_config.vocab_size:
    raise UserError(f"task {task.name!r}: its vocabulary has {vocab.vocab_size} ids but the model "
                    f"has {model_config.vocab_size}; pass the run's --vocab")


# ---------------------------------------------------------------------------------------------
# Batched decoding.


class Decoder:
  """Decodes [N, L] encoder (or prompt) tokens in batches of a fixed size.

  Rows are decoded shortest first, each batch cut to the narrowest of a few widths (WIDTHS, then
  L) that holds its longest row: a dev set of short sentences padded to a long `inputs_length`
  would otherwise spend most of its encoder and cross-attention work on padding, and a batch of
  similar inputs tends to stop decoding together. Padding is masked, so the cut changes nothing
  but the cost; jit compiles once per width used.

  beam_size 1 is greedy decoding; more is beam search (t5x's length penalty: `alpha`). dtype
  (--decode-dtype): decode a copy of the model that computes in it and holds its weights in it
  (`model.with_dtype`); None: the model as it is.
  """

  WIDTHS = (32, 64, 128, 256)

  def __init__(self, graphdef, *, max_decode_len: int, beam_size: int = 1,
               alpha: float = decode.LENGTH_PENALTY, batch_size: int = DEFAULT_BATCH_SIZE,
               dtype: str | None = None):
    if beam_size < 1:
      raise UserError(f"--beam-size must be at least 1, got {beam_size}")
    if batch_size < 1:
      raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if dtype not in (None, *DECODE_DTYPES):
      raise UserError(f"--decode-dtype must be one of {', '.join(DECODE_DTYPES)}, got {dtype!r}")
    self.graphdef, self.max_decode_len = graphdef, max_decode_len
    self.beam_size, self.alpha, self.batch_size, self.dtype = beam_size, alpha, batch_size, dtype

  @property
  def description(self) -> str:
    weights = f", {self.dtype} weights" if self.dtype else ""
    if self.beam_size == 1:
      return f"greedy{weights}"
    penalty = f", length penalty {self.alpha:g}" if self.alpha != decode.LENGTH_PENALTY else ""
    return f"beam search ({self.beam_size} beams){penalty}{weights}"

  @property
  def settings(self) -> dict[str, Any]:
    """What results.json records of it."""
    dtype = {"dtype": self.dtype} if self.dtype else {}  # the model as trained: not recorded
    return {"beam_size": self.beam_size, "length_penalty": self.alpha,
            "max_decode_len": self.max_decode_len, **dtype}

  def __call__(self, params, inputs: np.ndarray) -> np.ndarray:
    model = nnx.merge(self.graphdef, params)
    if self.dtype:
      model = with_dtype(model, self.dtype)
    outputs = np.zeros((len(inputs), self.max_decode_len), np.int32)
    for rows, width in width_batches(inputs, self.batch_size, self.WIDTHS):
      chunk = pad_rows(inputs[rows, :width], self.batch_size)
      n = len(rows)
      if self.beam_size == 1:
        tokens = decode.greedy(model, chunk, max_decode_len=self.max_decode_len)
      else:
        tokens = decode.beam_search(model, chunk, max_decode_len=self.max_decode_len,
                                    beam_size=self.beam_size, alpha=self.alpha)
      outputs[rows] = np.asarray(jax.device_get(tokens))[:n]
    return outputs


def width_batches(tokens: np.ndarray, batch_size: int, widths=Decoder.WIDTHS):
  """(row indices, width) batches over [N, L] padded token rows: shortest row first, each batch
  cut to the narrowest of `widths` (then L) that holds its longest row."""
  full = tokens.shape[1]
  nonzero = tokens != 0
  lengths = np.where(nonzero.any(axis=1), full - np.argmax(nonzero[:, ::-1], axis=1), 1)
  order = np.argsort(lengths, kind="stable")
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    yield rows, min(next((w for w in widths if w >= lengths[rows].max()), full), full)


def pad_rows(chunk: np.ndarray, size: int) -> np.ndarray:
  """`chunk` filled up to `size` rows with copies of its first (a real row: in decoding it stops at
  EOS like that one does), so that the last batch has the shape the others compiled for."""
  if len(chunk) >= size:
    return chunk
  return np.concatenate([chunk, np.repeat(chunk[:1], size - len(chunk), axis=0)])


def tokenize_inputs(texts: Sequence[str], vocab: seqio.Vocabulary, length: int) -> np.ndarray:
  """[N, length] int32: each text's tokens, trimmed to length - 1, then EOS, then padding (as
  seqio's tokenize + append_eos_after_trim + feature converter make the encoder inputs)."""
  out = np.zeros((len(texts), length), np.int32)
  for i, text in enumerate(texts):
    ids = list(vocab.encode(text))[:length - 1] + [decode.EOS_ID]
    out[i, :len(ids)] = ids
  return out


def task_decoder(task: seqio.Task, graphdef, *, max_decode_len: int,
                 beam_size: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 dtype: str | None = None) -> Decoder:
  """The decoder of a task's own settings (its definition's beam_size, length_penalty and
  max_decode_length; else greedy, alpha 0.6, up to `max_decode_len` tokens); `beam_size`, when
  given (--beam-size), overrides the task's; `dtype` as Decoder's."""
  spec = getattr(task, "t5mix_spec", None)  # None: a plain seqio task, which has no settings
  own = {key: getattr(spec, key, None)
         for key in ("beam_size", "length_penalty", "max_decode_length")}
  if beam_size is None:
    beam_size = own["beam_size"] or 1
  alpha = decode.LENGTH_PENALTY if own["length_penalty"] is None else own["length_penalty"]
  return Decoder(graphdef, max_decode_len=own["max_decode_length"] or max_decode_len,
                 beam_size=beam_size, alpha=alpha, batch_size=batch_size, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The evaluator.


def eval_tasks(names: Sequence[str], split: str, *, explicit: bool,
               note: Callable[[str], None] = print) -> list[seqio.Task]:
  """The tasks (of the tasks/mixtures `names`) that have metrics and `split`.

  Named explicitly (--tasks), a task without them is an error; from the run's mixture, it is
  skipped with a note (span corruption has no metrics).
  """
  tasks: dict[str, seqio.Task] = {}
  for name in names:
    for task in input_pipeline.leaf_tasks(name):
      tasks.setdefault(task.name, task)
  chosen = []
  for task in tasks.values():
    if not task.metric_fns:
      problem = "has no metrics"
    elif split not in task.splits:
      problem = f"has no {split!r} split (it has {', '.join(task.splits)})"
    else:
      chosen.append(task)
      continue
    if explicit:
      raise UserError(f"task {task.name!r} {problem}; nothing to evaluate")
    note(f"skipping task {task.name}: it {problem}")
  if not chosen:
    raise UserError(f"{', '.join(names)}: no task has metrics and a {split!r} split")
  return chosen


def label_words(task: seqio.Task) -> dict[Any, str] | None:
  """{label: word} of a classification task (labels as its postprocessor makes them), else None."""
  spec = getattr(task, "t5mix_spec", None)
  if spec is None or spec.kind != "classification":
    return None
  return {task.postprocess_fn(word, is_target=True): word
          for word in dict.fromkeys(spec.label_map.values())}


class _Predictions(seqio.Logger):
  """Keeps the postprocessed predictions of the last evaluation and their decoded text, in the
  order of the task's examples (seqio hands them to loggers)."""

  def __init__(self, output_dir):
    super().__init__(output_dir)
    self.predictions: list = []
    self.outputs: list = []

  def __call__(self, task_name, step, metrics, dataset, inferences, targets):
    del task_name, step, metrics, dataset, targets
    self.predictions = list((inferences or {}).get("prediction", []))
    self.outputs = list((inferences or {}).get("output", []))


class Evaluator:
  """Scores parameters on tasks; built once, called per checkpoint (or every eval_every steps).

  One seqio.Evaluator per task holds the task's cached examples, model features and
  postprocessed targets; our predict_fn additionally keeps each task's stacked input tokens.
  `decoders` is one Decoder for every task, or {task name: Decoder} (`task_decoder`).
  After each call, `single_label` names the classification tasks whose predictions were all one
  label, with that label's word, and `signatures` holds each task's metric signatures
  (sacrebleu's, {metric: text}).
  """

  def __init__(self, tasks: Sequence[seqio.Task], decoders: Decoder | Mapping[str, Decoder], *,
               split: str = "validation", lengths: dict[str, int],
               max_examples: int | None = None):
    if max_examples is not None and max_examples < 1:
      raise UserError(f"--max-examples must be at least 1, got {max_examples}")
    self.decoders = {task.name: decoders if isinstance(decoders, Decoder) else decoders[task.name]
                     for task in tasks}
    self.split = split
    self.single_label: dict[str, str] = {}
    self.signatures: dict[str, dict[str, str]] = {}
    self._tasks = {task.name: task for task in tasks}
    self._inputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    self._evaluators: dict[str, seqio.Evaluator] = {}
    converter = seqio.EncDecFeatureConverter(pack=False)  # encoder_input_tokens = the inputs
    for task in tasks:
      try:
        evaluator = seqio.Evaluator(
            task.name, converter, eval_split=split, sequence_length=dict(lengths),
            num_examples=max_examples, shuffle=False, use_memory_cache=True,
            async_compute_metrics=False,
            # seqio wants a directory for its loggers; this one writes nothing
            logger_cls=[_Predictions], log_dir=os.devnull)
      except UserError:
        raise
      except (ValueError, KeyError) as e:
        raise UserError(f"task {task.name!r}: cannot build its {split!r} examples "
                        f"({first_line(e)})") from None
      if not evaluator.eval_tasks:
        raise UserError(f"task {task.name!r}: no metrics or no {split!r} split")
      count = int(evaluator.cached_task_datasets[task.name].cardinality())
      if count == 0:
        raise UserError(f"task {task.name!r}: split {split!r} has no examples")
      self._evaluators[task.name] = evaluator
    self.examples = {name: int(ev.cached_task_datasets[name].cardinality())
                     for name, ev in self._evaluators.items()}

  @property
  def task_names(self) -> list[str]:
    return list(self._evaluators)

  def _predict_fn(self, name: str, params):
    def predict_fn(dataset, model_feature_shapes=None):
      del model_feature_shapes
      if name not in self._inputs:  # the same examples for every checkpoint: stack them once
        indices, rows = [], []
        for index, features in dataset.as_numpy_iterator():
          indices.append(int(index))
          rows.append(features["encoder_input_tokens"])
        self._inputs[name] = (np.asarray(indices), np.stack(rows).astype(np.int32))
      indices, inputs = self._inputs[name]
      tokens = self.decoders[name](params, inputs)
      return [(int(i), row) for i, row in zip(indices, tokens)]
    return predict_fn

  def evaluate(self, params, step: int | None = None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} (T5 scale: ×100)."""
    results, self.single_label, self.signatures = {}, {}, {}
    for name, evaluator in self._evaluators.items():
      try:
        future, _ = evaluator.evaluate(compute_metrics=True, step=step,
                                       predict_fn=self._predict_fn(name, params))
        scores = future.result()[name]
      except ValueError as e:  # a gold target the postprocessor cannot read: a bug in the task
        raise UserError(f"task {name!r}: cannot score ({first_line(e.__cause__ or e)})") from None
      texts = {k: v for k, v in scores.items() if isinstance(v, seqio.metrics.Text)}
      results[name] = {k: float(getattr(v, "value", v)) for k, v in scores.items()
                       if k not in texts}
      if texts:
        self.signatures[name] = {k.removesuffix(metrics.SIGNATURE_SUFFIX): v.textdata
                                 for k, v in texts.items()}
      words = label_words(self._tasks[name])
      predicted = set(evaluator.loggers[0].predictions) if words else set()
      if len(predicted) == 1 and next(iter(predicted)) in words:
        self.single_label[name] = words[predicted.pop()]
    return results

  def samples(self, n: int) -> dict[str, list[dict[str, str]]]:
    """{task: the first n evaluated examples of the last evaluation, each {input, target,
    prediction} as text (the prediction decoded, before postprocessing)}."""
    def text(value) -> str:
      return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    samples = {}
    for name, evaluator in self._evaluators.items():
      examples = evaluator.cached_task_datasets[name].take(n).as_numpy_iterator()
      samples[name] = [{"input": text(ex["inputs_pretokenized"]),
                        "target": text(ex["targets_pretokenized"]), "prediction": text(output)}
                       for ex, output in zip(examples, evaluator.loggers[0].outputs)]
    return samples

  def baselines(self) -> dict[str, dict[str, dict]]:
    """{task: metrics.constant_baselines} of the classification tasks, on the evaluated examples:
    the majority class (the most frequent label of the task's train split, the label a model
    that learnt nothing but the label shares would answer) and the best constant label of this
    split (an upper bound for any constant answer). Labels given as words."""
    baselines = {}
    for name, evaluator in self._evaluators.items():
      task = self._tasks[name]
      words = label_words(task)
      if not words:
        continue
      targets = [task.postprocess_fn(ex["targets_pretokenized"], example=ex, is_target=True)
                 for ex in evaluator.cached_task_datasets[name].as_numpy_iterator()]
      majority = None
      if "train" in task.splits:
        counts = Counter(row["targets"] for row in registry.examples(task.t5mix_spec, "train"))
        majority = max(words, key=lambda label: counts[words[label]])  # ties: the first label
      scores = metrics.constant_baselines(task.predict_metric_fns, targets, list(words), majority)
      baselines[name] = {kind: {**b, "label": words[b["label"]]} for kind, b in scores.items()}
    return baselines


def single_label_warning(step: int, task: str, word: str) -> str:
  return f"warning: step {step}: every {task} prediction is {word!r} (a constant answer)"


# ---------------------------------------------------------------------------------------------
# `t5mix eval`: every chosen checkpoint, then the table, results.json and metrics.png.


@dataclasses.dataclass
class EvalOptions:
  checkpoints: str | None = None        # all | latest | N,M
  split: str = "validation"
  tasks: list[str] | None = None        # default: the run's mixture
  beam_size: int | None = None         # default: each task's own (greedy unless it names one)
  max_examples: int | None = None
  batch_size: int = DEFAULT_BATCH_SIZE
  inputs_length: int | None = None      # default: the run's data.inputs_length
  targets_length: int | None = None     # default: the run's data.targets_length (max decode length)
  decode_dtype: str | None = None       # decode a copy in this dtype (Decoder); default: as trained


def run_eval(workdir: str, options: EvalOptions, *, log: Callable[[str], None] = print) -> dict:
  """Evaluates checkpoints of `workdir`; writes eval/results.json and eval/metrics.png; returns
  the results (as in results.json)."""
  run = checkpoints.open_run(workdir)
  steps = checkpoints.choose_steps(workdir, options.checkpoints)
  if options.tasks:
    names, explicit = options.tasks, True
  elif run.config is not None:
    names, explicit = [run.config.data.mixture], False
  else:
    raise UserError(f"{workdir}: has no config.yaml naming a mixture; pass --tasks T1,T2")
  tasks = eval_tasks(names, options.split, explicit=explicit, note=log)
  for task in tasks:
    check_vocabulary(task, run.model_config)
  lengths = run.lengths
  if options.inputs_length:
    lengths["inputs"] = options.inputs_length
  if options.targets_length:
    lengths["targets"] = options.targets_length
  graphdef, abstract = checkpoints.abstract_model(run.model_config)
  # The decoding of tasks that name none; the others say theirs beside their name.
  default = Decoder(graphdef, max_decode_len=lengths["targets"],
                    beam_size=1 if options.beam_size is None else options.beam_size,
                    dtype=options.decode_dtype)
  decoders = {task.name: task_decoder(task, graphdef, max_decode_len=lengths["targets"],
                                      beam_size=options.beam_size, batch_size=options.batch_size,
                                      dtype=options.decode_dtype)
              for task in tasks}
  evaluator = Evaluator(tasks, decoders, split=options.split, lengths=lengths,
                        max_examples=options.max_examples)

  def described(name: str) -> str:
    own = [decoders[name].description] if decoders[name].description != default.description else []
    if decoders[name].max_decode_len != default.max_decode_len:
      own.append(f"up to {decoders[name].max_decode_len} tokens")
    return f"{name} ({', '.join([f'{evaluator.examples[name]} examples', *own])})"

  log(f"evaluating {', '.join(map(described, evaluator.examples))} "
      f"on {options.split!r}, {default.description}, at step(s) {', '.join(map(str, steps))}")
  truncation = {}
  for task in tasks:  # exactly the evaluated examples: the first evaluator.examples of the split
    counts = input_pipeline.count_truncation(task, options.split, lengths,
                                             limit=evaluator.examples[task.name])
    if counts:
      truncation[task.name] = counts
      log(counts.describe())

  by_step, skipped, single_label = {}, {}, {}
  for step in steps:
    try:
      params = checkpoints.restore_step_params(workdir, step, abstract)
    except UserError as e:
      log(f"skipping {e}")
      skipped[step] = str(e)
      continue
    start = time.time()
    by_step[step] = evaluator.evaluate(params, step)
    log(f"step {step}: average {metrics.glue_average(by_step[step]):.2f} "
        f"({time.time() - start:.1f} s)")
    single_label[step] = evaluator.single_label
    for name, word in evaluator.single_label.items():
      log(single_label_warning(step, name, word))
  if not by_step:
    raise UserError(f"{workdir}: none of the chosen checkpoints could be restored")

  results = eval_report.summarize(by_step)
  for step, labels in single_label.items():
    results["steps"][str(step)]["single_label"] = labels
  results.update(baselines=evaluator.baselines(),
                 truncation={name: dataclasses.asdict(t) for name, t in truncation.items()})
  results.update(workdir=os.path.abspath(workdir), split=options.split,
                 mixture=run.config.data.mixture if run.config else None,
                 decoding={"beam_size": default.beam_size, "max_decode_len": lengths["targets"],
                           "inputs_length": lengths["inputs"],
                           **({"dtype": options.decode_dtype} if options.decode_dtype else {})},
                 task_decoding={name: d.settings for name, d in decoders.items()},
                 signatures=evaluator.signatures,
                 examples=evaluator.examples,
                 skipped={str(k): v for k, v in skipped.items()})
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, "results.json")
  with open(json_path + ".tmp", "w") as f:
    json.dump(results, f, indent=2)
  os.replace(json_path + ".tmp", json_path)
  png_path = os.path.join(out_dir, "metrics.png")
  eval_report.plot(results, png_path)
  for line in eval_report.format_table(results):
    log(line)
  log(f"wrote {json_path} and {png_path}")
  return results


# ---------------------------------------------------------------------------------------------
# During training: every `eval_every` steps on the in-memory parameters.


class DuringTraining:
  """The train loop's evaluator: `hook(step, params)` scores the mixture's tasks (at most
  `eval_examples` validation examples each), logs eval/<task>/<metric>, eval/<task>/mean,
  eval/average and `eval_samples` examples per task (samples/<task>) through the tracker, prints
  one line, and returns the scores that keep_best ranks the step's checkpoint by."""

  def __init__(self, c: config_lib.TrainConfig, graphdef, tracker,
               log: Callable[[str], None] = print):
    self.tracker, self.log, self.evaluator = tracker, log, None
    self.sample_count, self.keep_best_metric = c.eval_samples, c.keep_best.metric
    if jax.process_count() > 1:  # our decoding feeds host arrays: one process holds every shard
      log("eval_every: evaluation during training needs a single-process run; skipped "
          "(run `t5mix eval` on the checkpoints instead)")
      return
    tasks = eval_tasks([c.data.mixture], "validation", explicit=False, note=log)
    lengths = {"inputs": c.data.inputs_length, "targets": c.data.targets_length}
    decoders = {task.name: task_decoder(task, graphdef, max_decode_len=c.data.targets_length)
                for task in tasks}
    self.evaluator = Evaluator(tasks, decoders, lengths=lengths, max_examples=c.eval_examples)
    metric = self.keep_best_metric
    task = metric.partition("/")[0] if metric not in (None, "average") else None
    if task is not None and task not in self.evaluator.task_names:
      raise UserError(f"config key 'keep_best.metric': {self.keep_best_metric!r} names task "
                      f"{task!r}, which is not evaluated; the evaluated tasks are "
                      f"{', '.join(self.evaluator.task_names)}")
    log(f"evaluating every {c.eval_every} steps on 'validation': "
        + ", ".join(f"{n} ({k} examples)" for n, k in self.evaluator.examples.items()))

  def __call__(self, step: int, params) -> dict[str, Any]:
    if self.evaluator is None:
      return {}
    start = time.time()
    results = self.evaluator.evaluate(params, step)
    average = metrics.glue_average(results)
    scores = checkpoints.scores(results)
    if self.keep_best_metric is not None and self.keep_best_metric not in scores:
      raise UserError(f"config key 'keep_best.metric': evaluation has no score "
                      f"{self.keep_best_metric!r}; it has {', '.join(sorted(scores))}")
    self.tracker.scalars(step, {f"eval/{name}": value for name, value in scores.items()})
    if self.sample_count:
      for task, rows in self.evaluator.samples(self.sample_count).items():
        self.tracker.samples(step, task, rows)
    parts = " | ".join(f"{t} " + " ".join(f"{m} {v:.1f}" for m, v in s.items())
                       for t, s in results.items())
    self.log(f"eval   {step:>6}  average {average:.2f}  ({time.time() - start:.1f} s)  | {parts}")
    for task, word in self.evaluator.single_label.items():
      self.log(single_label_warning(step, task, word))
    return {"step": step, "average": average, "metrics": results, "scores": scores}
