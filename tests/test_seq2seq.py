"""Generation tasks (kind seq2seq): the parallel-text format; templates and references from files,
parallel text, a Python module and TFDS; BLEU, chrF, ROUGE and exact match against their
libraries' documented examples; each task's decoding settings; and eval, predict and show on a
tiny trained run.
"""

import json

import numpy as np
import pytest
import sacrebleu
import seqio
import tensorflow_datasets as tfds
from rouge_score import rouge_scorer

from t5mix import checkpoints, decode, definitions, evaluate, formats, input_pipeline, metrics
from t5mix import config as config_lib
from t5mix import registry, train
from t5mix.errors import UserError

pytestmark = pytest.mark.usefixtures("clean_registry")

BYTE = seqio.ByteVocabulary(extra_ids=100)


def write_parallel(directory, sources, targets, stem="x"):
  """(source path, target path) of two line files."""
  source, target = directory / f"{stem}.en", directory / f"{stem}.de"
  source.write_text("".join(f"{line}\n" for line in sources), encoding="utf-8")
  target.write_text("".join(f"{line}\n" for line in targets), encoding="utf-8")
  return source, target


@pytest.fixture
def spec(tmp_path, unique_name):
  """spec(**keys) → a validated seq2seq TaskSpec whose relative paths resolve in tmp_path."""
  def make(**keys):
    keys = {"name": unique_name("s2s"), "kind": "seq2seq", "vocabulary": "byte", **keys}
    return registry.TaskSpec.from_dict(keys, origin="test.yaml: tasks[0]", base_dir=str(tmp_path))
  return make


def pairs(spec, split="train"):
  return [(ex["inputs"], ex["targets"], json.loads(ex["references"]))
          for ex in registry.examples(spec, split)]


def through_pipeline(spec, split="train"):
  """(inputs, targets) decoded from the seqio Task's token ids."""
  task = registry.build_task(spec)
  return [(BYTE.decode(ex["inputs"].tolist()), BYTE.decode(ex["targets"].tolist()))
          for ex in task.get_dataset(None, split=split, shuffle=False).as_numpy_iterator()]


# ---------------------------------------------------------------------------------------------
# The parallel format.


def test_parallel_reads_line_pairs(tmp_path):
  source, target = write_parallel(tmp_path, ["Hello world .", "", "  Good morning ", "", ""],
                                  ["Hallo Welt .", "", "Guten Morgen"])
  records = formats.read(str(source), "parallel", target=str(target))
  # Blank lines at the end of a file do not count; a pair of blank lines is skipped.
  assert records == [{"source": "Hello world .", "target": "Hallo Welt .", "_line": 1},
                     {"source": "Good morning", "target": "Guten Morgen", "_line": 3}]


def test_parallel_line_counts_must_match(tmp_path):
  source, target = write_parallel(tmp_path, ["a", "b", "c"], ["x", "y"])
  with pytest.raises(UserError, match=rf"^{source} has 3 lines but {target} has 2; a parallel "
                                      "pair needs line i of one file to match line i of the "
                                      "other$"):
    formats.read(str(source), "parallel", target=str(target))


def test_parallel_missing_target_file_is_named(spec, tmp_path):
  write_parallel(tmp_path, ["a"], ["x"])
  s = spec(format="parallel", splits={"train": {"source": "x.en", "target": "x.fr"}})
  with pytest.raises(UserError, match=rf"^{tmp_path / 'x.fr'}: data file does not exist$"):
    registry.examples(s, "train")


# ---------------------------------------------------------------------------------------------
# Tasks from each source.


def test_parallel_task_with_template_and_select(spec, tmp_path):
  write_parallel(tmp_path, ["one", "two", "three", "four"], ["eins", "zwei", "drei", "vier"])
  s = spec(format="parallel", template="translate English to German: {source}",
           splits={"train": {"source": "x.en", "target": "x.de", "select": ":75%"},
                   "validation": {"source": "x.en", "target": "x.de", "select": "75%:"}})
  assert pairs(s) == [(f"translate English to German: {en}", de, [de])
                      for en, de in [("one", "eins"), ("two", "zwei"), ("three", "drei")]]
  assert through_pipeline(s, "validation") == [("translate English to German: four", "vier")]
  assert s.source_description == f"parallel:{tmp_path / 'x.en'}"
  assert s.metric_names == ["bleu"]


