"""Metric functions and postprocessors in seqio's conventions.

Metric functions are called as `metric_fn(targets=..., predictions=...)` on postprocessed values
and return `{metric name: float}`. Following T5, every score is reported ×100 (accuracy 87.5
means 87.5 %; correlations 91.2 mean r = 0.912). BLEU and chrF also return their sacrebleu
signature (how they were computed) as `{NAME}_signature`, a seqio.metrics.Text, which is no score.
Generated text is scored by the libraries the field reports with: sacrebleu (BLEU, chrF) and
rouge-score (ROUGE).

Postprocessors are called as `postprocess_fn(output, example=None, is_target=False)` on decoded
text, once for each target and each prediction. A prediction that cannot be read becomes -1
(classification), NaN (regression) or no entities (NER), so it scores as wrong and never crashes
a metric. A target that cannot be read is a bug in the task, and raises ValueError.
"""

import json
import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import sacrebleu
import scipy.stats
import seqio
from rouge_score import rouge_scorer
from sklearn import metrics as sk

from t5mix import ner

INVALID_LABEL = -1  # what label_postprocessor gives for a prediction that is no label word


def _text(value) -> str:
  """Decoded text of a postprocessor input (seqio may hand over bytes)."""
  if value is None:
    return ""
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return str(value)


def _check_lengths(targets, predictions) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  if not len(targets):
    raise ValueError("no examples to score")


# --- postprocessors ---------------------------------------------------------------------------


def label_postprocessor(label_words: Sequence[str]) -> Callable[..., int]:
  """A postprocessor mapping a label word (exact match after strip) to its index in `label_words`.

  Unknown predictions give INVALID_LABEL (-1); unknown targets raise ValueError.
  """
  index = {word: i for i, word in enumerate(label_words)}
  if len(index) != len(label_words):
    raise ValueError(f"label words are not unique: {list(label_words)}")

  def postprocess(output, example=None, is_target=False) -> int:
    del example  # unused; part of seqio's signature
    label = index.get(_text(output).strip(), INVALID_LABEL)
    if is_target and label == INVALID_LABEL:
      raise ValueError(f"target {_text(output)!r} is not one of the label words {list(index)}")
    return label

  return postprocess


def float_postprocessor(output, example=None, is_target=False) -> float:
  """The number in a regression output (e.g. STS-B's "3.8"); NaN if it is not a finite number."""
  del example  # unused; part of seqio's signature
  try:
    value = float(_text(output).strip())
  except ValueError:
    value = math.nan
  if not math.isfinite(value):
    if is_target:
      raise ValueError(f"target {_text(output)!r} is not a finite number")
    value = math.nan
  return value


def squad_postprocessor(output, example=None, is_target=False) -> str | list[str]:
  """Targets: all gold answers, from `example["answers"]`. Predictions: the decoded text.

  `answers` is either a sequence of str/bytes (as in TFDS's squad) or one string holding a JSON
  list of strings (as t5mix.registry stores it: a tf.string feature is one string per example).
  Any other single string is taken as the only answer.
  """
  if not is_target:
    return _text(output)
  if example is None or "answers" not in example:
    raise ValueError("squad_postprocessor needs the example's 'answers' feature for targets")
  answers = example["answers"]
  if isinstance(answers, (str, bytes)):
    answers = _json_string_list(_text(answers)) or [answers]
  return [_text(answer) for answer in answers]


def references_postprocessor(output, example=None, is_target=False) -> str | list[str]:
  """Generation tasks. Targets: every reference text, from `example["references"]` (a JSON list
  of strings, as t5mix.registry stores it). Predictions: the decoded text."""
  if not is_target:
    return _text(output)
  if example is None or "references" not in example:
    raise ValueError("references_postprocessor needs the example's 'references' feature")
  references = _json_string_list(_text(example["references"]))
  if references is None:
    raise ValueError(f"references {_text(example['references'])[:80]!r} are not a JSON list of "
                     "strings")
  return references


def _json_string_list(text: str) -> list[str] | None:
  """The list if `text` is a JSON list of strings, else None."""
  try:
    value = json.loads(text)
  except ValueError:
    return None
  if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
    return value
  return None


def ner_postprocessor(output, example=None, is_target=False) -> list[tuple[str, str]]:
  """(type, text) entities of an NER target string (see t5mix.ner); [] for unparseable outputs."""
  del example  # unused; part of seqio's signature
  entities = ner.parse_entities(_text(output))
  if entities is None:
    if is_target:
      raise ValueError(f"NER target {_text(output)!r} does not fit the entity format")
    return []
  return entities


# --- classification and regression -----------------------------------------------------------


def _labels(predictions) -> list:
  """Predictions with None (no parse) replaced by INVALID_LABEL, which matches no target."""
  return [INVALID_LABEL if p is None else p for p in predictions]


