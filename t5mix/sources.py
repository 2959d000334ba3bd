"""Where a task's records come from, and how many there are: local files and HuggingFace datasets.

- A file split (`path: FILE`) is read whole, once per process (t5mix.formats), and counted
  exactly: labelled datasets fit in memory, and `select:` carves splits from one file.
- A glob split (`path: corpus/*.jsonl.gz`) streams. Its files are a seqio.FileDataSource, read
  by tf.data and interleaved, so a corpus larger than memory trains in bounded memory; with
  several processes, seqio gives each its own files (seqio.ShardInfo) when there are at least as
  many files as processes, and its own records of every file otherwise. Plain text for span
  corruption is read by tf.data alone; formats that need Python (JSON, CSV, CoNLL, Parquet, or a
  template) are parsed and formatted by tf.py_function over batches of lines (a row group, a
  file). Mixing rates need exact counts: one pass over the files counts their records, cached
  beside the data (or `num_examples:` says).
- An HF split (`source: {hf: ...}`) is a memory-mapped Arrow table (`datasets`): its count is its
  metadata's num_rows, its rows stream in chunks through the same Python formatting, and several
  processes each read a contiguous share of the rows.

tf.data checkpoints the position of a streamed split like any other (the Python steps are pure
functions of their chunk), so a resumed run reads on from where it saved.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import tempfile
from typing import Any, Callable, Mapping, Sequence

import seqio
import tensorflow as tf

from t5mix import formats
from t5mix.errors import UserError, first_line, where

Record = dict[str, Any]
Formatter = Callable[[Record, str], dict[str, str]]  # (record, "file:line") → example texts

GLOB_CHARACTERS = "*?["
LINE_BATCH = 256  # lines per Python call when a line format is parsed in Python
ROW_CHUNK = 256   # rows per Python call when an HF dataset streams
COUNTS_FILE = ".t5mix-record-counts.json"

# The Python steps (tf.py_function) hold no state, so a checkpoint of the iterator without them
# restores the same position; tf.data refuses to save one otherwise.
_PURE_PYTHON_STEPS = tf.data.Options()
_PURE_PYTHON_STEPS.experimental_external_state_policy = (
    tf.data.experimental.ExternalStatePolicy.IGNORE)


# ---------------------------------------------------------------------------------------------
# Files read whole.


def parse_select(select, where_: str) -> tuple[str | None, str | None]:
  """The START and END texts of `select: "START:END"` (integers or percentages)."""
  m = re.fullmatch(r"\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*", str(select))
  if not m:
    raise UserError(f"{where_}: select {select!r} is not 'START:END' (e.g. '0:90%', '90%:')")
  return m.group(1), m.group(2)


def select_records(records: list, select: str | None, where_: str) -> list:
  """`select: "START:END"` with integers or percentages (e.g. "0:90%", "90%:"), in file order."""
  if not select:
    return records

  def bound(text):
    if text is None:
      return None
    if text.endswith("%"):
      return round(len(records) * int(text[:-1]) / 100)
    return int(text)

  start, end = parse_select(select, where_)
  return records[bound(start):bound(end)]


@functools.lru_cache(maxsize=64)
def _read_file(path: str, fmt: str, options: tuple, mtimes: tuple) -> list:
  del mtimes  # part of the cache key: an edited file is read again
  return formats.read(path, fmt, **dict(options))


def file_records(paths: Sequence[str], fmt: str, options: tuple, select: str | None,
                 where_select: str) -> list[Record]:
  """The records of a file split (paths: [file], or [source, target] for `parallel`), read once
  per process and version of the files, then `select`ed (`where_select` prefixes its errors)."""
  mtimes = tuple(os.path.getmtime(p) if os.path.exists(p) else 0.0 for p in paths)
  records = _read_file(paths[0], fmt, options, mtimes)
  if fmt == "squad_json" and select:
    # Carve SQuAD splits by article so that no context is in two splits.
    articles = sorted({r["article"] for r in records})
    keep = set(select_records(articles, select, where_select))
    return [r for r in records if r["article"] in keep]
  return select_records(records, select, where_select)


class CountedSource(seqio.FunctionDataSource):
  """A FunctionDataSource whose split sizes are counted on first use (seqio wants them upfront).

  Counting reads the file (or TFDS metadata), so registering a task stays cheap.
  """

  def __init__(self, dataset_fn, splits, count_fn: Callable[[str], int]):
    super().__init__(dataset_fn, splits=splits)
    self._count_fn = count_fn
    self._counts: dict[str, int] = {}

  def num_input_examples(self, split: str) -> int:
    if split not in self._counts:
      self._counts[split] = self._count_fn(split)
    return self._counts[split]


# ---------------------------------------------------------------------------------------------
# Streamed files.


def is_glob(path: str) -> bool:
  """Whether a split's path is a pattern (*, ?, [...]): such a split streams its files."""
  return any(c in path for c in GLOB_CHARACTERS)


