"""Feature-based transfer (`t5mix probe`): how much a frozen encoder already knows about a
classification task. Each example's encoder outputs are mean-pooled (predict.encode_split, the
features of `t5mix embed`), a linear classifier is fitted on the training split's features and
scored on the held-out split, beside the majority class. Run it on the imported model, on a random
encoder of the same shape (`random_init`: what pooling alone gives) and on a fine-tuned one.

scikit-learn does the fitting: logistic regression (L-BFGS) on standardised features.
"""

from __future__ import annotations

import collections
import json

import numpy as np
from flax import nnx
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from t5mix import checkpoints, evaluate, predict
from t5mix.errors import UserError
from t5mix.model import T5

MAX_LABELS = 100  # a --module task with more distinct targets than this is no classification task


def run_probe(workdir: str, task_name: str, *, train_split: str = "train",
              split: str = "validation", checkpoint: str | None = None, random_init: bool = False,
              max_train_examples: int | None = None, max_examples: int | None = None,
              inputs_length: int | None = None, regularization: float = 1.0, seed: int = 0,
              batch_size: int = evaluate.DEFAULT_BATCH_SIZE) -> dict:
  """Fits and scores the probe; returns its numbers (accuracy and majority ×100, as eval's)."""
  task = predict.get_task(task_name)
  kind = getattr(getattr(task, "t5mix_spec", None), "kind", None)  # None: a task from --module
  if kind not in (None, "classification"):
    raise UserError(f"task {task.name!r} is a {kind} task; probe needs a classification task "
                    "(a label to predict per example)")
  if random_init:
    if checkpoint is not None:
      raise UserError("--random-init and --checkpoint exclude each other: the random encoder has "
                      "no checkpoint")
    run = checkpoints.open_run(workdir)
    graphdef, params = nnx.split(T5(run.model_config, rngs=nnx.Rngs(seed)), nnx.Param)
    step = None
  else:
    run, graphdef, params, step = predict.load(workdir, checkpoint)
  predict.check_encoder(run, workdir, "probe")
  evaluate.check_vocabulary(task, run.model_config)
  if regularization <= 0:
    raise UserError(f"--C must be positive, got {regularization}")
  lengths = dict(run.lengths, **({"inputs": inputs_length} if inputs_length else {}))
  encode = lambda s, n: predict.encode_split(task, s, lengths, graphdef, params,  # noqa: E731
                                             max_examples=n, batch_size=batch_size)
  x_train, train_rows = encode(train_split, max_train_examples)
  y_train = [row["targets"] for row in train_rows]
  labels = collections.Counter(y_train)
  if len(labels) > MAX_LABELS:
    raise UserError(f"task {task.name!r}: its {train_split} split has {len(labels)} distinct "
                    f"targets in {len(y_train)} examples; probe needs a classification task "
                    f"(at most {MAX_LABELS} labels)")
  if len(labels) < 2:
    raise UserError(f"task {task.name!r}: every example of its {train_split} split has the target "
                    f"{y_train[0]!r}; a probe needs at least two labels")
  x_eval, eval_rows = encode(split, max_examples)
  y_eval = np.array([row["targets"] for row in eval_rows])
  classifier = make_pipeline(StandardScaler(), LogisticRegression(C=regularization, max_iter=2000))
  classifier.fit(x_train, y_train)
  majority = labels.most_common(1)[0][0]
  return {
      "task": task.name, "workdir": workdir,
      "encoder": "random" if random_init else f"checkpoint {step}", "step": step,
      "train_split": train_split, "split": split, "train_examples": len(y_train),
      "eval_examples": len(y_eval), "features": int(x_train.shape[1]),
      "inputs_length": lengths["inputs"], "C": regularization,
      "accuracy": 100 * float(np.mean(classifier.predict(x_eval) == y_eval)),
      "train_accuracy": 100 * float(classifier.score(x_train, y_train)),
      "majority_label": majority, "majority": 100 * float(np.mean(y_eval == majority)),
      "unseen_labels": sorted(set(y_eval) - set(labels)),
  }


def describe(result: dict) -> str:
  """The lines `t5mix probe` prints."""
  encoder = ("a random encoder of the run's shape" if result["step"] is None
             else f"checkpoint {result['step']}'s encoder")
  lines = [
      f"probe {result['task']}: logistic regression on {result['features']} mean-pooled features "
      f"of {encoder}, fitted on {result['train_examples']:,} {result['train_split']} examples "
      f"(train accuracy {result['train_accuracy']:.1f})",
      f"{result['split']} accuracy {result['accuracy']:.2f} on {result['eval_examples']:,} examples; "
      f"majority class ({result['majority_label']!r}) {result['majority']:.2f}"]
  if result["unseen_labels"]:
    lines.append(f"note: {result['split']} has labels the training examples lack (scored as wrong): "
                 f"{', '.join(map(repr, result['unseen_labels']))}")
  return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
  try:
    with open(path, "w") as f:
      json.dump(result, f, indent=2)
  except OSError as e:
    raise UserError(f"{path}: cannot write ({e.strerror})") from None
