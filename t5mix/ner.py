r"""Named-entity recognition in text-to-text form.

A tagged sentence (CoNLL-style tokens + IOB1/IOB2/BIOES tags) becomes a target string that lists
its entities, and a (possibly model-generated) target string parses back into (type, text) pairs.

Target format
-------------
Entities are listed in sentence order as `TYPE: entity text`, joined by `; `, e.g.
`PER: John Smith; LOC: Paris`. The entity text is the entity's tokens joined by single spaces. A
sentence without entities has the target `none`; this cannot clash with an entity, because every
entity item contains a `:`. Inside entity text a backslash escapes the next character: `;` is
written `\;`, `\` is written `\\`, and whitespace at the very start or end of the text is escaped
too (`\ `), so that any token text (including `;`, `:`, `\`, the word `none`, empty or
space-padded tokens) survives `parse_entities(format_entities(tokens, spans))` exactly. A `:`
needs no escape: the type ends at the first `:`, and types may not contain `:`, `;`, `\` or
whitespace. When parsing, whitespace around `;` and `:` is ignored, empty items (e.g. from a
trailing `;`) are skipped, `none` is matched case-insensitively, and anything else that does not
fit the format makes the whole string unparseable (None).
"""

import re
from collections.abc import Sequence

# Entity types become the `TYPE` part of the target, so they may not contain the characters the
# format uses as syntax (nor whitespace, which the parser strips).
_TYPE_RE = re.compile(r"[^\s:;\\]+")

NO_ENTITIES = "none"
_ITEM_SEP = "; "
_TYPE_SEP = ": "

# Tag prefixes each scheme allows, mapped onto the BIOES roles B (begin), I (inside), E (end),
# S (single). BILOU is BIOES with other letters (L = last, U = unit).
_ROLES = {
    "iob1": {"B": "B", "I": "I"},
    "iob2": {"B": "B", "I": "I"},
    "bioes": {"B": "B", "I": "I", "E": "E", "S": "S"},
    "iobes": {"B": "B", "I": "I", "E": "E", "S": "S"},
    "bilou": {"B": "B", "I": "I", "L": "E", "U": "S"},
}
SCHEMES = tuple(_ROLES)  # the scheme names tags_to_spans accepts (in any case)


def _split_tag(tag: str, roles: dict[str, str], position: int) -> tuple[str, str | None]:
  """('O', None) or (role, type) for one tag; ValueError if it is not a tag of the scheme."""
  if tag == "O":
    return "O", None
  prefix, dash, type_ = tag.partition("-")
  if prefix not in roles or not dash or not _TYPE_RE.fullmatch(type_):
    allowed = ", ".join(f"{p}-TYPE" for p in roles)
    raise ValueError(f"malformed tag {tag!r} at token {position + 1}: expected O, {allowed}")
  return roles[prefix], type_


def tags_to_spans(tags: Sequence[str], scheme: str) -> list[tuple[str, int, int]]:
  """Entity spans (type, start, end-exclusive) of one sentence's tags, in sentence order.

  Schemes: "iob1", "iob2", "bioes" (aliases "iobes", "bilou"; case-insensitive).
  - iob1: `I-X` continues an open X entity and otherwise starts one; `B-X` always starts a new
    X entity (it is meant to separate two adjacent X entities; elsewhere it is accepted as in
    conlleval).
  - iob2: every entity starts with `B-X`; an `I-X` that does not continue an X entity is an error.
  - bioes: `S-X` is a one-token entity; `B-X (I-X)* E-X` a longer one; anything else (an `I-`/`E-`
    without its `B-`, a `B-` never closed by `E-`, a type change inside an entity) is an error.
  Malformed tags raise ValueError naming the token (1-based); the caller adds file:line.

  Written by hand because seqeval's readers do not report errors: its default mode guesses
  (conlleval-style) and its strict mode silently drops malformed entities. The tests check that
  we agree with seqeval on well-formed input.
  """
  name = scheme.lower()
  if name not in _ROLES:
    raise ValueError(f"unknown tagging scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")
  roles = _ROLES[name]
  strict_ends = roles.keys() != {"B", "I"}  # BIOES-like: entities must be closed explicitly

  spans = []
  open_type, open_start = None, 0  # the entity being read, if any

  def close(end):
    nonlocal open_type
    if open_type is not None:
      spans.append((open_type, open_start, end))
      open_type = None

  def unclosed(position):
    end_prefix = next(p for p, role in roles.items() if role == "E")
    where = f"before token {position + 1}" if position < len(tags) else "by the sentence end"
    return ValueError(f"{open_type} entity starting at token {open_start + 1} is not closed "
                      f"{where} (expected I-{open_type} or {end_prefix}-{open_type})")

  for i, tag in enumerate(tags):
    role, type_ = _split_tag(tag, roles, i)
    continues = open_type is not None and open_type == type_

    if strict_ends and open_type is not None and not (role in ("I", "E") and continues):
      raise unclosed(i)

    if role == "O":
      close(i)
    elif role == "B":
      close(i)
      open_type, open_start = type_, i
    elif role == "S":
      spans.append((type_, i, i + 1))
    elif continues:  # I or E continuing the open entity
      if role == "E":
        close(i + 1)
    elif name == "iob1":  # an IOB1 `I-X` outside an X entity starts one
      close(i)
      open_type, open_start = type_, i
    else:
      previous = repr(tags[i - 1]) if i else "none"
      raise ValueError(f"tag {tag!r} at token {i + 1} does not continue a {type_} entity "
                       f"(previous tag: {previous}); a {type_} entity must start with B-{type_}")

  if strict_ends and open_type is not None:
    raise unclosed(len(tags))
  close(len(tags))
  return spans