def list_files(pattern: str, where_: str) -> list[str]:
  """The files a glob matches (`**` spans directories), sorted: the order they are read in."""
  files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not files:
    raise UserError(f"{where_}: no file matches {pattern}")
  return files


def count_records(files: Sequence[str], fmt: str, options: tuple,
                  count_file: Callable[[str], int] | None = None) -> int:
  """How many records `files` hold: `count_file(path)` (default formats.count_records) for each
  file not counted before. Counts are kept per file, under its name, size and modification time,
  in COUNTS_FILE in the files' directory, or under the user's cache directory where that is not
  writable, so the pass happens once per version of a file."""
  directory = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
  caches = [_read_counts(path) for path in _counts_paths(directory)]
  new: dict[str, list[int]] = {}
  total = 0
  for path in files:
    stat = os.stat(path)
    stamp = [stat.st_size, stat.st_mtime_ns]
    key = f"{os.path.relpath(os.path.abspath(path), directory)} {fmt} {json.dumps(options)}"
    entry = next((c[key] for c in caches if c.get(key, [None])[:2] == stamp), None)
    if entry is None:
      n = count_file(path) if count_file else formats.count_records(path, fmt, **dict(options))
      entry = new[key] = [*stamp, n]
    total += entry[2]
  if new:
    _write_counts(directory, new)
  return total


def _counts_paths(directory: str) -> list[str]:
  """Where the counts of files in `directory` are kept: beside them, else in the user's cache."""
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  digest = hashlib.sha256(directory.encode()).hexdigest()[:16]
  return [os.path.join(directory, COUNTS_FILE),
          os.path.join(cache_home, "t5mix", "record-counts", f"{digest}.json")]


def _read_counts(path: str) -> dict[str, list[int]]:
  try:
    with open(path) as f:
      counts = json.load(f)
  except (OSError, ValueError):  # none yet, or damaged: count again
    return {}
  return counts if isinstance(counts, dict) else {}


def _write_counts(directory: str, new: Mapping[str, list[int]]) -> None:
  """Adds `new` to the first writable place of _counts_paths, replacing the file atomically (a
  concurrent writer's additions may be lost, which costs a recount, never a wrong count)."""
  for path in _counts_paths(directory):
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      counts = {**_read_counts(path), **new}
      # A hidden name, which no glob of the data (`*`) matches.
      with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), prefix=f"{COUNTS_FILE}.",
                                       delete=False) as f:
        json.dump(counts, f)
      try:
        os.replace(f.name, path)
      except OSError:
        os.remove(f.name)
        raise
      return
    except OSError:
      continue


# Python's str.strip() whitespace, as RE2 spells it, so that tf.data strips text lines exactly as
# formats' text reader does (and the count of non-blank lines is the same).
_WHITESPACE = r"[\t-\r\x1c-\x1f\x{85}\p{Z}]"


def _text_lines(path: tf.Tensor) -> tf.data.Dataset:
  """The `text` format read by tf.data alone: {"inputs": "", "targets": line} for each non-blank
  line, stripped; what formats' text reader and a `text` task's formatting make of it."""
  lines = tf.data.TextLineDataset(path, compression_type=_compression(path))
  lines = lines.take(1).map(lambda line: tf.strings.regex_replace(line, r"^\x{FEFF}", "")
                            ).concatenate(lines.skip(1))
  texts = lines.map(lambda line: tf.strings.regex_replace(
      line, f"^{_WHITESPACE}+|{_WHITESPACE}+$", ""), num_parallel_calls=tf.data.AUTOTUNE)
  return texts.filter(lambda text: tf.strings.length(text) > 0).map(
      lambda text: {"inputs": tf.constant(""), "targets": text})


