"""Evaluation: `t5mix eval` (table, results.json, metrics.png, averages, corrupt checkpoints),
evaluation during training, `t5mix predict`, `t5mix embed`, and their errors.

Two runs are shared across tests: `small_run` (20 steps, seconds: mechanics and errors) and, for
the slow tests, `trained_run` (500 steps of a tiny model, a minute or a few on 2 CPU cores), which
must beat the trivial baselines on every demo task.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import seqio
import yaml
from sklearn import metrics as sk
from flax import nnx

from t5mix import config as config_lib
from t5mix import checkpoints, definitions, eval_report, evaluate, metrics, registry, train
from t5mix.errors import UserError
from t5mix.model import T5, T5Config

TINY = ["model=tiny", "data.mixture=demo_supervised", "data.batch_size=8", "data.inputs_length=64",
        "data.targets_length=16", "log_every=10", "optimizer.warmup_steps=5"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def builtin_definitions():
  definitions.load()


def _train(workdir, *overrides, log=lambda *a: None):
  c = config_lib.load(None, TINY + list(overrides))
  return train.train(c, str(workdir), quiet=True, log=log)


@pytest.fixture(scope="module")
def small_run_and_log(tmp_path_factory):
  """A 20-step run with checkpoints at 10 and 20, evaluated during training every 10 steps (3
  examples per task): far from good, enough for the mechanics. (workdir, log lines)."""
  workdir = tmp_path_factory.mktemp("small_run")
  lines = []
  _train(workdir, "steps=20", "checkpoint_every=10", "eval_every=10", "eval_examples=3",
         log=lines.append)
  return workdir, lines


@pytest.fixture(scope="module")
def small_run(small_run_and_log):
  return small_run_and_log[0]


def _table_lines(out):
  return [line for line in out.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# t5mix eval


def test_eval_prints_table_and_writes_json_and_png(cli, small_run):
  rc, out, err = cli("eval", "--workdir", small_run, "--max-examples", 8)
  assert rc == 0, err
  assert "Traceback" not in err
  lines = _table_lines(out)
  header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["step"]
                and "precision" in line.split())
  assert all(t in lines[header - 1] for t in ("demo_ner", "demo_qa", "demo_sentiment"))
  for name in ("precision", "recall", "em", "accuracy", "mean", "average"):
    assert name in lines[header].split()
  rows = {line.split()[0]: line for line in lines[header + 2:header + 4]}
  assert set(rows) == {"10", "20"}
  assert sum(line.count("*") for line in rows.values()) == 3 + 1  # best per task + single best
  assert "average of task means, best checkpoint per task:" in out
  assert "average of task means, single best checkpoint (step" in out

  results = json.loads((small_run / "eval" / "results.json").read_text())
  assert results["tasks"] == ["demo_ner", "demo_qa", "demo_sentiment"]
  assert set(results["steps"]) == {"10", "20"}
  assert results["examples"] == {t: 8 for t in results["tasks"]}
  assert results["decoding"] == {"beam_size": 1, "max_decode_len": 16, "inputs_length": 64}
  step20 = results["steps"]["20"]
  assert set(step20["metrics"]["demo_sentiment"]) == {"accuracy", "f1_macro"}
  assert set(step20["metrics"]["demo_qa"]) == {"em", "f1"}
  assert set(step20["metrics"]["demo_ner"]) == {"precision", "recall", "f1"}
  for entry in results["steps"].values():  # T5's GLUE average: mean over tasks of task means
    assert entry["average"] == pytest.approx(metrics.glue_average(entry["metrics"]))
    for t, scores in entry["metrics"].items():
      assert entry["task_means"][t] == pytest.approx(np.mean(list(scores.values())))
  for t, best in results["best_per_task"].items():
    assert best["mean"] == max(e["task_means"][t] for e in results["steps"].values())
  assert results["average_best_per_task"] == pytest.approx(
      np.mean([b["mean"] for b in results["best_per_task"].values()]))
  single = results["single_best_checkpoint"]
  assert single["average"] == max(e["average"] for e in results["steps"].values())
  assert results["average_best_per_task"] >= single["average"] - 1e-9
  assert (small_run / "eval" / "metrics.png").read_bytes()[:8] == PNG_MAGIC


def test_eval_latest_checkpoint_with_beam_search_and_chosen_tasks(cli, small_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(small_run, workdir)
  rc, out, err = cli("eval", "--workdir", workdir, "--checkpoints", "latest", "--tasks",
                     "demo_sentiment,demo_ner", "--beam-size", 2, "--max-examples", 4,
                     "--batch-size", 3)
  assert rc == 0, err
  assert "beam search (2 beams)" in out
  results = json.loads((workdir / "eval" / "results.json").read_text())
  assert list(results["steps"]) == ["20"] and results["decoding"]["beam_size"] == 2
  assert results["tasks"] == ["demo_sentiment", "demo_ner"]
  rc, out, err = cli("eval", "--workdir", workdir, "--checkpoints", "10", "--tasks", "demo_qa",
                     "--max-examples", 2)
  assert rc == 0, err
  assert list(json.loads((workdir / "eval" / "results.json").read_text())["steps"]) == ["10"]


def _uncut(name, split, n=None):
  """The first n (None: all) examples of a task as its own seqio pipeline makes them, uncut."""
  ds = seqio.get_mixture_or_task(name).get_dataset(None, split=split, shuffle=False)
  return list(ds.take(n if n is not None else -1).as_numpy_iterator())


def _demo_labels(split):
  """demo_sentiment's labels (0 negative, 1 positive), read from its TSV file."""
  from t5mix import demo_data
  path = pathlib.Path(demo_data.ensure()) / f"sentiment.{split}.tsv"
  return [int(line.rsplit("\t", 1)[1]) for line in path.read_text().splitlines()[1:]]


