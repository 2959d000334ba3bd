"""Tests for t5mix.metrics against hand-computed values and reference implementations."""

import functools
import math
import random
import warnings

import numpy as np
import pytest
import scipy.stats
from seqeval import metrics as seqeval_metrics
from sklearn import metrics as sk

from t5mix import metrics
from t5mix.ner import format_entities, parse_entities, tags_to_spans

# --- postprocessors ---------------------------------------------------------------------------


def test_label_postprocessor():
  postprocess = metrics.label_postprocessor(["not_entailment", "entailment"])
  assert postprocess("entailment") == 1
  assert postprocess("  not_entailment\n") == 0
  assert postprocess(b"entailment", example={}, is_target=True) == 1
  assert postprocess("Entailment") == -1  # exact match only
  assert postprocess("entailment entailment") == -1
  assert postprocess("") == -1
  with pytest.raises(ValueError, match="not one of the label words"):
    postprocess("maybe", is_target=True)
  with pytest.raises(ValueError, match="not unique"):
    metrics.label_postprocessor(["yes", "yes"])


def test_float_postprocessor():
  assert metrics.float_postprocessor("3.8") == 3.8
  assert metrics.float_postprocessor(b" 2 ") == 2.0
  for garbage in ["", "three", "3.8.1", "nan", "inf"]:
    assert math.isnan(metrics.float_postprocessor(garbage))
  with pytest.raises(ValueError, match="not a finite number"):
    metrics.float_postprocessor("three", is_target=True)


def test_squad_postprocessor():
  example = {"answers": np.array([b"Denver Broncos", "Broncos".encode()], dtype=object)}
  assert metrics.squad_postprocessor("ignored", example=example, is_target=True) == [
      "Denver Broncos", "Broncos"]
  assert metrics.squad_postprocessor("x", example={"answers": "only one"}, is_target=True) == [
      "only one"]
  assert metrics.squad_postprocessor(b"Broncos", example=example) == "Broncos"
  # t5mix.registry stores the answers as one JSON string.
  stored = {"answers": '["Denver Broncos", "Broncos"]'.encode()}
  assert metrics.squad_postprocessor("x", example=stored, is_target=True) == [
      "Denver Broncos", "Broncos"]
  for single in ["1984", '"quoted"', "[1, 2]", "[]", "[oops"]:  # not a JSON list of strings
    assert metrics.squad_postprocessor("x", example={"answers": single}, is_target=True) == [
        single]
  with pytest.raises(ValueError, match="answers"):
    metrics.squad_postprocessor("x", example=None, is_target=True)


def test_ner_postprocessor():
  assert metrics.ner_postprocessor("PER: John; LOC: Paris") == [("PER", "John"), ("LOC", "Paris")]
  assert metrics.ner_postprocessor("none", is_target=True) == []
  assert metrics.ner_postprocessor("complete garbage") == []
  with pytest.raises(ValueError, match="does not fit"):
    metrics.ner_postprocessor("complete garbage", is_target=True)


# --- classification ---------------------------------------------------------------------------


def random_labels(seed, n=200, classes=3, invalid=False):
  rng = random.Random(seed)
  targets = [rng.randrange(classes) for _ in range(n)]
  predictions = [rng.randrange(-1 if invalid else 0, classes) for _ in range(n)]
  return targets, predictions


def test_classification_hand_computed():
  targets = [1, 1, 1, 0, 0]
  predictions = [1, 0, -1, 1, 0]  # TP=1, FN=2 (one unparseable), FP=1, TN=1
  assert metrics.accuracy(targets, predictions) == {"accuracy": 40.0}
  assert metrics.f1_binary(targets, predictions) == pytest.approx({"f1": 40.0})  # P 1/2, R 1/3
  # Positive class 0: TP=1, FP=1 (the 0 predicted for a 1), FN=1 -> F1 0.5.
  f1_of_zero = functools.partial(metrics.f1_binary, positive=0)
  assert f1_of_zero(targets, predictions) == pytest.approx({"f1": 50.0})
  # Macro over labels {0, 1}: mean(0.5, 0.4).
  assert metrics.f1_macro(targets, predictions) == pytest.approx({"f1_macro": 45.0})


