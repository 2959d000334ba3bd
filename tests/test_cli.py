"""The `t5mix` command line: listing, showing, vocab training, user definitions, and bad input.

Commands run in-process (`t5mix.cli.main`); two real runs of the console script check the exit
code and that stderr holds one line and no traceback.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import seqio
import yaml

from t5mix import cli as cli_lib
from t5mix import definitions, ner, vocab

pytestmark = pytest.mark.usefixtures("clean_registry")

DEMO_PY = os.path.join(definitions.PROJECT_ROOT, "tasks", "demo.py")
TFDS_YAML = os.path.join(definitions.PROJECT_ROOT, "tasks", "tfds.yaml")


def table_rows(out):
  """First column → whole line, for the rows of `t5mix tasks` tables."""
  return {line.split()[0]: line for line in out.splitlines() if line.strip()}


def line_of(path, key):
  """`path:N`, N the line of the first `key:` (or `- key:`, or the list item `- key`) in the
  YAML file `path`."""
  for number, line in enumerate(open(path, encoding="utf-8"), start=1):
    if line.strip().removeprefix("- ").startswith(f"{key}:") or line.strip() == f"- {key}":
      return f"{path}:{number}"
  raise AssertionError(f"no key {key!r} in {path}")


class Lines:
  """`"{at[key]}".format(at=Lines(path))` → `path:N` of that key (see line_of)."""

  def __init__(self, path):
    self.path = path

  def __getitem__(self, key):
    return line_of(self.path, key)


# ---------------------------------------------------------------------------------------------
# tasks / show / vocab / --help


def test_tasks_lists_builtin_and_demo_tasks_with_counts(cli, tmp_path):
  rc, out, err = cli("tasks", "--tfds-data-dir", tmp_path)
  assert rc == 0, err
  rows = table_rows(out)
  # Metrics by the names `metrics:` takes (and the README lists), not their functions' names
  # (f1_binary, matthews_corrcoef).
  assert re.search(r"demo_sentiment\s+classification\s+tsv:\S+sentiment\.train\.tsv\s+"
                   r"train=3,000 validation=300\s+accuracy,f1_macro$", rows["demo_sentiment"])
  assert re.search(r"\s+accuracy,f1$", rows["glue_mrpc"])
  assert re.search(r"\s+mcc$", rows["glue_cola"])
  assert re.search(r"qa\s+squad_json:\S+\s+train=3,000 validation=300\s+squad", rows["demo_qa"])
  assert re.search(r"ner\s+conll:\S+\s+train=3,000 validation=300\s+span_f1", rows["demo_ner"])
  assert re.search(r"text\s+text:\S+\s+train=6,750\s+-$", rows["demo_text"])
  for name in ("glue_sst2", "glue_mrpc", "glue_rte", "glue_cola", "squad_v1", "conll2003"):
    assert "tfds:" in rows[name] and "train=not prepared validation=not prepared" in rows[name]
  assert re.search(r"demo_supervised\s+temperature T=2\s+demo_sentiment, demo_qa, demo_ner$",
                   rows["demo_supervised"])
  assert "glue_sst2, glue_mrpc, glue_rte, glue_cola" in rows["glue_t2"]


def test_tasks_no_counts(cli):
  rc, out, err = cli("tasks", "--no-counts")
  assert rc == 0, err
  assert "train=? validation=?" in table_rows(out)["demo_qa"]


@pytest.mark.parametrize("name", ["demo_sentiment", "demo_qa", "demo_ner", "demo_text"])
def test_show_each_demo_kind(cli, name):
  rc, out, err = cli("show", name, "-n", "3")
  assert rc == 0, err
  lines = out.splitlines()
  # then one line counting truncation; span corruption has none (its chunks fit by construction)
  assert len(lines) == (6 if name == "demo_text" else 7), out
  if name != "demo_text":
    assert lines[6].startswith(f"truncation of {name} (all 3,000 train examples): "), out
  pairs = []
  for i in range(3):
    m_in = re.fullmatch(rf"\[{i}\] inputs \((\d+) tokens\): (.*)", lines[2 * i])
    m_out = re.fullmatch(r"    targets \((\d+) tokens\): (.*)", lines[2 * i + 1])
    assert m_in and m_out, out
    pairs.append((m_in.group(2), m_out.group(2)))
  for inputs, targets in pairs:
    if name == "demo_sentiment":
      assert inputs.startswith("sentiment: ") and targets in ("positive", "negative")
    elif name == "demo_qa":
      assert re.fullmatch(r"question: .+\? context: .+", inputs) and targets
    elif name == "demo_ner":
      assert inputs.startswith("demo_ner: ") and ner.parse_entities(targets) is not None
    else:
      assert "<extra_id_0>" in inputs and targets.startswith("<extra_id_0>")


def test_show_validation_split_and_mixture(cli, expect_error):
  rc, out, err = cli("show", "demo_sentiment", "--split", "validation", "-n", "1")
  assert rc == 0 and out.startswith("[0] inputs"), err
  rc, out, err = cli("show", "demo_supervised")
  assert rc == 0, err
  assert out.startswith("mixture demo_supervised: temperature, T=2")
  assert all(name in out for name in ("demo_sentiment", "demo_qa", "demo_ner"))
  rc, out, err = cli("show", "demo_text", "--split", "validation")
  expect_error(rc, err, "task 'demo_text' has no split 'validation'; it has train")


def test_show_counts_truncation_of_demo_qa(cli, builtins):
  """The issue's numbers: 266 of 300 demo_qa validation inputs are longer than 128 tokens. The
  reference is the task's own seqio pipeline, uncut (lengths None) and cut (128/32)."""
  rc, out, err = cli("show", "demo_qa", "--split", "validation", "-n", "1")
  assert rc == 0, err
  task = seqio.get_mixture_or_task("demo_qa")
  vocab = task.output_features["inputs"].vocabulary
  whole = list(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
  cut = list(task.get_dataset({"inputs": 128, "targets": 32}, split="validation",
                              shuffle=False).as_numpy_iterator())
  longer = sum(len(ex["inputs"]) > 128 for ex in whole)
  lost = sum(not any(a in vocab.decode(c["inputs"].tolist()) for a in json.loads(w["answers"]))
             for w, c in zip(whole, cut))
  assert (longer, lost) == (266, 39)
  assert out.splitlines()[-1] == (
      "truncation of demo_qa (all 300 validation examples): 266 (88.7%) have inputs over 128 "
      "tokens, 0 (0.0%) targets over 32 tokens; for 39 (13.0%) the answer lies past the cut")
  rc, out, err = cli("show", "demo_qa", "--split", "validation", "-n", "0",
                     "--inputs-length", "1024", "--targets-length", "3")
  assert rc == 0, err
  targets_longer = sum(len(ex["targets"]) > 3 for ex in whole)
  assert out == (f"truncation of demo_qa (all 300 validation examples): 0 (0.0%) have inputs over "
                 f"1024 tokens, {targets_longer} ({targets_longer / 3:.1f}%) targets over 3 "
                 "tokens; for 0 (0.0%) the answer lies past the cut\n")


def test_show_counts_answers_past_the_cut(cli, write_yaml, unique_name, tmp_path):
  """Byte tokens (one per byte, plus EOS): inputs of 11 tokens keep the first 10 bytes."""
  name = unique_name("qa")
  rows = [("0123456789 Zed", ["Zed"]),                  # longer, the answer is cut off
          ("Zed 0123456789", ["Zed"]),                  # longer, the answer is kept
          ("short Zed", ["Zed"]),                       # 10 tokens: fits
          ("0123456789 Zed and Y", ["Zed", "0123"]),    # the second gold answer is kept
          ("Zed 12345678 Zed", ["Zed"]),                # the answer is kept at the start too
          ("long answer here", ["long answer"])]        # cut off, and so is its target (12 > 4)
  data = tmp_path / "qa.jsonl"
  data.write_text("".join(json.dumps({"context": c, "answers": a}) + "\n" for c, a in rows))
  path = write_yaml({"tasks": [{"name": name, "kind": "qa", "format": "jsonl",
                                "splits": {"train": str(data)}, "template": "{context}",
                                "vocabulary": "byte"}]})
  rc, out, err = cli("show", name, "-n", "0", "--inputs-length", "11", "--targets-length", "4",
                     "--tasks-dir", path)
  assert rc == 0, err
  assert out == (f"truncation of {name} (all 6 train examples): 5 (83.3%) have inputs over 11 "
                 "tokens, 1 (16.7%) targets over 4 tokens; for 2 (33.3%) the answer lies past "
                 "the cut\n")


def _commands():
  parser = cli_lib.build_parser()
  sub = next(a for a in parser._actions if a.dest == "command")
  commands = [[]]
  for name, subparser in sub.choices.items():
    commands.append([name])
    for action in subparser._actions:
      if getattr(action, "choices", None) and action.dest.endswith("_command"):
        commands += [[name, child] for child in action.choices]
  return commands


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c) or "t5mix")
def test_help(capsys, command):
  with pytest.raises(SystemExit) as e:
    cli_lib.main(command + ["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: t5mix" + "".join(" " + c for c in command))


# Each subcommand with (the start of) the one-line description `t5mix --help` lists it with
# (t5mix/cli.py, t5mix/eval_cli.py).
COMMAND_HELP = {
    "tasks": "list registered tasks and mixtures",
    "show": "print examples of a task, or the rate table of a mixture",
    "train": "train a model on a task or mixture",
    "import-hf": "make a workdir from a HuggingFace T5 checkpoint",
    "export-hf": "write a workdir's parameters as a HuggingFace T5 directory",
    "adapters": "adapter / LoRA files of fine-tuning runs",
    "vocab": "vocabulary tools",
    "eval": "score a run's checkpoints on its tasks' validation metrics",
    "predict": "predict raw inputs with a run's model",
    "embed": "mean-pooled encoder embeddings of a task's examples",
    "compare": "runs side by side: scores, steps, tokens, minutes, differing settings",
    "probe": "linear probe on frozen encoder features (feature-based transfer)",
}


def test_help_lists_commands(capsys):
  with pytest.raises(SystemExit) as e:
    cli_lib.main(["--help"])
  assert e.value.code == 0
  text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
  assert "Multitask T5 training with temperature-based dataset mixing." in text
  for command, description in COMMAND_HELP.items():
    assert f" {command} {description}" in text, command


def test_vocab_train(cli, tmp_path):
  out_path = tmp_path / "tmp" / "x.model"
  rc, out, err = cli("vocab", "train", "--mixture", "demo_supervised", "--vocab-size", "200",
                     "--out", out_path)
  assert rc == 0, err
  assert out.strip() == f"wrote {out_path} (200 pieces + 100 sentinels)"
  v = vocab.get_vocabulary(str(out_path))
  vocab.check_vocabulary(v)
  assert v.vocab_size == 300
  sentence = "sentiment: the acting was enjoyable but the plot was tedious ."
  ids = v.encode(sentence)
  assert ids and max(ids) < 200 and v.unk_id not in ids
  assert v.decode(ids) == sentence
  assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2)
  assert v.decode([v.vocab_size - 1]) == "<extra_id_0>"
  assert v.encode("<extra_id_0>") == [v.vocab_size - 1]
  assert v.encode("<extra_id_99>") == [v.vocab_size - 100]