def _compression(path: tf.Tensor) -> tf.Tensor:
  return tf.where(tf.strings.regex_full_match(path, r".*\.gz"), "GZIP", "")


@functools.lru_cache(maxsize=256)
def _line_parser(path: str, fmt: str, columns: tuple | None, mtime: float):
  del mtime  # part of the cache key: an edited file's header is read again
  return formats.line_parser(path, fmt, list(columns) if columns else None)


def _python_examples(chunks: tf.data.Dataset, examples_of: Callable[..., list[dict[str, str]]],
                     keys: Sequence[str]) -> tf.data.Dataset:
  """Each element of `chunks` → examples_of(*its values as numpy) → its examples, one element
  each: Python parsing and formatting inside tf.data, a chunk per call."""
  def call(*args):
    examples = examples_of(*(a.numpy() for a in args))
    return [tf.constant([ex[k] for ex in examples], tf.string) for k in keys]

  def apply(*args):
    columns = tf.py_function(call, list(args), [tf.string] * len(keys))
    return {k: tf.ensure_shape(c, [None]) for k, c in zip(keys, columns)}
  return chunks.map(apply, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


@dataclasses.dataclass(frozen=True)
class FileReader:
  """How one streamed file becomes examples, as tf.data (seqio.FileDataSource's read_file_fn):
  the format and its options, and the task's formatter; no formatter reads `text` lines in
  tf.data alone (span corruption's plain text)."""
  fmt: str
  options: tuple                 # (name, value) pairs of formats.iter_records' options
  format_fn: Formatter | None
  keys: tuple[str, ...] = ("inputs", "targets")

  def __call__(self, path: tf.Tensor) -> tf.data.Dataset:
    if self.format_fn is None:
      return _text_lines(path)
    if self.fmt in formats.LINE_FORMATS:
      lines = tf.data.TextLineDataset(path, compression_type=_compression(path))
      chunks = lines.enumerate(start=1).batch(LINE_BATCH).map(lambda n, line: (path, n, line))
      return _python_examples(chunks, self._line_examples, self.keys)
    if self.fmt == "parquet":
      groups = tf.py_function(lambda p: formats.parquet_row_groups(p.numpy().decode()), [path],
                              tf.int64)
      chunks = tf.data.Dataset.range(groups).map(lambda i: (path, i))
      return _python_examples(chunks, self._row_group_examples, self.keys)
    # conll and squad_json records span lines: a file is one chunk
    return _python_examples(tf.data.Dataset.from_tensors(path), self._file_examples, self.keys)

  def _line_examples(self, path: bytes, numbers, lines) -> list[dict[str, str]]:
    path = path.decode()
    columns = dict(self.options).get("columns")
    parse = _line_parser(path, self.fmt, columns, os.path.getmtime(path))
    examples = []
    for number, raw in zip(numbers.tolist(), lines.tolist()):
      record = parse(number, formats.decode_line(path, number, raw))
      if record is not None:
        examples.append(self.format_fn(record, where(path, number)))
    return examples

  def _row_group_examples(self, path: bytes, index) -> list[dict[str, str]]:
    path = path.decode()
    return [self.format_fn(r, where(path, r["_line"]))
            for r in formats.read_parquet_row_group(path, int(index))]

  def _file_examples(self, path: bytes) -> list[dict[str, str]]:
    path = path.decode()
    return [self.format_fn(r, where(path, r.get("_line", "?")))
            for r in formats.iter_records(path, self.fmt, **dict(self.options))]


class StreamedFiles(seqio.FileDataSource):
  """Splits that are glob patterns, streamed: seqio's FileDataSource (files shuffled, sharded
  between processes, interleaved) over files listed when read, with exact counts."""

  def __init__(self, patterns: Mapping[str, str], reader: FileReader,
               count_fn: Callable[[str], int], check_fn: Callable[[str], None],
               wheres: Mapping[str, str]):
    """`count_fn(split)`: its number of records; `check_fn(split)`: raises a UserError if its
    records do not fit the task (called before reading); `wheres`: each split's error prefix."""
    super().__init__(reader, dict(patterns))
    self._count_fn, self._check_fn, self._wheres = count_fn, check_fn, dict(wheres)
    self._counts: dict[str, int] = {}

  def list_shards(self, split: str) -> list[str]:
    return list_files(self._split_to_filepattern[split], self._wheres[split])

  def num_input_examples(self, split: str) -> int:
    if split not in self._counts:
      self._counts[split] = self._count_fn(split)
    return self._counts[split]

  def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, *,
                  sequence_length=None, use_cached=False, num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs  # as FileDataSource: the Task applies them
    self._check_fn(split)
    ds = super().get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info)
    return ds.with_options(_PURE_PYTHON_STEPS)