def test_jsonl_task_with_both_templates(spec, tmp_path):
  (tmp_path / "d.jsonl").write_text(
      json.dumps({"dialogue": "#A#: hi\n#B#: hello", "summary": "They greet.", "topic": "t"})
      + "\n")
  s = spec(format="jsonl", splits={"train": "d.jsonl"}, template="summarize: {dialogue}",
           target_template="{topic}: {summary}", metrics=["rouge"])
  assert pairs(s) == [("summarize: #A#: hi\n#B#: hello", "t: They greet.", ["t: They greet."])]


def test_several_references_from_a_list_column(spec, tmp_path):
  (tmp_path / "d.jsonl").write_text(
      json.dumps({"text": "a", "refs": ["first", "second"]}) + "\n"
      + json.dumps({"text": "b", "refs": "only"}) + "\n"
      + json.dumps({"text": "c", "refs": ["x"], "gold": "chosen"}) + "\n")
  s = spec(format="jsonl", splits={"train": "d.jsonl"}, template="{text}", references="refs")
  # Trained on the first reference, scored against all of them.
  assert pairs(s)[:2] == [("a", "first", ["first", "second"]), ("b", "only", ["only"])]
  task = registry.build_task(s)
  stored = next(task.get_dataset(None, split="train", shuffle=False).as_numpy_iterator())
  assert task.postprocess_fn(b"ignored", example=stored, is_target=True) == ["first", "second"]
  assert task.postprocess_fn(b"a prediction", example=stored) == "a prediction"
  # A target template still sets what is trained on.
  s = spec(format="jsonl", splits={"train": "d.jsonl"}, template="{text}", references="refs",
           target_template="{text}!")
  assert pairs(s)[2] == ("c", "c!", ["x"])


def test_task_from_a_python_module(cli, tmp_path, unique_name):
  name = unique_name("module")
  source, target = write_parallel(tmp_path, ["a b", "c d"], ["b a", "d c"])
  splits = {"train": {"source": str(source), "target": str(target)}}
  module = tmp_path / "my_tasks.py"
  module.write_text(
      "import t5mix\n"
      f"t5mix.add_task({name!r}, kind='seq2seq', format='parallel', vocabulary='byte',\n"
      f"               splits={splits!r},\n"
      "               template='reverse: {source}', metrics=['exact_match', 'chrf'])\n")
  rc, out, err = cli("tasks", "--module", module)
  assert rc == 0, err
  row = next(line for line in out.splitlines() if line.startswith(name))
  assert row.split()[1:] == ["seq2seq", f"parallel:{source}", "train=2", "exact_match,chrf"]
  assert pairs(seqio.get_mixture_or_task(name).t5mix_spec) == [
      ("reverse: a b", "b a", ["b a"]), ("reverse: c d", "d c", ["d c"])]


def test_task_from_tfds_translation(spec, monkeypatch):
  monkeypatch.setattr(registry, "TFDS_DATA_DIR", None)
  s = spec(tfds="wmt14_translate/de-en:1.0.0", splits={"train": "train"},
           template="translate English to German: {en}", target_template="{de}")
  with tfds.testing.mock_data(num_examples=3):
    raw = list(tfds.as_numpy(tfds.load("wmt14_translate/de-en:1.0.0", split="train")))
    examples = pairs(s)
  expected = [(f"translate English to German: {r['en'].decode()}", r["de"].decode()) for r in raw]
  assert [(i, t) for i, t, _ in examples] == expected


# ---------------------------------------------------------------------------------------------
# Definition mistakes: one line naming the key.