def test_vocab_train_errors(cli, expect_error, tmp_path):
  rc, out, err = cli("vocab", "train", "--task", "demo_text", "--split", "validation",
                     "--out", tmp_path / "x.model")
  expect_error(rc, err, "no text to train a vocabulary on")
  rc, out, err = cli("vocab", "train", "--task", "demo_sentiment", "--out", tmp_path)
  expect_error(rc, err, f"{tmp_path}: is a directory")
  (tmp_path / "file").write_text("")
  rc, out, err = cli("vocab", "train", "--task", "demo_sentiment", "--out", tmp_path / "file" / "x.model")
  expect_error(rc, err, f"{tmp_path}/file/x.model: cannot create its directory")
  rc, out, err = cli("vocab", "train", "--task", "demo_sentiment", "--vocab-size", "8",
                     "--out", tmp_path / "x.model")
  expect_error(rc, err, "vocab_size must be at least 16, got 8")


# ---------------------------------------------------------------------------------------------
# User definitions: YAML files and Python modules.


def sst_task(name, fixtures_dir, **extra):
  return {"name": name, "kind": "classification", "format": "tsv",
          "splits": {"train": str(fixtures_dir / "sst.tsv")}, "template": "sst2 sentence: {sentence}",
          "label_words": ["negative", "positive"], "vocabulary": "byte", **extra}