def test_compare_reads_what_train_and_eval_wrote(cli, small_run, tmp_path):
  evaluated, never = tmp_path / "evaluated", tmp_path / "never"
  shutil.copytree(small_run, evaluated)
  shutil.copytree(small_run, never)
  shutil.rmtree(never / "eval", ignore_errors=True)
  rc, out, err = cli("eval", "--workdir", evaluated, "--checkpoints", "latest", "--max-examples", 4)
  assert rc == 0, err
  rc, out, err = cli("compare", evaluated, never)
  assert rc == 0, err
  rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["evaluated"], ["never"])}
  average = json.loads((evaluated / "eval" / "results.json").read_text())["steps"]["20"]["average"]
  cells = rows["evaluated"].split()
  assert cells[1:4] == ["best,", "latest", "20"] and cells[-4] == f"{average:.2f}", out
  assert cells[-3] == "20" and cells[-2] != "-" and float(cells[-1]) > 0  # steps, tokens, minutes
  assert rows["never"].split()[1:3] == ["not", "evaluated"]
  assert "The runs' settings are the same." in out


def test_train_logs_truncated_share_per_task_once(small_run_and_log):
  _, lines = small_run_and_log
  found = [line for line in lines if line.startswith("truncation of ")]
  assert sorted(line.split()[2] for line in found) == ["demo_ner", "demo_qa", "demo_sentiment"]
  rows = _uncut("demo_qa", "train")  # the run's lengths: inputs 64, targets 16 (TINY)
  longer = sum(len(r["inputs"]) > 64 for r in rows)
  targets = sum(len(r["targets"]) > 16 for r in rows)
  qa = next(line for line in found if line.split()[2] == "demo_qa")
  assert qa.startswith(f"truncation of demo_qa (all 3,000 train examples): {longer:,} "
                       f"({longer / 30:.1f}%) have inputs over 64 tokens, {targets:,} "
                       f"({targets / 30:.1f}%) targets over 16 tokens; for "), qa
  assert longer > 2500 and qa.endswith("the answer lies past the cut"), qa