class SplitSources(seqio.DataSource):
  """One data source per split (a seqio.Task has one for all): a task whose training split
  streams a glob of shards while its validation split is one file read whole."""

  def __init__(self, sources: Mapping[str, seqio.DataSource]):
    self._sources = dict(sources)
    super().__init__(splits=list(self._sources))

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False  # seqio shards by file where a split has enough of them, else by example

  def list_shards(self, split: str) -> Sequence[str]:
    return self._sources[split].list_shards(split)

  def num_input_examples(self, split: str) -> int:
    return self._sources[split].num_input_examples(split)

  def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, *,
                  sequence_length=None, use_cached=False, num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs
    return self._sources[split].get_dataset(split=split, shuffle=shuffle, seed=seed,
                                            shard_info=shard_info)


# ---------------------------------------------------------------------------------------------
# HuggingFace datasets.

# datasets' builders of local files (`load_dataset("parquet", data_files=...)`).
PACKAGED_BUILDERS = ("parquet", "arrow", "json", "csv", "text")
SOURCE_KEYS = ("hf", "config", "split_map", "data_files", "revision")


def hf_split(source: Mapping[str, Any], split: str, base_dir: str, where_: str):
  """Split `split` of the HF dataset `source` names (a `datasets.Dataset`, memory-mapped): a
  directory written by save_to_disk, a directory of data files, a packaged builder over local
  `data_files`, or a hub dataset (from the local cache when HF_DATASETS_OFFLINE=1). `where_`
  prefixes errors."""
  return _hf_split(json.dumps(dict(source), sort_keys=True), split, base_dir, where_)


@functools.lru_cache(maxsize=64)
def _hf_split(source_json: str, split: str, base_dir: str, where_: str):
  import datasets  # ~2 s to import: only tasks over HF datasets pay it
  datasets.disable_progress_bars()  # t5mix reports its own progress
  source = json.loads(source_json)
  name, config = source["hf"], source.get("config")
  local = os.path.join(base_dir, os.path.expanduser(name))
  if any(os.path.exists(os.path.join(local, f)) for f in ("dataset_dict.json", "state.json")):
    return _saved_split(datasets.load_from_disk(local), local, split, where_)
  if os.path.isdir(local):  # data files in a directory: datasets picks the builder by extension
    name = local
  elif name.startswith(("/", "./", "../", "~")):  # a path, not a hub name
    raise UserError(f"{where_}: hf: {local} is not a directory")
  data_files = _resolve_data_files(source.get("data_files"), base_dir)
  if name in PACKAGED_BUILDERS and data_files is None:
    raise UserError(f"{where_}: hf {name!r} reads local files: give source.data_files")
  try:
    return datasets.load_dataset(name, config, data_files=data_files, split=split,
                                 revision=source.get("revision"))
  except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
    described = f"{name!r}" + (f" (config {config!r})" if config else "")
    config_arg = f", '{config}'" if config else ""
    raise UserError(
        f"{where_}: HF dataset {described} is not in the local cache and the hub cannot be "
        f"reached ({first_line(e, 120)}); on a machine with internet run `python -c \"import "
        f"datasets; datasets.load_dataset('{name}'{config_arg})\"`, copy its cache "
        f"(HF_DATASETS_CACHE, default ~/.cache/huggingface/datasets) here and set "
        f"HF_DATASETS_OFFLINE=1") from None
  except (FileNotFoundError, ValueError, KeyError) as e:  # missing data files, unknown split/config
    raise UserError(f"{where_}: split {split!r} of {name!r}: {first_line(e, 300)}") from None


