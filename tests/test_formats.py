"""The file readers: records from each format, and one-line errors naming file and line."""

import gzip
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from t5mix import formats
from t5mix.errors import UserError


def strip_lines(records):
  return [{k: v for k, v in r.items() if k != "_line"} for r in records]


def test_tsv_with_quoted_fields(fixtures_dir):
  records = formats.read(str(fixtures_dir / "rte.tsv"), "tsv")
  assert strip_lines(records) == [
      {"index": "0", "sentence1": 'She said "yes"\tthen left.', "sentence2": "She agreed.",
       "label": "entailment"},
      {"index": "1", "sentence1": "Paris is in France.",
       "sentence2": 'The city of "lights" is in Italy.', "label": "not_entailment"},
      {"index": "2", "sentence1": "No quotes here.", "sentence2": 'A plain "inner" quote.',
       "label": "entailment"}]
  assert [r["_line"] for r in records] == [2, 3, 4]


def test_csv_and_headerless_columns(fixtures_dir, tmp_path):
  records = formats.read(str(fixtures_dir / "reviews.csv"), "csv")
  assert [r["review"] for r in records] == ["Great, would buy again", 'Broke after a day, "sadly"',
                                            "Okay I guess"]
  path = tmp_path / "nohead.tsv"
  path.write_text("hello\t1\r\nbye\t0\r\n")  # CRLF too
  assert strip_lines(formats.read(str(path), "tsv", columns=["text", "label"])) == [
      {"text": "hello", "label": "1"}, {"text": "bye", "label": "0"}]


def test_jsonl(fixtures_dir):
  records = formats.read(str(fixtures_dir / "qa.jsonl"), "jsonl")
  assert [r["_line"] for r in records] == [1, 3]  # the blank line 2 is skipped
  assert records[1]["answers"] == "Switzerland"


def test_squad_records(fixtures_dir):
  records = formats.read(str(fixtures_dir / "squad.json"), "squad_json")
  assert [r["id"] for r in records] == ["q1", "q2", "q3", "q4", "q5", "q6", "q7"]
  assert [r["article"] for r in records] == [0, 0, 0, 1, 2, 3, 3]
  assert records[0]["answers"] == ["William Shakespeare", "Shakespeare", "William Shakespeare"]
  assert records[3]["title"] == "Zürich"


def test_conll_docstart_and_columns(fixtures_dir):
  records = formats.read(str(fixtures_dir / "ner_iob1.conll"), "conll")
  assert [r["tokens"] for r in records][:2] == [
      ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."],
      ["Peter", "Blackburn"]]
  assert records[2]["tags"] == ["I-PER", "B-PER", "O", "O", "I-LOC", "I-LOC", "I-LOC", "O"]
  assert len(records) == 5 and all("-DOCSTART-" not in r["tokens"] for r in records)
  assert [r["_line"] for r in records] == [3, 13, 16, 27, 32]
  chunks = formats.read(str(fixtures_dir / "ner_iob1.conll"), "conll", tag_column=2)
  assert chunks[1]["tags"] == ["B-NP", "I-NP"]


def test_parquet_rows_by_row_group(tmp_path):
  path = str(tmp_path / "d.parquet")
  pq.write_table(pa.table({"sentence": ["a", "b", "c"], "label": [0, 1, 0],
                           "tags": [["X"], [], ["Y", "Z"]]}), path, row_group_size=2)
  assert formats.read(path, "parquet") == [
      {"sentence": "a", "label": 0, "tags": ["X"], "_line": 0},
      {"sentence": "b", "label": 1, "tags": [], "_line": 1},
      {"sentence": "c", "label": 0, "tags": ["Y", "Z"], "_line": 2}]
  assert formats.parquet_row_groups(path) == 2 and formats.count_records(path, "parquet") == 3


