"""The WikiText-2 span-corruption task: a task module (`--module`), because the text needs cleaning.

The shared WikiText-2 files are tokenised and HTML-escaped ("&lt; unk &gt;", "&quot;", " @-@ ",
"<unk>"). We undo that once into a cache file and register a plain `text` task over it, grouping
consecutive sentences of an article into documents of up to ~2,000 characters so that span
corruption sees whole passages.
"""

import hashlib
import html
import os
import re

import t5mix

SHARED = os.environ.get("T5MIX_SHARED_DATA", os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data"))
FILES = [os.path.join(SHARED, "wikitext2", name) for name in ("valid.txt", "test.txt")]
UNK = "<unk>"  # both spellings ("<unk>", "&lt; unk &gt;") become this one marker
MAX_CHARS = 2000


def clean(line: str) -> str:
  line = html.unescape(line)                      # &lt; unk &gt; -> < unk >, &quot; -> "
  line = re.sub(r"<\s*unk\s*>", UNK, line)
  line = re.sub(r"\s*@\s*([-,.])\s*@\s*", r"\1", line)  # 1 @,@ 000 -> 1,000; pre @-@ war -> pre-war
  line = re.sub(r" ([.,;:!?%)\]'])", r"\1", line)  # detokenise punctuation spacing
  line = re.sub(r"([(\[$]) ", r"\1", line)
  line = re.sub(r" (n't|'s|'re|'ve|'d|'ll|'m)\b", r"\1", line)
  return line.strip()


def documents(lines):
  """Documents of consecutive sentences; a heading ("= Title =", "= = Section = =") starts a new one."""
  doc = []
  for raw in lines:
    line = raw.strip()
    heading = re.match(r"((?:= )+)(.+?)((?: =)+)(?: |$)", line)  # may share a line with a sentence
    if heading or sum(map(len, doc)) > MAX_CHARS:
      if doc:
        yield " ".join(doc)
      doc = []
    if heading:
      line = heading.group(2) + ". " + line[heading.end():]
    if line:
      doc.append(clean(line))
  if doc:
    yield " ".join(doc)


def ensure() -> str:
  """The cleaned text file (one document per line), rewritten when the sources or this code change."""
  digest = hashlib.sha256(open(__file__, "rb").read())  # this cleaning code, and its input
  for path in FILES:
    if not os.path.exists(path):
      raise t5mix.UserError(f"{path}: WikiText-2 file not found (set T5MIX_SHARED_DATA to the shared data directory)")
    digest.update(open(path, "rb").read())
  out = os.path.join(os.path.expanduser("~/.cache/t5mix/wikitext2"), digest.hexdigest()[:16] + ".txt")
  if not os.path.exists(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    lines = [line for path in FILES for line in open(path, encoding="utf-8")]
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for doc in documents(lines):
        f.write(doc + "\n")
    os.replace(tmp, out)
  return out


t5mix.add_task("real_wikitext", kind="text", format="text", splits={"train": ensure()},
               description="WikiText-2 valid+test, cleaned (wikitext.py)")