def test_unparseable_predictions_count_as_wrong():
  targets = [0, 1, 1]
  for bad in (-1, None):
    predictions = [0, 1, bad]
    assert metrics.accuracy(targets, predictions)["accuracy"] == pytest.approx(200 / 3)
    assert metrics.f1_binary(targets, predictions)["f1"] == pytest.approx(200 / 3)  # P 1, R 1/2
    assert metrics.matthews_corrcoef(targets, predictions)["mcc"] < 100
  assert metrics.accuracy([0, 1], [None, None]) == {"accuracy": 0.0}
  assert metrics.f1_binary([0, 1], [-1, -1]) == {"f1": 0.0}
  assert metrics.f1_macro([0, 1], [-1, -1]) == {"f1_macro": 0.0}
  assert metrics.matthews_corrcoef([0, 1], [-1, -1]) == {"mcc": 0.0}


@pytest.mark.parametrize("seed", range(5))
def test_classification_matches_sklearn(seed):
  targets, predictions = random_labels(seed, classes=2)
  assert metrics.accuracy(targets, predictions)["accuracy"] == pytest.approx(
      100 * sk.accuracy_score(targets, predictions))
  assert metrics.f1_binary(targets, predictions)["f1"] == pytest.approx(
      100 * sk.f1_score(targets, predictions))
  assert metrics.matthews_corrcoef(targets, predictions)["mcc"] == pytest.approx(
      100 * sk.matthews_corrcoef(targets, predictions))
  targets, predictions = random_labels(seed, classes=3)
  assert metrics.f1_macro(targets, predictions)["f1_macro"] == pytest.approx(
      100 * sk.f1_score(targets, predictions, average="macro"))


@pytest.mark.parametrize("seed", range(5))
def test_invalid_predictions_match_sklearn_with_fixed_labels(seed):
  targets, predictions = random_labels(seed, classes=3, invalid=True)
  assert -1 in predictions
  assert metrics.f1_macro(targets, predictions)["f1_macro"] == pytest.approx(
      100 * sk.f1_score(targets, predictions, labels=[0, 1, 2], average="macro"))
  assert metrics.accuracy(targets, predictions)["accuracy"] == pytest.approx(
      100 * np.mean(np.array(targets) == np.array(predictions)))


def test_f1_macro_fixed_labels():
  # A label nobody predicted or needed still counts (as 0) when it is named explicitly.
  three_way = functools.partial(metrics.f1_macro, labels=[0, 1, 2])
  assert three_way([0, 1], [0, 1]) == pytest.approx({"f1_macro": 200 / 3})
  assert metrics.f1_macro([0, 1], [0, 1]) == {"f1_macro": 100.0}


def test_mcc_hand_computed_and_undefined():
  # TP=2, TN=1, FP=1, FN=0: (2*1 - 1*0) / sqrt(3 * 2 * 1 * 2) = 2 / sqrt(12).
  assert metrics.matthews_corrcoef([1, 1, 0, 0], [1, 1, 1, 0])["mcc"] == pytest.approx(
      100 * 2 / math.sqrt(12))
  assert metrics.matthews_corrcoef([1, 1, 1], [1, 1, 1]) == {"mcc": 0.0}  # undefined -> 0


# --- regression -------------------------------------------------------------------------------


def test_pearson_spearman_matches_scipy():
  rng = np.random.default_rng(0)
  targets = rng.uniform(0, 5, 50)
  predictions = targets + rng.normal(0, 1, 50)
  scores = metrics.pearson_spearman(list(targets), list(predictions))
  assert scores["pearson"] == pytest.approx(100 * scipy.stats.pearsonr(targets, predictions)[0])
  assert scores["spearman"] == pytest.approx(100 * scipy.stats.spearmanr(targets, predictions)[0])


