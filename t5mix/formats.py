"""Readers for the local file formats a task can come from.

Each format yields plain dicts (one per example) and raises `UserError` naming the file and line
for anything malformed. `read` reads a file whole (task files are labelled datasets that fit in
memory); `iter_records` yields its records as it reads, for corpora streamed shard by shard
(t5mix.sources), and `line_parser` parses one line of a line format (text, jsonl, tsv, csv), the
unit tf.data streams them in. Encoding is UTF-8; a leading byte-order mark is ignored; a `.gz`
file is read through gzip.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import os
from typing import IO, Any, Callable, Iterator

from t5mix.errors import UserError, where

FORMATS = ("tsv", "csv", "jsonl", "squad_json", "conll", "text", "parallel", "parquet")
# One record per line (after a header line for tsv/csv without `columns`).
LINE_FORMATS = ("text", "jsonl", "tsv", "csv")
BOM = b"\xef\xbb\xbf"


def open_binary(path: str) -> IO[bytes]:
  """`path` opened for reading bytes (decompressed if it ends in .gz), or a UserError saying why
  it cannot be."""
  if not os.path.exists(path):
    raise UserError(f"{path}: data file does not exist")
  if os.path.isdir(path):
    raise UserError(f"{path}: is a directory, expected a data file")
  if os.path.getsize(path) == 0:
    raise UserError(f"{path}: file is empty")
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def decode_line(path: str, number: int, raw: bytes) -> str:
  """Line `number` (1-based) of `path` as text, without its newline (or the BOM of line 1)."""
  if number == 1 and raw.startswith(BOM):
    raw = raw[len(BOM):]
  if b"\x00" in raw:
    raise UserError(f"{where(path, number)}: binary data (NUL byte); expected a text file")
  try:
    return raw.decode("utf-8").rstrip("\r\n")
  except UnicodeDecodeError as e:
    raise UserError(f"{where(path, number)}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _open_lines(path: str) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, line without newline); decoding errors name the line."""
  with open_binary(path) as f:
    try:
      for number, raw in enumerate(f, start=1):
        yield number, decode_line(path, number, raw)
    except (OSError, EOFError) as e:  # a damaged or truncated .gz
      raise UserError(f"{path}: cannot read ({e})") from None


# ---------------------------------------------------------------------------------------------
# Line formats: a parser per file turns each line into a record (None for blank and header lines).


def line_parser(path: str, fmt: str, columns: list[str] | None = None
                ) -> Callable[[int, str], dict[str, Any] | None]:
  """The parser of the lines of `path` in line format `fmt`: (line number, text) → its record, or
  None for a blank line or the header row. A delimited file's header is read here, once."""
  if fmt == "text":
    return _text_record
  if fmt == "jsonl":
    return functools.partial(_jsonl_record, path)
  if fmt not in ("tsv", "csv"):
    raise UserError(f"format {fmt!r} is not one record per line ({', '.join(LINE_FORMATS)} are)")
  delimiter = "\t" if fmt == "tsv" else ","
  header, header_line = (list(columns), 0) if columns else _delimited_header(path, delimiter)
  return functools.partial(_delimited_record, path, delimiter, header, header_line)


def _text_record(number: int, text: str) -> dict[str, Any] | None:
  """Plain text: one document (or sentence) per non-blank line."""
  return {"text": text.strip(), "_line": number} if text.strip() else None


def _jsonl_record(path: str, number: int, text: str) -> dict[str, Any] | None:
  """One JSON object per line; blank lines are skipped."""
  if not text.strip():
    return None
  try:
    row = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"{where(path, number)}: not valid JSON ({e.msg}, column {e.colno})") from None
  if not isinstance(row, dict):
    raise UserError(f"{where(path, number)}: expected a JSON object, found {type(row).__name__}")
  row["_line"] = number
  return row


def _fields(path: str, number: int, text: str, delimiter: str) -> list[str]:
  try:  # one record per line: quoted fields may hold delimiters and quotes, not newlines
    return next(csv.reader([text], delimiter=delimiter))
  except csv.Error as e:
    raise UserError(f"{where(path, number)}: cannot parse row ({e})") from None


