"""The embedded demo data: one small synthetic dataset per task kind, generated deterministically.

So that the whole pipeline runs offline on a fresh machine, t5mix writes these files on first use
(Python's `random.Random(seed)`, stable across versions and platforms) into
`$T5MIX_CACHE/demo/v1` (default `~/.cache/t5mix`), in the same formats users bring:

  sentiment.{train,validation}.tsv   classification; negation and "but" clauses decide the label
  qa.{train,validation}.json         SQuAD JSON; several people per context, the answer must be found
  ner.{train,validation}.conll       CoNLL columns, IOB2; ambiguous names typed by their context
  text.train.txt                     the texts above, for span-corruption pretraining

Labels are balanced and each task needs its input: always answering the majority label scores
50% on sentiment, and a constant answer scores near 0 on QA and NER.
"""

from __future__ import annotations

import json
import os
import random

VERSION = "v1"
SIZES = {"train": 3000, "validation": 300}

POSITIVE = ["good", "great", "excellent", "wonderful", "delightful", "superb", "pleasant",
            "charming", "brilliant", "lovely", "enjoyable", "fantastic"]
NEGATIVE = ["bad", "awful", "terrible", "dreadful", "boring", "poor", "disappointing",
            "bland", "horrible", "mediocre", "tedious", "unpleasant"]
SUBJECTS = ["the movie", "the food", "the service", "the hotel", "the book", "the concert",
            "the plot", "the acting", "the coffee", "the staff", "the room", "the music",
            "the game", "the show", "the meal", "the trip"]
INTENSIFIERS = ["", "", "really ", "very ", "quite ", "truly ", "rather "]
NEGATIONS = ["not", "never", "hardly"]

FIRST = ["Alice", "Bruno", "Chen", "Dara", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
         "Kemal", "Lena", "Mateo", "Nadia", "Oscar", "Priya", "Quinn", "Rosa", "Sven", "Tariq",
         "Uma", "Victor", "Wen", "Yara", "Zoe"]
LAST = ["Moreno", "Okafor", "Lindqvist", "Tanaka", "Novak", "Haddad", "Schmidt", "Rossi",
        "Kowalski", "Dubois", "Silva", "Ivanova", "Murphy", "Jensen", "Costa", "Weber"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Kyoto", "Lima", "Dublin", "Krakow", "Porto", "Quito",
          "Tunis", "Hanoi", "Malmo", "Graz", "Bergen", "Cusco", "Leeds"]
JOBS = ["baker", "pilot", "nurse", "teacher", "chemist", "carpenter", "lawyer", "farmer",
        "painter", "engineer", "librarian", "surgeon"]
COLORS = ["green", "blue", "orange", "purple", "yellow", "red", "silver", "teal"]
PETS = ["a cat", "a parrot", "two dogs", "a rabbit", "a tortoise", "no pets", "a horse"]
ORGS = ["Acme Corp", "Globex", "Initech", "Umbrella Labs", "Stark Industries", "Wayne Trust",
        "Hooli", "Vandelay Imports", "Soylent Foods", "Cyberdyne Systems"]
# Words that name a person in one sentence and a place in another: context decides.
AMBIGUOUS = ["Jordan", "Chad", "Georgia", "Austin", "Florence", "Victoria"]


def _sentiment_example(rng: random.Random) -> tuple[str, int]:
  def clause(label):
    word = rng.choice(POSITIVE if label else NEGATIVE)
    subject = rng.choice(SUBJECTS)
    if rng.random() < 0.4:  # negation flips the surface word
      word = rng.choice(NEGATIVE if label else POSITIVE)
      return f"{subject} was {rng.choice(NEGATIONS)} {rng.choice(INTENSIFIERS)}{word}"
    return f"{subject} was {rng.choice(INTENSIFIERS)}{word}"

  label = rng.randrange(2)
  if rng.random() < 0.35:  # "X but Y": the clause after "but" decides
    return f"{clause(1 - label)} but {clause(label)} .", label
  return f"{clause(label)} .", label


def _person(rng: random.Random) -> dict:
  return {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "city": rng.choice(CITIES),
          "job": rng.choice(JOBS), "color": rng.choice(COLORS), "pet": rng.choice(PETS),
          "org": rng.choice(ORGS)}


FACTS = [
    ("city", "{name} lives in {city}.", "Where does {name} live?"),
    ("job", "{name} works as a {job}.", "What is the job of {name}?"),
    ("color", "The favourite colour of {name} is {color}.", "What is the favourite colour of {name}?"),
    ("pet", "{name} keeps {pet} at home.", "What does {name} keep at home?"),
    ("org", "{name} is employed by {org}.", "Which company employs {name}?"),
]