@pytest.mark.parametrize("keys, message", [
    (dict(metrics=["accuracy"]), r"key 'metrics': metric 'accuracy' does not score generated "
                                 r"text; kind 'seq2seq' takes bleu, chrf, rouge, exact_match$"),
    (dict(kind="classification", label_words=["a", "b"], metrics=["bleu"]),
     r"key 'metrics': metric 'bleu' scores generated text, which only kind 'seq2seq' makes$"),
    (dict(kind="qa", target_template="{answer}"), r"key 'target_template' is for kind 'seq2seq', "
                                                  r"not 'qa'$"),
    (dict(target_template="{a"), r"key 'target_template': '\{a' is not a valid template"),
    (dict(references=["refs"]), r"key 'references' must be a string, found list"),
    (dict(beam_size=0), r"key 'beam_size' must be at least 1, found 0$"),
    (dict(beam_size=True), r"key 'beam_size' must be an integer, found bool True$"),
    (dict(length_penalty=-0.5), r"key 'length_penalty' must be at least 0, found -0.5$"),
    (dict(max_decode_length="64"), r"key 'max_decode_length' must be an integer, found str"),
    (dict(splits={"train": "x.en"}), r"key 'splits': split 'train' must map to \{source: FILE, "
                                     r"target: FILE, select: 'START:END'\}, found str 'x.en'$"),
    (dict(splits={"train": {"source": "x.en"}}), r"key 'splits': split 'train': no 'target'; "
                                                 r"expected"),
    (dict(splits={"train": {"path": "x.en", "target": "x.de"}}),
     r"key 'splits': split 'train': unknown key 'path'; expected \{source: FILE"),
])
def test_definition_errors(spec, keys, message):
  with pytest.raises(UserError, match=r"^test.yaml: tasks\[0\]: task '\w+': " + message):
    spec(**{"format": "parallel", "splits": {"train": {"source": "x.en", "target": "x.de"}},
            **keys})


def test_column_mistakes_name_the_key(spec, tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps({"dialogue": "hi", "summary": "greeting", "refs": 3}) + "\n")
  # Without templates, the defaults read the parallel format's columns: say how to name yours.
  with pytest.raises(UserError, match=r"key 'template': placeholder \{source\} is not a column of "
                                      rf"{path}; its columns are dialogue, summary, refs "
                                      r".*; it is the default template, set 'template' to name"):
    registry.examples(spec(format="jsonl", splits={"train": "d.jsonl"}), "train")
  with pytest.raises(UserError, match=r"key 'target_template': placeholder \{sumary\} is not a "
                                      r"column .*\(did you mean \{summary\}\?\)"):
    registry.examples(spec(format="jsonl", splits={"train": "d.jsonl"}, template="{dialogue}",
                           target_template="{sumary}"), "train")
  with pytest.raises(UserError, match=r"key 'references': no column 'ref' in .*did you mean "
                                      r"'refs'"):
    registry.examples(spec(format="jsonl", splits={"train": "d.jsonl"}, template="{dialogue}",
                           references="ref"), "train")
  with pytest.raises(UserError, match=rf"^{path}:1: column 'refs' \(key 'references'\) must hold a "
                                      "text or a list of texts, found 3$"):
    registry.examples(spec(format="jsonl", splits={"train": "d.jsonl"}, template="{dialogue}",
                           references="refs"), "train")


# ---------------------------------------------------------------------------------------------
# Truncation is counted.


def test_truncation_is_counted(spec, tmp_path, cli):
  sources = ["short", "a much longer source sentence", "tiny"]
  write_parallel(tmp_path, sources, ["s", "a much longer target", "t"])
  s = spec(format="parallel", splits={"train": {"source": "x.en", "target": "x.de"}})
  counts = input_pipeline.count_truncation(registry.build_task(s), "train",
                                           {"inputs": 10, "targets": 8})
  assert (counts.inputs, counts.targets, counts.answers_cut) == (1, 1, None)
  defs = tmp_path / "defs.yaml"
  defs.write_text(json.dumps({"tasks": [{
      "name": "s2s_show", "kind": "seq2seq", "format": "parallel", "vocabulary": "byte",
      "splits": {"train": {"source": str(tmp_path / "x.en"), "target": str(tmp_path / "x.de")}}}]}))
  rc, out, err = cli("show", "s2s_show", "--tasks-dir", defs, "--inputs-length", 10,
                     "--targets-length", 8)
  assert rc == 0, err
  assert ("truncation of s2s_show (all 3 train examples): 1 (33.3%) have inputs over 10 tokens, "
          "1 (33.3%) targets over 8 tokens") in out