def test_eval_reports_baselines_and_truncation(cli, small_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(small_run, workdir)
  rc, out, err = cli("eval", "--workdir", workdir, "--checkpoints", "latest", "--max-examples", 40)
  assert rc == 0, err
  results = json.loads((workdir / "eval" / "results.json").read_text())

  # Truncation: of exactly the 40 evaluated examples, at the run's lengths (64 and 16).
  rows = _uncut("demo_qa", "validation", 40)
  longer = sum(len(r["inputs"]) > 64 for r in rows)
  targets = sum(len(r["targets"]) > 16 for r in rows)
  qa = results["truncation"]["demo_qa"]
  assert (qa["counted"], qa["inputs"], qa["targets"]) == (40, longer, targets)
  assert results["truncation"]["demo_sentiment"]["inputs"] == 0
  assert (f"truncation of demo_qa (the first 40 of 300 validation examples): {longer} "
          f"({100 * longer / 40:.1f}%) have inputs over 64 tokens") in out

  # Baselines: the train split's majority label, and the best single label, scored by sklearn on
  # the 40 validation labels.
  train, gold = _demo_labels("train"), _demo_labels("validation")[:40]
  majority = int(sum(train) > len(train) / 2)
  def scores(label):
    acc = 100 * sk.accuracy_score(gold, [label] * 40)
    f1 = 100 * sk.f1_score(gold, [label] * 40, average="macro", labels=[0, 1], zero_division=0)
    return acc, f1, (acc + f1) / 2
  best = max([0, 1], key=lambda label: scores(label)[2])
  words = ["negative", "positive"]
  baselines = results["baselines"]
  assert set(baselines) == {"demo_sentiment"}  # classification only
  for kind, label in (("majority_class", majority), ("best_constant", best)):
    entry = baselines["demo_sentiment"][kind]
    acc, f1, mean = scores(label)
    assert entry["label"] == words[label]
    assert entry["metrics"] == pytest.approx({"accuracy": acc, "f1_macro": f1})
    assert entry["mean"] == pytest.approx(mean)
    # its table row: "-" under demo_ner and demo_qa and the average, the scores under sentiment
    row = next(line for line in out.splitlines() if line.split()[:1] == [
        {"majority_class": "majority", "best_constant": "constant"}[kind]]).split()
    assert row[1:8] == ["-"] * 7 and row[-1] == "-"
    assert row[8:11] == [f"{acc:.2f}", f"{f1:.2f}", f"{mean:.2f}"]
  assert (f"baselines, one label for every example: majority = the most frequent label of the "
          f"train split (demo_sentiment {words[majority]}); constant = the label that scores best "
          f"on this split (demo_sentiment {words[best]})") in out


def test_eval_warns_when_a_checkpoint_answers_one_label(cli, small_run, tmp_path, monkeypatch):
  """A model that answers "positive" to everything: a warning per checkpoint, and it scores
  exactly the constant baseline of that label."""
  workdir = tmp_path / "run"
  shutil.copytree(small_run, workdir)
  vocab = seqio.get_mixture_or_task("demo_sentiment").output_features["targets"].vocabulary
  positive = list(vocab.encode("positive")) + [1]  # then EOS

  def answer_positive(self, params, inputs):
    tokens = np.zeros((len(inputs), self.max_decode_len), np.int32)
    tokens[:, :len(positive)] = positive
    return tokens

  monkeypatch.setattr(evaluate.Decoder, "__call__", answer_positive)
  rc, out, err = cli("eval", "--workdir", workdir, "--tasks", "demo_sentiment",
                     "--max-examples", 50)
  assert rc == 0, err
  for step in (10, 20):
    assert (f"warning: step {step}: every demo_sentiment prediction is 'positive' "
            "(a constant answer)") in out
  results = json.loads((workdir / "eval" / "results.json").read_text())
  assert results["steps"]["20"]["single_label"] == {"demo_sentiment": "positive"}
  gold = _demo_labels("validation")[:50]
  accuracy = 100 * sum(gold) / 50
  f1_macro = 100 * sk.f1_score(gold, [1] * 50, average="macro", labels=[0, 1], zero_division=0)
  assert results["steps"]["20"]["metrics"]["demo_sentiment"] == pytest.approx(
      {"accuracy": accuracy, "f1_macro": f1_macro})
  assert f1_macro < 50  # the metrics do not reward it


def test_plot_marks_best_checkpoints_and_constant_baselines(tmp_path, monkeypatch):
  import matplotlib.figure
  figures = []
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                      lambda self, *a, **k: figures.append(self))
  steps = {"200": {"task_means": {"a": 60.0, "b": 10.0}, "average": 35.0},
           "400": {"task_means": {"a": 50.0, "b": 20.0}, "average": 35.0}}
  results = {"tasks": ["a", "b"], "steps": steps,
             "best_per_task": {"a": {"step": 200, "mean": 60.0}, "b": {"step": 400, "mean": 20.0}},
             "single_best_checkpoint": {"step": 400, "average": 35.0},
             "baselines": {"a": {"best_constant": {"label": "yes", "mean": 42.0}}}}
  eval_report.plot(results, str(tmp_path / "metrics.png"))
  lines = figures[0].axes[0].lines
  stars = {(line.get_xdata()[0], line.get_ydata()[0]) for line in lines if line.get_marker() == "*"}
  assert stars == {(200, 60.0), (400, 20.0), (400, 35.0)}
  dotted = [line for line in lines if line.get_linestyle() == ":"]
  assert len(dotted) == 1 and list(dotted[0].get_ydata()) == [42.0, 42.0]


