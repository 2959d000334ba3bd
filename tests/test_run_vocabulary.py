"""One vocabulary per run, and runs that remember their definitions (`t5mix train` → eval).

The first test is the reproduction a new user hit: a task with no `vocabulary:` (bytes) mixed
with the demo tasks (demo SentencePiece) used to train on two tokenisations without a word.
"""

import pathlib

import pytest
import yaml
from flax import nnx

from t5mix import registry
from t5mix import vocab as vocab_lib
from t5mix.hf_interop import save_hf_checkpoint
from t5mix.model import T5, T5Config

SHARED_T5 = pathlib.Path(__file__).resolve().parents[2] / "shared" / "models" / "flan-t5-small-kd"
TINY_RUN = ["--set", "model=tiny", "--set", "steps=2", "--set", "data.batch_size=4",
            "--set", "data.inputs_length=32", "--set", "data.targets_length=8",
            "--set", "checkpoint_every=2", "--quiet"]


@pytest.fixture
def user_tasks(tmp_path, unique_name):
  """A user's TSV classification task with no `vocabulary:` (so bytes), and a mixture of it with
  demo tasks (demo vocabulary); returns (yaml path, task name, mixture name)."""
  task, mixture = unique_name("my_sst"), unique_name("my_mix")
  (tmp_path / "my.tsv").write_text("text\tlabel\n" + "".join(
      f"{w} movie {i}\t{i % 2}\n" for i, w in enumerate(["good", "bad", "fine", "awful"] * 3)))
  path = tmp_path / "my_tasks.yaml"
  path.write_text(yaml.safe_dump({
      "tasks": [{"name": task, "kind": "classification", "format": "tsv",
                 "splits": {"train": "my.tsv", "validation": "my.tsv"},
                 "template": "sst2 sentence: {text}", "label_words": ["negative", "positive"]}],
      "mixtures": [{"name": mixture, "rate": "equal",
                    "tasks": [task, "demo_sentiment", "demo_text"]}]}))
  return path, task, mixture


def saved_config(workdir):
  return yaml.safe_load((pathlib.Path(workdir) / "config.yaml").read_text())


def test_tasks_with_different_vocabularies_are_an_error(cli, expect_error, clean_registry,
                                                        user_tasks, tmp_path):
  path, task, mixture = user_tasks
  rc, out, err = cli("train", "--tasks-dir", path, "--set", f"data.mixture={mixture}",
                     "--workdir", tmp_path / "wd", *TINY_RUN)
  expect_error(rc, err, f"{task}: byte", "demo_sentiment: demo", "demo_text: demo", "--vocab")
  assert not (tmp_path / "wd" / "config.yaml").exists()


def test_one_vocabulary_and_the_run_remembers_its_definitions(cli, clean_registry, user_tasks,
                                                              tmp_path, monkeypatch):
  path, task, mixture = user_tasks
  workdir = tmp_path / "wd"
  rc, out, err = cli("train", "--tasks-dir", path, "--vocab", "demo", "--set",
                     f"data.mixture={mixture}", "--workdir", workdir, *TINY_RUN)
  assert rc == 0, err
  assert f"note: tokenising {task} with the vocabulary of data.vocab, demo" in out
  saved = saved_config(workdir)
  assert saved["data"]["vocab"] == "demo"
  assert saved["data"]["tasks_dir"] == [str(path)]
  assert saved["data"]["hashes"] == {str(path): vocab_lib.file_hash(path),
                                     vocab_lib.DEMO_VOCAB: vocab_lib.file_hash(vocab_lib.DEMO_VOCAB)}
  assert (workdir / "spiece.model").read_bytes() == pathlib.Path(vocab_lib.DEMO_VOCAB).read_bytes()
  assert yaml.safe_load((workdir / "model.yaml").read_text())["vocab_size"] == 512  # 400 padded

  # eval from another directory, with no flags: the run's task file and vocabulary are found.
  monkeypatch.chdir(tmp_path.parent)
  args = ("eval", "--workdir", workdir, "--max-examples", "2", "--checkpoints", "latest")
  rc, out, err = cli(*args)
  assert rc == 0, err
  assert task in out and "edited" not in err
  path.write_text(path.read_text() + "# a comment\n")
  rc, out, err = cli(*args)
  assert rc == 0, err
  assert f"note: edited since {workdir}'s run was trained: {path} (edited)" in err
  # ... and so does resuming it.
  rc, out, err = cli("train", "--tasks-dir", path, "--vocab", "demo", "--set",
                     f"data.mixture={mixture}", "--workdir", workdir, *TINY_RUN, "--set", "steps=3")
  assert rc == 0, err
  assert f"note: edited since this workdir's run last trained: {path} (edited)" in out


def test_rerun_of_a_finished_run_reads_nothing(cli, clean_registry, user_tasks, tmp_path):
  path, task, mixture = user_tasks
  argv = ("train", "--tasks-dir", path, "--vocab", "demo", "--set", f"data.mixture={mixture}",
          "--workdir", tmp_path / "wd", *TINY_RUN)
  assert cli(*argv)[0] == 0
  (tmp_path / "my.tsv").unlink()  # a rerun that read data or built the model would now fail
  rc, out, err = cli(*argv)
  assert rc == 0, err
  assert "done: step 2, no steps left to run" in out


def test_config_paths_resolve_against_the_config_file(cli, clean_registry, user_tasks, tmp_path,
                                                      monkeypatch):
  path, task, mixture = user_tasks
  config = tmp_path / "run.yaml"
  config.write_text(yaml.safe_dump({"data": {"mixture": mixture, "tasks_dir": [path.name],
                                             "vocab": "demo"}}))
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  rc, out, err = cli("train", "--config", config, "--workdir", "wd", *TINY_RUN)
  assert rc == 0, err
  assert saved_config(elsewhere / "wd")["data"]["tasks_dir"] == [str(path)]