def test_user_yaml_via_definitions_load(cli, write_yaml, fixtures_dir, unique_name, tmp_path):
  name, mixture = unique_name("yaml"), unique_name("mix")
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "docs.txt").write_text("one doc\n\ntwo doc\n")
  path = write_yaml({
      "vocabulary": "byte",
      "tasks": [sst_task(name, fixtures_dir),
                {"name": name + "_text", "kind": "text", "format": "text",
                 "splits": {"train": "data/docs.txt"}}],  # relative to the YAML file
      "mixtures": [{"name": mixture, "rate": "proportional", "tasks": [name, name + "_text"]}]})
  definitions.load([str(path)], [], builtin=False)
  assert seqio.get_mixture_or_task(name).t5mix_spec.origin == line_of(path, "name")
  rc, out, err = cli("tasks")
  assert rc == 0, err
  rows = table_rows(out)
  assert re.search(rf"{name}\s+classification\s+tsv:{fixtures_dir}/sst.tsv\s+train=3\s+accuracy$",
                   rows[name])
  assert re.search(rf"text:{tmp_path}/data/docs.txt\s+train=2\s+-$", rows[name + "_text"])
  assert re.search(rf"{mixture}\s+proportional\s+{name}, {name}_text$", rows[mixture])
  rc, out, err = cli("show", name, "-n", "1")
  assert out == ("[0] inputs (41 tokens): sst2 sentence: a gripping , funny film .\n"
                 "    targets (9 tokens): positive\n"
                 f"truncation of {name} (all 3 train examples): 0 (0.0%) have inputs over 128 "
                 "tokens, 0 (0.0%) targets over 32 tokens\n")