def test_evaluator_caches_examples_and_is_deterministic(small_run):
  run = checkpoints.open_run(str(small_run))
  graphdef, abstract = checkpoints.abstract_model(run.model_config)
  params = checkpoints.restore_step_params(str(small_run), 20, abstract)
  tasks = evaluate.eval_tasks(["demo_supervised"], "validation", explicit=False)
  evaluator = evaluate.Evaluator(tasks, evaluate.Decoder(graphdef, max_decode_len=16),
                                 lengths=run.lengths, max_examples=5)
  first = evaluator.evaluate(params, 20)
  assert set(evaluator._inputs) == set(first)  # input tokens stacked once per task
  assert all(inputs.shape == (5, 64) for _, inputs in evaluator._inputs.values())
  assert evaluator.evaluate(params, 20) == first


def _truncate_state_files(workdir, step):
  """Cuts every array data file of a checkpoint's state to a third (as a crash mid-write would)."""
  files = [p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*")
           if p.is_file() and p.parent.name == "d"]
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(path.stat().st_size // 3)


def test_corrupt_checkpoint_is_skipped_with_one_line(cli, small_run, tmp_path, expect_error):
  workdir = tmp_path / "run"
  shutil.copytree(small_run, workdir)
  _truncate_state_files(workdir, 10)
  rc, out, err = cli("eval", "--workdir", workdir, "--max-examples", 4)
  assert rc == 0, err
  assert "Traceback" not in err and "Event loop is closed" not in err, err
  skipped = [line for line in out.splitlines() if line.startswith("skipping checkpoint")]
  assert len(skipped) == 1 and skipped[0].startswith("skipping checkpoint 10: cannot restore"), out
  results = json.loads((workdir / "eval" / "results.json").read_text())
  assert list(results["steps"]) == ["20"] and list(results["skipped"]) == ["10"]
  # Nothing restorable at all is an error.
  _truncate_state_files(workdir, 20)
  rc, out, err = cli("eval", "--workdir", workdir, "--max-examples", 4)
  expect_error(rc, err, "none of the chosen checkpoints could be restored")


def test_eval_during_training_logs_metrics_to_tensorboard(small_run_and_log):
  import tensorflow as tf
  workdir, lines = small_run_and_log
  assert any(line.startswith("evaluating every 10 steps on 'validation': demo_ner (3 examples)")
             for line in lines), lines
  evals = [line for line in lines if line.startswith("eval ")]
  assert len(evals) == 2 and "average" in evals[0] and "demo_sentiment accuracy" in evals[0], lines
  tags = set()
  for path in (workdir / "tensorboard").iterdir():
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      tags.update(v.tag for v in event.summary.value)
  assert {"eval/average", "eval/demo_sentiment/accuracy", "eval/demo_qa/f1",
          "eval/demo_ner/mean"} <= tags, tags
  with pytest.raises(UserError, match="eval_every"):
    config_lib.load(None, ["eval_every=-1"])
  with pytest.raises(UserError, match="eval_samples"):
    config_lib.load(None, ["eval_samples=-1"])
  with pytest.raises(UserError, match="eval_examples"):
    config_lib.load(None, ["eval_examples=0"])


def test_eval_during_training_writes_samples_and_tokens_seen_to_tensorboard(small_run_and_log):
  """Per task, a text table of eval_samples (default 3) examples: input, target, prediction; and
  the tokens seen per task as scalars beside learning_rate and padding_share."""
  import tensorflow as tf
  workdir, lines = small_run_and_log
  texts, scalars = {}, {}
  for path in (workdir / "tensorboard").iterdir():
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        array = tf.make_ndarray(value.tensor)
        if value.tag.startswith("samples/"):
          texts[value.tag, event.step] = array
        elif array.ndim == 0:
          scalars[value.tag, event.step] = float(array)
  assert {tag for tag, _ in texts} == {"samples/demo_ner", "samples/demo_qa", "samples/demo_sentiment"}
  assert {step for _, step in texts} == {10, 20}
  table = texts["samples/demo_qa", 20]
  assert table.shape == (4, 3) and list(table[0]) == [b"input", b"target", b"prediction"]
  gold = _uncut("demo_qa", "validation", 3)
  assert [row[0].decode() for row in table[1:]] == [ex["inputs_pretokenized"].decode() for ex in gold]
  assert [row[1].decode() for row in table[1:]] == [ex["targets_pretokenized"].decode() for ex in gold]
  for step in (10, 20):
    assert {"learning_rate", "padding_share"} <= {tag for tag, s in scalars if s == step}
    seen = {tag: v for (tag, s), v in scalars.items() if s == step and tag.startswith("tokens_seen/")}
    assert set(seen) == {"tokens_seen/all", "tokens_seen/demo_ner", "tokens_seen/demo_qa",
                         "tokens_seen/demo_sentiment"}
    assert seen["tokens_seen/all"] == sum(v for k, v in seen.items() if k != "tokens_seen/all") > 0
  assert scalars["tokens_seen/all", 20] > scalars["tokens_seen/all", 10]
  # saved with the checkpoint, so that a resumed run goes on counting and `compare` reports it
  totals = checkpoints.read_totals(str(workdir / "checkpoints" / "20"))
  assert sum(totals["tokens"].values()) == scalars["tokens_seen/all", 20] and totals["seconds"] > 0


# ---------------------------------------------------------------------------------------------
# predict / embed


def test_predict_text_arguments(cli, small_run):
  rc, out, err = cli("predict", "--workdir", small_run, "--task", "demo_sentiment",
                     "the movie was great .", "the food was not good .")
  assert rc == 0, err
  lines = out.splitlines()
  assert lines[0] == "[0] sentiment: the movie was great ."
  assert lines[2] == "[1] sentiment: the food was not good ."
  assert lines[1].startswith("    -> ") and lines[3].startswith("    -> ")
  rc, out, err = cli("predict", "--workdir", small_run, "--task", "demo_ner", "--checkpoint", 10,
                     "Alice Moreno visited Lisbon last week .")
  assert rc == 0, err
  assert out.startswith("[0] demo_ner: Alice Moreno visited Lisbon last week .\n    -> ")


def test_predict_jsonl_in_and_out(cli, small_run, tmp_path):
  inputs = tmp_path / "in.jsonl"
  inputs.write_text(json.dumps({"question": "Where does Alice live?",
                                "context": "Alice lives in Oslo. Bruno works as a baker."}) + "\n\n"
                    + json.dumps({"question": "What is the job of Bruno?",
                                  "context": "Bruno works as a baker."}) + "\n")
  output = tmp_path / "out.jsonl"
  rc, out, err = cli("predict", "--workdir", small_run, "--task", "demo_qa", "--input", inputs,
                     "--output", output)
  assert rc == 0, err
  assert out.strip() == f"wrote 2 predictions (checkpoint 20) to {output}"
  rows = [json.loads(line) for line in output.read_text().splitlines()]
  assert len(rows) == 2
  assert rows[0]["inputs"] == ("question: Where does Alice live? context: Alice lives in Oslo. "
                               "Bruno works as a baker.")
  assert rows[1]["record"] == {"question": "What is the job of Bruno?",
                               "context": "Bruno works as a baker."}
  assert all(isinstance(r["prediction"], str) and r["parsed"] == r["prediction"] for r in rows)


def test_predict_parses_labels_and_entities():
  from t5mix import predict
  import seqio
  sentiment, ner = seqio.get_mixture_or_task("demo_sentiment"), seqio.get_mixture_or_task("demo_ner")
  assert predict.parse(sentiment, "positive") == "positive"
  assert predict.parse(sentiment, "posi tive!") is None  # not a label word: scored as wrong
  assert predict.parse(ner, "PER: Alice Moreno; LOC: Oslo") == [["PER", "Alice Moreno"],
                                                                 ["LOC", "Oslo"]]
  assert predict.parse(ner, "PER Alice ;;") == []  # unparseable: no entities


def test_embed_writes_mean_pooled_rows_and_texts(cli, small_run, tmp_path):
  out = tmp_path / "emb" / "sentiment.npy"
  rc, stdout, err = cli("embed", "--workdir", small_run, "--task", "demo_sentiment", "--out", out,
                        "--max-examples", 10, "--batch-size", 4)
  assert rc == 0, err
  x = np.load(out)
  assert x.shape == (10, 64) and x.dtype == np.float32 and np.isfinite(x).all()
  rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
  expected = registry.examples(registry.get_task_or_mixture("demo_sentiment").t5mix_spec,
                               "validation")[:10]
  assert [r["inputs"] for r in rows] == [e["inputs"] for e in expected]
  assert [r["targets"] for r in rows] == [e["targets"] for e in expected]
  # Mean pooling ignores padding: one example alone gives the same vector.
  one = tmp_path / "one.npy"
  rc, _, err = cli("embed", "--workdir", small_run, "--task", "demo_sentiment", "--out", one,
                   "--max-examples", 1)
  assert rc == 0, err
  np.testing.assert_allclose(np.load(one)[0], x[0], rtol=1e-5, atol=1e-5)


def test_probe_is_logistic_regression_on_the_embed_features(cli, small_run, tmp_path):
  """`t5mix probe` scores what scikit-learn's standardised logistic regression scores on the
  features `t5mix embed` writes, and the majority class of the training labels."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  out = tmp_path / "probe.json"
  rc, stdout, err = cli("probe", "--workdir", small_run, "--task", "demo_sentiment",
                        "--max-train-examples", 80, "--max-examples", 30, "--out", out)
  assert rc == 0, err
  result = json.loads(out.read_text())

  def features(split, n):
    path = tmp_path / f"{split}.npy"
    assert cli("embed", "--workdir", small_run, "--task", "demo_sentiment", "--split", split,
               "--out", path, "--max-examples", n)[0] == 0
    rows = path.with_suffix(".jsonl").read_text().splitlines()
    return np.load(path), np.array([json.loads(r)["targets"] for r in rows])

  x_train, y_train = features("train", 80)
  x_val, y_val = features("validation", 30)
  reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, y_train)
  assert result["accuracy"] == pytest.approx(100 * reference.score(x_val, y_val))
  labels, counts = np.unique(y_train, return_counts=True)
  assert result["majority_label"] == labels[counts.argmax()]
  assert result["majority"] == pytest.approx(100 * np.mean(y_val == labels[counts.argmax()]))
  assert (result["train_examples"], result["eval_examples"], result["step"]) == (80, 30, 20)
  assert f"validation accuracy {result['accuracy']:.2f} on 30 examples" in stdout
  assert f"majority class ({result['majority_label']!r}) {result['majority']:.2f}" in stdout


def test_probe_of_a_random_encoder_and_its_errors(cli, small_run):
  rc, stdout, err = cli("probe", "--workdir", small_run, "--task", "demo_sentiment", "--random-init",
                        "--max-train-examples", 40, "--max-examples", 10)
  assert rc == 0, err
  assert "mean-pooled features of a random encoder of the run's shape" in stdout
  for args, message in [
      (["--task", "demo_sentiment", "--random-init", "--checkpoint", "20"],
       "--random-init and --checkpoint exclude each other"),
      (["--task", "demo_qa"], "probe needs a classification task"),
      (["--task", "demo_sentiment", "--train-split", "nope"], "has no split 'nope'"),
  ]:
    rc, _, err = cli("probe", "--workdir", small_run, *args)
    assert rc != 0 and message in err and "Traceback" not in err, err


def test_prediction_inputs_read_as_the_training_examples():
  """The fields `t5mix predict` asks for (input_fields), without a label or answer, give the input
  text the task's examples have (the first validation example of each demo task, its text typed
  out here)."""
  spec = {name: registry.get_task_or_mixture(name).t5mix_spec
          for name in ("demo_sentiment", "demo_qa", "demo_ner")}
  sentence = "the concert was very fantastic but the concert was disappointing ."
  question = "Where does Victor Dubois live?"
  context = ("Victor Dubois is employed by Stark Industries. Elena Ivanova works as a painter. The "
             "favourite colour of Elena Ivanova is yellow. Dara Tanaka lives in Graz. Victor Dubois "
             "works as a farmer. Elena Ivanova keeps a parrot at home. Dara Tanaka keeps a tortoise "
             "at home. Dara Tanaka is employed by Soylent Foods. Victor Dubois lives in Lima.")
  expected = {
      "demo_sentiment": ({"sentence": sentence}, f"sentiment: {sentence}", "negative"),
      "demo_qa": ({"question": question, "context": context},
                  f"question: {question} context: {context}", "Lima"),
      # NER: the sentence as text (split on whitespace) or as the tokens column.
      "demo_ner": ({"sentence": " Acme Corp  opened an office in Cusco . "},
                   "demo_ner: Acme Corp opened an office in Cusco .", "ORG: Acme Corp; LOC: Cusco"),
  }
  for name, (fields, inputs, targets) in expected.items():
    assert registry.input_fields(spec[name]) == list(fields)
    example = registry.examples(spec[name], "validation")[0]
    assert (example["inputs"], example["targets"]) == (inputs, targets)
    assert registry.format_inputs(spec[name], fields, "x") == inputs
  tokens = {"tokens": ["Acme", "Corp", "opened", "an", "office", "in", "Cusco", "."]}
  assert registry.format_inputs(spec["demo_ner"], tokens, "x") == (
      "demo_ner: Acme Corp opened an office in Cusco .")


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2.


@pytest.fixture
def bad_dirs(tmp_path, small_run):
  (tmp_path / "not_a_run").mkdir()
  no_ckpt = tmp_path / "no_ckpt"
  no_ckpt.mkdir()
  for name in ("config.yaml", "model.yaml"):
    shutil.copy(small_run / name, no_ckpt / name)
  (tmp_path / "empty.jsonl").write_text("\n")
  (tmp_path / "bad.jsonl").write_text('{"sentence": "fine"}\n{"sentence": \n')
  return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["eval", "--workdir", "{tmp}/missing"], "{tmp}/missing: no such workdir"),
    (["eval", "--workdir", "{tmp}/not_a_run"], "{tmp}/not_a_run: not a t5mix workdir"),
    (["eval", "--workdir", "{tmp}/no_ckpt"], "{tmp}/no_ckpt: no checkpoints"),
    (["eval", "--workdir", "{run}", "--tasks", "demo_sentimnt"],
     "unknown task or mixture 'demo_sentimnt'; did you mean demo_sentiment"),
    (["eval", "--workdir", "{run}", "--tasks", "demo_text"], "task 'demo_text' has no metrics"),
    (["eval", "--workdir", "{run}", "--tasks", "demo_qa", "--split", "test"],
     "task 'demo_qa' has no 'test' split"),
    (["eval", "--workdir", "{run}", "--split", "test"], "no task has metrics and a 'test' split"),
    (["eval", "--workdir", "{run}", "--checkpoints", "15"], "no checkpoint at step 15; there are 10, 20"),
    (["eval", "--workdir", "{run}", "--checkpoints", "first"], "expected all, latest, best or steps"),
    (["eval", "--workdir", "{run}", "--checkpoints", "best"], "was trained without keep_best"),
    (["predict", "--workdir", "{tmp}/missing", "--task", "demo_qa", "x"], "no such workdir"),
    (["predict", "--workdir", "{run}", "--task", "nope", "x"], "unknown task or mixture 'nope'"),
    (["predict", "--workdir", "{run}", "--task", "demo_supervised", "x"], "is a mixture"),
    (["predict", "--workdir", "{run}", "--task", "demo_sentiment", "--input", "{tmp}/empty.jsonl"],
     "{tmp}/empty.jsonl: empty input file"),
    (["predict", "--workdir", "{run}", "--task", "demo_sentiment", "--input", "{tmp}/bad.jsonl"],
     "{tmp}/bad.jsonl:2: not valid JSON"),
    (["predict", "--workdir", "{run}", "--task", "demo_sentiment", "--input", "{tmp}/none.jsonl"],
     "{tmp}/none.jsonl: no such input file"),
    (["predict", "--workdir", "{run}", "--task", "demo_qa", "where?"],
     "task 'demo_qa' reads 2 fields (question, context); pass JSON lines"),
    (["predict", "--workdir", "{run}", "--task", "demo_sentiment"], "nothing to predict"),
    (["predict", "--workdir", "{run}", "--task", "demo_sentiment", "--checkpoint", "7", "x"],
     "no checkpoint at step 7"),
    (["embed", "--workdir", "{run}", "--task", "demo_qa", "--split", "test", "--out", "{tmp}/x.npy"],
     "task 'demo_qa' has no split 'test'; it has train, validation"),
    (["embed", "--workdir", "{tmp}/no_ckpt", "--task", "demo_qa", "--out", "{tmp}/x.npy"],
     "no checkpoints"),
])
def test_bad_inputs(cli, expect_error, bad_dirs, small_run, argv, message):
  fill = lambda s: s.format(tmp=bad_dirs, run=small_run)  # noqa: E731
  rc, out, err = cli(*[fill(a) for a in argv])
  expect_error(rc, err, fill(message))


# ---------------------------------------------------------------------------------------------
# Slow: a run trained long enough to beat the trivial baselines.

MIXTURE = "evaltest_demo_weighted"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """500 steps of the tiny model on the three demo tasks, trained by the console script.

  The mixture is a user definition named by the run config (data.tasks_dir), so `t5mix eval` in a
  fresh process must load it from the workdir's config.yaml. Sentiment is weighted up (10:1:1):
  a tiny model needs ~10k sentiment examples to leave the constant-answer plateau, which the
  T=2 demo_supervised mixture reaches only after ~1,500 steps.
  """
  root = tmp_path_factory.mktemp("trained_run")
  defs = root / "mixture.yaml"
  defs.write_text(yaml.safe_dump({"mixtures": [{
      "name": MIXTURE, "rate": "explicit",
      "tasks": [{"name": "demo_sentiment", "rate": 10}, {"name": "demo_qa", "rate": 1},
                {"name": "demo_ner", "rate": 1}]}]}))
  config = root / "run.yaml"
  config.write_text(yaml.safe_dump({
      "model": "tiny", "model_overrides": {"dropout_rate": 0.0}, "steps": 500,
      "checkpoint_every": 250, "log_every": 100,
      "optimizer": {"name": "adamw", "learning_rate": 3e-3, "schedule": "constant",
                    "warmup_steps": 30, "parameter_scale": False},  # the rate was tuned without it
      "data": {"mixture": MIXTURE, "batch_size": 16, "inputs_length": 160, "targets_length": 16,
               "tasks_dir": [str(defs)]}}))
  workdir = root / "run"
  run = _console(["train", "--config", str(config), "--workdir", str(workdir), "--quiet"],
                 timeout=1200)
  assert run.returncode == 0, run.stdout + run.stderr
  return workdir


def _console(argv, timeout=600):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", "t5mix.cli", *argv], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=pathlib.Path(__file__).parent.parent)


@pytest.mark.slow
def test_trained_run_beats_trivial_baselines(trained_run):
  run = _console(["eval", "--workdir", str(trained_run)])  # a fresh process: config.yaml's defs
  assert run.returncode == 0, run.stdout + run.stderr
  assert run.stderr == "", run.stderr
  results = json.loads((trained_run / "eval" / "results.json").read_text())
  assert results["mixture"] == MIXTURE and set(results["steps"]) == {"250", "500"}
  assert results["examples"] == {"demo_ner": 300, "demo_qa": 300, "demo_sentiment": 300}
  final = results["steps"]["500"]["metrics"]
  # Balanced labels: the majority class scores 50%. A constant answer scores ~0 on QA and NER.
  assert final["demo_sentiment"]["accuracy"] > 60, final
  assert final["demo_qa"]["f1"] > 0, final
  assert final["demo_ner"]["f1"] > 5, final
  for line in ("best checkpoint per task (*):", "average of task means, best checkpoint per task:",
               "average of task means, single best checkpoint (step"):
    assert line in run.stdout
  assert (trained_run / "eval" / "metrics.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_trained_run_predict_and_embedding_probe(trained_run, tmp_path):
  from t5mix import predict, probe
  step, results = predict.predict(str(trained_run), "demo_sentiment",
                                  ["the movie was great .", "the food was awful ."])
  assert step == 500
  assert all(r["parsed"] in ("positive", "negative") for r in results), results
  step, results = predict.predict(str(trained_run), "demo_ner",
                                  ["Alice Moreno visited Lisbon last week ."])
  assert isinstance(results[0]["parsed"], list)

  result = probe.run_probe(str(trained_run), "demo_sentiment", max_train_examples=1500)
  assert result["accuracy"] > 60 and result["eval_examples"] > 100, result


@pytest.mark.parametrize("architecture,beam_size",
                         [("encoder_decoder", 1), ("decoder_only", 1), ("encoder_decoder", 2)])
def test_decoder_cuts_padding_without_changing_outputs(architecture, beam_size):
  """Rows sorted by length and batches cut to narrower widths decode as each row does alone at the
  full inputs_length, and come back in their original order."""
  config = T5Config(vocab_size=48, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2,
                    num_decoder_layers=2, relative_attention_num_buckets=8,
                    relative_attention_max_distance=16, dropout_rate=0.0, architecture=architecture)
  graphdef, params = nnx.split(T5(config, rngs=nnx.Rngs(3)))
  rng = np.random.default_rng(0)
  lengths = [40, 3, 9, 1, 5]  # in batches of 2, shortest first: [1, 3] and [5, 9] at width 32, [40]
  inputs = np.zeros((len(lengths), 40), np.int32)
  for row, n in enumerate(lengths):
    inputs[row, :n] = rng.integers(2, 48, n)
  got = evaluate.Decoder(graphdef, max_decode_len=6, beam_size=beam_size, batch_size=2)(params, inputs)
  alone = evaluate.Decoder(graphdef, max_decode_len=6, beam_size=beam_size, batch_size=1)
  alone.WIDTHS = ()  # every row at the full width
  expected = np.concatenate([alone(params, inputs[row:row + 1]) for row in range(len(lengths))])
  np.testing.assert_array_equal(got, expected)