# ---------------------------------------------------------------------------------------------
# Metrics, against the libraries' documented examples.

# sacrebleu's README: two reference streams for three hypotheses.
SACREBLEU_REFS = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
                  ["The dog had bit the man.", "No one was surprised.",
                   "The man had bitten the dog."]]
SACREBLEU_HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]


def per_example(streams):
  """sacrebleu's reference streams → each example's references (how t5mix's targets come)."""
  return [list(refs) for refs in zip(*streams)]


def test_bleu_and_chrf_match_sacrebleus_readme():
  targets = per_example(SACREBLEU_REFS)
  scores = metrics.bleu(targets, SACREBLEU_HYPS)
  assert scores["bleu"] == pytest.approx(48.53, abs=0.005)  # "BLEU = 48.53 82.4/50.0/45.5/37.5"
  assert scores["bleu_signature"].textdata == (
      f"nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}")
  scores = metrics.chrf(targets, SACREBLEU_HYPS)
  assert scores["chrf"] == pytest.approx(59.73, abs=0.005)  # "chrF2 = 59.73"
  assert scores["chrf_signature"].textdata == (
      f"nrefs:2|case:mixed|eff:yes|nc:6|nw:0|space:no|version:{sacrebleu.__version__}")


def test_bleu_with_a_varying_number_of_references():
  targets = [["The dog bit the man.", "The dog had bit the man."], "It was not unexpected.",
             ["The man bit him first."]]
  scores = metrics.bleu(targets, SACREBLEU_HYPS)
  expected = sacrebleu.corpus_bleu(SACREBLEU_HYPS, [
      [t[0] if isinstance(t, list) else t for t in targets],
      ["The dog had bit the man.", None, None]])
  assert scores["bleu"] == pytest.approx(expected.score)
  assert scores["bleu_signature"].textdata.startswith("nrefs:var|")


def test_rouge_matches_rouge_scores_readme():
  # rouge-score's README: RougeScorer(['rouge1', 'rougeL'], use_stemmer=True).score(target,
  # prediction) gives rouge1 F 0.7058823529411765 and rougeL F 0.5882352941176471.
  target = "The quick brown fox jumps over the lazy dog"
  prediction = "The quick brown dog jumps on the log."
  scores = metrics.rouge([[target]], [prediction])
  assert scores["rouge1"] == pytest.approx(100 * 0.7058823529411765)
  assert scores["rougeLsum"] == pytest.approx(100 * 0.5882352941176471)  # one line: rougeL's
  library = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True).score(target, prediction)
  assert scores["rouge2"] == pytest.approx(100 * library["rouge2"].fmeasure)


def test_rouge_lsum_splits_sentences_at_newlines_and_takes_the_best_reference():
  target = "the cat sat on the mat\nthe dog ran in the park"
  prediction = "the dog ran in the park\nthe cat sat on the mat"
  scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)
  library = scorer.score(target, prediction)
  scores = metrics.rouge([["unrelated words", target]], [prediction])
  assert scores["rougeLsum"] == pytest.approx(100 * library["rougeLsum"].fmeasure) == 100
  assert library["rougeL"].fmeasure < 0.6  # without the split, the sentence order costs
  many = metrics.rouge([["the cat sat", "x"], ["a dog"]], ["the cat sat", "the dog"])
  assert many["rouge1"] == pytest.approx((100 + 50) / 2)  # "a dog" / "the dog": P = R = 1/2