def test_user_yaml_via_tasks_dir(cli, write_yaml, fixtures_dir, unique_name, tmp_path):
  name = unique_name("dir")
  write_yaml({"tasks": [sst_task(name, fixtures_dir)]}, name="a.yaml")
  rc, out, err = cli("tasks", "--tasks-dir", tmp_path)  # a directory of YAML files
  assert rc == 0, err
  assert "train=3" in table_rows(out)[name]


def _write_module(path, name, fixtures_dir, line_before=""):
  path.write_text(
      "import t5mix\n" + line_before +
      f"t5mix.add_task({name!r}, kind='classification', format='tsv',\n"
      f"               splits={{'train': {str(fixtures_dir / 'sst.tsv')!r}}},\n"
      "               label_words=['negative', 'positive'], vocabulary='byte')\n")


def test_user_module_file(cli, fixtures_dir, unique_name, tmp_path):
  name = unique_name("mod")
  module = tmp_path / "my_tasks.py"
  _write_module(module, name, fixtures_dir)
  rc, out, err = cli("tasks", "--module", module)
  assert rc == 0, err
  assert re.search(r"classification\s+tsv:\S+sst.tsv\s+train=3\s+accuracy$", table_rows(out)[name])
  assert seqio.get_mixture_or_task(name).t5mix_spec.origin == f"{module}:2"


def test_user_module_dotted_name(cli, fixtures_dir, unique_name, tmp_path, monkeypatch):
  name = unique_name("dotted")
  package = tmp_path / f"pkg_{name}"
  package.mkdir()
  (package / "__init__.py").write_text("")
  _write_module(package / "tasks_mod.py", name, fixtures_dir)
  monkeypatch.syspath_prepend(str(tmp_path))
  rc, out, err = cli("tasks", "--module", f"pkg_{name}.tasks_mod")
  assert rc == 0, err
  assert "train=3" in table_rows(out)[name]


def test_clash_yaml_with_python_task(cli, expect_error, write_yaml, fixtures_dir, unique_name):
  path = write_yaml({"tasks": [sst_task(unique_name("ok"), fixtures_dir),
                               sst_task("demo_qa", fixtures_dir)]})
  rc, out, err = cli("tasks", "--no-counts", "--tasks-dir", path)
  line = f"{path}:{open(path).read().splitlines().index('- name: demo_qa') + 1}"
  expect_error(rc, err, f"{line}: task 'demo_qa' is already defined (by {DEMO_PY}:",
               "pick another name")


def test_clash_yaml_with_builtin_yaml(cli, expect_error, write_yaml, fixtures_dir):
  path = write_yaml({"tasks": [sst_task("glue_sst2", fixtures_dir)]})
  rc, out, err = cli("tasks", "--no-counts", "--tasks-dir", path)
  expect_error(rc, err, f"{line_of(path, 'name')}: task 'glue_sst2' is already defined "
                        f"(by {line_of(TFDS_YAML, 'name')})")


def test_clash_module_with_builtin(cli, expect_error, fixtures_dir, tmp_path):
  module = tmp_path / "clash.py"
  _write_module(module, "demo_ner", fixtures_dir, line_before="\n\n")
  rc, out, err = cli("tasks", "--no-counts", "--module", module)
  expect_error(rc, err, f"{module}:4: task 'demo_ner' is already defined (by {DEMO_PY}:")


def test_clash_between_two_user_files(cli, expect_error, write_yaml, fixtures_dir, unique_name):
  name = unique_name("twice")
  a = write_yaml({"tasks": [sst_task(name, fixtures_dir)]}, name="a.yaml")
  b = write_yaml({"tasks": [sst_task(name, fixtures_dir)]}, name="b.yaml")
  rc, out, err = cli("tasks", "--no-counts", "--tasks-dir", a, "--tasks-dir", b)
  expect_error(rc, err, f"{line_of(b, 'name')}: task '{name}' is already defined "
                        f"(by {line_of(a, 'name')})")


# ---------------------------------------------------------------------------------------------
# Bad input: one line `t5mix: error: ...` naming the file and line (or key), exit code 2.

TEXT = dict(kind="text", format="text")
TSV = dict(kind="classification", format="tsv", label_words=["negative", "positive"])

