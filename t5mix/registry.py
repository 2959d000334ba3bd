"""The task registry: datasets of five kinds turned into text-to-text seqio Tasks.

A task is a seqio.Task (source → preprocessors → output features, postprocess_fn, metric_fns).
t5mix adds one thing seqio lacks: a declarative *task spec* (a YAML mapping or keyword
arguments) that names a kind, where the data is, and how to phrase it:

  kind            input text (template)                         target text
  classification  "sst2 sentence: {sentence}"                   label word, e.g. "positive"
  qa              "question: {question} context: {context}"     the (first) gold answer
  ner             "ner: {sentence}" (tokens joined by spaces)    "PER: John Smith; LOC: Paris" / "none"
  seq2seq         "summarize: {dialogue}" (default "{source}")  target_template, e.g. "{summary}"
  text            (span corruption of the text; see span_corruption.py)

Sources (t5mix.sources): local files (t5mix.formats), a TFDS dataset, or a HuggingFace dataset.
A file or TFDS split is read whole and formatted in Python, once per process, then handed to
tf.data: labelled datasets fit in memory, counts are exact (mixing rates need them), and one
formatter serves every source. Splits that may not fit stream instead: a glob of files, an HF
dataset (formatted a chunk at a time inside tf.data), and `text` tasks over TFDS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import itertools
import json
import os
import re
import string
import sys
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import seqio
import tensorflow as tf

from t5mix import formats, metrics, ner, sources, span_corruption
from t5mix.errors import UserError, check_keys, did_you_mean, key_origin
from t5mix.vocab import get_vocabulary

KINDS = ("classification", "qa", "ner", "seq2seq", "text")
# seq2seq's defaults read the columns of the parallel format (t5mix.formats.read_parallel).
DEFAULT_TEMPLATES = {
    "classification": None,  # built from the field names, see _default_template
    "qa": "question: {question} context: {context}",
    "ner": "{name}: {sentence}",
    "seq2seq": "{source}",
    "text": "{text}",
}
DEFAULT_TARGET_TEMPLATE = "{target}"
DEFAULT_METRICS = {
    "classification": ["accuracy"],
    "qa": ["squad"],
    "ner": ["span_f1"],
    "seq2seq": ["bleu"],
    "text": [],
}
METRICS: dict[str, Callable] = {
    "accuracy": metrics.accuracy,
    "f1": metrics.f1_binary,
    "f1_macro": metrics.f1_macro,
    "mcc": metrics.matthews_corrcoef,
    "pearson_spearman": metrics.pearson_spearman,
    "squad": metrics.squad,
    "span_f1": metrics.span_f1,
    "bleu": metrics.bleu,
    "chrf": metrics.chrf,
    "rouge": metrics.rouge,
    "exact_match": metrics.exact_match,
}
# The metrics of generated text take lists of reference texts, which only seq2seq makes; the
# others take labels, answers or entities, which seq2seq does not.
GENERATION_METRICS = ("bleu", "chrf", "rouge", "exact_match")
SEQ2SEQ_KEYS = ("target_template", "references")


_STR, _OPT_STR = ((str,), "a string"), ((str, type(None)), "a string")
_INT, _NUMBER = ((int,), "an integer"), ((int, float), "a number")
_OPT_LIST = ((list, tuple, type(None)), "a list")
_OPT_INT, _OPT_NUMBER = ((int, type(None)), "an integer"), ((int, float, type(None)), "a number")
_SOURCE = ((Mapping, type(None)), "a mapping {hf: NAME, config: ..., split_map: {...}, ...}")
# The type each TaskSpec key must have (checked by validate, so a bad YAML value is a one-line
# error naming the key rather than a crash later).
_KEY_TYPES = {
    "kind": _STR, "splits": ((Mapping,), "a mapping of split names"), "format": _OPT_STR,
    "tfds": _OPT_STR, "source": _SOURCE, "template": _OPT_STR,
    "fields": ((Mapping,), "a mapping of names to columns"),
    "label": _STR,
    "label_words": ((list, tuple, Mapping, type(None)), "a list or mapping of label words"),
    "answers": _STR, "tokens": _STR, "tags": _STR, "scheme": _STR, "token_column": _INT,
    "tag_column": _INT, "columns": _OPT_LIST, "metrics": _OPT_LIST, "vocabulary": _OPT_STR,
    "noise_density": _NUMBER, "mean_noise_span_length": _NUMBER, "description": _STR,
    "target_template": _OPT_STR, "references": _OPT_STR, "beam_size": _OPT_INT,
    "length_penalty": _OPT_NUMBER, "max_decode_length": _OPT_INT,
}


@dataclasses.dataclass(eq=False)  # hashed by identity: caches key on the spec object
class TaskSpec:
  """Everything that defines a task. Field names are the keys of a task YAML entry."""
  name: str
  kind: str
  # split → path | {path, select, num_examples} (files; a glob path streams) |
  # {source, target, select} (parallel) | TFDS split name | HF split (from source.split_map)
  splits: dict[str, Any]
  format: str | None = None         # one of formats.FORMATS: tsv, csv, jsonl, ..., parquet
  tfds: str | None = None           # e.g. "glue/sst2:2.0.0"; replaces `format`
  # HF datasets: {hf: NAME | DIR | parquet..., config, split_map, data_files, revision}; replaces
  # `format`, and its split_map gives `splits`
  source: dict[str, Any] | None = None
  template: str | None = None       # input text; {field} placeholders
  fields: dict[str, str] = dataclasses.field(default_factory=dict)  # placeholder → column
  label: str = "label"              # classification: the label column
  label_words: Any = None           # classification: {label value: word} or [word, ...]
  answers: str = "answers"          # qa: column with the gold answer(s)
  tokens: str = "tokens"            # ner: column with tokens (tfds/jsonl)
  tags: str = "tags"                # ner: column with tags (tfds/jsonl)
  scheme: str = "iob2"              # ner: one of ner.SCHEMES (iob1, iob2, bioes, ...)
  token_column: int = 0             # conll: column of the token
  tag_column: int = -1              # conll: column of the NER tag
  columns: list[str] | None = None  # tsv/csv without a header row
  target_template: str | None = None  # seq2seq: target text; {field} placeholders
  references: str | None = None     # seq2seq: column of the reference text(s) eval scores against
  metrics: list[str] | None = None
  vocabulary: str | None = None     # "byte", "demo", or a SentencePiece model path
  noise_density: float = 0.15       # text: span corruption
  mean_noise_span_length: float = 3.0
  # Decoding in eval and predict (None: greedy, alpha 0.6, up to the run's targets length).
  beam_size: int | None = None
  length_penalty: float | None = None  # beam search's alpha: score / ((5 + length) / 6) ** alpha
  max_decode_length: int | None = None
  description: str = ""
  base_dir: str = "."               # where relative paths resolve (the YAML file's directory)
  origin: str = "<python>"          # where the spec was defined (`file:line`), for error messages
  # Where each key was written (`file:line`), by key path as in `splits.train` or `metrics[1]`;
  # empty for tasks defined in Python, whose errors name the add_task call (`origin`).
  key_origins: dict[str, str] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], origin: str, base_dir: str = ".",
                key_origins: Mapping[str, str] | None = None) -> "TaskSpec":
    if not isinstance(d, Mapping):
      raise UserError(f"{origin}: a task must be a mapping, found {type(d).__name__}")
    key_origins = dict(key_origins or {})
    name = d.get("name")
    task = f": task {name!r}" if isinstance(name, str) else ""
    known = {f.name for f in dataclasses.fields(cls)} - {"base_dir", "origin", "key_origins"}
    check_keys(d, known, lambda key: f"{key_origins.get(key, origin)}{task}")
    if "source" in d:
      d = {**d, "splits": _source_splits(d, lambda key: f"{key_origin(key_origins, key, origin)}"
                                                        f"{task}")}
    for key in ("name", "kind", "splits"):
      if key not in d:
        raise UserError(f"{origin}{task}: missing required key {key!r}")
    spec = cls(**d, base_dir=base_dir, origin=origin, key_origins=key_origins)
    spec.validate()
    return spec

  def where(self, key: str | None = None) -> str:
    """`file:line: task 'NAME'` for error messages, at the line of `key` (a key path such as
    `splits.train`, else its closest enclosing key written in the file), else the task's."""
    return f"{key_origin(self.key_origins, key, self.origin)}: task {self.name!r}"

  def validate(self) -> None:
    if not isinstance(self.name, str) or not re.fullmatch(r"[\w.:-]+", self.name):
      raise UserError(f"{self.key_origins.get('name', self.origin)}: key 'name': {self.name!r} is "
                      "not a valid task name (letters, digits, _ . : -)")
    for key, (types, expected) in _KEY_TYPES.items():
      value = getattr(self, key)
      if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
        raise UserError(f"{self.where(key)}: key {key!r} must be {expected}, found "
                        f"{type(value).__name__} {value!r}")
    for key in ("columns", "metrics", "fields"):
      value = getattr(self, key) or ()
      items = value.items() if isinstance(value, Mapping) else enumerate(value)
      bad = next(((k, v) for k, v in items if not isinstance(v, str)), None)
      if bad is not None:
        path = f"{key}.{bad[0]}" if isinstance(value, Mapping) else f"{key}[{bad[0]}]"
        raise UserError(f"{self.where(path)}: key {key!r}: {bad[1]!r} is not a string "
                        "(column or metric name)")
    self._check_choice("kind", self.kind, KINDS)
    if sum(x is not None for x in (self.format, self.tfds, self.source)) != 1:
      raise UserError(f"{self.where()}: give exactly one of 'format' (local files), 'tfds' or "
                      "'source' (HuggingFace datasets)")
    if self.format is not None:
      self._check_choice("format", self.format, formats.FORMATS)
    if self.source is not None:
      self._check_source()
    if not isinstance(self.splits, Mapping) or not self.splits:
      raise UserError(f"{self.where('splits')}: key 'splits' must map split names to files")
    if self.kind == "classification" and not self.label_words:
      raise UserError(f"{self.where()}: classification needs 'label_words'")
    if self.kind == "ner":  # tags_to_spans reads scheme names in any case
      self._check_choice("scheme", self.scheme.lower(), ner.SCHEMES, shown=self.scheme)
    for i, m in enumerate(self.metrics or []):
      if m not in METRICS:
        raise UserError(f"{self.where(f'metrics[{i}]')}: key 'metrics': unknown metric {m!r}"
                        f"{did_you_mean(m, METRICS)}; known: {', '.join(METRICS)}")
      if (m in GENERATION_METRICS) != (self.kind == "seq2seq"):
        problem = (f"does not score generated text; kind 'seq2seq' takes "
                   f"{', '.join(GENERATION_METRICS)}" if self.kind == "seq2seq" else
                   "scores generated text, which only kind 'seq2seq' makes")
        raise UserError(f"{self.where(f'metrics[{i}]')}: key 'metrics': metric {m!r} {problem}")
    for key in SEQ2SEQ_KEYS:
      if getattr(self, key) is not None and self.kind != "seq2seq":
        raise UserError(f"{self.where(key)}: key {key!r} is for kind 'seq2seq', not "
                        f"{self.kind!r}")
    for key, least in (("beam_size", 1), ("max_decode_length", 1), ("length_penalty", 0)):
      if getattr(self, key) is not None and getattr(self, key) < least:
        raise UserError(f"{self.where(key)}: key {key!r} must be at least {least}, found "
                        f"{getattr(self, key)!r}")
    for key in ("template", "target_template"):
      if getattr(self, key) is not None:
        self._check_template(key)
    for split, entry in self.splits.items():
      self._check_split(split, entry)

  def _check_choice(self, key: str, value: str, choices: Sequence[str], shown=None) -> None:
    if value not in choices:
      shown = value if shown is None else shown
      raise UserError(f"{self.where(key)}: key {key!r}: {shown!r} is not one of "
                      f"{', '.join(choices)}{did_you_mean(shown, choices)}")

  def _check_template(self, key: str) -> None:
    """The syntax of template `key` (template, target_template); whether its placeholders are
    columns is known once data is read (_check_columns)."""
    template = getattr(self, key)
    try:
      names = _placeholders(template)
    except ValueError as e:  # string.Formatter's message, e.g. "Single '}' encountered ..."
      raise UserError(f"{self.where(key)}: key {key!r}: {template!r} is not a "
                      f"valid template ({e}; write {{{{ and }}}} for literal braces)") from None
    if any(not n or n.isdigit() for n in names):
      raise UserError(f"{self.where(key)}: key {key!r}: {template!r} has a "
                      "placeholder without a name ({} or {0}); name a column, e.g. {sentence}")

  def _check_source(self) -> None:
    """The keys of `source:` (HF datasets); its split_map became `splits` (see _source_splits)."""
    source = self.source
    check_keys(source, sources.SOURCE_KEYS, lambda key: self.where(f"source.{key}"),
               prefix="source.", suffix=f"; expected {', '.join(sources.SOURCE_KEYS)}")
    if not isinstance(source.get("hf"), str) or not source["hf"]:
      raise UserError(f"{self.where('source')}: key 'source' needs 'hf': a hub dataset name, a "
                      "directory (written by save_to_disk, or of data files), or one of "
                      f"{', '.join(sources.PACKAGED_BUILDERS)} with data_files")
    for key in ("config", "revision"):
      if not isinstance(source.get(key), (str, type(None))):
        raise UserError(f"{self.where(f'source.{key}')}: key 'source.{key}' must be a string, "
                        f"found {type(source[key]).__name__} {source[key]!r}")
    data_files = source.get("data_files")
    paths = data_files.values() if isinstance(data_files, Mapping) else [data_files]
    if data_files is not None and not all(
        isinstance(p, str) or isinstance(p, list) and all(isinstance(f, str) for f in p)
        for p in paths):
      raise UserError(f"{self.where('source.data_files')}: key 'source.data_files' must be a path "
                      f"(or glob), a list of them, or {{split: paths}}, found {data_files!r}")
    if source["hf"] in sources.PACKAGED_BUILDERS and data_files is None:
      raise UserError(f"{self.where('source.hf')}: key 'source': hf {source['hf']!r} reads "
                      "local files: give them in data_files")

  def _check_split(self, split, entry) -> None:
    where = self.where(f"splits.{split}")
    parallel = self.format == "parallel"  # two files per split
    keys = ("select",) if parallel else ("select", "num_examples")
    if self.tfds:
      expected = "a TFDS split name"
    elif self.source is not None:
      expected = "an HF split name (e.g. train, or train[:90%]), in source.split_map"
      where = self.where(f"source.split_map.{split}")
    elif parallel:
      expected = "{source: FILE, target: FILE, select: 'START:END'}"
    else:
      expected = "a file path or glob, or {path: FILE, select: 'START:END'}"
    ok = (isinstance(entry, str) and not parallel) or (self.format and isinstance(entry, Mapping))
    if not isinstance(split, str) or not ok:
      raise UserError(f"{where}: key 'splits': split {split!r} must map to {expected}, found "
                      f"{type(entry).__name__} {entry!r}")
    if not self.format:
      return
    if isinstance(entry, Mapping):
      files = ("source", "target") if parallel else ("path",)
      unknown = [k for k in entry if k not in (*files, *keys)]
      missing = [k for k in files if not isinstance(entry.get(k), str)]
      if unknown or missing:
        problem = (f"unknown key {unknown[0]!r}{did_you_mean(unknown[0], (*files, *keys))}"
                   if unknown else f"no {missing[0]!r}")
        raise UserError(f"{where}: key 'splits': split {split!r}: {problem}; expected {expected}")
    entry = entry if isinstance(entry, Mapping) else {"path": entry}
    glob = next((entry[k] for k in ("path", "source", "target")
                 if sources.is_glob(entry.get(k, ""))), None)
    if glob is not None and parallel:
      raise UserError(f"{where}: key 'splits': split {split!r}: {glob!r} is a glob, and format "
                      "'parallel' pairs two single files line by line")
    if entry.get("select") is not None:
      where_select = f"{self.where(f'splits.{split}.select')}: key 'splits': split {split!r}"
      sources.parse_select(entry["select"], where_select)
      if glob is not None:
        raise UserError(f"{where_select}: select slices a single file, and {glob!r} is a glob "
                        "(a streamed split); split the files instead")
    count = entry.get("num_examples")
    if count is not None:
      where_count = f"{self.where(f'splits.{split}.num_examples')}: key 'splits': split {split!r}"
      if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise UserError(f"{where_count}: num_examples must be an integer >= 0, found {count!r}")
      if glob is None:
        raise UserError(f"{where_count}: num_examples is for a glob (a streamed split); a single "
                        "file is counted exactly as it is read")

  @property
  def metric_names(self) -> list[str]:
    """The names of its metrics, as in `metrics:` (METRICS' keys)."""
    return list(self.metrics if self.metrics is not None else DEFAULT_METRICS[self.kind])

  @property
  def label_map(self) -> dict[str, str]:
    """Label value (as text) → label word."""
    words = self.label_words
    if isinstance(words, Sequence) and not isinstance(words, str):
      return {str(i): str(w) for i, w in enumerate(words)}
    if isinstance(words, Mapping):
      return {str(k): str(v) for k, v in words.items()}
    raise UserError(f"{self.where('label_words')}: 'label_words' must be a list or mapping")

  @property
  def source_description(self) -> str:
    if self.tfds:
      return f"tfds:{self.tfds}"
    if self.source is not None:
      config = self.source.get("config")
      return f"hf:{self.source['hf']}" + (f":{config}" if config else "")
    paths = [self._split_files(s)[0][0] for s in self.splits]
    home = os.path.expanduser("~")
    path = paths[0] if paths else ""
    return f"{self.format}:{'~' + path[len(home):] if path.startswith(home + os.sep) else path}"

  def _split_files(self, split: str) -> tuple[list[str], str | None]:
    """(the split's files: [path], or [source, target] for the parallel format; its select)."""
    entry = self.splits[split]
    if not isinstance(entry, Mapping):
      entry = {"path": entry}
    # Its keys are checked by validate.
    files = [entry["source"], entry["target"]] if self.format == "parallel" else [entry["path"]]
    paths = [os.path.expandvars(os.path.expanduser(str(f))) for f in files]
    return [os.path.normpath(os.path.join(self.base_dir, p)) for p in paths], entry.get("select")

  def streams(self, split: str) -> bool:
    """Whether a split streams rather than being read whole: an HF dataset's, or a glob's."""
    if self.source is not None:
      return True
    return self.format is not None and sources.is_glob(self._split_files(split)[0][0])


