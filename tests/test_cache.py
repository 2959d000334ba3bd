"""`t5mix cache` (seqio's Beam caching pipeline) and training that reads the caches.

The tests that run Beam need the `cache` extra (pyproject.toml says how it installs) and are
skipped without it; the fingerprint, staleness and rate tests need only the main install.
"""

import ast
import json
import os
import subprocess
import sys

import pytest
import seqio
import yaml

from t5mix import input_pipeline, mixing, registry, span_corruption
from t5mix.errors import UserError

LENGTHS = {"inputs": 64, "targets": 32}
TINY = ["model=tiny", "data.batch_size=8", "data.inputs_length=64", "data.targets_length=32",
        "steps=4", "log_every=2", "checkpoint_every=4"]


def _settings(*overrides):
  return [x for o in TINY + list(overrides) for x in ("--set", o)]


# ---------------------------------------------------------------------------------------------
# Without Beam: fingerprints, stale caches, rates from the cached counts.


@pytest.fixture
def tsv_task(tmp_path, clean_registry, unique_name):
  """A classification task over a TSV file in tmp_path, and the file."""
  data = tmp_path / "data.tsv"
  data.write_text("text\tlabel\ngood film\t1\nbad film\t0\nfine film\t1\n")
  task = registry.add_task(unique_name("cached"), kind="classification", format="tsv",
                           splits={"train": str(data)}, label_words=["negative", "positive"],
                           vocabulary="demo")
  return task, data


def _fake_cache(cache_dir, task, examples=None, fingerprint=None):
  """A cache directory as `t5mix cache` leaves one, with no data: COMPLETED holding the
  fingerprint (the task's own by default) and, given `examples`, stats.train.json."""
  task_dir = cache_dir / task.name
  task_dir.mkdir(parents=True)
  completed = input_pipeline.cache_fingerprint(task) if fingerprint is None else fingerprint
  (task_dir / "COMPLETED").write_text(json.dumps(completed))
  if examples is not None:
    (task_dir / "stats.train.json").write_text(json.dumps({"examples": examples}))


def test_a_cache_of_the_task_as_it_is_is_used(tsv_task, tmp_path):
  task, _ = tsv_task
  _fake_cache(tmp_path / "cache", task)
  input_pipeline.use_caches([task], [str(tmp_path / "cache")])
  assert task.cache_dir == str(tmp_path / "cache" / task.name)


@pytest.mark.parametrize("edit, changed", [
    ("data", "data file of split 'train'"),
    ("vocabulary", "vocabulary"),
    ("template", "definition key 'template'"),
    ("not_t5mix", "not made by `t5mix cache`"),
])
def test_a_stale_cache_is_an_error_naming_the_task_and_what_changed(tsv_task, tmp_path, edit,
                                                                    changed):
  task, data = tsv_task
  fingerprint = input_pipeline.cache_fingerprint(task)
  if edit == "template":
    fingerprint["definition"]["template"] = "review: {text}"
  _fake_cache(tmp_path / "cache", task, fingerprint={} if edit == "not_t5mix" else fingerprint)
  if edit == "data":
    data.write_text(data.read_text() + "dull film\t0\n")
  vocab = seqio.ByteVocabulary(extra_ids=100) if edit == "vocabulary" else None
  with registry.run_vocabulary(vocab), pytest.raises(UserError) as error:
    input_pipeline.use_caches([task], [str(tmp_path / "cache")])
  message = str(error.value)
  assert f"task {task.name!r}" in message and "stale" in message and changed in message, message
  assert f"t5mix cache {task.name} --output-dir {tmp_path / 'cache'}" in message, message


def test_span_corruption_settings_leave_a_cache_valid(tmp_path, clean_registry, unique_name):
  """Span corruption's noise is drawn after the cache: its settings do not make a cache stale."""
  text = tmp_path / "text.txt"
  text.write_text("one two three four five six seven\n")
  kwargs = dict(kind="text", format="text", splits={"train": str(text)}, vocabulary="demo")
  name = unique_name("text")
  before = input_pipeline.cache_fingerprint(registry.build_task(
      registry.TaskSpec.from_dict({"name": name, **kwargs}, origin="test")))
  after = input_pipeline.cache_fingerprint(registry.build_task(registry.TaskSpec.from_dict(
      {"name": name, **kwargs, "noise_density": 0.3, "mean_noise_span_length": 2.0}, "test")))
  assert input_pipeline.cache_changes(before, after) == []
  assert before["steps"] == ["tokenize"]


