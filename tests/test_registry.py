"""Task specs → text-to-text examples: every kind on real-format fixtures, split carving, specs.

Each conversion is checked twice with exact strings: directly (`registry.examples`) and through
the seqio Task (tokenized with the byte vocabulary, then decoded).
"""

import json
import os

import pytest
import seqio

import t5mix
from t5mix import ner, registry, span_corruption
from t5mix.errors import UserError

pytestmark = pytest.mark.usefixtures("clean_registry")

BYTE = seqio.ByteVocabulary(extra_ids=100)


@pytest.fixture
def spec(fixtures_dir, unique_name):
  """spec(**keys) → a validated TaskSpec whose relative paths resolve in tests/fixtures."""
  def make(**keys):
    keys.setdefault("name", unique_name("spec"))
    keys.setdefault("vocabulary", "byte")
    return registry.TaskSpec.from_dict(keys, origin="test.yaml: tasks[0]", base_dir=str(fixtures_dir))
  return make


def direct(spec, split="train"):
  return [(ex["inputs"], ex["targets"]) for ex in registry.examples(spec, split)]


def through_pipeline(spec, split="train", lengths=None):
  """(inputs, targets) decoded from the seqio Task's token ids (EOS checked and removed)."""
  task = registry.build_task(spec)
  vocab = task.output_features["targets"].vocabulary
  assert isinstance(vocab, seqio.ByteVocabulary)
  rows = []
  for ex in task.get_dataset(lengths, split=split, shuffle=False).as_numpy_iterator():
    inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
    assert targets[-1] == vocab.eos_id and inputs[-1] == vocab.eos_id
    rows.append((vocab.decode(inputs), vocab.decode(targets)))
  return rows


def check(spec, expected, split="train"):
  assert direct(spec, split) == expected
  assert through_pipeline(spec, split) == expected


# ---------------------------------------------------------------------------------------------
# Each kind on each format.


def test_classification_tsv(spec):
  s = spec(kind="classification", format="tsv", splits={"train": "sst.tsv"},
           template="sst2 sentence: {sentence}", label_words=["negative", "positive"])
  check(s, [("sst2 sentence: a gripping , funny film .", "positive"),
            ("sst2 sentence: it 's a dull mess .", "negative"),
            ("sst2 sentence: Café scenes in Zürich shine", "positive")])


def test_classification_default_template_uses_task_name_and_columns(spec, unique_name):
  name = unique_name("sst")
  s = spec(name=name, kind="classification", format="tsv", splits={"train": "sst.tsv"},
           label_words=["negative", "positive"])
  assert direct(s)[1] == (f"{name} sentence: it 's a dull mess .", "negative")


def test_classification_sentence_pair_tsv_with_quoted_fields(spec):
  s = spec(kind="classification", format="tsv", splits={"train": "rte.tsv"},
           template="rte sentence1: {sentence1} sentence2: {sentence2}",
           label_words={"entailment": "entailment", "not_entailment": "not_entailment"})
  check(s, [('rte sentence1: She said "yes"\tthen left. sentence2: She agreed.', "entailment"),
            ('rte sentence1: Paris is in France. sentence2: The city of "lights" is in Italy.',
             "not_entailment"),
            ('rte sentence1: No quotes here. sentence2: A plain "inner" quote.', "entailment")])


def test_classification_csv_with_fields_and_label_column(spec):
  s = spec(kind="classification", format="csv", splits={"train": "reviews.csv"},
           template="review: {text}", fields={"text": "review"}, label="stars",
           label_words={"pos": "positive", "neg": "negative"})
  check(s, [("review: Great, would buy again", "positive"),
            ('review: Broke after a day, "sadly"', "negative"),
            ("review: Okay I guess", "negative")])


