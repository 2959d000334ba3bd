"""Task sources: glob splits streamed through tf.data (gzip, shards, exact cached counts, sharding
between processes, checkpoints), Parquet files, and HuggingFace datasets (Parquet through its
packaged builder, a save_to_disk directory, a hub name offline). All data is written here."""

import gzip
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio
import tensorflow as tf

import t5mix
from t5mix import definitions, formats, input_pipeline, registry, sources
from t5mix.errors import UserError

pytestmark = pytest.mark.usefixtures("clean_registry")

LABELS = ["negative", "positive"]


@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
  """datasets keeps its Arrow cache in the test's directory and never asks the hub."""
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def add(unique_name, **keys) -> seqio.Task:
  return t5mix.add_task(unique_name("src"), vocabulary="byte", **keys)


def source_rows(task, split, shuffle=False, seed=None):
  """(inputs, targets) texts as the task's source yields them."""
  ds = task.source.get_dataset(split, shuffle=shuffle, seed=seed)
  return [(ex["inputs"].decode(), ex["targets"].decode()) for ex in ds.as_numpy_iterator()]


def pipeline_inputs(task, split, shard_info=None):
  """The inputs texts through the whole seqio Task (tokenised, then decoded), in order."""
  ds = task.get_dataset(None, split=split, shuffle=False, shard_info=shard_info)
  return [ex["inputs_pretokenized"].decode() for ex in ds.as_numpy_iterator()]


def write_jsonl_shards(directory, shards, per_shard, gz=True):
  """shards files of `per_shard` {"sentence", "label"} records; returns every sentence."""
  directory.mkdir(exist_ok=True)
  sentences = []
  for s in range(shards):
    lines = []
    for r in range(per_shard):
      sentences.append(f"shard {s} record {r}")
      lines.append(json.dumps({"sentence": sentences[-1], "label": (s + r) % 2}) + "\n")
    path = directory / f"part-{s:02d}.jsonl{'.gz' if gz else ''}"
    data = "".join(lines).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
  return sentences


# ---------------------------------------------------------------------------------------------
# Glob splits.


def test_plain_text_glob_streams_what_the_text_reader_reads(tmp_path, unique_name):
  """tf.data reads span corruption's plain text alone; it must keep and strip exactly the lines
  formats' text reader does: every whitespace character Python's str.strip() strips, a BOM,
  CRLF, blank lines, gzip."""
  whitespace = [chr(c) for c in range(0x10000) if chr(c).isspace() and chr(c) not in "\r\n"]
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "a.txt.gz").write_bytes(gzip.compress("\ufeffFirst line\n\n  two  \n".encode()))
  (corpus / "b.txt").write_bytes("crlf line\r\n\r\n\u00e9t\u00e9\r\nlast, no newline".encode())
  (corpus / "c.txt").write_text("".join(f"{w}word {i}{w}\n{w}\n" for i, w in enumerate(whitespace)),
                                encoding="utf-8")
  task = add(unique_name, kind="text", format="text", splits={"train": str(corpus / "*.txt*")})
  expected = [("", r["text"]) for name in ("a.txt.gz", "b.txt", "c.txt")
              for r in formats.read(str(corpus / name), "text")]
  assert expected[:4] == [("", "First line"), ("", "two"), ("", "crlf line"), ("", "été")]
  assert len(expected) == 5 + len(whitespace)
  assert sorted(source_rows(task, "train")) == sorted(expected)  # files interleaved
  assert [(ex["inputs"], ex["targets"]) for ex in registry.examples(task.t5mix_spec, "train")] == \
      expected
  assert task.num_input_examples("train") == len(expected)
  assert (corpus / sources.COUNTS_FILE).exists()