def test_gzip_is_read_through(tmp_path):
  path = tmp_path / "d.jsonl.gz"
  path.write_bytes(gzip.compress(b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2}\n'))
  assert formats.read(str(path), "jsonl") == [{"a": 1, "_line": 1}, {"a": 2, "_line": 3}]
  truncated = tmp_path / "t.txt.gz"
  truncated.write_bytes(gzip.compress(b"one\ntwo\n" * 1000)[:-12])
  with pytest.raises(UserError, match=rf"^{re.escape(str(truncated))}: cannot read \("):
    formats.read(str(truncated), "text")


def test_text(fixtures_dir):
  assert strip_lines(formats.read(str(fixtures_dir / "text.txt"), "text")) == [
      {"text": "The quick brown fox jumps over the lazy dog."},
      {"text": "Pack my box with five dozen liquor jugs."}]


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the file and the line.


@pytest.mark.parametrize("fmt, content, message", [
    ("tsv", b"sentence\tlabel\ngood\t1\nbad\t0\textra\n",
     "{path}:3: expected 2 columns (sentence, label), found 3"),
    ("tsv", b"a\ta\n", "{path}:1: duplicate column names in header ['a', 'a']"),
    ("tsv", b"\n\n", "{path}: file is empty (expected a header row)"),
    ("csv", b"text,label\n\"unterminated,1\n", "{path}:2: expected 2 columns (text, label), found 1"),
    ("jsonl", b'{"a": 1}\n{"a": 2,}\n', "{path}:2: not valid JSON"),
    ("jsonl", b'{"a": 1}\n\n[1, 2]\n', "{path}:3: expected a JSON object, found list"),
    ("squad_json", b'{"data": [\n  {"title": "x",\n  }\n]}\n', "{path}:3: not valid JSON"),
    ("squad_json", b'{"version": 1}', "{path}: not SQuAD JSON"),
    ("squad_json", b'{"data": [{"title": "x", "paragraphs": [{"context": "c"}]}]}',
     "{path}: SQuAD record 0 (article 0) is missing field 'qas'"),
    ("conll", b"EU B-ORG\nrejects\n", "{path}:2: expected at least 2 columns (token ... tag), found 1"),
    ("conll", b"EU NNP B-ORG\nrejects O\n", "{path}:2: expected 3 columns like the lines before"),
    ("tsv", b"sentence\tlabel\ncaf\xe9\t1\n", "{path}:2: not valid UTF-8"),
    ("text", b"fine\nfine\n\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "{path}:3: not valid UTF-8"),
    ("text", b"\x00\x01\x02\x03binary", "{path}:1: binary data (NUL byte); expected a text file"),
    ("jsonl", b"", "{path}: file is empty"),
    ("conll", b"", "{path}: file is empty"),
    ("text", b"", "{path}: file is empty"),
    ("parquet", b"PAR1 but not parquet", "{path}: not a Parquet file"),
])
def test_reader_errors(tmp_path, fmt, content, message):
  path = tmp_path / f"data.{fmt}"
  path.write_bytes(content)
  with pytest.raises(UserError) as e:
    formats.read(str(path), fmt)
  text = str(e.value)
  assert "\n" not in text
  assert text.startswith(message.format(path=path)), text


def test_missing_file_and_directory(tmp_path):
  with pytest.raises(UserError, match=re.escape(f"{tmp_path}/nope.tsv: data file does not exist")):
    formats.read(str(tmp_path / "nope.tsv"), "tsv")
  with pytest.raises(UserError, match=re.escape(f"{tmp_path}: is a directory")):
    formats.read(str(tmp_path), "jsonl")
  with pytest.raises(UserError, match="unknown format 'xml'"):
    formats.read(str(tmp_path), "xml")


def test_bom_and_blank_lines(tmp_path):
  path = tmp_path / "bom.csv"
  path.write_bytes(b"\xef\xbb\xbftext,label\r\n\r\n\"a, b\",1\r\n\r\n")
  assert strip_lines(formats.read(str(path), "csv")) == [{"text": "a, b", "label": "1"}]
  conll = tmp_path / "bom.conll"
  conll.write_bytes(b"\xef\xbb\xbf-DOCSTART- O\n\n\nA B-X\n  \nB B-Y\n")
  assert strip_lines(formats.read(str(conll), "conll")) == [
      {"tokens": ["A"], "tags": ["B-X"]}, {"tokens": ["B"], "tags": ["B-Y"]}]