DATA_ERRORS = {
    "missing_data_file": (TEXT, None, "{path}: data file does not exist"),
    "tsv_column_count": (TSV, b"sentence\tlabel\ngood\t1\nbad\t0\textra\n",
                         "{path}:3: expected 2 columns (sentence, label), found 3"),
    "csv_column_count": (dict(TSV, format="csv"), b'sentence,label\n"a, b",1\na, b,1\n',
                         "{path}:3: expected 2 columns (sentence, label), found 3"),
    "jsonl_not_json": (dict(kind="qa", format="jsonl"),
                       b'{"question": "q", "context": "c", "answers": ["c"]}\n{question: 1}\n',
                       "{path}:2: not valid JSON"),
    "squad_not_json": (dict(kind="qa", format="squad_json"), b'{"data": [\n  {,\n]}\n',
                       "{path}:2: not valid JSON"),
    "conll_malformed_line": (dict(kind="ner", format="conll"),
                             b"-DOCSTART- -X- O\n\nEU NNP B-ORG\nrejects\n",
                             "{path}:4: expected at least 2 columns (token ... tag), found 1"),
    "conll_malformed_tag": (dict(kind="ner", format="conll"), b"EU O\n\nin O\nParis X-LOC\n",
                            "{path}:3: malformed tag 'X-LOC' at token 2"),
    "conll_bioes_unclosed": (dict(kind="ner", format="conll", scheme="bioes"),
                             b"New B-LOC\nYork O\n", "{path}:1: LOC entity starting at token 1 "
                                                     "is not closed before token 2"),
    "label_not_in_label_words": (TSV, b"sentence\tlabel\ngood\t1\nmeh\tneutral\n",
                                 "{path}:3: label 'neutral' is not in label_words (0, 1)"),
    "non_utf8": (TEXT, b"fine\ncaf\xe9 au lait\n", "{path}:2: not valid UTF-8"),
    "binary": (TEXT, bytes(range(256)) * 4, "{path}:1: binary data (NUL byte)"),
    "empty": (TEXT, b"", "{path}: file is empty"),
}


@pytest.mark.parametrize("case", list(DATA_ERRORS))
def test_bad_data(cli, expect_error, write_yaml, unique_name, tmp_path, case):
  keys, content, message = DATA_ERRORS[case]
  data = tmp_path / f"data.{keys['format']}"
  if content is not None:
    data.write_bytes(content)
  name = unique_name("bad")
  path = write_yaml({"tasks": [{"name": name, **keys, "splits": {"train": data.name}}]})
  rc, out, err = cli("show", name, "--tasks-dir", path)
  expect_error(rc, err, message.format(path=data))


# Column mistakes, found at the data's first record: (keys, data file, message). The message
# names the key's line (`{at[KEY]}`), the data file, its columns and the closest one.
COLUMN_ERRORS = {
    "template_typo": (dict(TSV, template="sst2 sentence: {txt}"), "d.tsv", "text\tlabel\ngood\t1\n",
                      "{at[template]}: task '{name}': key 'template': placeholder {{txt}} is not a "
                      "column of {data} (did you mean {{text}}?); its columns are text, label "
                      "({{name}} is the task name)"),
    "label_typo": (dict(TSV, template="{text}", label="lable"), "d.tsv", "text\tlabel\ngood\t1\n",
                   "{at[label]}: task '{name}': key 'label': no column 'lable' in {data} (did you "
                   "mean 'label'?); its columns are text, label"),
    "fields_typo": (dict(TSV, template="s: {sentence}", fields={"sentence": "txt"}), "d.tsv",
                    "text\tlabel\ngood\t1\n",
                    "{at[sentence]}: task '{name}': key 'fields': placeholder {{sentence}}: no "
                    "column 'txt' in {data} (did you mean 'text'?); its columns are text, label"),
    "qa_answers": (dict(kind="qa", format="jsonl", answers="answer"), "d.jsonl",
                   '{"question": "q", "context": "c", "answers": ["c"]}\n',
                   "{at[answers]}: task '{name}': key 'answers': no column 'answer' in {data} (did "
                   "you mean 'answers'?); its columns are question, context, answers"),
    "ner_tokens": (dict(kind="ner", format="jsonl", tokens="token"), "d.jsonl",
                   '{"words": ["Ada"], "tags": ["B-PER"]}\n',
                   "{at[tokens]}: task '{name}': key 'tokens': no column 'token' in {data}; its "
                   "columns are words, tags"),
    "ner_template": (dict(kind="ner", format="conll", template="{name}: {sentense}"), "d.conll",
                     "Ada B-PER\n", "{at[template]}: task '{name}': key 'template': placeholder "
                     "{{sentense}} is not a column of {data} (did you mean {{sentence}}?); its "
                     "columns are tokens, tags ({{name}} is the task name; {{sentence}} is the "
                     "tokens joined by spaces)"),
}


