"""The bad-input catalogue: each case gives exit code 2 and one line naming the file/line or key,
never a traceback, and leaves existing checkpoints and outputs untouched."""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from conftest import assert_one_error

TSV_TASK = {"kind": "classification", "format": "tsv", "label_words": ["neg", "pos"],
            "vocabulary": "byte"}


def _task_yaml(tmp_path, name, data_name, data, **spec):
  """Writes `data` to a file and a definitions YAML naming it; returns the YAML path."""
  import yaml
  data_path = tmp_path / data_name
  if isinstance(data, bytes):
    data_path.write_bytes(data)
  else:
    data_path.write_text(data, encoding="utf-8")
  doc = {"tasks": [{"name": name, "splits": {"train": data_name}, **spec}]}
  path = tmp_path / f"{name}.yaml"
  path.write_text(yaml.safe_dump(doc), encoding="utf-8")
  return path


# Data files: (file name, content, task spec, fragments expected in the message).
DATA_CASES = {
    "tsv_wrong_columns": ("d.tsv", "text\tlabel\ngood\t1\nbad row\t0\textra\n", TSV_TASK,
                          ["d.tsv:3", "expected 2 columns"]),
    "csv_wrong_columns": ("d.csv", "text,label\n\"a, b\",1\nx\n", {**TSV_TASK, "format": "csv"},
                          ["d.csv:3", "expected 2 columns"]),
    "jsonl_bad_json": ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n',
                       {**TSV_TASK, "format": "jsonl"}, ["d.jsonl:2", "not valid JSON"]),
    "jsonl_not_object": ("d.jsonl", '["a", 1]\n', {**TSV_TASK, "format": "jsonl"},
                         ["d.jsonl:1", "expected a JSON object"]),
    "conll_one_column": ("d.conll", "John B-PER\nlives\n", {"kind": "ner", "format": "conll",
                                                              "vocabulary": "byte"},
                         ["d.conll:2", "expected at least 2 columns"]),
    "conll_bad_tag": ("d.conll", "John X-PER\n\n", {"kind": "ner", "format": "conll",
                                                    "vocabulary": "byte"}, ["d.conll:1"]),
    "empty_file": ("d.tsv", "", TSV_TASK, ["d.tsv", "empty"]),
    "binary_file": ("d.tsv", b"text\tlabel\n\x00\x01\x02\x03\n", TSV_TASK, ["d.tsv:2", "binary"]),
    "not_utf8": ("d.tsv", b"text\tlabel\ncaf\xe9\t1\n", TSV_TASK, ["d.tsv:2", "UTF-8"]),
    "huge_line": ("d.tsv", "text\tlabel\n\"" + "x" * 200_000 + "\t1\n", TSV_TASK, ["d.tsv:2"]),
    "label_not_in_map": ("d.tsv", "text\tlabel\ngood\t7\n", TSV_TASK,
                         ["d.tsv:2", "label '7' is not in label_words"]),
    # found at the first record, reported at the template's line in the (sorted) YAML file
    "template_field_missing": ("d.tsv", "text\tlabel\ngood\t1\n",
                               {**TSV_TASK, "template": "s: {sentence}"},
                               [".yaml:10: task 'bad_", "key 'template': placeholder {sentence} is "
                                "not a column of", "d.tsv; its columns are text, label"]),
    "squad_not_squad": ("d.json", '{"version": 1}', {"kind": "qa", "format": "squad_json",
                                                     "vocabulary": "byte"},
                        ["d.json", "not SQuAD JSON"]),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_file(case, cli, tmp_path, unique_name, clean_registry):
  data_name, data, spec, fragments = DATA_CASES[case]
  name = unique_name("bad")
  defs = _task_yaml(tmp_path, name, data_name, data, **spec)
  rc, _, err = cli("show", name, "--tasks-dir", defs)
  assert_one_error(rc, err, *fragments)