def _source_splits(d: Mapping[str, Any], at: Callable[[str], str]) -> Any:
  """The `splits` of a task over an HF dataset (`source:`): its split_map, {task split: HF split},
  or, with data_files by split, those splits under their own names. `at(key)` says where a key
  was written. What is not a mapping is left for validate to report."""
  source = d["source"]
  if "splits" in d:
    raise UserError(f"{at('splits')}: key 'splits': a task with 'source' names its splits in "
                    "source.split_map, e.g. {train: train, validation: test}")
  if not isinstance(source, Mapping):
    return {}
  split_map = source.get("split_map")
  if split_map is None and isinstance(source.get("data_files"), Mapping):
    return {split: split for split in source["data_files"]}
  if not isinstance(split_map, Mapping) or not split_map:
    raise UserError(f"{at('source.split_map')}: key 'source': split_map must map the task's "
                    "splits to the dataset's, e.g. {train: train, validation: validation}")
  return dict(split_map)


# ---------------------------------------------------------------------------------------------
# Formatting: records → {"inputs", "targets", extra fields for metrics}.


def _default_template(spec: TaskSpec, record: Mapping[str, Any]) -> str:
  # GLUE style: "<task> <field>: {field} <field2>: {field2}" over the mapped or text columns.
  names = list(spec.fields) or [k for k in record if k not in (spec.label, "idx", "_line")]
  return " ".join([spec.name] + [f"{n}: {{{n}}}" for n in names])