def test_streamed_jsonl_through_the_pipeline_and_sharded_between_processes(tmp_path, unique_name):
  sentences = write_jsonl_shards(tmp_path / "shards", shards=4, per_shard=5)
  task = add(unique_name, kind="classification", format="jsonl",
             splits={"train": str(tmp_path / "shards/*.jsonl.gz")},
             template="sst2 sentence: {sentence}", label_words=LABELS)
  assert task.num_input_examples("train") == 20
  rows = source_rows(task, "train")
  assert sorted(rows) == sorted((f"sst2 sentence: {s}", LABELS[(i // 5 + i % 5) % 2])
                                for i, s in enumerate(sentences))
  assert sorted(pipeline_inputs(task, "train")) == sorted(f"sst2 sentence: {s}" for s in sentences)
  # 2 processes, 4 files: each reads its own files whole.
  halves = [pipeline_inputs(task, "train", seqio.ShardInfo(i, 2)) for i in range(2)]
  assert [{s.split()[3] for s in half} for half in halves] == [{"0", "2"}, {"1", "3"}]
  # 8 processes, 4 files: each reads every file, and keeps its own records.
  eighths = [pipeline_inputs(task, "train", seqio.ShardInfo(i, 8)) for i in range(8)]
  assert sorted(sum(eighths, [])) == sorted(f"sst2 sentence: {s}" for s in sentences)
  assert {len(e) for e in eighths} == {2, 3}


@pytest.mark.parametrize("source", ["glob", "hf"])
def test_streamed_position_is_checkpointed_and_restored(source, tmp_path, unique_name,
                                                        monkeypatch):
  """Training saves the input pipeline's position with tf.train.Checkpoint: the Python parsing
  inside tf.data must not stop it, and a restored iterator goes on with the same batches."""
  # As for a corpus too large for seqio to cache in memory (the cache would hide the stream).
  monkeypatch.setattr(seqio.dataset_providers, "_MAX_EXAMPLES_TO_MEM_CACHE", 0)
  write_jsonl_shards(tmp_path / "shards", shards=3, per_shard=40, gz=False)
  if source == "glob":
    keys = dict(format="jsonl", splits={"train": str(tmp_path / "shards/*.jsonl")})
  else:
    keys = dict(source={"hf": "json", "data_files": {"train": str(tmp_path / "shards/*.jsonl")}})
  task = add(unique_name, kind="classification", template="{sentence}", label_words=LABELS, **keys)
  ds = input_pipeline.get_dataset(task.name, "train", {"inputs": 32, "targets": 8}, seed=3,
                                  pack=False).batch(4)
  iterator = iter(ds)
  for _ in range(5):
    next(iterator)
  saved = tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "ckpt"))
  expected = [next(iterator)["encoder_input_tokens"].numpy().tolist() for _ in range(5)]
  restored = iter(ds)
  tf.train.Checkpoint(iterator=restored).read(saved).assert_consumed()
  assert [next(restored)["encoder_input_tokens"].numpy().tolist() for _ in range(5)] == expected


def test_a_record_the_task_cannot_use_is_found_by_the_count(tmp_path, unique_name):
  directory = tmp_path / "shards"
  write_jsonl_shards(directory, shards=2, per_shard=3, gz=False)
  with open(directory / "part-01.jsonl", "a") as f:
    f.write(json.dumps({"sentence": "x", "label": 7}) + "\n")
  task = add(unique_name, kind="classification", format="jsonl",
             splits={"train": str(directory / "*.jsonl")}, template="{sentence}",
             label_words=LABELS)
  with pytest.raises(UserError, match=rf"^{directory}/part-01.jsonl:4: label '7' is not in "
                                      r"label_words \(0, 1\)"):
    task.num_input_examples("train")


def test_counts_are_cached_beside_the_data_or_in_the_user_cache(tmp_path, monkeypatch):
  write_jsonl_shards(tmp_path / "shards", shards=3, per_shard=4)
  files = sources.list_files(str(tmp_path / "shards/*.gz"), "here")
  options = (("columns", None),)
  assert sources.count_records(files, "jsonl", options) == 12

  def no_count(*args, **kwargs):
    raise AssertionError("counted again")
  monkeypatch.setattr(formats, "count_records", no_count)
  assert sources.count_records(files, "jsonl", options) == 12
  with gzip.open(files[1], "at") as f:  # an edited file is counted again, the others are not
    f.write(json.dumps({"sentence": "new", "label": 0}) + "\n")
  with pytest.raises(AssertionError, match="counted again"):
    sources.count_records(files, "jsonl", options)
  monkeypatch.undo()
  assert sources.count_records(files, "jsonl", options) == 13
  # Where the data's directory takes no file, the counts go to $XDG_CACHE_HOME/t5mix.
  beside = tmp_path / "shards" / sources.COUNTS_FILE
  beside.unlink()
  beside.mkdir()  # no file can replace a directory
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
  assert sources.count_records(files, "jsonl", options) == 13
  assert len(list((tmp_path / "user_cache" / "t5mix" / "record-counts").iterdir())) == 1
  assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [  # no temporary file left
      sources.COUNTS_FILE, "part-00.jsonl.gz", "part-01.jsonl.gz", "part-02.jsonl.gz"]
  monkeypatch.setattr(formats, "count_records", no_count)
  assert sources.count_records(files, "jsonl", options) == 13


def test_num_examples_in_yaml_replaces_the_count(tmp_path, write_yaml, unique_name, monkeypatch):
  write_jsonl_shards(tmp_path / "shards", shards=2, per_shard=3)
  name = unique_name("yaml")
  path = write_yaml({"tasks": [{
      "name": name, "kind": "classification", "format": "jsonl", "vocabulary": "byte",
      "template": "{sentence}", "label_words": LABELS,
      "splits": {"train": {"path": "shards/*.jsonl.gz", "num_examples": 6}}}]})
  definitions.load([str(path)], builtin=False)
  monkeypatch.setattr(formats, "count_records", lambda *a, **k: pytest.fail("counted"))
  task = seqio.get_mixture_or_task(name)
  assert task.num_input_examples("train") == 6
  assert len(list(registry.examples(task.t5mix_spec, "train"))) == 6


@pytest.mark.parametrize("keys, message", [
    (dict(splits={"train": {"path": "s/*.jsonl", "select": ":50%"}}),
     r"defs.yaml:5: task '\S+': key 'splits': split 'train': select slices a single file, and "
     r"'s/\*.jsonl' is a glob"),
    (dict(splits={"train": {"path": "one.jsonl", "num_examples": 3}}),
     r"num_examples is for a glob \(a streamed split\)"),
    (dict(splits={"train": {"path": "s/*.jsonl", "num_examples": -1}}),
     r"num_examples must be an integer >= 0, found -1"),
    (dict(format="parallel", kind="seq2seq",
          splits={"train": {"source": "s/*.en", "target": "t.de"}}),
     r"'s/\*.en' is a glob, and format 'parallel' pairs two single files"),
    (dict(source={"hf": "imdb"}, format=None, splits=None),
     r"split_map must map the task's splits to the dataset's"),
    (dict(source={"hf": "imdb", "split_map": {"train": "train"}}, format=None),
     r"a task with 'source' names its splits in source.split_map"),
    (dict(source={"hf": "imdb", "split_map": {"train": "train"}, "revison": "main"}, format=None,
          splits=None), r"unknown key 'source.revison' \(did you mean 'source.revision'\?\)"),
    (dict(source={"hf": "parquet", "split_map": {"train": "train"}}, format=None, splits=None),
     r"hf 'parquet' reads local files: give them in data_files"),
    (dict(source={"hf": "imdb", "split_map": {"train": "train"}}, splits=None),
     r"give exactly one of 'format' \(local files\), 'tfds' or 'source'"),
])
def test_spec_errors(keys, message):
  """Keys set to None are left out."""
  spec = {"name": "t", "kind": "classification", "label_words": LABELS, "format": "jsonl",
          "splits": {"train": "x.jsonl"}, **keys}
  spec = {k: v for k, v in spec.items() if v is not None}
  lines = {"splits.train": "defs.yaml:5", "splits.train.select": "defs.yaml:5"}
  with pytest.raises(UserError, match=message):
    registry.TaskSpec.from_dict(spec, origin="defs.yaml:2", key_origins=lines)


def test_a_glob_without_files_is_an_error(tmp_path, unique_name):
  task = add(unique_name, kind="text", format="text", splits={"train": str(tmp_path / "*.txt")})
  with pytest.raises(UserError, match=rf"split 'train': no file matches {tmp_path}/\*.txt"):
    task.num_input_examples("train")


# ---------------------------------------------------------------------------------------------
# Parquet.


def write_parquet(path, n, start=0, row_group_size=None):
  sentences = [f"sentence {i}" for i in range(start, start + n)]
  labels = [i % 2 for i in range(start, start + n)]
  pq.write_table(pa.table({"sentence": sentences, "label": labels}), str(path),
                 row_group_size=row_group_size)
  return [(f"s: {s}", LABELS[i % 2]) for i, s in enumerate(sentences, start=start)]


def test_parquet_file_read_whole_and_streamed_by_row_group(tmp_path, unique_name):
  (tmp_path / "pq").mkdir()
  first = write_parquet(tmp_path / "pq" / "a.parquet", 7, row_group_size=3)
  second = write_parquet(tmp_path / "pq" / "b.parquet", 4, start=7)
  task = add(unique_name, kind="classification", format="parquet", template="s: {sentence}",
             label_words=LABELS, splits={"head": {"path": str(tmp_path / "pq" / "a.parquet"),
                                                  "select": ":2"},
                                         "all": str(tmp_path / "pq" / "*.parquet")})
  assert [(ex["inputs"], ex["targets"]) for ex in registry.examples(task.t5mix_spec, "head")] == \
      first[:2]
  assert source_rows(task, "head") == first[:2]
  assert task.num_input_examples("all") == 11
  assert sorted(source_rows(task, "all")) == sorted(first + second)
  (tmp_path / "pq" / "c.parquet").write_bytes(b"not parquet at all")
  with pytest.raises(UserError, match=r"c.parquet: not a Parquet file"):
    formats.read(str(tmp_path / "pq" / "c.parquet"), "parquet")


# ---------------------------------------------------------------------------------------------
# HuggingFace datasets.


def test_hf_parquet_counts_from_metadata_and_streams_in_chunks(tmp_path, unique_name, monkeypatch):
  train = write_parquet(tmp_path / "train.parquet", 10)
  validation = write_parquet(tmp_path / "validation.parquet", 3, start=10)
  monkeypatch.setattr(sources, "ROW_CHUNK", 4)
  task = add(unique_name, kind="classification", template="s: {sentence}", label_words=LABELS,
             source={"hf": "parquet",
                     "data_files": {"train": str(tmp_path / "train.parquet"),
                                    "validation": str(tmp_path / "validation.parquet")}})
  assert task.splits == ("train", "validation")
  with monkeypatch.context() as m:  # counts come from the Arrow table's metadata, no row is read
    m.setattr(sources, "hf_records", lambda *a: pytest.fail("rows were read to count"))
    assert [task.num_input_examples(s) for s in ("train", "validation")] == [10, 3]
  assert source_rows(task, "validation") == validation
  assert pipeline_inputs(task, "train") == [inputs for inputs, _ in train]
  assert [(ex["inputs"], ex["targets"])
          for ex in registry.examples(task.t5mix_spec, "train")] == train
  thirds = [pipeline_inputs(task, "train", seqio.ShardInfo(i, 3)) for i in range(3)]
  assert thirds == [[i for i, _ in train[a:b]] for a, b in ((0, 4), (4, 7), (7, 10))]
  shuffled = source_rows(task, "train", shuffle=True, seed=1)  # chunks in another order
  assert shuffled != train and sorted(shuffled) == sorted(train)


def test_hf_saved_to_disk_from_yaml(tmp_path, write_yaml, unique_name):
  """A DatasetDict saved with save_to_disk, named in a task file: class-label tags read as their
  names, SQuAD-style answers, the split map, and errors at the line of the key."""
  features = datasets.Features({
      "tokens": datasets.List(datasets.Value("string")),
      "ner_tags": datasets.List(datasets.ClassLabel(names=["O", "B-PER", "I-PER", "B-LOC"])),
      "question": datasets.Value("string"), "context": datasets.Value("string"),
      "answers": {"text": datasets.List(datasets.Value("string")),
                  "answer_start": datasets.List(datasets.Value("int32"))}})
  rows = {"tokens": [["John", "Smith", "visits", "Paris"], ["Nothing", "here"]],
          "ner_tags": [[1, 2, 0, 3], [0, 0]], "question": ["Who?", "Where?"],
          "context": ["John Smith visits Paris", "Nothing here"],
          "answers": [{"text": ["John Smith", "John"], "answer_start": [0, 0]},
                      {"text": ["here"], "answer_start": [8]}]}
  datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
      str(tmp_path / "saved"))
  ner, qa, bad = unique_name("ner"), unique_name("qa"), unique_name("bad")
  source = {"hf": "saved", "split_map": {"validation": "test"}}
  path = write_yaml(f"""tasks:
  - {{name: {ner}, kind: ner, tags: ner_tags, vocabulary: byte, source: {json.dumps(source)}}}
  - {{name: {qa}, kind: qa, vocabulary: byte, source: {json.dumps(source)}}}
  - name: {bad}
    kind: qa
    vocabulary: byte
    source:
      hf: saved
      split_map: {{validation: validation}}
""")
  definitions.load([str(path)], builtin=False)
  ner_task, qa_task = seqio.get_mixture_or_task(ner), seqio.get_mixture_or_task(qa)
  assert source_rows(ner_task, "validation") == [
      (f"{ner}: John Smith visits Paris", "PER: John Smith; LOC: Paris"),
      (f"{ner}: Nothing here", "none")]
  examples = list(registry.examples(qa_task.t5mix_spec, "validation"))
  assert [(ex["targets"], json.loads(ex["answers"])) for ex in examples] == [
      ("John Smith", ["John Smith", "John"]), ("here", ["here"])]
  assert ner_task.num_input_examples("validation") == 2
  with pytest.raises(UserError, match=rf"^{path}:7: task '{bad}': split 'validation': "
                                      rf"{tmp_path}/saved has no split 'validation'; it has test"):
    seqio.get_mixture_or_task(bad).num_input_examples("validation")