def test_qa_jsonl(spec):
  s = spec(kind="qa", format="jsonl", splits={"train": "qa.jsonl"})
  check(s, [("question: Who wrote Hamlet? context: Hamlet is a tragedy by William Shakespeare.",
             "William Shakespeare"),
            ("question: Where is Zürich? context: Zürich is a city in Switzerland.", "Switzerland")])
  answers = [json.loads(ex["answers"]) for ex in registry.examples(s, "train")]
  assert answers == [["William Shakespeare", "Shakespeare"], ["Switzerland"]]


SQUAD_EXPECTED = [
    ("question: Who wrote Hamlet? context: Hamlet is a tragedy written by William Shakespeare "
     "around 1600.", "William Shakespeare"),
    ("question: When was Hamlet written? context: Hamlet is a tragedy written by William "
     "Shakespeare around 1600.", "around 1600"),
    ("question: Where is the play set? context: The play is set in Denmark.", "Denmark"),
    ("question: Which country is Zürich in? context: Zürich is the largest city in Switzerland.",
     "Switzerland"),
    ("question: What is the atomic number of oxygen? context: Oxygen has the atomic number 8.", "8"),
    ("question: Into which sea does the Nile flow? context: The Nile flows north into the "
     "Mediterranean Sea.", "Mediterranean Sea"),
    ("question: Which way does the Nile flow? context: The Nile flows north into the "
     "Mediterranean Sea.", "north"),
]


def test_qa_squad_json_keeps_all_gold_answers(spec):
  s = spec(kind="qa", format="squad_json", splits={"train": "squad.json"},
           template="question: {question} context: {context}")
  check(s, SQUAD_EXPECTED)
  answers = [json.loads(ex["answers"]) for ex in registry.examples(s, "train")]
  assert answers[0] == ["William Shakespeare", "Shakespeare", "William Shakespeare"]
  assert answers[1] == ["around 1600", "1600"]
  assert answers[5] == ["Mediterranean Sea", "Mediterranean"]


NER_GOLD = [
    ("ner: EU rejects German call to boycott British lamb .",
     "ORG: EU; MISC: German; MISC: British",
     [("ORG", "EU"), ("MISC", "German"), ("MISC", "British")]),
    ("ner: Peter Blackburn", "PER: Peter Blackburn", [("PER", "Peter Blackburn")]),
    ("ner: Smith Jones met in New York City .", "PER: Smith; PER: Jones; LOC: New York City",
     [("PER", "Smith"), ("PER", "Jones"), ("LOC", "New York City")]),
    ("ner: Nothing happened today .", "none", []),
    ("ner: Rock;Paper signed with AT&T .", "ORG: Rock\\;Paper; ORG: AT&T",
     [("ORG", "Rock;Paper"), ("ORG", "AT&T")]),
]


@pytest.mark.parametrize("scheme", ["iob1", "iob2", "bioes"])
def test_ner_conll_schemes(spec, scheme):
  s = spec(kind="ner", format="conll", splits={"train": f"ner_{scheme}.conll"}, scheme=scheme,
           template="ner: {sentence}")
  check(s, [(inputs, targets) for inputs, targets, _ in NER_GOLD])


@pytest.mark.parametrize("scheme", ["IOBES", "bilou"])
def test_ner_every_scheme_the_parser_reads_is_accepted(spec, fixtures_dir, tmp_path, scheme):
  """ner.SCHEMES is the one list: its aliases (any case) work in a task, not only in the parser."""
  text = (fixtures_dir / "ner_bioes.conll").read_text()
  if scheme == "bilou":
    text = text.replace("\tE-", "\tL-").replace("\tS-", "\tU-")
  path = tmp_path / f"ner_{scheme}.conll"
  path.write_text(text)
  s = spec(kind="ner", format="conll", splits={"train": str(path)}, scheme=scheme,
           template="ner: {sentence}")
  assert direct(s) == [(inputs, targets) for inputs, targets, _ in NER_GOLD]


@pytest.mark.parametrize("scheme", ["iob1", "iob2", "bioes"])
def test_ner_target_round_trip_through_pipeline(spec, scheme):
  s = spec(kind="ner", format="conll", splits={"train": f"ner_{scheme}.conll"}, scheme=scheme)
  targets = [t for _, t in through_pipeline(s)]
  assert [ner.parse_entities(t) for t in targets] == [gold for _, _, gold in NER_GOLD]


