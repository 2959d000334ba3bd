"""The demo tasks: one per kind over the embedded synthetic data (t5mix/demo_data.py).

Written as a user would write a task module: plain calls of `t5mix.add_task`.
"""

import os

import t5mix
from t5mix import demo_data

data = demo_data.ensure()


COMMON = dict(vocabulary="demo")  # the SentencePiece model shipped in t5mix/assets


def splits(stem, ext):
  return {s: os.path.join(data, f"{stem}.{s}.{ext}") for s in ("train", "validation")}


t5mix.add_task(
    "demo_sentiment", kind="classification", format="tsv", splits=splits("sentiment", "tsv"),
    template="sentiment: {sentence}", label_words=["negative", "positive"],
    # accuracy and macro-F1: answering "positive" to every validation example scores 42.4 (with
    # the F1 of "positive" instead of macro-F1 it scored 59.3, as much as a trained model)
    metrics=["accuracy", "f1_macro"],
    description="synthetic sentiment with negation and 'but' clauses", **COMMON)
t5mix.add_task(
    "demo_qa", kind="qa", format="squad_json", splits=splits("qa", "json"),
    description="synthetic extractive QA: facts about three people per context", **COMMON)
t5mix.add_task(
    "demo_ner", kind="ner", format="conll", splits=splits("ner", "conll"), scheme="iob2",
    description="synthetic NER (PER, LOC, ORG); ambiguous names typed by context", **COMMON)
t5mix.add_task(
    "demo_text", kind="text", format="text",
    splits={"train": os.path.join(data, "text.train.txt")},
    description="span corruption over the demo tasks' text", **COMMON)