def test_missing_data_file(cli, tmp_path, unique_name, clean_registry, write_yaml):
  name = unique_name("bad")
  defs = write_yaml({"tasks": [{"name": name, **TSV_TASK, "splits": {"train": "nope.tsv"}}]})
  rc, _, err = cli("show", name, "--tasks-dir", defs)
  assert_one_error(rc, err, "nope.tsv", "does not exist")


# Definition YAML: (document, fragments).
YAML_CASES = {
    "invalid_syntax": ("tasks:\n  - name: [unclosed\n", ["defs.yaml:", "invalid YAML"]),
    "missing_key": ({"tasks": [{"name": "x1", "format": "tsv", "splits": {"train": "a"}}]},
                    ["defs.yaml:2: task 'x1': missing required key 'kind'"]),
    "unknown_key": ({"tasks": [{"name": "x2", "kind": "qa", "format": "jsonl",
                                "splits": {"train": "a"}, "tempalte": "q"}]},
                    ["defs.yaml:7: task 'x2': unknown key 'tempalte' (did you mean 'template'?)"]),
    "wrong_type": ({"tasks": [{"name": "x3", "kind": "qa", "format": "jsonl",
                               "splits": {"train": "a"}, "template": 5}]},
                   ["defs.yaml:7: task 'x3': key 'template' must be a string"]),
    "unknown_kind": ({"tasks": [{"name": "x4", "kind": "summarize", "format": "jsonl",
                                 "splits": {"train": "a"}}]}, ["defs.yaml", "'kind'"]),
    "unknown_top_level_key": ({"taks": []}, ["defs.yaml", "unknown top-level key 'taks'"]),
    "mixture_cycle": ({"mixtures": [{"name": "cyc_a", "tasks": ["cyc_b"]},
                                    {"name": "cyc_b", "tasks": ["cyc_a"]}]},
                      ["defs.yaml", "mixture cycle: cyc_a -> cyc_b -> cyc_a"]),
    "duplicate_mixture_names": ({"mixtures": [{"name": "dup_m", "tasks": ["demo_qa"]},
                                              {"name": "dup_m", "tasks": ["demo_ner"]}]},
                                ["defs.yaml", "'dup_m' is already defined"]),
    "clash_with_builtin_task": ({"tasks": [{"name": "demo_qa", "kind": "qa", "format": "jsonl",
                                            "splits": {"train": "a.jsonl"}}]},
                                ["defs.yaml", "'demo_qa' is already defined", "demo.py"]),
    "mixture_unknown_task": ({"mixtures": [{"name": "mx_u", "tasks": ["demo_qaa"]}]},
                             ["defs.yaml:4: mixture 'mx_u': unknown task or mixture 'demo_qaa'",
                              "demo_qa"]),
    "mixture_unknown_rate": ({"mixtures": [{"name": "mx_r", "tasks": ["demo_qa"],
                                            "rate": "softmax"}]}, ["defs.yaml", "'rate'"]),
}


@pytest.mark.parametrize("case", YAML_CASES)
def test_bad_definitions(case, cli, write_yaml, clean_registry):
  doc, fragments = YAML_CASES[case]
  rc, _, err = cli("tasks", "--no-counts", "--tasks-dir", write_yaml(doc))
  assert_one_error(rc, err, *fragments)


def test_unknown_task_name_suggests(cli):
  rc, _, err = cli("show", "demo_sentimnt")
  assert_one_error(rc, err, "unknown task or mixture 'demo_sentimnt'", "demo_sentiment")


# Run configs and flags, against a workdir that already holds a checkpoint: nothing may change it.

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  from t5mix import config as config_lib, definitions, train
  definitions.load()
  workdir = tmp_path_factory.mktemp("trained")
  c = config_lib.load(None, ["model=tiny", "data.mixture=demo_supervised", "data.batch_size=4",
                             "data.inputs_length=32", "data.targets_length=8", "steps=2",
                             "checkpoint_every=2"])
  train.train(c, str(workdir), quiet=True, log=lambda *a: None)
  return workdir