def _delimited_header(path: str, delimiter: str) -> tuple[list[str], int]:
  """(column names, line number) of the first non-blank line of a delimited file."""
  for number, text in _open_lines(path):
    if text.strip():
      header = [h.strip() for h in _fields(path, number, text, delimiter)]
      if len(set(header)) != len(header):
        raise UserError(f"{where(path, number)}: duplicate column names in header {header}")
      return header, number
  raise UserError(f"{path}: file is empty (expected a header row)")


def _delimited_record(path: str, delimiter: str, header: list[str], header_line: int,
                      number: int, text: str) -> dict[str, Any] | None:
  """TSV/CSV with a header row (or `columns` for a file without one).

  Quoting follows the csv module's defaults (fields containing the delimiter or quotes are
  double-quoted), which is how GLUE's RTE/MRPC files and pandas write them. One record per line;
  blank lines are skipped.
  """
  if number <= header_line or not text.strip():
    return None
  fields = _fields(path, number, text, delimiter)
  if len(fields) != len(header):
    raise UserError(f"{where(path, number)}: expected {len(header)} columns "
                    f"({', '.join(header)}), found {len(fields)}")
  return dict(zip(header, fields), _line=number)


# ---------------------------------------------------------------------------------------------
# Formats whose records span lines or files.


def read_squad(path: str) -> list[dict[str, Any]]:
  """Official SQuAD JSON (data → paragraphs → qas → answers): one record per question.

  Each record has title, context, question, id, answers (all gold texts, in order) and
  `article` (index of its article, used to carve splits by article).
  """
  text = "\n".join(line for _, line in _open_lines(path))
  try:
    doc = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"{where(path, e.lineno)}: not valid JSON ({e.msg})") from None
  if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
    raise UserError(f"{path}: not SQuAD JSON (expected a top-level object with a 'data' list)")
  records = []
  try:
    for a, article in enumerate(doc["data"]):
      for paragraph in article["paragraphs"]:
        for qa in paragraph["qas"]:
          answers = [ans["text"] for ans in qa.get("answers", [])]
          records.append({"title": article.get("title", ""), "context": paragraph["context"],
                          "question": qa["question"], "id": str(qa.get("id", len(records))),
                          "answers": answers, "article": a})
  except (KeyError, TypeError) as e:
    raise UserError(f"{path}: SQuAD record {len(records)} (article {a}) is missing field {e}") from None
  return records


def iter_conll(path: str, token_column: int = 0, tag_column: int = -1) -> Iterator[dict[str, Any]]:
  """CoNLL columns: one token per line (space- or tab-separated), blank line between sentences.

  `-DOCSTART-` lines are skipped. Records: {"tokens": [...], "tags": [...], "_line": first line}.
  """
  tokens: list[str] = []
  tags: list[str] = []
  start = None
  width = None
  for number, text in _open_lines(path):
    fields = text.split()
    if not fields or fields[0] == "-DOCSTART-":
      if tokens:
        yield {"tokens": tokens, "tags": tags, "_line": start}
      tokens, tags, start = [], [], None
      continue
    if len(fields) < 2:
      raise UserError(f"{where(path, number)}: expected at least 2 columns (token ... tag), "
                      f"found {len(fields)}: {text[:60]!r}")
    if width is not None and len(fields) != width:
      raise UserError(f"{where(path, number)}: expected {width} columns like the lines before, "
                      f"found {len(fields)}: {text[:60]!r}")
    width = len(fields)
    try:
      token, tag = fields[token_column], fields[tag_column]
    except IndexError:
      raise UserError(f"{where(path, number)}: no column {token_column} or {tag_column}") from None
    if start is None:
      start = number
    tokens.append(token)
    tags.append(tag)
  if tokens:
    yield {"tokens": tokens, "tags": tags, "_line": start}