def test_pearson_spearman_substitutes_unparseable_predictions():
  targets = [0.0, 1.0, 2.0, 3.0, 4.0]
  predictions = [0.2, math.nan, 2.1, None, 3.9]
  substituted = [0.2, -1.0, 2.1, -1.0, 3.9]
  scores = metrics.pearson_spearman(targets, predictions)
  assert scores["pearson"] == pytest.approx(100 * scipy.stats.pearsonr(targets, substituted)[0])
  assert scores["spearman"] == pytest.approx(
      100 * scipy.stats.spearmanr(targets, substituted)[0])
  assert scores["pearson"] < metrics.pearson_spearman(targets, [0.2, 1.0, 2.1, 3.0, 3.9])["pearson"]


def test_pearson_spearman_undefined_is_zero():
  assert metrics.pearson_spearman([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == {"pearson": 0.0,
                                                                         "spearman": 0.0}
  assert metrics.pearson_spearman([1.0, 2.0], [None, math.nan]) == {"pearson": 0.0,
                                                                     "spearman": 0.0}
  assert metrics.pearson_spearman([1.0], [1.0]) == {"pearson": 0.0, "spearman": 0.0}


# --- SQuAD ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, normalized", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   apple,\ta pear ", "apple pear"),
    ("another theory", "another theory"),  # articles only as whole words
    ("O'Neil's", "oneils"),  # punctuation is removed, not replaced by a space
    ("the", ""),
    ("Élan", "élan"),
])
def test_normalize_answer(text, normalized):
  assert metrics.normalize_answer(text) == normalized


@pytest.mark.parametrize("golds, prediction, em, f1", [
    (["Denver Broncos"], "Denver Broncos", 100.0, 100.0),
    (["Denver Broncos"], "the denver broncos.", 100.0, 100.0),
    (["Denver Broncos"], "Broncos", 0.0, 100 * 2 / 3),  # P 1, R 1/2
    (["Broncos"], "Denver Broncos", 0.0, 100 * 2 / 3),  # P 1/2, R 1
    (["Denver Broncos", "Broncos", "the Broncos"], "Broncos", 100.0, 100.0),  # max over golds
    (["Carolina Panthers", "Denver Broncos"], "Denver", 0.0, 100 * 2 / 3),
    (["Denver Broncos"], "", 0.0, 0.0),
    (["Denver Broncos"], None, 0.0, 0.0),
    (["The"], "", 100.0, 0.0),  # official v1.1 quirk: both normalise to "", but F1 needs a token
    (["Saint Bernadette Soubirous"], "Bernadette", 0.0, 50.0),
    (["a b a"], "a a b b", 0.0, 100 * 2 / 3),  # articles go: "b" against "b b"
    (["x y x"], "x x y y", 0.0, 100 * 6 / 7),  # token multisets: common 3, P 3/4, R 3/3
])
def test_squad_single_example(golds, prediction, em, f1):
  assert metrics.squad([golds], [prediction]) == pytest.approx({"em": em, "f1": f1})


def test_squad_averages_examples():
  targets = [["Denver Broncos"], ["Santa Clara"], ["1"]]
  predictions = ["Denver Broncos", "Clara", "two"]
  assert metrics.squad(targets, predictions) == pytest.approx(
      {"em": 100 / 3, "f1": (100 + 100 * 2 / 3 + 0) / 3})


def test_squad_rejects_example_without_answers():
  with pytest.raises(ValueError, match="no gold answers"):
    metrics.squad([[]], ["x"])


# --- NER span F1 ------------------------------------------------------------------------------


def test_span_f1_counts_multiplicities():
  targets = [[("PER", "a"), ("PER", "a"), ("LOC", "b")], []]
  predictions = [[("PER", "a"), ("LOC", "c")], [("PER", "a")]]
  # correct 1 (one PER a), predicted 3, gold 3.
  assert metrics.span_f1(targets, predictions) == pytest.approx(
      {"precision": 100 / 3, "recall": 100 / 3, "f1": 100 / 3})
  assert metrics.span_f1([[("PER", "a")] * 2], [[("PER", "a")] * 3]) == pytest.approx(
      {"precision": 200 / 3, "recall": 100.0, "f1": 80.0})