def test_exact_match():
  assert metrics.exact_match([["a b", "c"], ["d"], "e "], ["c", "D", " e"]) == {
      "exact_match": pytest.approx(200 / 3)}


def test_references_postprocessor_errors():
  with pytest.raises(ValueError, match="needs the example's 'references'"):
    metrics.references_postprocessor("x", example={}, is_target=True)
  with pytest.raises(ValueError, match="not a JSON list of strings"):
    metrics.references_postprocessor("x", example={"references": b"oops"}, is_target=True)


def test_glue_average_takes_each_tasks_mean_metric():
  scores = {"wmt": metrics.bleu([["a b c d"]], ["a b c d"]), "sst2": {"accuracy": 50.0}}
  numbers = {task: {k: v for k, v in s.items() if not k.endswith(metrics.SIGNATURE_SUFFIX)}
             for task, s in scores.items()}
  assert metrics.glue_average(numbers) == pytest.approx((100 + 50) / 2)


# ---------------------------------------------------------------------------------------------
# Decoding settings.


def test_task_decoder_takes_the_tasks_settings(spec, tmp_path):
  write_parallel(tmp_path, ["a"], ["b"])
  splits = {"train": {"source": "x.en", "target": "x.de"}}
  task = registry.build_task(spec(format="parallel", splits=splits, beam_size=4,
                                  length_penalty=1.0, max_decode_length=48))
  decoder = evaluate.task_decoder(task, None, max_decode_len=16)
  assert decoder.settings == {"beam_size": 4, "length_penalty": 1.0, "max_decode_len": 48}
  assert decoder.description == "beam search (4 beams), length penalty 1"
  assert evaluate.task_decoder(task, None, max_decode_len=16, beam_size=1).beam_size == 1
  plain = registry.build_task(spec(format="parallel", splits=splits))
  assert evaluate.task_decoder(plain, None, max_decode_len=16).settings == {
      "beam_size": 1, "length_penalty": decode.LENGTH_PENALTY, "max_decode_len": 16}


# ---------------------------------------------------------------------------------------------
# A tiny trained run: eval, predict and evaluation during training on a generation task mixed
# with a classification task.

GENERATION_TASK = "rev_gen"


@pytest.fixture(scope="module")
def generation_run(tmp_path_factory):
  """(workdir, train log lines) of a 4-step run of the tiny model on rev_gen (reverse the words;
  its definition decodes with 2 beams, up to 24 tokens) and demo_sentiment, in bytes."""
  directory = tmp_path_factory.mktemp("generation_run")
  rng = np.random.default_rng(0)
  words = "red green blue cat dog bird sun moon tree river".split()
  sources = [" ".join(rng.choice(words, rng.integers(2, 6))) for _ in range(40)]
  write_parallel(directory, sources, [" ".join(s.split()[::-1]) for s in sources])
  defs = directory / "defs.yaml"
  defs.write_text(json.dumps({
      "tasks": [{"name": GENERATION_TASK, "kind": "seq2seq", "format": "parallel",
                 "splits": {"train": {"source": "x.en", "target": "x.de", "select": ":30"},
                            "validation": {"source": "x.en", "target": "x.de", "select": "30:"}},
                 "template": "reverse: {source}",
                 "metrics": ["bleu", "chrf", "rouge", "exact_match"],
                 "beam_size": 2, "max_decode_length": 24}],
      "mixtures": [{"name": "rev_and_sentiment", "rate": "equal",
                    "tasks": [GENERATION_TASK, "demo_sentiment"]}]}))
  definitions.load([str(defs)])
  config = config_lib.load(None, [
      "model=tiny", "model_overrides.vocab_size=384", "data.mixture=rev_and_sentiment",
      f"data.tasks_dir=[{defs}]", "data.vocab=byte", "data.batch_size=8", "data.inputs_length=64",
      "data.targets_length=16", "steps=4", "log_every=4", "eval_every=4", "eval_examples=3"])
  workdir = directory / "run"
  lines = []
  train.train(config, str(workdir), quiet=True, log=lines.append)
  return workdir, lines