def test_ner_default_template_is_task_name(spec, unique_name):
  name = unique_name("conll")
  s = spec(name=name, kind="ner", format="conll", splits={"train": "ner_iob2.conll"})
  assert direct(s)[1] == (f"{name}: Peter Blackburn", "PER: Peter Blackburn")


def test_text_task_over_conll_tokens(spec):
  """A text (span-corruption) task can read another format: a token list reads as words, not a list."""
  s = spec(kind="text", format="conll", splits={"train": "ner_iob2.conll"}, template="{tokens}")
  assert [target for _, target in direct(s)] == [inputs[len("ner: "):] for inputs, _, _ in NER_GOLD]


def test_ner_jsonl_tokens_and_tags(spec, tmp_path):
  path = tmp_path / "ner.jsonl"
  path.write_text(json.dumps({"words": ["Ada", "Lovelace", "visited", "Paris"],
                              "labels": ["B-PER", "I-PER", "O", "B-LOC"]}) + "\n")
  s = spec(kind="ner", format="jsonl", splits={"train": str(path)}, tokens="words", tags="labels")
  check(s, [("{}: Ada Lovelace visited Paris".format(s.name), "PER: Ada Lovelace; LOC: Paris")])


def _uncorrupt(inputs, targets, vocab):
  """The original token ids from span-corrupted inputs and targets (sentinels ≥ first_sentinel)."""
  first_sentinel = vocab.vocab_size - 100
  spans, current = {}, None
  for t in targets:
    if t >= first_sentinel:
      current = t
      spans[current] = []
    elif t != vocab.eos_id:
      spans[current].append(t)
  out = []
  for t in inputs:
    if t >= first_sentinel:
      out += spans[t]
    elif t != vocab.eos_id:
      out.append(t)
  return out


def test_text_kind(spec):
  s = spec(kind="text", format="text", splits={"train": "text.txt"})
  docs = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs."]
  assert direct(s) == [("", d) for d in docs]
  _, targets_length = span_corruption.random_spans_helper(128, 0.15, 3.0)
  task = registry.build_task(s)
  rows = list(task.get_dataset({"inputs": 128, "targets": targets_length}, split="train",
                               shuffle=False, seed=0).as_numpy_iterator())
  assert len(rows) == 2
  for row, doc in zip(rows, docs):
    inputs, targets = row["inputs"].tolist(), row["targets"].tolist()
    assert any(t >= BYTE.vocab_size - 100 for t in inputs)  # some span was corrupted
    assert BYTE.decode(_uncorrupt(inputs, targets, BYTE)) == doc


def test_empty_lines_and_bom_are_handled(spec, tmp_path):
  bom = b"\xef\xbb\xbf"
  (tmp_path / "bom.tsv").write_bytes(bom + b"sentence\tlabel\n\nfine\t1\n\n   \nbad\t0\n\n")
  (tmp_path / "bom.jsonl").write_bytes(bom + b'{"q": "a?", "c": "b", "answers": ["b"]}\n\n\n'
                                       b'{"q": "c?", "c": "d", "answers": ["d"]}\n')
  (tmp_path / "bom.conll").write_bytes(bom + b"Ada B-PER\n\n\n\nParis B-LOC\n\n")
  (tmp_path / "bom.txt").write_bytes(bom + b"one\n\n\ntwo\n")
  (tmp_path / "bom.json").write_bytes(bom + json.dumps({"data": [{"title": "t", "paragraphs": [
      {"context": "c", "qas": [{"id": "1", "question": "q", "answers": [{"text": "c"}]}]}]}]})
      .encode())
  assert direct(spec(kind="classification", format="tsv", splits={"train": str(tmp_path / "bom.tsv")},
                     template="{sentence}", label_words=["no", "yes"])) == [("fine", "yes"), ("bad", "no")]
  assert direct(spec(kind="qa", format="jsonl", splits={"train": str(tmp_path / "bom.jsonl")},
                     template="{q} {c}")) == [("a? b", "b"), ("c? d", "d")]
  assert direct(spec(kind="ner", format="conll", splits={"train": str(tmp_path / "bom.conll")},
                     template="{sentence}")) == [("Ada", "PER: Ada"), ("Paris", "LOC: Paris")]
  assert direct(spec(kind="text", format="text", splits={"train": str(tmp_path / "bom.txt")})) == [
      ("", "one"), ("", "two")]
  assert direct(spec(kind="qa", format="squad_json", splits={"train": str(tmp_path / "bom.json")},
                     template="{question}")) == [("q", "c")]