def test_no_cache_or_no_cache_dir_is_an_error(tsv_task, tmp_path):
  task, _ = tsv_task
  with pytest.raises(UserError, match="pass --cache-dir DIR"):
    input_pipeline.use_caches([task], [])
  with pytest.raises(UserError, match=f"task '{task.name}' has no cache in .*t5mix cache {task.name}"):
    input_pipeline.use_caches([task], [str(tmp_path / "empty")])


def test_mixing_rates_count_the_cached_examples(tmp_path, clean_registry, unique_name):
  """T=1 rates of two 3-example tasks are 1:1 uncached; their caches' stats say 30 and 10."""
  data = tmp_path / "data.tsv"
  data.write_text("text\tlabel\ngood film\t1\nbad film\t0\nfine film\t1\n")
  tasks = [registry.add_task(unique_name("rated"), kind="classification", format="tsv",
                             splits={"train": str(data)}, label_words=["no", "yes"],
                             vocabulary="demo") for _ in range(2)]
  mixture = mixing.add_mixture(unique_name("mix"), tasks=[t.name for t in tasks])
  assert list(mixing.leaf_rates(mixture).values()) == [0.5, 0.5]
  for task, examples in zip(tasks, (30, 10)):
    _fake_cache(tmp_path / "cache", task, examples=examples)
  input_pipeline.use_caches(tasks, [str(tmp_path / "cache")])
  assert list(mixing.leaf_rates(mixture).values()) == [0.75, 0.25]


def test_cache_without_the_extra_says_how_to_install_it(cli, expect_error, tmp_path, monkeypatch):
  # As without the extra, whether or not this environment has it: importing Beam fails.
  monkeypatch.setitem(sys.modules, "apache_beam", None)
  monkeypatch.delitem(sys.modules, "seqio.beam_utils", raising=False)
  monkeypatch.delitem(sys.modules, "t5mix.cache", raising=False)
  rc, _, err = cli("cache", "demo_text", "--output-dir", tmp_path)
  expect_error(rc, err, "`t5mix cache` needs Apache Beam", 'pip install -e ".[cache]"')


# ---------------------------------------------------------------------------------------------
# With Beam: two demo tasks cached by the DirectRunner with two worker processes, then read.

CACHED_TASKS = ("demo_sentiment", "demo_text")


