"""The built-in TFDS tasks, offline: `tfds.testing.mock_data` stands in for prepared data."""

import json

import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from t5mix import ner, registry
from t5mix.errors import UserError

pytestmark = pytest.mark.usefixtures("builtins")

TFDS_TASKS = ("glue_sst2", "glue_mrpc", "glue_rte", "glue_cola", "squad_v1", "conll2003")


@pytest.fixture(autouse=True)
def fresh_tfds_state(monkeypatch):
  """Records and counts read under mock_data must not leak into other tests (both are cached)."""
  monkeypatch.setattr(registry, "TFDS_DATA_DIR", None)

  def clear():
    registry._examples_cached.cache_clear()
    for name in TFDS_TASKS:
      getattr(seqio.TaskRegistry.get(name).source, "_counts", {}).clear()
  clear()
  yield
  clear()


def decoded(task, split):
  vocab = task.output_features["targets"].vocabulary
  return [(vocab.decode(ex["inputs"].tolist()), vocab.decode(ex["targets"].tolist()))
          for ex in task.get_dataset(None, split=split, shuffle=False).as_numpy_iterator()]


def text(value):
  return value.decode("utf-8")


@pytest.mark.parametrize("name, tfds_name, make_inputs, words", [
    ("glue_sst2", "glue/sst2:2.0.0", lambda r: f"sst2 sentence: {text(r['sentence'])}",
     ["negative", "positive"]),
    ("glue_rte", "glue/rte:2.0.0",
     lambda r: f"rte sentence1: {text(r['sentence1'])} sentence2: {text(r['sentence2'])}",
     ["entailment", "not_entailment"]),
    ("glue_mrpc", "glue/mrpc:2.0.0",
     lambda r: f"mrpc sentence1: {text(r['sentence1'])} sentence2: {text(r['sentence2'])}",
     ["not_equivalent", "equivalent"]),
    ("glue_cola", "glue/cola:2.0.0", lambda r: f"cola sentence: {text(r['sentence'])}",
     ["unacceptable", "acceptable"]),
])
def test_glue_tasks(name, tfds_name, make_inputs, words):
  with tfds.testing.mock_data(num_examples=5):
    raw = list(tfds.as_numpy(tfds.load(tfds_name, split="train")))
    task = seqio.get_mixture_or_task(name)
    examples = registry.examples(task.t5mix_spec, "train")
    pipeline = decoded(task, "train")
    counts = {split: task.num_input_examples(split) for split in task.splits}
  expected = [(make_inputs(r), words[r["label"]]) for r in raw]
  assert len(expected) == 5
  assert [(ex["inputs"], ex["targets"]) for ex in examples] == expected
  assert pipeline == expected
  assert counts == {"train": 5, "validation": 5}


def test_squad_v1():
  with tfds.testing.mock_data(num_examples=4):
    raw = list(tfds.as_numpy(tfds.load("squad/v1.1:3.0.0", split="validation")))
    task = seqio.get_mixture_or_task("squad_v1")
    examples = registry.examples(task.t5mix_spec, "validation")
    pipeline = decoded(task, "validation")
  expected = [(f"question: {text(r['question'])} context: {text(r['context'])}",
               text(r["answers"]["text"][0])) for r in raw]
  assert [(ex["inputs"], ex["targets"]) for ex in examples] == expected
  assert pipeline == expected
  assert [json.loads(ex["answers"]) for ex in examples] == [
      [text(a) for a in r["answers"]["text"]] for r in raw]
  assert any(len(r["answers"]["text"]) > 1 for r in raw)  # several gold answers are kept


CONLL_SENTENCES = [
    (["EU", "rejects", "German", "call", "."], ["B-ORG", "O", "B-MISC", "O", "O"]),
    (["Peter", "Blackburn", "in", "New", "York"], ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]),
    (["Nothing", "."], ["O", "O"]),
]


def _conll_as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
  """Stands in for conll2003's prepared data: random mock tags would not be valid IOB2."""
  del split, decoders, read_config, shuffle_files, kwargs
  names = self.info.features["ner"].feature.names
  rows = [{"tokens": tokens, "ner": [names.index(t) for t in tags]}
          for tokens, tags in CONLL_SENTENCES]
  return tf.data.Dataset.from_generator(
      lambda: iter(rows), output_signature={"tokens": tf.TensorSpec([None], tf.string),
                                            "ner": tf.TensorSpec([None], tf.int64)})