@pytest.mark.parametrize("case", list(COLUMN_ERRORS))
def test_column_mistakes_name_the_key_line_and_the_columns(cli, expect_error, write_yaml,
                                                          unique_name, tmp_path, case):
  keys, data_name, content, message = COLUMN_ERRORS[case]
  data = tmp_path / data_name
  data.write_text(content)
  name = unique_name("col")
  path = write_yaml({"tasks": [{"name": name, **keys, "splits": {"train": data_name}}]})
  rc, out, err = cli("show", name, "--tasks-dir", path)
  expect_error(rc, err, message.format(at=Lines(path), name=name, data=data))


def test_text_labels_suggest_the_label_words_mapping(cli, expect_error, write_yaml, unique_name,
                                                     tmp_path):
  data = tmp_path / "d.tsv"
  data.write_text("text\tlabel\ngood\thigh\nbad\tlow\n")
  name = unique_name("lw")
  task = {"name": name, **TSV, "template": "{text}", "splits": {"train": "d.tsv"}}
  path = write_yaml({"tasks": [{**task, "label_words": ["low", "high"]}]})
  rc, out, err = cli("show", name, "--tasks-dir", path)
  expect_error(rc, err, f"{data}:2: label 'high' is not in label_words (0, 1); a list maps the "
                        f"labels 0, 1, ... to its words: for text labels write a mapping at "
                        f"{line_of(path, 'label_words')}, e.g. "
                        "label_words: {low: low, high: high}")
  name = unique_name("lw")  # the suggested form works
  words = {"low": "low", "high": "high"}
  path = write_yaml({"tasks": [{**task, "name": name, "label_words": words}]}, name="fixed.yaml")
  rc, out, err = cli("show", name, "--tasks-dir", path, "-n", "2")
  assert rc == 0, err
  assert "targets (5 tokens): high" in out and "targets (4 tokens): low" in out


def test_tasks_shows_why_a_task_is_broken_and_exits_2(cli, expect_error, write_yaml, unique_name,
                                                      fixtures_dir, tmp_path):
  data = tmp_path / "bad.tsv"
  data.write_text("text\tlabel\ngood\t1\nbad\n")
  good, bad = unique_name("ok"), unique_name("broken")
  path = write_yaml({"tasks": [sst_task(good, fixtures_dir),
                               {"name": bad, **TSV, "splits": {"train": "bad.tsv",
                                                                "validation": "bad.tsv"}}]})
  rc, out, err = cli("tasks", "--tasks-dir", path, "--tfds-data-dir", tmp_path)
  rows = table_rows(out)
  assert "train=error validation=error" in rows[bad]
  assert "train=3" in rows[good]
  assert "train=not prepared" in rows["glue_sst2"]  # an unprepared TFDS dataset is no error
  # one line for both splits: they fail alike
  expect_error(rc, err, f"task '{bad}': {data}:3: expected 2 columns (text, label), found 1")


def task_yaml(name, **changes):
  task = {"name": name, "kind": "text", "format": "text", "splits": {"train": "x.txt"}, **changes}
  return {"tasks": [{k: v for k, v in task.items() if v is not ...}]}


def mixture_yaml(name, **keys):
  return {"mixtures": [{"name": f"{name}_mix", **keys}]}