def _qa_article(rng: random.Random, title: str, num_questions: int) -> dict:
  people = []
  while len(people) < 3:  # distinct names, so every question has one answer
    p = _person(rng)
    if all(p["name"] != q["name"] for q in people):
      people.append(p)
  sentences = []
  for p in people:
    for key, statement, question in rng.sample(FACTS, 3):
      sentences.append((statement.format(**p), key, p))
  rng.shuffle(sentences)
  context = " ".join(s for s, _, _ in sentences)
  qas = []
  for i, (sentence, key, p) in enumerate(rng.sample(sentences, min(num_questions, len(sentences)))):
    question = next(q for k, _, q in FACTS if k == key).format(**p)
    answer = p[key]
    start = context.index(sentence) + sentence.index(answer)
    qas.append({"id": f"{title}-{i}", "question": question,
                "answers": [{"text": answer, "answer_start": start}]})
  return {"title": title, "paragraphs": [{"context": context, "qas": qas}]}


def _ner_sentence(rng: random.Random) -> list[tuple[str, str]]:
  def per():
    return [(w, t) for w, t in zip(rng.choice([f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                                               rng.choice(AMBIGUOUS),
                                               f"{rng.choice(AMBIGUOUS)} {rng.choice(LAST)}"]).split(),
                                   ["B-PER", "I-PER"])]

  def loc():
    return [(rng.choice(CITIES + AMBIGUOUS), "B-LOC")]

  def org():
    words = rng.choice(ORGS).split()
    return [(w, "B-ORG" if i == 0 else "I-ORG") for i, w in enumerate(words)]

  def words(text):
    return [(w, "O") for w in text.split()]

  patterns = [
      lambda: per() + words("visited") + loc() + words("last week ."),
      lambda: per() + words("joined") + org() + words("in") + loc() + words("."),
      lambda: words("Officials in") + loc() + words("said") + per() + words("will lead") + org() + words("."),
      lambda: org() + words("opened an office in") + loc() + words("."),
      lambda: words("According to") + per() + words(", prices in") + loc() + words("rose ."),
      lambda: words("The weather was mild and nobody complained ."),
      lambda: per() + words("and") + per() + words("met at the station ."),
      lambda: words("Shares of") + org() + words("fell after") + per() + words("resigned ."),
      lambda: words("Flights from") + loc() + words("to") + loc() + words("were delayed ."),
      lambda: words("She said the report was ready on time ."),
  ]
  return rng.choice(patterns)()


def generate(out_dir: str, seed: int = 0) -> None:
  """Writes all demo files into `out_dir` (overwriting)."""
  os.makedirs(out_dir, exist_ok=True)
  texts = []
  for split, n in SIZES.items():
    rng = random.Random(f"{seed}-sentiment-{split}")
    rows = [_sentiment_example(rng) for _ in range(n)]
    _write(os.path.join(out_dir, f"sentiment.{split}.tsv"),
           "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    rng = random.Random(f"{seed}-qa-{split}")
    articles = [_qa_article(rng, f"{split}-{i}", num_questions=4) for i in range(n // 4)]
    _write(os.path.join(out_dir, f"qa.{split}.json"), json.dumps({"version": "demo", "data": articles}))
    rng = random.Random(f"{seed}-ner-{split}")
    sentences = [_ner_sentence(rng) for _ in range(n)]
    _write(os.path.join(out_dir, f"ner.{split}.conll"),
           "".join("".join(f"{w} {t}\n" for w, t in s) + "\n" for s in sentences))
    if split == "train":
      texts += [s for s, _ in rows]
      texts += [a["paragraphs"][0]["context"] for a in articles]
      texts += [" ".join(w for w, _ in s) for s in sentences]
  random.Random(seed).shuffle(texts)
  _write(os.path.join(out_dir, "text.train.txt"), "\n".join(texts) + "\n")


def _write(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"  # write-then-rename: a reader never sees half a file
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def cache_dir() -> str:
  return os.path.expanduser(os.environ.get("T5MIX_CACHE", "~/.cache/t5mix"))


def ensure() -> str:
  """The demo data directory, generated on first use."""
  out_dir = os.path.join(cache_dir(), "demo", VERSION)
  if not os.path.exists(os.path.join(out_dir, "text.train.txt")):
    generate(out_dir)
  return out_dir