def _saved_split(saved, path: str, split: str, where_: str):
  """Split `split` of what load_from_disk read: a DatasetDict's split, or a Dataset saved alone
  (one split, under its own name or "train")."""
  if isinstance(saved, dict):  # a DatasetDict
    if split not in saved:
      raise UserError(f"{where_}: {path} has no split {split!r}; it has {', '.join(saved)} "
                      "(a dataset saved with save_to_disk is read whole: no slices)")
    return saved[split]
  own = str(saved.split) if saved.split is not None else "train"
  if split != own:
    raise UserError(f"{where_}: {path} holds one Dataset (split {own!r}), not split {split!r}; "
                    "save a DatasetDict for several splits")
  return saved


def _resolve_data_files(data_files, base_dir: str):
  """`data_files` (a path or pattern, a list of them, or {split: them}) relative to base_dir."""
  if data_files is None:
    return None
  if isinstance(data_files, Mapping):
    return {k: _resolve_data_files(v, base_dir) for k, v in data_files.items()}
  if isinstance(data_files, (list, tuple)):
    return [_resolve_data_files(v, base_dir) for v in data_files]
  return os.path.join(base_dir, os.path.expandvars(os.path.expanduser(str(data_files))))


def _class_names(features, label_column: str) -> dict[str, list[str]]:
  """{column: class names} of the ClassLabel columns (or lists of them), but `label_column`."""
  names = {}
  for key, feature in features.items():
    labels = getattr(getattr(feature, "feature", feature), "names", None)
    if labels and key != label_column:
      names[key] = labels
  return names


def hf_records(table, start: int, stop: int, label_column: str) -> list[Record]:
  """Rows [start, stop) of an HF split as records, `_line` the row (from 0). Class labels become
  their names (NER tags), except the classification label column, whose values label_words
  maps."""
  columns = table[start:stop]
  names = _class_names(table.features, label_column)
  records = []
  for i in range(stop - start):
    record = {key: values[i] for key, values in columns.items()}
    for key, labels in names.items():
      value = record[key]
      record[key] = [labels[v] for v in value] if isinstance(value, list) else labels[value]
    record["_line"] = start + i
    records.append(record)
  return records


class RowSource(seqio.DataSource):
  """Splits of numbered rows that Python formats by range (an HF dataset's Arrow table), streamed
  a chunk of ROW_CHUNK rows at a time; process i of n reads the i-th contiguous share."""

  def __init__(self, splits: Sequence[str], num_rows: Callable[[str], int],
               examples: Callable[[str, int, int], list[dict[str, str]]],
               check_fn: Callable[[str], None], keys: Sequence[str]):
    """`num_rows(split)`; `examples(split, start, stop)`: the examples of rows [start, stop);
    `check_fn(split)`: raises a UserError if its rows do not fit the task."""
    super().__init__(splits=list(splits))
    self._num_rows, self._examples, self._check_fn = num_rows, examples, check_fn
    self._keys = tuple(keys)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  def num_input_examples(self, split: str) -> int:
    return self._num_rows(split)

  def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, *,
                  sequence_length=None, use_cached=False, num_epochs=1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs
    self._check_fn(split)
    n = self._num_rows(split)
    first, last = 0, n
    if shard_info:  # contiguous shares, as datasets' Dataset.shard(contiguous=True) makes them
      size, extra = divmod(n, shard_info.num_shards)
      first = shard_info.index * size + min(shard_info.index, extra)
      last = first + size + (shard_info.index < extra)
    starts = tf.data.Dataset.range(first, last, ROW_CHUNK)
    if shuffle:  # chunk order; the Task shuffles examples within its buffer
      starts = starts.shuffle(max(1, -(-(last - first) // ROW_CHUNK)), seed=seed)
    ds = _python_examples(
        starts, lambda start: self._examples(split, int(start), min(int(start) + ROW_CHUNK, last)),
        self._keys)
    return ds.with_options(_PURE_PYTHON_STEPS)