# Mistakes in a definition name the line of the key at fault: `{at[KEY]}` is `path:N`, the line
# of KEY in the file (line_of).
YAML_ERRORS = {
    "missing_key": (lambda n: task_yaml(n, splits=...),
                    "{at[name]}: task '{name}': missing required key 'splits'"),
    "unknown_key": (lambda n: task_yaml(n, templat="{text}"),
                    "{at[templat]}: task '{name}': unknown key 'templat' (did you mean "
                    "'template'?)"),
    "wrong_type": (lambda n: task_yaml(n, template=5),
                   "{at[template]}: task '{name}': key 'template' must be a string, found int 5"),
    "wrong_type_splits": (lambda n: task_yaml(n, splits=["x.txt"]),
                          "{at[splits]}: task '{name}': key 'splits' must be a mapping"),
    "wrong_type_split_value": (lambda n: task_yaml(n, splits={"train": None}),
                               "{at[train]}: task '{name}': key 'splits': split 'train' must "
                               "map to a file path"),
    "wrong_type_number": (lambda n: task_yaml(n, noise_density="lots"),
                          "{at[noise_density]}: task '{name}': key 'noise_density' must be a "
                          "number, found str 'lots'"),
    "bad_kind": (lambda n: task_yaml(n, kind="regression"),
                 "{at[kind]}: task '{name}': key 'kind': 'regression' is not one of"),
    "bad_scheme": (lambda n: task_yaml(n, kind="ner", format="conll", scheme="bilu"),
                   "{at[scheme]}: task '{name}': key 'scheme': 'bilu' is not one of iob1, iob2, "
                   "bioes, iobes, bilou (did you mean 'bilou'?)"),
    "unknown_metric": (lambda n: task_yaml(n, metrics=["accuracy", "acuracy"]),
                       "{at[acuracy]}: task '{name}': key 'metrics': unknown metric 'acuracy' "
                       "(did you mean 'accuracy'?)"),
    "template_syntax": (lambda n: task_yaml(n, template="{text"),
                        "{at[template]}: task '{name}': key 'template': '{{text' is not a valid "
                        "template (expected '}}' before end of string; write {{{{ and }}}} for "
                        "literal braces)"),
    "template_positional": (lambda n: task_yaml(n, template="doc: {}"),
                            "{at[template]}: task '{name}': key 'template': 'doc: {{}}' has a "
                            "placeholder without a name"),
    "split_entry_key": (lambda n: task_yaml(n, splits={"train": {"pth": "x.txt"}}),
                        "{at[train]}: task '{name}': key 'splits': split 'train': unknown key "
                        "'pth' (did you mean 'path'?)"),
    "split_select": (lambda n: task_yaml(n, splits={"train": {"path": "x.txt", "select": "a:b"}}),
                     "{at[select]}: task '{name}': key 'splits': split 'train': select 'a:b' is "
                     "not 'START:END'"),
    "task_not_mapping": (lambda n: {"tasks": ["just a name"]},
                         "{path}:2: a task must be a mapping, found str"),
    "tasks_not_list": (lambda n: {"tasks": {"name": n}}, "{at[tasks]}: key 'tasks' must be a list"),
    "unknown_top_level_key": (lambda n: {"task": []},
                              "{at[task]}: unknown top-level key 'task' (did you mean 'tasks'?)"),
    "mixture_unknown_key": (lambda n: mixture_yaml(n, tasks=["demo_qa"], temprature=2),
                            "{at[temprature]}: mixture '{name}_mix': unknown key 'temprature' "
                            "(did you mean 'temperature'?)"),
    "mixture_rate": (lambda n: mixture_yaml(n, tasks=["demo_qa"], rate="temprature"),
                     "{at[rate]}: mixture '{name}_mix': key 'rate': 'temprature' is not one of "
                     "proportional, temperature, equal, explicit (did you mean 'temperature'?)"),
    "mixture_unknown_task": (lambda n: mixture_yaml(n, tasks=["demo_qa", "demo_nerr"]),
                             "{at[demo_nerr]}: mixture '{name}_mix': unknown task or mixture "
                             "'demo_nerr'; did you mean demo_ner"),
    "invalid_syntax": (lambda n: f"tasks:\n  - name: {n}\n    kind: [text\n    format: text\n",
                       "{path}:4: invalid YAML (expected ',' or ']'"),
    "tab_indent": (lambda n: f"tasks:\n  - name: {n}\n\tkind: text\n", "{path}:3: invalid YAML"),
    "non_utf8": (lambda n: b"tasks:\n  - name: x\n    description: caf\xe9\n",
                 "{path}:3: not valid UTF-8"),
    "binary": (lambda n: b"tasks:\n" + bytes(range(256)), "{path}:2: binary data (NUL byte)"),
    "control_character": (lambda n: "tasks: []\n# bell \x07\n", "{path}:2: invalid YAML"),
    "empty": (lambda n: "", "{path}: file is empty"),
    "only_comments": (lambda n: "# nothing here\n", "{path}: file is empty"),
    "not_a_mapping": (lambda n: "- a\n- b\n", "{path}: expected a mapping with keys vocabulary, "
                                              "tasks, mixtures"),
}


@pytest.mark.parametrize("case", list(YAML_ERRORS))
def test_bad_yaml(cli, expect_error, tmp_path, unique_name, case):
  make, message = YAML_ERRORS[case]
  name = unique_name("y")
  doc = make(name)
  path = tmp_path / "defs.yaml"
  if isinstance(doc, bytes):
    path.write_bytes(doc)
  else:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False),
                    encoding="utf-8")
  rc, out, err = cli("tasks", "--no-counts", "--tasks-dir", path)
  expect_error(rc, err, message.format(path=path, name=name, at=Lines(path)))


def test_yaml_lines_follow_anchors_and_flow_style(cli, expect_error, tmp_path, unique_name):
  """Keys merged from an anchor (`<<: *a`) and items of a flow list are reported on their line."""
  name = unique_name("y")
  path = tmp_path / "defs.yaml"
  path.write_text(f"""\
tasks:
  - &common {{name: {name}_ok, kind: text, format: text,
              splits: {{train: x.txt}}}}
  - <<: *common
    name: {name}
    metrics: [accuracy,
      acc]
""", encoding="utf-8")
  rc, out, err = cli("tasks", "--no-counts", "--tasks-dir", path)
  expect_error(rc, err, f"{path}:7: task '{name}': key 'metrics': unknown metric 'acc'")
  path.write_text(path.read_text().replace("acc]", "accuracy]").replace("x.txt}}", "[x.txt]}}"))
  rc, out, err = cli("tasks", "--no-counts", "--tasks-dir", path)
  expect_error(rc, err, f"{path}:3: task '{name}_ok': key 'splits': split 'train' must map to")