@pytest.mark.slow
def test_eval_uses_each_tasks_decoding_and_averages_every_task(cli, generation_run):
  workdir, lines = generation_run
  during = next(line for line in lines if line.startswith("eval "))  # evaluation during training
  assert f"| {GENERATION_TASK} bleu " in during and " rougeLsum " in during
  rc, out, err = cli("eval", "--workdir", workdir, "--max-examples", 6)
  assert rc == 0, err
  assert (f"evaluating demo_sentiment (6 examples), {GENERATION_TASK} (6 examples, beam search "
          "(2 beams), up to 24 tokens) on 'validation', greedy") in out
  assert f"truncation of {GENERATION_TASK} (the first 6 of 10 validation examples)" in out
  results = json.loads((workdir / "eval" / "results.json").read_text())
  assert results["decoding"] == {"beam_size": 1, "max_decode_len": 16, "inputs_length": 64}
  assert results["task_decoding"] == {
      GENERATION_TASK: {"beam_size": 2, "length_penalty": 0.6, "max_decode_len": 24},
      "demo_sentiment": {"beam_size": 1, "length_penalty": 0.6, "max_decode_len": 16}}
  version = sacrebleu.__version__
  assert results["signatures"] == {GENERATION_TASK: {
      "bleu": f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{version}",
      "chrf": f"nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:{version}"}}
  (entry,) = results["steps"].values()
  assert set(entry["metrics"][GENERATION_TASK]) == {
      "bleu", "chrf", "rouge1", "rouge2", "rougeLsum", "exact_match"}
  means, scores = entry["task_means"], entry["metrics"][GENERATION_TASK]
  assert means[GENERATION_TASK] == pytest.approx(np.mean(list(scores.values())))
  assert entry["average"] == pytest.approx((means[GENERATION_TASK] + means["demo_sentiment"]) / 2)


@pytest.mark.slow
def test_beam_size_flag_overrides_the_task_and_decodes_by_beam_search(cli, generation_run,
                                                                      tmp_path):
  workdir, _ = generation_run
  rc, out, err = cli("eval", "--workdir", workdir, "--tasks", GENERATION_TASK, "--beam-size", 3,
                     "--max-examples", 4)
  assert rc == 0, err
  assert (f"{GENERATION_TASK} (4 examples, up to 24 tokens) on 'validation', beam search "
          "(3 beams)") in out
  results = json.loads((workdir / "eval" / "results.json").read_text())
  assert results["task_decoding"][GENERATION_TASK]["beam_size"] == 3
  texts = ["red cat", "blue sun moon tree"]
  out_path = tmp_path / "predictions.jsonl"
  rc, out, err = cli("predict", "--workdir", workdir, "--task", GENERATION_TASK, "--beam-size", 3,
                     "--output", out_path, *texts)
  assert rc == 0, err
  rows = [json.loads(line) for line in out_path.read_text().splitlines()]
  _, model = checkpoints.load_workdir_params(str(workdir))
  inputs = evaluate.tokenize_inputs([f"reverse: {t}" for t in texts], BYTE, 64)
  tokens = decode.beam_search(model, inputs, max_decode_len=24, beam_size=3)
  assert [r["prediction"] for r in rows] == [BYTE.decode(t.tolist()) for t in np.asarray(tokens)]
  assert [r["parsed"] for r in rows] == [r["prediction"] for r in rows]


@pytest.mark.slow
def test_predict_prints_generated_text(cli, generation_run, tmp_path):
  workdir, _ = generation_run
  out_path = tmp_path / "predictions.jsonl"
  rc, _, err = cli("predict", "--workdir", workdir, "--task", GENERATION_TASK, "red cat",
                   "--output", out_path)
  assert rc == 0, err
  (row,) = [json.loads(line) for line in out_path.read_text().splitlines()]
  rc, out, err = cli("predict", "--workdir", workdir, "--task", GENERATION_TASK, "red cat")
  assert rc == 0, err
  assert out.splitlines() == ["[0] reverse: red cat", f"    -> {row['prediction']}"]