def test_conll2003():
  with tfds.testing.mock_data(as_dataset_fn=_conll_as_dataset):
    task = seqio.get_mixture_or_task("conll2003")
    examples = registry.examples(task.t5mix_spec, "validation")  # TFDS split "dev"
    pipeline = decoded(task, "test")
    count = task.num_input_examples("train")
  expected = [("ner: EU rejects German call .", "ORG: EU; MISC: German"),
              ("ner: Peter Blackburn in New York", "PER: Peter Blackburn; LOC: New York"),
              ("ner: Nothing .", "none")]
  assert [(ex["inputs"], ex["targets"]) for ex in examples] == expected
  assert pipeline == expected
  assert count == 3
  assert [ner.parse_entities(t) for _, t in pipeline] == [
      [("ORG", "EU"), ("MISC", "German")], [("PER", "Peter Blackburn"), ("LOC", "New York")], []]


def test_not_prepared_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setattr(registry, "TFDS_DATA_DIR", str(tmp_path))
  spec = seqio.TaskRegistry.get("glue_sst2").t5mix_spec
  message = (rf"^dataset glue/sst2:2\.0\.0 not prepared in {tmp_path}; run `tfds build "
             rf"glue/sst2:2\.0\.0 --data_dir DIR` on a machine with internet, then pass "
             rf"--tfds-data-dir DIR \(or set TFDS_DATA_DIR\)$")
  with pytest.raises(UserError, match=message):
    registry.examples(spec, "train")
  with pytest.raises(UserError, match=message):
    registry.build_task(spec).num_input_examples("validation")


def test_not_prepared_through_cli(cli, expect_error, tmp_path):
  rc, out, err = cli("show", "glue_sst2", "--tfds-data-dir", tmp_path)
  expect_error(rc, err, f"dataset glue/sst2:2.0.0 not prepared in {tmp_path}; run `tfds build",
               "--tfds-data-dir DIR")
  rc, out, err = cli("tasks", "--tfds-data-dir", tmp_path)
  assert rc == 0, err
  rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
  for name in TFDS_TASKS:
    assert "train=not prepared validation=not prepared" in rows[name], rows[name]
  assert "test=not prepared" in rows["conll2003"]


def test_unknown_tfds_dataset_is_a_clear_error(clean_registry, unique_name):
  spec = registry.TaskSpec.from_dict(
      {"name": unique_name("tf"), "kind": "text", "tfds": "no_such_dataset_xyz",
       "splits": {"train": "train"}}, origin="defs.yaml: tasks[0]")
  with pytest.raises(UserError, match=r"TFDS dataset 'no_such_dataset_xyz' unavailable"):
    registry._tfds_builder(spec, None)


# ---------------------------------------------------------------------------------------------
# Real prepared data (a tiny dataset built locally, no downloads): counts come from the metadata.


class T5mixTinyCls(tfds.core.GeneratorBasedBuilder):
  """Registered with TFDS as "t5mix_tiny_cls"."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "sentence": tfds.features.Text(), "label": tfds.features.ClassLabel(names=["neg", "pos"])}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(3), "validation": self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"sentence": f"sentence {i}", "label": i % 2}


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  tfds.disable_progress_bar()
  tfds.builder("t5mix_tiny_cls", data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return data_dir


def test_prepared_dataset(prepared_dir, monkeypatch, clean_registry, unique_name):
  monkeypatch.setattr(registry, "TFDS_DATA_DIR", prepared_dir)
  spec = registry.TaskSpec.from_dict(
      {"name": unique_name("tiny"), "kind": "classification", "tfds": "t5mix_tiny_cls:1.0.0",
       "splits": {"train": "train", "validation": "validation", "head": "train[:2]",
                  "bogus": "nope"},
       "template": "tiny: {sentence}", "label_words": ["negative", "positive"],
       "vocabulary": "byte"}, origin="defs.yaml: tasks[0]")
  task = registry.build_task(spec)
  assert [task.num_input_examples(s) for s in ("train", "validation", "head")] == [3, 2, 2]
  assert sorted(decoded(task, "train")) == [("tiny: sentence 0", "negative"),
                                            ("tiny: sentence 1", "positive"),
                                            ("tiny: sentence 2", "negative")]
  assert len(registry.examples(spec, "head")) == 2
  message = r"defs.yaml: tasks\[0\]: task '\S+': split 'bogus' \('nope' of t5mix_tiny_cls:1.0.0\): " \
            r"Unknown split 'nope'"
  with pytest.raises(UserError, match=message):
    task.num_input_examples("bogus")
  with pytest.raises(UserError, match=message):
    registry.examples(spec, "bogus")