def _digest(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


SMALL = ["--set", "model=tiny", "--set", "data.batch_size=4", "--set", "data.inputs_length=32",
         "--set", "data.targets_length=8", "--set", "steps=4"]
CONFIG_CASES = {
    "unknown_config_key": (["--set", "optimizer.lr=3"], ["unknown config key 'optimizer.lr'"]),
    "negative_batch_size": (["--set", "data.batch_size=-4"], ["'data.batch_size' must be positive"]),
    "wrong_type": (["--set", "steps=lots"], ["'steps': expected int"]),
    "missing_config_file": (["--config", "no/such.yaml"], ["no/such.yaml", "does not exist"]),
    "unknown_mixture": (["--set", "data.mixture=demo_mixx"], ["unknown task or mixture 'demo_mixx'"]),
    "feature_length_too_small": (["--set", "data.mixture=demo_text", "--set",
                                  "data.targets_length=2"], ["targets"]),
    "unknown_model": (["--set", "model=huge"], ["huge"]),
    "unknown_model_override": (["--set", "model_overrides={d_modle: 8}"], ["d_modle"]),
    "init_from_missing": (["--init-from", "/no/such/workdir"], ["/no/such/workdir"]),
    "resume_with_other_optimizer": (["--set", "optimizer.name=adamw"], ["does not match this config"]),
    "mesh_does_not_divide_devices": (["--set", "mesh.data=3"],
                                     ["config key 'mesh.data' (3)", "does not divide", "devices"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_leaves_workdir_untouched(case, cli, trained):
  flags, fragments = CONFIG_CASES[case]
  before = _digest(trained)
  rc, _, err = cli("train", "--workdir", trained, "--set", "data.mixture=demo_supervised",
                   *SMALL, *flags)
  assert_one_error(rc, err, *fragments)
  # Nothing changes: not the checkpoints, nor config.yaml / model.yaml (written only by a run that
  # starts, i.e. got past resuming), which eval and export read.
  assert _digest(trained) == before


def test_workdir_that_is_a_file(cli, tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  rc, _, err = cli("train", "--workdir", path, *SMALL)
  assert_one_error(rc, err, str(path))


def test_export_from_a_directory_that_is_not_a_workdir(cli, tmp_path):
  rc, _, err = cli("export-hf", "--workdir", tmp_path, "--out", tmp_path / "hf")
  assert_one_error(rc, err, "not a t5mix workdir")
  assert not os.path.exists(tmp_path / "hf")


def _drop_privileges():
  """The command prefix under which file permissions apply (root ignores them), or None."""
  if os.geteuid() != 0:
    return []
  if shutil.which("setpriv") is None:
    return None
  return ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]  # root without capabilities


@pytest.mark.parametrize("read_only", ["workdir", "checkpoints"])
def test_read_only_workdir(read_only, trained, tmp_path):
  """A workdir (or its checkpoints/) that cannot be written: one line before any work, nothing
  changed. A real `t5mix train` process, without root's capabilities when run as root."""
  prefix = _drop_privileges()
  if prefix is None:
    pytest.skip("running as root and setpriv is not available to drop capabilities")
  workdir = tmp_path / "ro"
  shutil.copytree(trained, workdir)
  target = workdir if read_only == "workdir" else workdir / "checkpoints"
  paths = [p for p in [target, *target.rglob("*")] if p.is_dir()]
  for p in paths:
    p.chmod(0o555)
  try:
    probe = subprocess.run(prefix + ["touch", str(target / "probe")], capture_output=True)
    if probe.returncode == 0:
      pytest.skip("cannot make a directory read-only here")
    before = _digest(workdir)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    p = subprocess.run(prefix + [sys.executable, "-m", "t5mix.cli", "train", "--workdir",
                                 str(workdir), "--set", "data.mixture=demo_supervised", *SMALL],
                       capture_output=True, text=True, env=env, timeout=300,
                       cwd=pathlib.Path(__file__).resolve().parent.parent)
    assert_one_error(p.returncode, p.stderr, f"{target}: ", "is not writable")
    assert _digest(workdir) == before
  finally:
    for p in paths:
      p.chmod(0o755)