# ---------------------------------------------------------------------------------------------
# `select:` split carving.


def test_select_percent_and_absolute(spec, tmp_path):
  path = tmp_path / "rows.tsv"
  path.write_text("sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(10)))
  s = spec(kind="classification", format="tsv", template="{sentence}", label_words=["a", "b"],
           splits={"train": {"path": str(path), "select": "0:80%"},
                   "validation": {"path": str(path), "select": "80%:"},
                   "test": {"path": str(path), "select": "2:5"},
                   "last": {"path": str(path), "select": "-2:"},
                   "all": str(path)})
  rows = lambda split: [i for i, _ in direct(s, split)]  # noqa: E731
  assert rows("train") == [f"row {i}" for i in range(8)]
  assert rows("validation") == ["row 8", "row 9"]
  assert rows("test") == ["row 2", "row 3", "row 4"]
  assert rows("last") == ["row 8", "row 9"]
  assert len(rows("all")) == 10
  task = registry.build_task(s)
  assert {split: task.num_input_examples(split) for split in s.splits} == {
      "train": 8, "validation": 2, "test": 3, "last": 2, "all": 10}
  assert [i for i, _ in through_pipeline(s, "validation")] == ["row 8", "row 9"]


def test_select_squad_by_article(spec):
  s = spec(kind="qa", format="squad_json", template="{context}",
           splits={"train": {"path": "squad.json", "select": "0:75%"},
                   "validation": {"path": "squad.json", "select": "75%:"},
                   "second": {"path": "squad.json", "select": "1:2"}})
  train, validation = direct(s, "train"), direct(s, "validation")
  assert [t for _, t in train] == [t for _, t in SQUAD_EXPECTED[:5]]  # articles 0-2, whole
  assert [t for _, t in validation] == ["Mediterranean Sea", "north"]  # article 3
  assert not {c for c, _ in train} & {c for c, _ in validation}  # no context in two splits
  assert direct(s, "second") == [("Zürich is the largest city in Switzerland.", "Switzerland")]


def test_select_syntax_error(spec):
  """Found when the task is defined, before any data is read."""
  with pytest.raises(UserError, match=r"key 'splits': split 'train': select 'a:b' is not "
                                      r"'START:END'"):
    spec(kind="text", format="text", splits={"train": {"path": "text.txt", "select": "a:b"}})


def test_unknown_split_is_an_error(spec):
  s = spec(kind="text", format="text", splits={"train": "text.txt"})
  with pytest.raises(UserError, match=r"has no split 'validation'; it has train"):
    registry.examples(s, "validation")


def test_edited_file_is_read_again(spec, tmp_path):
  path = tmp_path / "doc.txt"
  path.write_text("first\n")
  os.utime(path, (1, 1))
  assert direct(spec(kind="text", format="text", splits={"train": str(path)})) == [("", "first")]
  path.write_text("second\n")
  os.utime(path, (2, 2))  # a new mtime, whatever the clock's resolution
  assert direct(spec(kind="text", format="text", splits={"train": str(path)})) == [("", "second")]


# ---------------------------------------------------------------------------------------------
# Spec validation (the CLI tests check the same errors end to end).

BASE = dict(name="ok", kind="classification", format="tsv", splits={"train": "sst.tsv"},
            label_words=["negative", "positive"])


def from_dict(**changes):
  d = {**BASE, **changes}
  return registry.TaskSpec.from_dict({k: v for k, v in d.items() if v is not ...},
                                     origin="defs.yaml: tasks[3]")


@pytest.mark.parametrize("changes, message", [
    (dict(splits=...), r"defs.yaml: tasks\[3\]: task 'ok': missing required key 'splits'"),
    (dict(kind=...), r"missing required key 'kind'"),
    (dict(lable_words=["a"]), r"unknown key 'lable_words' \(did you mean 'label_words'\?\)"),
    (dict(template=5), r"task 'ok': key 'template' must be a string, found int 5"),
    (dict(label_words=5), r"key 'label_words' must be a list or mapping"),
    (dict(label_words=None), r"classification needs 'label_words'"),
    (dict(token_column="x"), r"key 'token_column' must be an integer, found str 'x'"),
    (dict(noise_density="high"), r"key 'noise_density' must be a number"),
    (dict(metrics="accuracy"), r"key 'metrics' must be a list"),
    (dict(metrics=["acc"]), r"key 'metrics': unknown metric 'acc'"),
    (dict(columns=["a", 1]), r"key 'columns': 1 is not a string"),
    (dict(fields={"text": ["a"]}), r"key 'fields': \['a'\] is not a string"),
    (dict(splits=["sst.tsv"]), r"key 'splits' must be a mapping"),
    (dict(splits={"train": None}), r"split 'train' must map to a file path"),
    (dict(splits={}), r"key 'splits' must map split names to files"),
    (dict(kind="regression"), r"key 'kind': 'regression' is not one of"),
    (dict(format="xml"), r"key 'format': 'xml' is not one of"),
    (dict(tfds="glue/sst2"), r"give exactly one of 'format' \(local files\), 'tfds' or 'source'"),
    (dict(name="bad name"), r"key 'name': 'bad name' is not a valid task name"),
    (dict(kind="ner", scheme="bilou2"), r"key 'scheme': 'bilou2' is not one of iob1, iob2, bioes, "
                                        r"iobes, bilou \(did you mean 'bilou'\?\)"),
    (dict(template="{text"), r"key 'template': '\{text' is not a valid template \(expected '\}' "),
    (dict(template="{0} and {}"), r"key 'template': '\{0\} and \{\}' has a placeholder without "
                                  r"a name"),
    (dict(splits={"train": {"path": "sst.tsv", "slect": ":5"}}),
     r"key 'splits': split 'train': unknown key 'slect' \(did you mean 'select'\?\)"),
    (dict(splits={"train": {"select": ":5"}}), r"key 'splits': split 'train': no 'path'"),
])
def test_spec_errors(changes, message):
  with pytest.raises(UserError, match=message):
    from_dict(**changes)


def test_label_not_in_label_words(spec, tmp_path):
  path = tmp_path / "labels.tsv"
  path.write_text("sentence\tlabel\ngood\t1\nodd\t2\n")
  s = spec(kind="classification", format="tsv", splits={"train": str(path)},
           label_words=["negative", "positive"])
  with pytest.raises(UserError, match=rf"^{path}:3: label '2' is not in label_words \(0, 1\)$"):
    registry.examples(s, "train")


def test_spec_errors_name_the_line_of_the_key(fixtures_dir):
  lines = {"name": "defs.yaml:4", "template": "defs.yaml:9", "splits": "defs.yaml:6",
           "splits.train": "defs.yaml:7", "metrics": "defs.yaml:10", "metrics[1]": "defs.yaml:11"}
  make = lambda **changes: registry.TaskSpec.from_dict(  # noqa: E731
      {**BASE, **changes}, origin="defs.yaml:4", base_dir=str(fixtures_dir), key_origins=lines)
  with pytest.raises(UserError, match=r"^defs.yaml:9: task 'ok': key 'template' must be a string"):
    make(template=5)
  with pytest.raises(UserError, match=r"^defs.yaml:7: task 'ok': key 'splits': split 'train' must"):
    make(splits={"train": 5})
  with pytest.raises(UserError, match=r"^defs.yaml:11: task 'ok': key 'metrics': unknown metric "
                                      r"'acuracy' \(did you mean 'accuracy'\?\)"):
    make(metrics=["f1", "acuracy"])
  with pytest.raises(UserError, match=r"^defs.yaml:4: task 'ok': key 'kind'"):  # the task's line
    make(kind="regression")


@pytest.mark.parametrize("keys, message", [
    (dict(template="{text}"), r"^defs.yaml:9: task 'ok': key 'template': placeholder \{text\} is "
                              r"not a column of \S+/sst.tsv; its columns are sentence, label "
                              r"\(\{name\} is the task name\)$"),
    (dict(template="{sentense}"), r"placeholder \{sentense\} is not a column of \S+/sst.tsv \(did "
                                  r"you mean \{sentence\}\?\)"),
    (dict(template="{nme}: {sentence}"), r"\(did you mean \{name\}\?\)"),
    (dict(label="labels"), r"^defs.yaml:4: task 'ok': key 'label': no column 'labels' in "
                           r"\S+/sst.tsv \(did you mean 'label'\?\); its columns are sentence, "
                           r"label$"),
    (dict(template="{t}", fields={"t": "sentnce"}),
     r"^defs.yaml:4: task 'ok': key 'fields': placeholder \{t\}: no column 'sentnce'"),
])
def test_column_mistakes_are_found_at_the_first_record(fixtures_dir, keys, message):
  s = registry.TaskSpec.from_dict({**BASE, **keys}, origin="defs.yaml:4",
                                  base_dir=str(fixtures_dir), key_origins={"template": "defs.yaml:9"})
  with pytest.raises(UserError, match=message):
    registry.examples(s, "train")


def test_placeholders_that_are_no_column(spec):
  """{name} (every kind), {sentence} (NER) and `fields` placeholders are not columns, and fine."""
  s = spec(kind="ner", format="conll", splits={"train": "ner_iob2.conll"},
           template="{name} {s} {sentence}", fields={"s": "tokens"})
  assert direct(s)[1][0] == f"{s.name} Peter Blackburn Peter Blackburn"


def test_a_later_record_without_a_column(spec, tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text('{"sentence": "a", "label": 1}\n{"sentence": "b"}\n{"label": 0}\n')
  s = spec(kind="classification", format="jsonl", splits={"train": str(path)},
           label_words=["x", "y"], template="{sentence}")
  with pytest.raises(UserError, match=rf"^{path}:2: no label column 'label' in this record; its "
                                      r"columns are sentence$"):
    registry.examples(s, "train")
  path.write_text('{"sentence": "a", "label": 1}\n{"label": 0}\n')
  with pytest.raises(UserError, match=rf"^{path}:2: no column 'sentence' for the template in this "
                                      r"record; its columns are label$"):
    registry.examples(s, "train")


def test_ner_tag_errors_name_file_and_line(spec, tmp_path):
  path = tmp_path / "bad.conll"
  path.write_text("Ada B-PER\n\nin O\nNew I-LOC\nYork I-LOC\n")
  s = spec(kind="ner", format="conll", splits={"train": str(path)}, scheme="iob2")
  with pytest.raises(UserError, match=rf"^{path}:3: tag 'I-LOC' at token 2 does not continue"):
    registry.examples(s, "train")


def test_qa_answer_objects_are_accepted(spec, tmp_path):
  path = tmp_path / "qa.jsonl"
  path.write_text(
      json.dumps({"question": "q1", "context": "c1", "answers": [{"text": "a", "answer_start": 0},
                                                                   {"text": "b", "answer_start": 1}]})
      + "\n" + json.dumps({"question": "q2", "context": "c2",
                           "answers": {"text": ["x", "y"], "answer_start": [0, 2]}}) + "\n")
  s = spec(kind="qa", format="jsonl", splits={"train": str(path)}, template="{question}")
  assert [(ex["targets"], json.loads(ex["answers"])) for ex in registry.examples(s, "train")] == [
      ("a", ["a", "b"]), ("x", ["x", "y"])]


@pytest.mark.parametrize("kind, record, extra, message", [
    ("ner", {"tokens": ["Ada", "spoke"], "tags": [1, 0]}, {},
     r"'tags' must be a list of strings \(tag names such as 'B-PER', not ids\), found \[1, 0\]"),
    ("ner", {"tokens": "Ada spoke", "tags": ["B-PER", "O"]}, {}, r"'tokens' must be a list of strings"),
    ("ner", {"tokens": ["Ada", "spoke"], "tags": ["B-PER"]}, {}, r"2 tokens but 1 tags"),
    ("qa", {"question": "q", "context": "c", "answers": []}, {}, r"no answer in column 'answers'"),
    ("qa", {"question": "q", "context": "c", "answers": [3]}, {},
     r"column 'answers' must hold an answer text or a list of them, found \[3\]"),
    ("classification", {"sentence": "s", "label": 1}, {"template": "{sentence.x}"},
     r"bad template '\{sentence.x\}'"),
    ("classification", {"sentence": "s", "label": 1}, {"template": "{label[0]}"},
     r"bad template '\{label\[0\]\}'"),
])
def test_record_errors_name_file_and_line(spec, tmp_path, kind, record, extra, message):
  path = tmp_path / "data.jsonl"
  path.write_text("\n" + json.dumps(record) + "\n")  # line 1 blank: the error names line 2
  if kind == "classification":
    extra = {"label_words": ["a", "b"], **extra}
  s = spec(kind=kind, format="jsonl", splits={"train": str(path)}, **extra)
  with pytest.raises(UserError, match=rf"^{path}:2: {message}"):
    registry.examples(s, "train")


# ---------------------------------------------------------------------------------------------
# add_task from Python.


def test_add_task_registers_and_names_its_caller(fixtures_dir, unique_name):
  name = unique_name("py")
  task = t5mix.add_task(name, kind="text", format="text",
                        splits={"train": str(fixtures_dir / "text.txt")}, vocabulary="byte")
  assert seqio.get_mixture_or_task(name) is task
  assert task.t5mix_spec.origin.startswith(f"{__file__}:")
  with pytest.raises(UserError, match=rf"^{__file__}:\d+: task '{name}' is already defined "
                                      rf"\(by {__file__}:\d+\); pick another name$"):
    t5mix.add_task(name, kind="text", format="text", splits={"train": "x.txt"})
  with pytest.raises(UserError, match=rf"^{__file__}:\d+: task '\w+': unknown key 'split' "
                                      r"\(did you mean 'splits'\?\)"):
    t5mix.add_task(unique_name("py"), kind="text", format="text", split={"train": "x"})


def test_add_task_explicit_origin(unique_name):
  name = unique_name("py")
  task = t5mix.add_task(name, kind="text", format="text", splits={"train": "x.txt"},
                        origin="my_module.py:7")
  assert task.t5mix_spec.origin == "my_module.py:7"


def test_counts_match_examples(spec):
  s = spec(kind="qa", format="squad_json", splits={"train": "squad.json"})
  assert registry.build_task(s).num_input_examples("train") == len(SQUAD_EXPECTED)


def test_get_task_or_mixture_suggests_close_names(builtins):
  with pytest.raises(UserError, match=r"unknown task or mixture 'demo_sentimnt'; did you mean "
                                      r"demo_sentiment"):
    registry.get_task_or_mixture("demo_sentimnt")
  with pytest.raises(UserError, match=r"see `t5mix tasks`"):
    registry.get_task_or_mixture("zzzzzzzzzzzz")
  assert isinstance(registry.get_task_or_mixture("demo_ner"), seqio.Task)
  assert isinstance(registry.get_task_or_mixture("demo"), seqio.Mixture)