def test_hf_hub_dataset_missing_offline_says_how_to_get_it(unique_name):
  task = add(unique_name, kind="classification", label_words=LABELS,
             source={"hf": "glue", "config": "sst2", "split_map": {"train": "train"}})
  with pytest.raises(UserError) as e:
    task.num_input_examples("train")
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"{task.t5mix_spec.origin}: task {task.name!r}: split 'train': HF "
                            "dataset 'glue' (config 'sst2') is not in the local cache")
  assert "datasets.load_dataset('glue', 'sst2')" in message and "HF_DATASETS_OFFLINE=1" in message


def test_show_and_tasks_read_streamed_splits(cli, write_yaml, unique_name, tmp_path):
  """`t5mix show` counts truncation over a stream; `t5mix tasks` lists the exact counts."""
  write_jsonl_shards(tmp_path / "shards", shards=2, per_shard=5)
  write_parquet(tmp_path / "train.parquet", 3)
  glob_task, hf_task = unique_name("glob"), unique_name("hf")
  path = write_yaml({"tasks": [
      {"name": glob_task, "kind": "classification", "format": "jsonl", "vocabulary": "byte",
       "splits": {"train": "shards/*.jsonl.gz"}, "template": "{sentence}", "label_words": LABELS},
      {"name": hf_task, "kind": "classification", "vocabulary": "byte", "template": "{sentence}",
       "label_words": LABELS,
       "source": {"hf": "parquet", "data_files": {"train": "train.parquet"}}}]})
  rc, out, err = cli("show", glob_task, "-n", "0", "--inputs-length", "16", "--tasks-dir", path)
  assert rc == 0, err
  assert out == (f"truncation of {glob_task} (all 10 train examples): 10 (100.0%) have inputs "
                 "over 16 tokens, 0 (0.0%) targets over 32 tokens\n")
  rc, out, err = cli("tasks", "--tasks-dir", path)
  assert rc == 0, err
  rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
  assert rows[glob_task][1:4] == ["classification", f"jsonl:{tmp_path}/shards/*.jsonl.gz",
                                  "train=10"]
  assert rows[hf_task][1:4] == ["classification", "hf:parquet", "train=3"]
