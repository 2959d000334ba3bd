"""Tests for t5mix.ner: tag schemes -> spans, and the entity target format."""

import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from seqeval import scheme as seqeval_scheme
from seqeval.metrics.sequence_labeling import get_entities

from t5mix.ner import SCHEMES, format_entities, parse_entities, tags_to_spans

# --- tags_to_spans: hand-written cases ----------------------------------------------------------


@pytest.mark.parametrize("scheme, tags, spans", [
    ("iob2", ["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
    ("iob2", ["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),
    ("iob2", ["B-PER", "B-LOC"], [("PER", 0, 1), ("LOC", 1, 2)]),
    # IOB1: I- starts an entity unless it continues the same type; B- splits adjacent ones.
    ("iob1", ["I-PER", "I-PER", "O", "I-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
    ("iob1", ["I-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),
    ("iob1", ["I-PER", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 2)]),
    ("iob1", ["O", "B-PER", "I-PER"], [("PER", 1, 3)]),  # B- after O: accepted, as conlleval
    ("bioes", ["S-PER", "B-LOC", "I-LOC", "E-LOC", "O", "B-ORG", "E-ORG"],
     [("PER", 0, 1), ("LOC", 1, 4), ("ORG", 5, 7)]),
    ("bioes", ["S-PER", "S-PER"], [("PER", 0, 1), ("PER", 1, 2)]),
    ("IOBES", ["B-PER", "E-PER"], [("PER", 0, 2)]),
    ("BILOU", ["U-PER", "B-LOC", "I-LOC", "L-LOC"], [("PER", 0, 1), ("LOC", 1, 4)]),
    ("iob2", ["B-WORK_OF_ART", "I-WORK_OF_ART", "B-B-X"], [("WORK_OF_ART", 0, 2), ("B-X", 2, 3)]),
    ("iob2", ["O", "O"], []),
    ("bioes", [], []),
])
def test_tags_to_spans(scheme, tags, spans):
  assert tags_to_spans(tags, scheme) == spans


def test_schemes_lists_accepted_names():
  assert set(SCHEMES) == {"iob1", "iob2", "bioes", "iobes", "bilou"}
  for scheme in SCHEMES:
    assert tags_to_spans(["O"], scheme) == []


@pytest.mark.parametrize("scheme, tags, message", [
    ("iob2", ["X-PER"], r"malformed tag 'X-PER' at token 1"),
    ("iob2", ["O", "B-"], r"malformed tag 'B-' at token 2"),
    ("iob2", ["B PER"], r"malformed tag"),
    ("iob2", ["o"], r"malformed tag"),
    ("iob2", ["S-PER"], r"malformed tag 'S-PER'"),  # not an IOB2 prefix
    ("iob1", ["E-PER"], r"malformed tag 'E-PER'"),
    ("bilou", ["E-PER"], r"malformed tag 'E-PER'"),
    ("iob2", ["O", "I-PER"], r"'I-PER' at token 2 does not continue a PER entity"),
    ("iob2", ["I-PER"], r"'I-PER' at token 1 does not continue"),
    ("iob2", ["B-PER", "I-LOC"], r"'I-LOC' at token 2 does not continue a LOC entity"),
    ("bioes", ["E-PER"], r"'E-PER' at token 1 does not continue a PER entity"),
    ("bioes", ["O", "I-PER", "E-PER"], r"'I-PER' at token 2 does not continue"),
    ("bioes", ["B-PER", "O"], r"PER entity starting at token 1 is not closed before token 2"),
    ("bioes", ["B-PER", "I-PER"], r"not closed by the sentence end \(expected I-PER or E-PER\)"),
    ("bioes", ["B-PER", "E-LOC"], r"PER entity starting at token 1 is not closed"),
    ("bioes", ["B-PER", "S-PER"], r"not closed before token 2"),
    ("bioes", ["B-PER", "B-PER", "E-PER"], r"not closed before token 2"),
    ("bilou", ["B-PER"], r"expected I-PER or L-PER"),
    ("iob3", ["O"], r"unknown tagging scheme 'iob3'"),
])
def test_tags_to_spans_rejects_malformed(scheme, tags, message):
  with pytest.raises(ValueError, match=message):
    tags_to_spans(tags, scheme)


# --- tags_to_spans against seqeval --------------------------------------------------------------

TYPES = ["PER", "LOC", "B-X"]  # "B-X" checks that only the first "-" splits prefix and type


@st.composite
def sentences(draw):
  """(length, spans): non-overlapping spans, in order, each a random type and length."""
  spans, position = [], 0
  for _ in range(draw(st.integers(0, 6))):
    position += draw(st.integers(0, 2))  # gap of O tokens (0: adjacent entities)
    length = draw(st.integers(1, 3))
    spans.append((draw(st.sampled_from(TYPES)), position, position + length))
    position += length
  return position + draw(st.integers(0, 2)), spans


def encode(length, spans, scheme):
  """The tags of `spans` in a scheme: the inverse of tags_to_spans, written independently."""
  tags = ["O"] * length
  previous = None  # the span before, if it ends right where this one starts
  for type_, start, end in spans:
    if scheme == "iob1":
      adjacent_same = previous is not None and previous[0] == type_ and previous[2] == start
      tags[start:end] = ["B-" + type_ if adjacent_same else "I-" + type_] + ["I-" + type_] * (
          end - start - 1)
    elif scheme == "iob2":
      tags[start:end] = ["B-" + type_] + ["I-" + type_] * (end - start - 1)
    else:
      begin, end_, single = ("B", "E", "S") if scheme == "bioes" else ("B", "L", "U")
      if end - start == 1:
        tags[start] = f"{single}-{type_}"
      else:
        tags[start:end] = ([f"{begin}-{type_}"] + [f"I-{type_}"] * (end - start - 2) +
                           [f"{end_}-{type_}"])
    previous = (type_, start, end)
  return tags


def seqeval_strict(tags, scheme_class):
  entities = seqeval_scheme.Tokens(tags, scheme_class).entities
  return [(e.tag, e.start, e.end) for e in entities]


def seqeval_lenient(tags):
  """seqeval's default (conlleval-style) reader, with end made exclusive."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return [(type_, start, end + 1) for type_, start, end in get_entities(list(tags))]


SEQEVAL_SCHEMES = {"iob1": seqeval_scheme.IOB1, "iob2": seqeval_scheme.IOB2,
                   "bioes": seqeval_scheme.IOBES, "bilou": seqeval_scheme.BILOU}


@pytest.mark.parametrize("scheme", ["iob1", "iob2", "bioes", "bilou"])
@given(sentence=sentences())
def test_well_formed_tags_round_trip_and_match_seqeval(scheme, sentence):
  length, spans = sentence
  tags = encode(length, spans, scheme)
  assert tags_to_spans(tags, scheme) == spans
  assert seqeval_strict(tags, SEQEVAL_SCHEMES[scheme]) == spans
  if scheme != "bilou":  # seqeval's default reader does not know L- and U-
    assert seqeval_lenient(tags) == spans


TAG_SOUP = {
    "iob2": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
    "bioes": ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC"],
}


@pytest.mark.parametrize("scheme", ["iob2", "bioes"])
@given(data=st.data())
def test_arbitrary_tags_raise_exactly_when_seqeval_readings_disagree(scheme, data):
  # For the strict schemes, seqeval's lenient reader guesses at malformed input while its strict
  # reader drops the malformed entities, so the two disagree exactly on malformed input: that is
  # where we must raise, and elsewhere we must agree with both.
  tags = data.draw(st.lists(st.sampled_from(TAG_SOUP[scheme]), max_size=8))
  strict = seqeval_strict(tags, SEQEVAL_SCHEMES[scheme])
  lenient = seqeval_lenient(tags)
  if strict == lenient:
    assert tags_to_spans(tags, scheme) == strict
  else:
    with pytest.raises(ValueError):
      tags_to_spans(tags, scheme)


@given(tags=st.lists(st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]), max_size=8))
def test_arbitrary_iob1_tags_match_seqeval_lenient_reader(tags):
  # Every IOB1 sequence is readable; seqeval's default reader has the same semantics.
  assert tags_to_spans(tags, "iob1") == seqeval_lenient(tags)


# --- format_entities / parse_entities -------------------------------------------------------------


def test_format_example():
  tokens = ["John", "Smith", "visited", "Paris", "."]
  spans = [("PER", 0, 2), ("LOC", 3, 4)]
  assert format_entities(tokens, spans) == "PER: John Smith; LOC: Paris"
  assert parse_entities("PER: John Smith; LOC: Paris") == [("PER", "John Smith"), ("LOC", "Paris")]


def test_no_entities_is_none():
  assert format_entities(["nothing", "here"], []) == "none"
  assert parse_entities("none") == []


def test_format_orders_entities_by_position():
  assert format_entities(["a", "b"], [("LOC", 1, 2), ("PER", 0, 1)]) == "PER: a; LOC: b"


@pytest.mark.parametrize("tokens, target", [
    (["a;b"], r"X: a\;b"),
    (["back\\slash"], r"X: back\\slash"),
    (["none"], "X: none"),
    (["key:", "value"], "X: key: value"),
    ([" padded "], r"X: \ padded\ "),
    ([""], "X: "),
])
def test_format_escapes(tokens, target):
  assert format_entities(tokens, [("X", 0, len(tokens))]) == target
  assert parse_entities(target) == [("X", " ".join(tokens))]


@pytest.mark.parametrize("type_, span", [
    ("P ER", (0, 1)), ("PER:", (0, 1)), ("", (0, 1)), ("A;B", (0, 1)), ("A\\B", (0, 1)),
    ("PER", (0, 0)), ("PER", (1, 3)), ("PER", (-1, 1)),
])
def test_format_rejects_bad_entities(type_, span):
  with pytest.raises(ValueError):
    format_entities(["a", "b"], [(type_, *span)])


@pytest.mark.parametrize("text, entities", [
    ("PER:John Smith;LOC:Paris", [("PER", "John Smith"), ("LOC", "Paris")]),
    ("  PER :  John Smith  ;  LOC:Paris ; ", [("PER", "John Smith"), ("LOC", "Paris")]),
    ("PER: John;;LOC: Paris;", [("PER", "John"), ("LOC", "Paris")]),
    (" None ", []),
    ("NONE", []),
    ("PER: a: b", [("PER", "a: b")]),
    (r"PER: \x", [("PER", "x")]),  # unnecessary escapes are tolerated
    ("PER: John Smith; PER: John Smith", [("PER", "John Smith")] * 2),
])
def test_parse_is_lenient_about_whitespace_and_separators(text, entities):
  assert parse_entities(text) == entities


@pytest.mark.parametrize("text", [
    "", "   ", ";", "garbage", "John Smith", "PER John", ": John", "P ER: John",
    "none; PER: John", "PER: John; Paris", "PER: John\\", r"P\ER: John", None, b"PER: x",
])
def test_parse_returns_none_for_garbage(text):
  assert parse_entities(text) is None


NASTY_TOKEN = st.one_of(
    st.sampled_from(["", " ", ";", ":", "\\", "\\;", ";;", "none", "None", "O", ": ", " ;",
                     "\t", "\n", "a\\", "PER:", "\u00a0", "\u2028"]),
    st.text(alphabet=st.sampled_from("ab ;:\\\t\n"), max_size=5),
    st.text(max_size=4),
)
TYPE = st.from_regex(r"[A-Za-z0-9_\-.]{1,6}", fullmatch=True)


@st.composite
def tagged_sentences(draw):
  tokens = draw(st.lists(NASTY_TOKEN, max_size=8))
  bounds = sorted(draw(st.sets(st.integers(0, len(tokens)), max_size=6)))
  pairs = [(a, b) for a, b in zip(bounds[::2], bounds[1::2]) if a < b]  # disjoint spans
  return tokens, [(draw(TYPE), a, b) for a, b in pairs]


@settings(max_examples=500)
@given(sentence=tagged_sentences())
def test_format_parse_round_trip(sentence):
  tokens, spans = sentence
  expected = [(type_, " ".join(tokens[start:end])) for type_, start, end in spans]
  assert parse_entities(format_entities(tokens, spans)) == expected


@settings(max_examples=500)
@given(text=st.one_of(st.text(), st.text(alphabet=st.sampled_from("PER:;\\ none\t"))))
def test_parse_never_raises(text):
  entities = parse_entities(text)
  assert entities is None or all(isinstance(t, str) and isinstance(e, str) for t, e in entities)