def _columns(record: Mapping[str, Any]) -> list[str]:
  return [k for k in record if not k.startswith("_")]  # "_line" is the reader's, not a column


def _placeholders(template: str) -> list[str]:
  """The names a template's placeholders start with (`{a.b}` and `{a[0]}` read `a`; `{}` is '');
  ValueError if the template is malformed."""
  return [re.match(r"\w*", f).group()
          for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def _fill(template: str, values: Mapping[str, Any], record: Mapping[str, Any], where: str) -> str:
  try:
    return template.format_map(values)
  except KeyError as e:  # a record without a column that the first record had (_check_columns)
    raise UserError(f"{where}: no column {e} for the template in this record; its columns are "
                    f"{', '.join(_columns(record))}") from None
  except (ValueError, IndexError, AttributeError, TypeError) as e:
    raise UserError(f"{where}: bad template {template!r} ({e})") from None


def _template_values(spec: TaskSpec, record: Mapping[str, Any], where: str) -> dict[str, Any]:
  # A list of strings (CoNLL/TFDS tokens) reads as the words joined by spaces, not as a Python list.
  values = {k: " ".join(v) if isinstance(v, list) and all(isinstance(t, str) for t in v) else v
            for k, v in record.items()}
  values["name"] = spec.name
  for placeholder, column in spec.fields.items():
    if column not in record:
      raise UserError(f"{where}: no column {column!r} (key 'fields', placeholder {placeholder!r}) "
                      f"in this record; its columns are {', '.join(_columns(record))}")
    values[placeholder] = values[column]
  return values


def _check_columns(spec: TaskSpec, record: Mapping[str, Any], source: str) -> None:
  """The keys that name columns (template placeholders, fields, label, answers, tokens, tags),
  checked against the first record of `source`, where the columns are first known. An error
  names the key and its line in the task's definition, the columns found and the closest one."""
  columns = _columns(record)
  found = f"; its columns are {', '.join(columns)}"

  def missing(key: str, what: str, column: str) -> UserError:
    return UserError(f"{spec.where(key)}: key {key.split('.')[0]!r}: {what}no column {column!r} "
                     f"in {source}{did_you_mean(column, columns)}{found}")

  for placeholder, column in spec.fields.items():
    if column not in record:
      raise missing(f"fields.{placeholder}", f"placeholder {{{placeholder}}}: ", column)
  for key in {"classification": ["label"], "qa": ["answers"], "ner": ["tokens", "tags"],
              "seq2seq": ["references"] if spec.references else []}.get(spec.kind, []):
    if getattr(spec, key) not in record:
      raise missing(key, "", getattr(spec, key))
  if spec.kind == "classification" and not spec.template:
    return  # the default template is built from the columns there are
  # Placeholders that are not columns: the task name, NER's sentence, and those `fields` maps.
  others = {"name": "{name} is the task name"}
  if spec.kind == "ner":
    others["sentence"] = "{sentence} is the tokens joined by spaces"
  templates = {"template": spec.template or DEFAULT_TEMPLATES[spec.kind]}
  if spec.kind == "seq2seq" and (spec.target_template or not spec.references):
    templates["target_template"] = spec.target_template or DEFAULT_TARGET_TEMPLATE
  for key, template in templates.items():
    for name in _placeholders(template):
      if name not in record and name not in others and name not in spec.fields:
        hint = did_you_mean(name, [*columns, *others], lambda close: f"{{{close}}}")
        default = (f"; it is the default {key}, set {key!r} to name your columns"
                   if spec.kind == "seq2seq" and getattr(spec, key) is None else "")
        raise UserError(f"{spec.where(key)}: key {key!r}: placeholder {{{name}}} is not a "
                        f"column of {source}{hint}{found} ({'; '.join(others.values())}){default}")


def input_fields(spec: TaskSpec) -> list[str]:
  """The record columns the input template reads (what `t5mix predict` asks for); [] when the
  template is built from whatever columns a record has (classification without a template)."""
  if spec.kind == "ner":
    return ["sentence"]  # or the tokens column, a list of strings: see format_inputs
  if spec.kind == "classification" and not spec.template:
    return list(spec.fields.values())
  names = _placeholders(spec.template or DEFAULT_TEMPLATES[spec.kind])
  return list(dict.fromkeys(spec.fields.get(n, n) for n in names if n and n != "name"))


def format_inputs(spec: TaskSpec, record: Mapping[str, Any], where: str) -> str:
  """The input text of one record, as the model reads it: format_record's "inputs", without
  needing a label or answer (so raw inputs can be formatted for prediction). For NER, a record
  may give `sentence` (text, split on whitespace) instead of the tokens column."""
  values = _template_values(spec, record, where)
  if spec.kind == "ner":
    tokens = record.get(spec.tokens)
    if tokens is None and isinstance(record.get("sentence"), str):
      tokens = record["sentence"].split()
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
      raise UserError(f"{where}: NER input needs {spec.tokens!r} (a list of strings) or "
                      "'sentence' (text)")
    values["sentence"] = " ".join(tokens)
  if spec.kind == "classification":
    template = spec.template or _default_template(spec, record)
  else:
    template = spec.template or DEFAULT_TEMPLATES[spec.kind]
  return _fill(template, values, record, where)


def _label_words_hint(spec: TaskSpec, value: str) -> str:
  """How to fix a label value that label_words lacks: for a list and a text label, the mapping
  form; for a mapping, the closest key."""
  words = spec.label_words
  if isinstance(words, Mapping):
    return did_you_mean(value, [str(k) for k in words])
  if value.lstrip("-").isdigit():
    return ""
  if value in map(str, words):
    example = ", ".join(f"{w}: {w}" for w in words)
  else:
    example = f"{value}: WORD, ..."
  return (f"; a list maps the labels 0, 1, ... to its words: for text labels write a mapping at "
          f"{key_origin(spec.key_origins, 'label_words', spec.origin)}, e.g. "
          f"label_words: {{{example}}}")


def format_record(spec: TaskSpec, record: Mapping[str, Any], where: str) -> dict[str, str]:
  """One source record → one text-to-text example (plus what the metrics need)."""
  values = _template_values(spec, record, where)
  if spec.kind == "classification":
    if spec.label not in record:
      raise UserError(f"{where}: no label column {spec.label!r} in this record; its columns are "
                      f"{', '.join(_columns(record))}")
    value = str(record[spec.label]).strip()
    label_map = spec.label_map
    if value not in label_map:
      raise UserError(f"{where}: label {value!r} is not in label_words ({', '.join(label_map)})"
                      f"{_label_words_hint(spec, value)}")
    return {"inputs": format_inputs(spec, record, where), "targets": label_map[value]}
  if spec.kind == "qa":
    answers = record.get(spec.answers)
    if isinstance(answers, Mapping):  # SQuAD/HF style {"text": [...], "answer_start": [...]}
      answers = answers.get("text")
    if isinstance(answers, str):
      answers = [answers]
    if isinstance(answers, list):  # [{"text": ..., "answer_start": ...}, ...] as in SQuAD JSON
      answers = [a.get("text") if isinstance(a, Mapping) else a for a in answers]
    if not answers:
      raise UserError(f"{where}: no answer in column {spec.answers!r}")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
      raise UserError(f"{where}: column {spec.answers!r} must hold an answer text or a list of "
                      f"them, found {str(record.get(spec.answers))[:80]}")
    return {"inputs": format_inputs(spec, record, where),
            "targets": answers[0], "answers": json.dumps(list(answers))}
  if spec.kind == "ner":
    tokens, tags = record.get(spec.tokens), record.get(spec.tags)
    if tokens is None or tags is None:
      raise UserError(f"{where}: NER record needs {spec.tokens!r} and {spec.tags!r}")
    for key, value in ((spec.tokens, tokens), (spec.tags, tags)):
      if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        names = " (tag names such as 'B-PER', not ids)" if value is tags else ""
        raise UserError(f"{where}: {key!r} must be a list of strings{names}, "
                        f"found {str(value)[:80]}")
    if len(tokens) != len(tags):
      raise UserError(f"{where}: {len(tokens)} tokens but {len(tags)} tags")
    try:
      spans = ner.tags_to_spans(tags, spec.scheme)
    except ValueError as e:
      raise UserError(f"{where}: {e}") from None
    return {"inputs": format_inputs(spec, record, where),
            "targets": ner.format_entities(tokens, spans)}
  if spec.kind == "seq2seq":
    references = None
    if spec.references:
      references = record.get(spec.references)
      if isinstance(references, str):
        references = [references]
      if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise UserError(f"{where}: column {spec.references!r} (key 'references') must hold a "
                        f"text or a list of texts, found {str(references)[:80]}")
      if not references:
        raise UserError(f"{where}: no reference in column {spec.references!r}")
    if spec.target_template or not references:
      target = _fill(spec.target_template or DEFAULT_TARGET_TEMPLATE, values, record, where)
    else:  # trained on the first reference, scored against them all
      target = references[0]
    return {"inputs": format_inputs(spec, record, where), "targets": target,
            "references": json.dumps(references or [target])}
  # text: the document goes to "targets"; span corruption makes inputs and targets from it.
  return {"inputs": "", "targets": _fill(spec.template or DEFAULT_TEMPLATES["text"], values, record,
                                        where)}


# ---------------------------------------------------------------------------------------------
# Sources: what each spec asks of t5mix.sources.


def _split_where(spec: TaskSpec, split: str) -> str:
  return f"{spec.where(f'splits.{split}')}: key 'splits': split {split!r}"


def _file_options(spec: TaskSpec, paths: Sequence[str]) -> tuple:
  """The reading options of formats.iter_records for the task's files, as (name, value) pairs."""
  return (("columns", tuple(spec.columns) if spec.columns else None),
          ("token_column", spec.token_column), ("tag_column", spec.tag_column),
          *((("target", paths[1]),) if spec.format == "parallel" else ()))


def _file_records(spec: TaskSpec, split: str) -> list[dict[str, Any]]:
  paths, select = spec._split_files(split)
  where = f"{spec.where(f'splits.{split}.select')}: key 'splits': split {split!r}"
  return sources.file_records(paths, spec.format, _file_options(spec, paths), select, where)


def _streamed_files(spec: TaskSpec, split: str) -> list[str]:
  return sources.list_files(spec._split_files(split)[0][0], _split_where(spec, split))


def _hf_split(spec: TaskSpec, split: str):
  return sources.hf_split(spec.source, spec.splits[split], spec.base_dir,
                          f"{spec.where('source')}: split {split!r}")


def _hf_name(spec: TaskSpec, split: str) -> str:
  """How errors name an HF split, e.g. `hf:imdb[train]` (then `:ROW`)."""
  return f"{spec.source_description}[{spec.splits[split]}]"


def _streamed_records(spec: TaskSpec, split: str) -> Iterator[tuple[dict[str, Any], str]]:
  """(record, the file or dataset it is from) of a streamed split, read as they come: an HF
  split a chunk of rows at a time, a glob's files in order."""
  if spec.source is not None:
    table, name = _hf_split(spec, split), _hf_name(spec, split)
    for start in range(0, table.num_rows, sources.ROW_CHUNK):
      stop = min(start + sources.ROW_CHUNK, table.num_rows)
      for record in sources.hf_records(table, start, stop, spec.label):
        yield record, name
    return
  options = dict(_file_options(spec, spec._split_files(split)[0]))
  for path in _streamed_files(spec, split):
    for record in formats.iter_records(path, spec.format, **options):
      yield record, path


def _check_first_record(spec: TaskSpec, split: str) -> None:
  """The columns the task names, against the first record of a streamed split (_check_columns)."""
  first = next(_streamed_records(spec, split), None)
  if first is not None:
    _check_columns(spec, *first)


def _streamed_examples(spec: TaskSpec, split: str) -> Iterator[dict[str, str]]:
  _check_first_record(spec, split)
  for record, source in _streamed_records(spec, split):
    yield format_record(spec, record, f"{source}:{record.get('_line', '?')}")


def _hf_examples(spec: TaskSpec, split: str, start: int, stop: int) -> list[dict[str, str]]:
  """The examples of rows [start, stop) of an HF split."""
  name = _hf_name(spec, split)
  return [format_record(spec, r, f"{name}:{r['_line']}")
          for r in sources.hf_records(_hf_split(spec, split), start, stop, spec.label)]


def _tfds_builder(spec: TaskSpec, data_dir: str | None):
  import tensorflow_datasets as tfds
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
  try:
    builder = tfds.builder(spec.tfds, data_dir=data_dir)
  except Exception as e:  # tfds raises DatasetNotFoundError, ValueError, … with long texts
    raise UserError(f"task {spec.name!r}: TFDS dataset {spec.tfds!r} unavailable "
                    f"({str(e).splitlines()[0]})") from None
  return builder


def _tfds_not_prepared(spec: TaskSpec, builder) -> UserError:
  data_dir = getattr(builder, "data_dir_root", None) or builder.data_dir  # what --tfds-data-dir names
  return UserError(
      f"dataset {spec.tfds} not prepared in {data_dir}; run `tfds build {spec.tfds} "
      f"--data_dir DIR` on a machine with internet, then pass --tfds-data-dir DIR "
      f"(or set TFDS_DATA_DIR)")


def _tfds_bad_split(spec: TaskSpec, split: str, error: Exception) -> UserError:
  message = str(error.args[0] if error.args else error).splitlines()[0]
  return UserError(f"{spec.where(f'splits.{split}')}: split {split!r} "
                   f"({spec.splits[split]!r} of {spec.tfds}): {message}")


def _decode(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if hasattr(value, "tolist"):
    return _decode(value.tolist())
  if isinstance(value, list):
    return [_decode(v) for v in value]
  if isinstance(value, dict):
    return {k: _decode(v) for k, v in value.items()}
  return value


def _tfds_records(spec: TaskSpec, split: str, data_dir: str | None) -> list[dict[str, Any]]:
  import tensorflow_datasets as tfds
  builder = _tfds_builder(spec, data_dir)
  tfds_split = spec.splits[split]
  try:
    ds = builder.as_dataset(split=tfds_split, shuffle_files=False)
  except (AssertionError, FileNotFoundError, tf.errors.NotFoundError):
    raise _tfds_not_prepared(spec, builder) from None
  except (KeyError, ValueError) as e:  # an unknown split name or bad slice
    raise _tfds_bad_split(spec, split, e) from None
  features = builder.info.features
  records = []
  for i, ex in enumerate(tfds.as_numpy(ds)):
    record = _decode(ex)
    # Class labels become their names (NER tags), except the classification label column,
    # whose values label_words maps.
    for key, feature in features.items():
      names = getattr(getattr(feature, "feature", feature), "names", None)
      if names and key != spec.label and key in record:
        value = record[key]
        record[key] = [names[v] for v in value] if isinstance(value, list) else names[value]
    if spec.kind == "qa" and isinstance(record.get(spec.answers), dict):
      record[spec.answers] = record[spec.answers].get("text", [])
    record["_line"] = i
    records.append(record)
  return records


# ---------------------------------------------------------------------------------------------
# Building and registering seqio Tasks.

TFDS_DATA_DIR: str | None = None  # set by --tfds-data-dir
# The vocabulary of tasks that name none: --vocab, else $T5MIX_VOCAB, else bytes (works for any
# text; train a SentencePiece model with `t5mix vocab train` for shorter sequences).
DEFAULT_VOCABULARY: str = os.environ.get("T5MIX_VOCAB", "byte")
# The run's vocabulary: while set (see `run_vocabulary`), every t5mix task tokenises with it,
# whatever vocabulary its definition names, so that a run has exactly one.
RUN_VOCABULARY: seqio.Vocabulary | None = None


@contextlib.contextmanager
def run_vocabulary(vocab: seqio.Vocabulary | None):
  """Inside the block every t5mix task tokenises with `vocab` (None: each with its own)."""
  global RUN_VOCABULARY
  saved, RUN_VOCABULARY = RUN_VOCABULARY, vocab
  try:
    yield
  finally:
    RUN_VOCABULARY = saved


def _output_features(vocab: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {"inputs": seqio.Feature(vocab, add_eos=True, required=False),
          "targets": seqio.Feature(vocab, add_eos=True)}


class _Task(seqio.Task):
  """A t5mix task: its features use the run's vocabulary while one is set (RUN_VOCABULARY), so a
  pretrained model's vocabulary applies to every task without redefining them."""

  @property
  def output_features(self) -> Mapping[str, seqio.Feature]:
    if RUN_VOCABULARY is None:
      return super().output_features
    return dict(sorted(_output_features(RUN_VOCABULARY).items()))

  @property
  def own_vocabulary(self) -> seqio.Vocabulary:
    """The vocabulary its definition names (or the default), whatever the run uses."""
    return super().output_features["targets"].vocabulary


def examples(spec: TaskSpec, split: str) -> Iterable[dict[str, str]]:
  """The formatted text-to-text examples of a split: a list, cached per process, for a split read
  whole (a file, TFDS); an iterator that reads as it goes for a streamed one (a glob, an HF
  dataset)."""
  return _examples(spec, split)


@functools.lru_cache(maxsize=64)
def _examples_cached(spec: TaskSpec, split: str, data_dir: str | None):
  if spec.tfds:
    records = _tfds_records(spec, split, data_dir)
  else:
    records = _file_records(spec, split)
  path = spec._split_files(split)[0][0] if not spec.tfds else f"tfds:{spec.tfds}[{split}]"
  if records:
    _check_columns(spec, records[0], path)
  return [format_record(spec, r, f"{path}:{r.get('_line', '?')}") for r in records]


def _examples(spec: TaskSpec, split: str):
  if split not in spec.splits:
    raise UserError(f"task {spec.name!r} has no split {split!r}; it has {', '.join(spec.splits)}")
  if spec.streams(split):
    return _streamed_examples(spec, split)
  return _examples_cached(spec, split, TFDS_DATA_DIR)


def _count_examples(spec: TaskSpec, split: str) -> int:
  if spec.tfds:
    builder = _tfds_builder(spec, TFDS_DATA_DIR)
    if builder.info.splits:  # a prepared dataset: the sizes are in its metadata
      try:
        return builder.info.splits[spec.splits[split]].num_examples
      except (KeyError, ValueError) as e:
        raise _tfds_bad_split(spec, split, e) from None
    # No split metadata: not prepared (reading fails with the "not prepared" error), or data
    # without metadata such as tfds.testing.mock_data's: count the records.
  elif spec.source is not None:
    return _hf_split(spec, split).num_rows  # the Arrow table's metadata
  elif spec.streams(split):
    entry = spec.splits[split]
    if isinstance(entry, Mapping) and entry.get("num_examples") is not None:
      return entry["num_examples"]
    options = _file_options(spec, spec._split_files(split)[0])
    # The pass formats every record (but plain text's, which cannot fail), so that a record the
    # task cannot use is an error here, before training, rather than in the middle of tf.data.
    count_file = None if _plain_text(spec) else functools.partial(_count_file, spec, options)
    return sources.count_records(_streamed_files(spec, split), spec.format, options, count_file)
  return len(_examples(spec, split))


def _count_file(spec: TaskSpec, options: tuple, path: str) -> int:
  records = formats.iter_records(path, spec.format, **dict(options))
  first = next(records, None)
  if first is None:
    return 0
  _check_columns(spec, first, path)
  count = 0
  for record in itertools.chain([first], records):
    format_record(spec, record, f"{path}:{record.get('_line', '?')}")  # a UserError if unusable
    count += 1
  return count


def _plain_text(spec: TaskSpec) -> bool:
  """Span corruption over plain text with the default template: tf.data alone reads such files
  (sources.FileReader without a formatter), as no Python formatting is needed."""
  return (spec.format == "text" and spec.kind == "text" and not spec.fields
          and spec.template in (None, DEFAULT_TEMPLATES["text"]))


def _example_keys(spec: TaskSpec) -> tuple[str, ...]:
  """The features format_record makes for the task's kind."""
  return ("inputs", "targets", *{"qa": ("answers",), "seq2seq": ("references",)}.get(spec.kind, ()))


def _source(spec: TaskSpec) -> seqio.DataSource:
  """The data source of a task (but a `text` task over TFDS, which seqio streams itself): splits
  read whole, streamed files (globs), or an HF dataset's rows; counts on first use."""
  count = functools.partial(_count_examples, spec)
  check = functools.partial(_check_first_record, spec)
  if spec.source is not None:
    return sources.RowSource(list(spec.splits), count, functools.partial(_hf_examples, spec), check,
                             _example_keys(spec))

  def dataset_fn(split, shuffle_files, seed=None):
    del shuffle_files, seed  # in-memory records; the Task shuffles examples
    return _to_dataset(_examples(spec, split))

  streamed = [split for split in spec.splits if spec.streams(split)]
  whole = sources.CountedSource(dataset_fn, [s for s in spec.splits if s not in streamed], count)
  if not streamed:
    return whole
  reader = sources.FileReader(spec.format, _file_options(spec, spec._split_files(streamed[0])[0]),
                              None if _plain_text(spec) else functools.partial(format_record, spec),
                              _example_keys(spec))
  files = sources.StreamedFiles({s: spec._split_files(s)[0][0] for s in streamed}, reader, count,
                                check, {s: _split_where(spec, s) for s in streamed})
  return sources.SplitSources({s: files if s in streamed else whole for s in spec.splits})


def _to_dataset(rows: list[dict[str, str]]) -> tf.data.Dataset:
  keys = rows[0].keys() if rows else ("inputs", "targets")
  return tf.data.Dataset.from_tensor_slices(
      {k: tf.constant([r[k] for r in rows], dtype=tf.string) for k in keys})


def _postprocess_fn(spec: TaskSpec):
  if spec.kind == "classification":
    words = list(dict.fromkeys(spec.label_map.values()))
    return metrics.label_postprocessor(words)
  if spec.kind == "qa":
    return metrics.squad_postprocessor
  if spec.kind == "ner":
    return metrics.ner_postprocessor
  if spec.kind == "seq2seq":
    return metrics.references_postprocessor
  return None


def build_task(spec: TaskSpec) -> seqio.Task:
  """The seqio.Task for a spec (not registered)."""
  output_features = _output_features(
      get_vocabulary(spec.vocabulary or DEFAULT_VOCABULARY, spec.base_dir))
  streaming_text = spec.kind == "text" and spec.tfds
  if streaming_text:
    source = seqio.TfdsDataSource(tfds_name=spec.tfds, splits=dict(spec.splits),
                                  tfds_data_dir=TFDS_DATA_DIR)
  else:
    source = _source(spec)

  if spec.kind == "text":
    preprocessors = [
        *([span_corruption.text_to_targets] if streaming_text else []),
        seqio.preprocessors.tokenize,
        # `t5mix cache` stores the tokens; span corruption's noise is drawn live, per epoch.
        seqio.CacheDatasetPlaceholder(),
        functools.partial(span_corruption.span_corruption, noise_density=spec.noise_density,
                          mean_noise_span_length=spec.mean_noise_span_length),
        seqio.preprocessors.append_eos_after_trim,
    ]
  else:  # trimming needs the run's lengths, so it comes after the cache
    preprocessors = [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos_after_trim]
  task = _Task(spec.name, source=source, output_features=output_features,
               preprocessors=preprocessors, postprocess_fn=_postprocess_fn(spec),
               metric_fns=[METRICS[m] for m in spec.metric_names])
  task.t5mix_spec = spec  # what `t5mix tasks` and the evaluator show
  return task


def add_task(name: str | None = None, *, spec: TaskSpec | None = None, **kwargs) -> seqio.Task:
  """Registers a task from keyword arguments (the TaskSpec fields) or a TaskSpec.

  This is the Python-module way to add a task:

      import t5mix
      t5mix.add_task("my_sst2", kind="classification", format="tsv",
                     splits={"train": "/data/sst2/train.tsv"},
                     template="sst2 sentence: {text}", label_words=["negative", "positive"])
  """
  if spec is None:
    origin = kwargs.pop("origin", None)
    if origin is None:  # the calling module's file:line, so that errors and clashes name it
      caller = sys._getframe(1)
      origin = f"{caller.f_code.co_filename}:{caller.f_lineno}"
    spec = TaskSpec.from_dict({"name": name, **kwargs}, origin=origin)
  if spec.name in seqio.TaskRegistry.names() or spec.name in seqio.MixtureRegistry.names():
    raise UserError(f"{spec.origin}: task {spec.name!r} is already defined "
                    f"(by {_origin(spec.name)}); pick another name")
  task = build_task(spec)
  seqio.TaskRegistry.add_provider(spec.name, task)
  return task


def _origin(name: str) -> str:
  try:
    provider = seqio.get_mixture_or_task(name)
  except ValueError:
    return "?"
  spec = getattr(provider, "t5mix_spec", None)
  return getattr(provider, "t5mix_origin", None) or (spec.origin if spec else "seqio")


def get_task_or_mixture(name: str):
  """The registered task or mixture, or a UserError suggesting the closest names."""
  names = list(seqio.TaskRegistry.names()) + list(seqio.MixtureRegistry.names())
  if name not in names:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `t5mix tasks`"
    raise UserError(f"unknown task or mixture {name!r}{hint}")
  return seqio.get_mixture_or_task(name)