def test_yaml_with_bom(cli, tmp_path, fixtures_dir, unique_name):
  name = unique_name("bom")
  path = tmp_path / "bom.yaml"
  path.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump({"tasks": [sst_task(name, fixtures_dir)]}).encode())
  rc, out, err = cli("tasks", "--tasks-dir", path)
  assert rc == 0, err
  assert "train=3" in table_rows(out)[name]


def test_yaml_error_can_be_fixed_and_loaded_again(cli, expect_error, tmp_path, fixtures_dir,
                                                  unique_name):
  name = unique_name("retry")
  path = tmp_path / "defs.yaml"
  path.write_text("tasks: [\n")
  expect_error(*cli("tasks", "--no-counts", "--tasks-dir", path)[::2], f"{path}:2: invalid YAML")
  path.write_text(yaml.safe_dump({"tasks": [sst_task(name, fixtures_dir)]}))
  rc, out, err = cli("tasks", "--no-counts", "--tasks-dir", path)
  assert rc == 0 and name in table_rows(out), err


@pytest.mark.parametrize("argv, message", [
    (["show", "demo_sentimnt"], "unknown task or mixture 'demo_sentimnt'; did you mean "
                                "demo_sentiment"),
    (["show", "glue_sst"], "did you mean glue_sst2"),
    (["tasks", "--tasks-dir", "/nonexistent/defs.yaml"], "/nonexistent/defs.yaml: no such file"),
    (["tasks", "--module", "/nonexistent/mod.py"], "/nonexistent/mod.py: module file does not exist"),
    (["tasks", "--module", "no_such_module_xyz.sub"], "--module no_such_module_xyz.sub: cannot import"),
    (["vocab", "train", "--mixture", "nope_mixture", "--out", "/tmp/never.model"],
     "unknown task or mixture 'nope_mixture'"),
])
def test_bad_names(cli, expect_error, argv, message):
  rc, out, err = cli(*argv)
  expect_error(rc, err, message)


def test_module_syntax_error(cli, expect_error, tmp_path):
  module = tmp_path / "broken.py"
  module.write_text("import t5mix\n\nt5mix.add_task(\n")
  rc, out, err = cli("tasks", "--module", module)
  expect_error(rc, err, f"{module}:3: syntax error in module")


def test_bad_vocabulary_file(cli, expect_error, write_yaml, fixtures_dir, unique_name, tmp_path):
  name = unique_name("v")
  (tmp_path / "junk.model").write_bytes(b"not a model")
  path = write_yaml({"tasks": [sst_task(name, fixtures_dir, vocabulary="missing.model"),
                               sst_task(name + "_junk", fixtures_dir, vocabulary="junk.model")]})
  rc, out, err = cli("show", name, "--tasks-dir", path)
  expect_error(rc, err, f"{tmp_path}/missing.model: vocabulary file does not exist; create it "
                        f"with `t5mix vocab train")
  rc, out, err = cli("show", name + "_junk")
  expect_error(rc, err, f"{tmp_path}/junk.model: not a readable SentencePiece model")


# ---------------------------------------------------------------------------------------------
# The console script itself.


def test_console_script_errors_exit_2_without_traceback(tmp_path):
  script = os.path.join(os.path.dirname(sys.executable), "t5mix")
  if not os.path.exists(script):
    pytest.skip("t5mix console script not installed next to this Python")
  data = tmp_path / "bad.tsv"
  data.write_text("sentence\tlabel\ngood\t1\nbad\n")
  defs = tmp_path / "defs.yaml"
  defs.write_text(yaml.safe_dump({"tasks": [
      {"name": "console_bad", "kind": "classification", "format": "tsv",
       "splits": {"train": "bad.tsv"}, "label_words": ["no", "yes"]}]}))
  results = []
  for argv in (["show", "demo_sentimnt"], ["show", "console_bad", "--tasks-dir", str(defs)]):
    run = subprocess.run([script, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    results.append((run.stdout, run.stderr, run.returncode))
  (out1, err1, rc1), (out2, err2, rc2) = results
  assert rc1 == 2 and out1 == "", err1
  assert re.fullmatch(r"t5mix: error: unknown task or mixture 'demo_sentimnt'; did you mean "
                      r"demo_sentiment.*\n", err1), err1
  assert rc2 == 2 and out2 == "", err2
  assert err2 == f"t5mix: error: {data}:3: expected 2 columns (sentence, label), found 1\n"