def test_span_f1_type_must_match_and_empty_cases():
  assert metrics.span_f1([[("PER", "Paris")]], [[("LOC", "Paris")]])["f1"] == 0.0
  assert metrics.span_f1([[]], [[]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
  assert metrics.span_f1([[("PER", "a")]], [None]) == {"precision": 0.0, "recall": 0.0,
                                                        "f1": 0.0}
  # Lists (e.g. after a JSON round trip) work as well as tuples.
  assert metrics.span_f1([[["PER", "a"]]], [[("PER", "a")]])["f1"] == 100.0


def random_iob2(rng, length, types=("PER", "LOC", "ORG")):
  tags = []
  for _ in range(length):
    choice = rng.random()
    if choice < 0.5:
      tags.append("O")
    elif choice < 0.8 or tags[-1:] in ([], ["O"]):
      tags.append("B-" + rng.choice(types))
    else:
      tags.append("I-" + tags[-1][2:])
  return tags


def repair_iob2(tags):
  """`tags` with each I-X that does not continue an X entity turned into B-X."""
  repaired = []
  for tag in tags:
    if tag.startswith("I-") and (not repaired or repaired[-1][2:] != tag[2:]):
      tag = "B-" + tag[2:]
    repaired.append(tag)
  return repaired


def as_entities(tokens, tags):
  """tags -> spans -> target string -> parsed entities, as the pipeline does."""
  return parse_entities(format_entities(tokens, tags_to_spans(tags, "iob2")))


@pytest.mark.parametrize("seed", range(20))
def test_span_f1_matches_seqeval(seed):
  rng = random.Random(seed)
  gold_tags, predicted_tags, targets, predictions = [], [], [], []
  for _ in range(rng.randrange(1, 15)):
    length = rng.randrange(0, 12)
    tokens = [f"w{i}" for i in range(length)]  # unique tokens -> unique entity texts
    gold, predicted = random_iob2(rng, length), random_iob2(rng, length)
    if rng.random() < 0.5:  # mostly the gold tags, so that scores are not all near zero
      predicted = repair_iob2([g if rng.random() < 0.8 else p for g, p in zip(gold, predicted)])
    gold_tags.append(gold)
    predicted_tags.append(predicted)
    targets.append(metrics.ner_postprocessor(format_entities(tokens, tags_to_spans(gold, "iob2")),
                                             is_target=True))
    predictions.append(as_entities(tokens, predicted))

  scores = metrics.span_f1(targets, predictions)
  with warnings.catch_warnings():  # seqeval warns when a score is undefined (it then gives 0)
    warnings.simplefilter("ignore")
    report = seqeval_metrics.classification_report(gold_tags, predicted_tags, output_dict=True,
                                                   zero_division=0)
    expected = {
        "precision": seqeval_metrics.precision_score(gold_tags, predicted_tags),
        "recall": seqeval_metrics.recall_score(gold_tags, predicted_tags),
        "f1": seqeval_metrics.f1_score(gold_tags, predicted_tags),
    }
  assert scores == pytest.approx({k: 100 * v for k, v in expected.items()})
  if "micro avg" in report:  # absent when there are no entities at all
    micro = report["micro avg"]
    assert scores["f1"] == pytest.approx(100 * micro["f1-score"])
    assert scores["precision"] == pytest.approx(100 * micro["precision"])
    assert scores["recall"] == pytest.approx(100 * micro["recall"])


# --- constant-answer baselines ---------------------------------------------------------------


def test_constant_baselines_score_each_label_with_the_metrics():
  targets = [1, 1, 1, 0]  # three of four positive
  fns = [metrics.accuracy, metrics.f1_macro]
  baselines = metrics.constant_baselines(fns, targets, labels=[0, 1], majority=0)
  # Answering 1: accuracy 75; F1 of label 1 is 2*.75*1/1.75, of label 0 it is 0 (sklearn agrees).
  f1_macro_of_1 = 100 * sk.f1_score(targets, [1] * 4, average="macro")
  assert f1_macro_of_1 == pytest.approx(100 * (6 / 7) / 2)
  best = baselines["best_constant"]
  assert best["label"] == 1 and best["mean"] == pytest.approx((75 + f1_macro_of_1) / 2)
  assert best["metrics"] == pytest.approx({"accuracy": 75.0, "f1_macro": f1_macro_of_1})
  # The majority class is the caller's (e.g. of the train split), whatever scores best here.
  majority = baselines["majority_class"]
  assert majority["label"] == 0 and majority["mean"] == pytest.approx(22.5)
  assert majority["metrics"] == pytest.approx({"accuracy": 25.0, "f1_macro": 20.0})
  assert list(baselines) == ["majority_class", "best_constant"]
  assert "majority_class" not in metrics.constant_baselines(fns, targets, labels=[0, 1])
  # Ties go to the first label.
  assert metrics.constant_baselines(fns, [0, 1], labels=[1, 0])["best_constant"]["label"] == 1


def test_f1_of_one_class_rewards_a_constant_answer_but_f1_macro_does_not():
  """Why the demo sentiment task scores accuracy and macro-F1: with 51% positives, answering
  "positive" everywhere got accuracy 51 and F1 67.5, a mean of 59.3 (a trained model's 59.3)."""
  targets = [1] * 51 + [0] * 49
  old = metrics.constant_baselines([metrics.accuracy, metrics.f1_binary], targets, [0, 1])
  new = metrics.constant_baselines([metrics.accuracy, metrics.f1_macro], targets, [0, 1])
  assert old["best_constant"]["mean"] == pytest.approx((51 + 100 * 102 / 151) / 2)  # 59.27
  assert new["best_constant"]["mean"] == pytest.approx((51 + 100 * 51 / 151) / 2)  # 42.39
  assert new["best_constant"]["mean"] < 50 < old["best_constant"]["mean"]


# --- GLUE average and argument checks ---------------------------------------------------------


def test_glue_average_averages_each_task_first():
  results = {"cola": {"mcc": 50.0}, "mrpc": {"f1": 80.0, "accuracy": 90.0},
             "stsb": {"pearson": 88.0, "spearman": 86.0}}
  assert metrics.glue_average(results) == pytest.approx((50 + 85 + 87) / 3)
  with pytest.raises(ValueError):
    metrics.glue_average({})
  with pytest.raises(ValueError, match="'cola' has no metrics"):
    metrics.glue_average({"cola": {}})


METRIC_FNS = [metrics.accuracy, metrics.f1_binary, metrics.f1_macro, metrics.matthews_corrcoef,
              metrics.pearson_spearman, metrics.squad, metrics.span_f1]


@pytest.mark.parametrize("metric_fn", METRIC_FNS)
def test_metric_fns_check_lengths(metric_fn):
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    metric_fn(targets=[[1], [1]], predictions=[[1]])
  with pytest.raises(ValueError, match="no examples"):
    metric_fn(targets=[], predictions=[])


def test_scores_are_plain_floats():
  # seqio logs and writes scores as JSON, so no numpy scalars.
  results = [metrics.accuracy([0, 1], [0, 1]), metrics.f1_binary([0, 1], [0, 1]),
             metrics.f1_macro([0, 1], [0, 1]), metrics.matthews_corrcoef([0, 1], [0, 1]),
             metrics.pearson_spearman([0.0, 1.0, 2.0], [0.0, 1.0, 3.0]),
             metrics.squad([["a b"]], ["b"]), metrics.span_f1([[("A", "b")]], [[("A", "b")]])]
  for result in results:
    assert all(type(value) is float for value in result.values()), result
  assert type(metrics.glue_average({"t": {"m": np.float32(1)}})) is float