def test_set_tasks_dir_is_used(cli, clean_registry, user_tasks, tmp_path):
  path, task, mixture = user_tasks
  rc, out, err = cli("train", "--set", f"data.tasks_dir=[{path}]", "--vocab", "demo", "--set",
                     f"data.mixture={mixture}", "--workdir", tmp_path / "wd", *TINY_RUN)
  assert rc == 0, err
  assert saved_config(tmp_path / "wd")["data"]["tasks_dir"] == [str(path)]


def _pretrained(tmp_path, vocab_file, vocab_size):
  """A tiny random T5 in HF layout with `vocab_file` as its spiece.model, imported as a workdir."""
  from t5mix import cli as cli_lib
  config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                    num_encoder_layers=2, num_decoder_layers=2, relative_attention_num_buckets=8,
                    relative_attention_max_distance=20, dropout_rate=0.0)
  save_hf_checkpoint(T5(config, rngs=nnx.Rngs(3)), config, tmp_path / "hf", vocab_file=vocab_file)
  assert cli_lib.main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "pre")]) == 0
  return tmp_path / "pre"


def test_init_from_brings_the_model_and_its_vocabulary(cli, clean_registry, user_tasks, tmp_path):
  path, task, mixture = user_tasks
  pretrained = _pretrained(tmp_path, vocab_lib.DEMO_VOCAB, 512)
  workdir = tmp_path / "ft"
  rc, out, err = cli("train", "--tasks-dir", path, "--init-from", pretrained, "--set",
                     f"data.mixture={mixture}", "--workdir", workdir, *TINY_RUN[2:])
  assert rc == 0, err
  assert f"note: tokenising {task} with the vocabulary of the --init-from model {pretrained}" in out
  saved = saved_config(workdir)
  assert saved["model"] == str(pretrained / "model.yaml")
  assert saved["data"]["vocab"] == str(pretrained / "spiece.model")
  assert yaml.safe_load((workdir / "model.yaml").read_text())["d_model"] == 32


def test_a_vocabulary_larger_than_the_model_is_an_error(cli, expect_error, clean_registry,
                                                        tmp_path):
  pretrained = _pretrained(tmp_path, None, 384)  # no spiece.model: the demo tasks' vocabulary
  rc, out, err = cli("train", "--init-from", pretrained, "--set", "data.mixture=demo",
                     "--workdir", tmp_path / "ft", *TINY_RUN[2:])
  expect_error(rc, err, "400 ids", "<extra_id_0..99> are ids 300..399", "vocab_size 384")


def test_show_checks_and_uses_the_vocab_flag(cli, expect_error, tmp_path):
  bad = tmp_path / "notes.model"
  bad.write_text("not a sentencepiece model\n")
  expect_error(*cli("show", "demo_qa", "--vocab", bad, "-n", "1")[::2], bad)
  rc, out, _ = cli("show", "demo_sentiment", "-n", "1", "--vocab", "byte")
  assert rc == 0
  line = next(line for line in out.splitlines() if line.startswith("[0] inputs"))
  n_tokens = int(line.split("(")[1].split()[0])
  decoded = line.split("): ", 1)[1]
  assert decoded.startswith("sentiment: ") and n_tokens == len(decoded.encode()) + 1  # bytes + EOS


@pytest.mark.skipif(not SHARED_T5.exists(), reason="no ../shared/models/flan-t5-small-kd")
def test_span_corruption_sentinels_are_t5s_extra_ids(builtins):
  import transformers
  spiece = str(SHARED_T5 / "spiece.model")
  tokenizer = transformers.T5Tokenizer(spiece, legacy=False)
  t5 = vocab_lib.get_vocabulary(spiece)
  with registry.run_vocabulary(t5):
    task = registry.get_task_or_mixture("demo_text")
    ds = task.get_dataset({"inputs": 64, "targets": 16}, split="train", shuffle=False, seed=0)
    example = next(ds.as_numpy_iterator())
  assert t5.vocab_size == 32100 and 32099 in example["inputs"].tolist()
  assert tokenizer.convert_ids_to_tokens(32099) == "<extra_id_0>"
  assert t5.decode(example["targets"].tolist()).startswith("<extra_id_0>")
  ids = t5.encode("The house is wonderful.")
  assert list(ids) == tokenizer("The house is wonderful.", add_special_tokens=False).input_ids


@pytest.mark.skipif(not SHARED_T5.exists(), reason="no ../shared/models/flan-t5-small-kd")
def test_vocabulary_t5_in_a_task_file(cli, expect_error, clean_registry, write_yaml,
                                      unique_name, tmp_path, monkeypatch):
  (tmp_path / "one.txt").write_text("The house is wonderful. It has a garden.\n")

  def task_file(name):
    return write_yaml({"tasks": [{"name": name, "kind": "text", "format": "text",
                                  "splits": {"train": "one.txt"}, "vocabulary": "t5"}]},
                      name=f"{name}.yaml")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
  monkeypatch.delenv(vocab_lib.T5_VOCAB_ENV, raising=False)
  name = unique_name("t5_task")
  expect_error(*cli("show", name, "--tasks-dir", task_file(name))[::2], vocab_lib.T5_VOCAB_ENV)
  monkeypatch.setenv(vocab_lib.T5_VOCAB_ENV, str(SHARED_T5 / "spiece.model"))
  name = unique_name("t5_task")
  rc, out, err = cli("show", name, "--tasks-dir", task_file(name), "-n", "1")
  assert rc == 0, err
  assert "<extra_id_0>" in out