def accuracy(targets, predictions) -> dict[str, float]:
  """{"accuracy": % of predictions equal to their target}."""
  _check_lengths(targets, predictions)
  return {"accuracy": 100 * float(sk.accuracy_score(targets, _labels(predictions)))}


def f1_binary(targets, predictions, positive=1) -> dict[str, float]:
  """{"f1": F1 of the `positive` label}; use functools.partial to choose another positive label."""
  _check_lengths(targets, predictions)
  # Compare as positive / not positive, so invalid predictions (-1) are simply "not positive"
  # rather than a third class sklearn's binary mode would refuse.
  gold = np.asarray([t == positive for t in targets])
  pred = np.asarray([p == positive for p in _labels(predictions)])
  return {"f1": 100 * float(sk.f1_score(gold, pred, zero_division=0))}


def f1_macro(targets, predictions, labels=None) -> dict[str, float]:
  """{"f1_macro": unweighted mean of per-label F1}.

  Labels default to those seen in targets or valid predictions; invalid predictions (-1) are not a
  label of their own, they only cost recall. Pass `labels` (via functools.partial) to fix the set.
  """
  _check_lengths(targets, predictions)
  predictions = _labels(predictions)
  if labels is None:
    labels = sorted(set(targets) | (set(predictions) - {INVALID_LABEL}))
  score = sk.f1_score(targets, predictions, labels=labels, average="macro", zero_division=0)
  return {"f1_macro": 100 * float(score)}


def matthews_corrcoef(targets, predictions) -> dict[str, float]:
  """{"mcc": Matthews correlation}; invalid predictions form an extra, always-wrong class (as T5)."""
  _check_lengths(targets, predictions)
  with warnings.catch_warnings():  # sklearn warns when MCC is undefined; it then returns 0
    warnings.simplefilter("ignore")
    return {"mcc": 100 * float(sk.matthews_corrcoef(targets, _labels(predictions)))}


def pearson_spearman(targets, predictions, invalid_value=-1.0) -> dict[str, float]:
  """{"pearson", "spearman"} correlations of regression outputs.

  Unparseable predictions (None or NaN) are replaced by `invalid_value`, -1 by default as in T5
  (outside STS-B's 0-5 range, so it counts against the model). An undefined correlation (fewer
  than two examples, or constant targets or predictions) is reported as 0, like sklearn's MCC.
  """
  _check_lengths(targets, predictions)
  gold = np.asarray(targets, dtype=float)
  pred = np.asarray([math.nan if p is None else p for p in predictions], dtype=float)
  pred[np.isnan(pred)] = invalid_value

  def correlation(fn) -> float:
    if len(gold) < 2 or np.all(gold == gold[0]) or np.all(pred == pred[0]):
      return 0.0
    return 100 * float(fn(gold, pred).statistic)

  return {"pearson": correlation(scipy.stats.pearsonr),
          "spearman": correlation(scipy.stats.spearmanr)}


def constant_baselines(metric_fns: Sequence[Callable], targets, labels: Sequence,
                       majority=None) -> dict[str, dict]:
  """The scores of answering one label for every example: what a model must beat.

  {"majority_class": `majority` (the caller's most frequent label, e.g. of the train split;
  only if given), "best_constant": the label of `labels` whose mean metric on `targets` is
  highest (the first of them on ties)}, each {"label", "metrics", "mean"}.
  """
  def constant(label):
    scores = {}
    for fn in metric_fns:
      scores.update(fn(targets=targets, predictions=[label] * len(targets)))
    return {"label": label, "metrics": scores, "mean": float(np.mean(list(scores.values())))}

  by_label = {label: constant(label) for label in labels}
  baselines = {}
  if majority is not None:
    baselines["majority_class"] = by_label.get(majority) or constant(majority)
  baselines["best_constant"] = max(by_label.values(), key=lambda b: b["mean"])
  return baselines


# --- SQuAD ------------------------------------------------------------------------------------
# Written by hand: the official SQuAD v1.1 evaluation script (evaluate-v1.1.py) is not packaged.
# These three functions follow it exactly, including its quirks (an empty prediction against an
# answer that normalises to "" gets EM 1 but F1 0).

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
  """Lowercase, drop ASCII punctuation and the articles a/an/the, collapse whitespace."""
  text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def _exact_match(prediction: str, gold: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(gold))


