"""Readers for the local file formats a task can come from.

Each reader returns a list of plain dicts (one per example) and raises `UserError` naming the
file and line for anything malformed. Files are read whole: task files are labelled datasets
(thousands to a few hundred thousand rows), which fit in memory and make example counts exact.
Encoding is UTF-8; a leading byte-order mark is ignored.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Iterator

from t5mix.errors import UserError, where

FORMATS = ("tsv", "csv", "jsonl", "squad_json", "conll", "text", "parallel")


def _open_lines(path: str) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, line without newline); decoding errors name the line."""
  if not os.path.exists(path):
    raise UserError(f"{path}: data file does not exist")
  if os.path.isdir(path):
    raise UserError(f"{path}: is a directory, expected a data file")
  if os.path.getsize(path) == 0:
    raise UserError(f"{path}: file is empty")
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
      if b"\x00" in raw:
        raise UserError(f"{where(path, number)}: binary data (NUL byte); expected a text file")
      try:
        yield number, raw.decode("utf-8").rstrip("\r\n")
      except UnicodeDecodeError as e:
        raise UserError(f"{where(path, number)}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def read_delimited(path: str, delimiter: str, columns: list[str] | None = None) -> list[dict[str, str]]:
  """TSV/CSV with a header row (or `columns` for a file without one).

  Quoting follows the csv module's defaults (fields containing the delimiter or quotes are
  double-quoted), which is how GLUE's RTE/MRPC files and pandas write them. One record per line;
  blank lines are skipped.
  """
  rows: list[dict[str, str]] = []
  header = list(columns) if columns else None
  for number, text in _open_lines(path):
    if not text.strip():
      continue
    try:  # one record per line: quoted fields may hold delimiters and quotes, not newlines
      fields = next(csv.reader([text], delimiter=delimiter))
    except csv.Error as e:
      raise UserError(f"{where(path, number)}: cannot parse row ({e})") from None
    if header is None:
      header = [h.strip() for h in fields]
      if len(set(header)) != len(header):
        raise UserError(f"{where(path, number)}: duplicate column names in header {header}")
      continue
    if len(fields) != len(header):
      raise UserError(f"{where(path, number)}: expected {len(header)} columns "
                      f"({', '.join(header)}), found {len(fields)}")
    rows.append(dict(zip(header, fields), _line=number))
  if header is None:
    raise UserError(f"{path}: file is empty (expected a header row)")
  return rows


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """One JSON object per line; blank lines are skipped."""
  rows = []
  for number, text in _open_lines(path):
    if not text.strip():
      continue
    try:
      row = json.loads(text)
    except json.JSONDecodeError as e:
      raise UserError(f"{where(path, number)}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(row, dict):
      raise UserError(f"{where(path, number)}: expected a JSON object, found {type(row).__name__}")
    row["_line"] = number
    rows.append(row)
  return rows


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


def read_conll(path: str, token_column: int = 0, tag_column: int = -1) -> list[dict[str, Any]]:
  """CoNLL columns: one token per line (space- or tab-separated), blank line between sentences.

  `-DOCSTART-` lines are skipped. Records: {"tokens": [...], "tags": [...], "_line": first line}.
  """
  records: list[dict[str, Any]] = []
  tokens: list[str] = []
  tags: list[str] = []
  start = None
  width = None

  def flush():
    nonlocal tokens, tags, start
    if tokens:
      records.append({"tokens": tokens, "tags": tags, "_line": start})
    tokens, tags, start = [], [], None

  for number, text in _open_lines(path):
    fields = text.split()
    if not fields:
      flush()
      continue
    if fields[0] == "-DOCSTART-":
      flush()
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
  flush()
  return records


def read_text(path: str) -> list[dict[str, Any]]:
  """Plain text, one document (or sentence) per non-blank line."""
  return [{"text": text.strip(), "_line": number}
          for number, text in _open_lines(path) if text.strip()]


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


def read(path: str, fmt: str, **options) -> list[dict[str, Any]]:
  """Reads `path` in format `fmt` (one of FORMATS); `parallel` reads `path` as the source side
  and `options["target"]` as the target side."""
  if fmt == "tsv":
    return read_delimited(path, "\t", options.get("columns"))
  if fmt == "csv":
    return read_delimited(path, ",", options.get("columns"))
  if fmt == "jsonl":
    return read_jsonl(path)
  if fmt == "squad_json":
    return read_squad(path)
  if fmt == "conll":
    return read_conll(path, options.get("token_column", 0), options.get("tag_column", -1))
  if fmt == "text":
    return read_text(path)
  if fmt == "parallel":
    return read_parallel(path, options["target"])
  raise UserError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