@pytest.fixture(scope="module")
def cache_run(tmp_path_factory, builtins):
  """(cache directory, the command's stdout) of `t5mix cache demo_sentiment demo_text`."""
  pytest.importorskip("apache_beam")
  cache_dir = tmp_path_factory.mktemp("cache")
  command = [sys.executable, "-m", "t5mix.cli", "cache", *CACHED_TASKS, "--output-dir",
             str(cache_dir), "--min-shards", "3", "--",
             "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
  done = subprocess.run(command, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  tasks = [seqio.get_mixture_or_task(name) for name in CACHED_TASKS]
  input_pipeline.use_caches(tasks, [str(cache_dir)])
  return cache_dir, done.stdout


@pytest.mark.slow
def test_cache_writes_seqios_layout_with_exact_counts(cache_run):
  cache_dir, stdout = cache_run
  for name in CACHED_TASKS:
    task = seqio.get_mixture_or_task(name)
    for split in task.splits:
      files = os.listdir(cache_dir / name)
      assert {f"info.{split}.json", f"stats.{split}.json", "COMPLETED"} <= set(files)
      assert sorted(f for f in files if f.startswith(f"{split}.tfrecord-")) == [
          f"{split}.tfrecord-0000{i}-of-00003" for i in range(3)]
      stats = json.loads((cache_dir / name / f"stats.{split}.json").read_text())
      assert stats["examples"] == task.num_input_examples(split)
    assert f"{name}: cached in {cache_dir / name}" in stdout
  assert f"--cache-dir {cache_dir} --set data.use_cached=true" in stdout


def _rows(task, use_cached, seed=0):
  ds = task.get_dataset(LENGTHS, split="train", shuffle=False, seed=seed, use_cached=use_cached)
  return [(tuple(ex["inputs"].tolist()), tuple(ex["targets"].tolist()))
          for ex in ds.as_numpy_iterator()]


def _uncorrupted(inputs, targets, vocab):
  """The chunk of raw tokens a span-corrupted example was made from: each sentinel of the inputs
  replaced by the tokens that follow it in the targets (EOS dropped)."""
  first_sentinel = vocab.vocab_size - vocab.extra_ids
  spans, span = {}, None
  for token in targets[:-1]:
    if token >= first_sentinel:
      span = spans.setdefault(token, [])
    else:
      span.append(token)
  return tuple(t for token in inputs[:-1] for t in (spans[token] if token >= first_sentinel
                                                    else [token]))


@pytest.mark.slow
def test_cached_examples_are_the_uncached_ones(cache_run):
  sentiment = seqio.get_mixture_or_task("demo_sentiment")
  cached = _rows(sentiment, use_cached=True)
  assert len(cached) == sentiment.num_input_examples("train")
  assert sorted(cached) == sorted(_rows(sentiment, use_cached=False))  # cached in another order


@pytest.mark.slow
def test_cached_text_has_the_same_tokens_and_span_corruption_noise_drawn_live(cache_run):
  text = seqio.get_mixture_or_task("demo_text")
  vocab = text.output_features["targets"].vocabulary
  chunks = {}
  for use_cached, seed in ((False, 0), (True, 0), (True, 1)):
    rows = _rows(text, use_cached, seed)
    chunks[use_cached, seed] = sorted(_uncorrupted(i, t, vocab) for i, t in rows)
    if (use_cached, seed) == (True, 0):
      seed_0 = sorted(rows)
  assert chunks[True, 0] == chunks[False, 0] == chunks[True, 1]
  tokens_length, _ = span_corruption.random_spans_helper(LENGTHS["inputs"])
  assert max(map(len, chunks[True, 0])) == tokens_length
  assert seed_0 != sorted(_rows(text, True, seed=1))  # the noise is not in the cache


@pytest.fixture(scope="module")
def pair_mixture(tmp_path_factory):
  path = tmp_path_factory.mktemp("defs") / "pair.yaml"
  path.write_text(yaml.safe_dump({"mixtures": [
      {"name": "cached_pair", "rate": "temperature", "temperature": 2.0,
       "tasks": list(CACHED_TASKS)}]}))
  return path


@pytest.mark.slow
def test_training_reads_the_caches(cache_run, pair_mixture, cli, tmp_path):
  cache_dir, _ = cache_run
  rc, out, err = cli("train", "--tasks-dir", pair_mixture, "--workdir", tmp_path / "run",
                     "--cache-dir", cache_dir, *_settings("data.use_cached=true",
                                                          "data.mixture=cached_pair"))
  assert rc == 0, err
  done = next(line for line in out.splitlines() if line.startswith("done: step 4"))
  counts = ast.literal_eval(done.split("examples seen per task: ")[1].split(";")[0])
  assert set(counts) == set(CACHED_TASKS) and all(counts.values())
  saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
  assert saved["use_cached"] is True and saved["cache_dirs"] == [str(cache_dir)]


@pytest.mark.slow
def test_a_stale_cache_stops_training_and_recaching_skips_what_is_up_to_date(
    cache_run, pair_mixture, cli, expect_error, tmp_path):
  cache_dir, _ = cache_run
  rc, _, err = cli("train", "--tasks-dir", pair_mixture, "--workdir", tmp_path / "run",
                   "--cache-dir", cache_dir, "--vocab", "byte",
                   *_settings("data.use_cached=true", "data.mixture=cached_pair"))
  expect_error(rc, err, "task 'demo_sentiment'", "is stale (it differs in vocabulary)",
               f"t5mix cache demo_sentiment --output-dir {cache_dir} --vocab byte --overwrite")
  rc, out, err = cli("cache", *CACHED_TASKS, "--output-dir", cache_dir)
  assert rc == 0, err
  assert out.splitlines() == [f"{name}: up to date in {cache_dir / name}" for name in CACHED_TASKS]
  rc, _, err = cli("cache", "demo_sentiment", "--output-dir", cache_dir, "--vocab", "byte")
  expect_error(rc, err, "task 'demo_sentiment'", "holds a cache of another definition",
               "vocabulary", "--overwrite")