def read_parallel(source: str, target: str) -> list[dict[str, Any]]:
  """Two aligned line files, line i of `target` the counterpart (translation, summary) of line i
  of `source`: one record {"source", "target", "_line"} per line pair. Blank lines at the end of
  either file are ignored and a pair of blank lines is skipped; otherwise the files must have the
  same number of lines, since a count that differs means the pairs no longer line up."""
  sources, targets = ([text for _, text in _open_lines(path)] for path in (source, target))
  for lines in (sources, targets):
    while lines and not lines[-1].strip():
      lines.pop()
  if len(sources) != len(targets):
    raise UserError(f"{source} has {len(sources):,} lines but {target} has {len(targets):,}; "
                    "a parallel pair needs line i of one file to match line i of the other")
  return [{"source": s.strip(), "target": t.strip(), "_line": number}
          for number, (s, t) in enumerate(zip(sources, targets), start=1)
          if s.strip() or t.strip()]


# ---------------------------------------------------------------------------------------------
# Parquet, through pyarrow: columns become record keys; `_line` is the row (from 0, as pyarrow
# and pandas number them).


def _parquet_file(path: str):
  import pyarrow.parquet as pq  # pyarrow comes with `datasets`; only Parquet tasks need it
  if not os.path.exists(path):
    raise UserError(f"{path}: data file does not exist")
  if os.path.isdir(path):
    raise UserError(f"{path}: is a directory, expected a data file")
  try:
    return pq.ParquetFile(path)
  except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... on bad files
    raise UserError(f"{path}: not a Parquet file ({str(e).splitlines()[0]})") from None


def parquet_row_groups(path: str) -> int:
  """How many row groups a Parquet file has: its unit of reading."""
  return _parquet_file(path).num_row_groups


def parquet_rows(path: str) -> int:
  """How many rows a Parquet file has, from its metadata."""
  return _parquet_file(path).metadata.num_rows


def read_parquet_row_group(path: str, index: int) -> list[dict[str, Any]]:
  """The records of row group `index` of a Parquet file."""
  parquet = _parquet_file(path)
  first = sum(parquet.metadata.row_group(i).num_rows for i in range(index))
  try:
    rows = parquet.read_row_group(index).to_pylist()
  except Exception as e:  # noqa: BLE001 - pyarrow's errors for damaged pages
    raise UserError(f"{path}: cannot read row group {index} ({str(e).splitlines()[0]})") from None
  return [{**row, "_line": first + i} for i, row in enumerate(rows)]


# ---------------------------------------------------------------------------------------------


def iter_records(path: str, fmt: str, **options) -> Iterator[dict[str, Any]]:
  """The records of `path` in format `fmt` (one of FORMATS), as they are read; `parallel` reads
  `path` as the source side and `options["target"]` as the target side. Options: `columns`
  (tsv/csv without a header row), `token_column` and `tag_column` (conll)."""
  if fmt in LINE_FORMATS:
    parse = line_parser(path, fmt, options.get("columns"))
    for number, text in _open_lines(path):
      record = parse(number, text)
      if record is not None:
        yield record
  elif fmt == "squad_json":
    yield from read_squad(path)
  elif fmt == "conll":
    yield from iter_conll(path, options.get("token_column", 0), options.get("tag_column", -1))
  elif fmt == "parallel":
    yield from read_parallel(path, options["target"])
  elif fmt == "parquet":
    for index in range(parquet_row_groups(path)):
      yield from read_parquet_row_group(path, index)
  else:
    raise UserError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def read(path: str, fmt: str, **options) -> list[dict[str, Any]]:
  """The records of `path` in format `fmt`, read whole (see iter_records)."""
  return list(iter_records(path, fmt, **options))


def count_records(path: str, fmt: str, **options) -> int:
  """How many records `path` holds: a Parquet file's metadata says; other formats are read
  through (which checks every record's syntax on the way)."""
  if fmt == "parquet":
    return parquet_rows(path)
  return sum(1 for _ in iter_records(path, fmt, **options))