def _escape(text: str) -> str:
  r"""`text` with `\` and `;` escaped, and whitespace at either end (which parsing strips)."""
  body = text.replace("\\", "\\\\").replace(";", "\\;")
  core = body.strip()
  lead = body[:len(body) - len(body.lstrip())]
  trail = body[len(body.rstrip()):] if core else ""  # all-whitespace text is all `lead`
  return "".join("\\" + c for c in lead) + core + "".join("\\" + c for c in trail)


def format_entities(tokens: Sequence[str], spans: Sequence[tuple[str, int, int]]) -> str:
  """The target string for `spans` (type, start, end-exclusive) over `tokens`; see module doc."""
  items = []
  for type_, start, end in sorted(spans, key=lambda span: (span[1], span[2])):
    if not _TYPE_RE.fullmatch(type_):
      raise ValueError(f"entity type {type_!r} may not be empty or contain whitespace, ':', ';' "
                       "or '\\'")
    if not 0 <= start < end <= len(tokens):
      raise ValueError(f"span ({type_!r}, {start}, {end}) is empty or outside the "
                       f"{len(tokens)} tokens")
    items.append(type_ + _TYPE_SEP + _escape(" ".join(tokens[start:end])))
  return _ITEM_SEP.join(items) if items else NO_ENTITIES


def _unescape_items(text: str) -> list[list[tuple[str, bool]]] | None:
  """`text` split at unescaped `;` into items of (character, was_escaped); None on a dangling `\\`."""
  items, current = [], []
  chars = iter(text)
  for c in chars:
    if c == "\\":
      escaped = next(chars, None)
      if escaped is None:
        return None
      current.append((escaped, True))
    elif c == ";":
      items.append(current)
      current = []
    else:
      current.append((c, False))
  items.append(current)
  return items


def _strip(item: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
  """`item` without unescaped whitespace at either end (escaped whitespace is content)."""
  start, end = 0, len(item)
  while start < end and not item[start][1] and item[start][0].isspace():
    start += 1
  while end > start and not item[end - 1][1] and item[end - 1][0].isspace():
    end -= 1
  return item[start:end]


def parse_entities(text: str) -> list[tuple[str, str]] | None:
  """(type, entity text) pairs from a target string, or None if it does not fit the format.

  Never raises: model outputs may be arbitrary text.
  """
  if not isinstance(text, str):
    return None
  if text.strip().lower() == NO_ENTITIES:
    return []
  items = _unescape_items(text)
  if items is None:
    return None
  entities = []
  for item in items:
    item = _strip(item)
    if not item:
      continue  # lenient: tolerate stray separators such as a trailing `;`
    colon = next((i for i, (c, escaped) in enumerate(item) if c == ":" and not escaped), None)
    if colon is None:
      return None
    type_chars = _strip(item[:colon])
    type_ = "".join(c for c, _ in type_chars)
    if any(escaped for _, escaped in type_chars) or not _TYPE_RE.fullmatch(type_):
      return None
    entities.append((type_, "".join(c for c, _ in _strip(item[colon + 1:]))))
  return entities if entities else None  # no item at all: not even `none`