def _token_f1(prediction: str, gold: str) -> float:
  predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
  same = sum((Counter(predicted) & Counter(expected)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(predicted), same / len(expected)
  return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
  """{"em", "f1"}: SQuAD v1.1 exact match and token F1, each the max over an example's gold answers."""
  _check_lengths(targets, predictions)
  em = f1 = 0.0
  for i, (golds, prediction) in enumerate(zip(targets, predictions)):
    if not len(golds):
      raise ValueError(f"SQuAD example {i} has no gold answers")
    prediction = _text(prediction)
    em += max(_exact_match(prediction, _text(gold)) for gold in golds)
    f1 += max(_token_f1(prediction, _text(gold)) for gold in golds)
  return {"em": 100 * em / len(targets), "f1": 100 * f1 / len(targets)}


# --- NER --------------------------------------------------------------------------------------


def span_f1(targets, predictions) -> dict[str, float]:
  """{"precision", "recall", "f1"}: entity-level micro scores over (type, text) entities.

  An entity is correct when type and text match exactly; repeated entities count as often as
  they occur (multiset intersection per example). With no entities at all, every score is 0
  (as seqeval). Hand-written because the entities are strings, not tag positions, so seqeval
  does not apply; the tests check that both agree when entity texts are unique in a sentence.
  """
  _check_lengths(targets, predictions)
  correct = gold_total = predicted_total = 0
  for gold, predicted in zip(targets, predictions):
    gold = Counter(map(tuple, gold))
    predicted = Counter(map(tuple, predicted or []))
    correct += sum((gold & predicted).values())
    gold_total += sum(gold.values())
    predicted_total += sum(predicted.values())
  precision = correct / predicted_total if predicted_total else 0.0
  recall = correct / gold_total if gold_total else 0.0
  f1 = 2 * precision * recall / (precision + recall) if correct else 0.0
  return {"precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1}


# --- generated text ---------------------------------------------------------------------------
# Targets are each example's references (a list of texts, or one text); predictions are texts.

SIGNATURE_SUFFIX = "_signature"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeLsum")
# Stemming as in the T5 paper's and the ROUGE-1.5.5 script's usual setting. rougeLsum reads each
# line of a text as a sentence (rouge-score's convention); a text without newlines is one sentence.
_ROUGE = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def _references(targets) -> list[list[str]]:
  """Each example's references as a list of texts (a lone text is one reference)."""
  return [[_text(refs)] if isinstance(refs, (str, bytes)) else [_text(r) for r in refs]
          for refs in targets]


def _reference_streams(targets) -> list[list[str | None]]:
  """sacrebleu's layout: one stream per reference position, each as long as the corpus; None
  where an example has fewer references (sacrebleu skips it)."""
  references = _references(targets)
  width = max(len(r) for r in references)
  return [[r[i] if i < len(r) else None for r in references] for i in range(width)]


def _sacrebleu(metric, name: str, targets, predictions) -> dict:
  _check_lengths(targets, predictions)
  score = metric.corpus_score([_text(p) for p in predictions], _reference_streams(targets))
  return {name: float(score.score),
          name + SIGNATURE_SUFFIX: seqio.metrics.Text(textdata=str(metric.get_signature()))}


def bleu(targets, predictions) -> dict:
  """{"bleu": corpus BLEU, "bleu_signature"}: sacrebleu with its defaults (13a tokenisation,
  mixed case, exponential smoothing), against every reference of each example."""
  return _sacrebleu(sacrebleu.metrics.BLEU(), "bleu", targets, predictions)


def chrf(targets, predictions) -> dict:
  """{"chrf": corpus chrF, "chrf_signature"}: sacrebleu's chrF2 with its defaults (character
  6-grams, no word n-grams)."""
  return _sacrebleu(sacrebleu.metrics.CHRF(), "chrf", targets, predictions)


def rouge(targets, predictions) -> dict[str, float]:
  """{"rouge1", "rouge2", "rougeLsum"}: rouge-score's F-measures with stemming, each example
  against its best-matching reference, averaged over examples."""
  _check_lengths(targets, predictions)
  per_example = [_ROUGE.score_multi(references, _text(prediction))
                 for references, prediction in zip(_references(targets), predictions)]
  return {name: 100 * float(np.mean([scores[name].fmeasure for scores in per_example]))
          for name in ROUGE_TYPES}


def exact_match(targets, predictions) -> dict[str, float]:
  """{"exact_match": % of predictions equal to one of their references}, whitespace at either end
  aside (decoding does not reproduce it)."""
  _check_lengths(targets, predictions)
  hits = [_text(p).strip() in {r.strip() for r in references}
          for references, p in zip(_references(targets), predictions)]
  return {"exact_match": 100 * float(np.mean(hits))}


# --- benchmark average ------------------------------------------------------------------------


def task_mean(scores: Mapping[str, float]) -> float:
  """A task's score: the mean of its metrics (T5 averages a multi-metric task first)."""
  return float(np.mean(list(scores.values())))


def glue_average(results: Mapping[str, Mapping[str, float]]) -> float:
  """Mean over tasks of each task's mean metric (T5's GLUE score: multi-metric tasks averaged first)."""
  if not results:
    raise ValueError("no task results to average")
  for task, scores in results.items():
    if not scores:
      raise ValueError(f"task {task!r} has no metrics to average")
  return float(np.mean([task_mean(scores) for scores in results.values()]))
