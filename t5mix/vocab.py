"""Vocabularies: seqio's SentencePiece and byte vocabularies, and training a SentencePiece model.

Every vocabulary carries T5's 100 extra ids: the sentinels `<extra_id_0>` … `<extra_id_99>` that
span corruption uses, at the top of the id range (the first sentinel is `vocab_size - 1`).
Ids 0, 1, 2 are pad, EOS and UNK, as seqio and T5 expect.
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterable

import seqio

from t5mix.errors import UserError

EXTRA_IDS = 100
ASSETS = os.path.join(os.path.dirname(__file__), "assets")
# The demo vocabulary ships with t5mix; it was trained on the demo tasks' text with
# `t5mix vocab train --mixture demo --vocab-size 2000 --out t5mix/assets/demo_spm.model`.
DEMO_VOCAB = os.path.join(ASSETS, "demo_spm.model")


def get_vocabulary(spec: str | None = None, base_dir: str | None = None) -> seqio.Vocabulary:
  """`spec` is "byte", "demo" (the default), or a path to a SentencePiece `.model` file.

  Relative paths resolve against `base_dir` (the directory of the file that named them).
  The model file is read lazily by seqio, so a task can name a vocabulary that
  `t5mix vocab train` has not written yet.
  """
  spec = spec or "demo"
  if spec == "byte":
    return seqio.ByteVocabulary(extra_ids=EXTRA_IDS)
  path = DEMO_VOCAB if spec == "demo" else os.path.join(base_dir or ".", os.path.expanduser(spec))
  return _sentencepiece(os.path.normpath(path))


_CACHE: dict[str, seqio.Vocabulary] = {}


def _sentencepiece(path: str) -> seqio.Vocabulary:
  # One object per file: seqio compares vocabularies of mixed tasks, and loading is not free.
  if path not in _CACHE:
    _CACHE[path] = seqio.SentencePieceVocabulary(path, extra_ids=EXTRA_IDS)
  return _CACHE[path]


def check_vocabulary(vocab: seqio.Vocabulary) -> None:
  """Fails with a clear message if a SentencePiece model file is missing or unreadable."""
  path = getattr(vocab, "sentencepiece_model_file", None)
  if path is None:
    return
  if not os.path.exists(path):
    raise UserError(f"{path}: vocabulary file does not exist; create it with "
                    f"`t5mix vocab train --mixture NAME --out {path}`")
  try:
    vocab.vocab_size  # forces the load
  except Exception as e:  # sentencepiece raises RuntimeError/OSError with long texts
    raise UserError(f"{path}: not a readable SentencePiece model ({str(e).splitlines()[0]})") from None


def train_sentencepiece(texts: Iterable[str], out_path: str, vocab_size: int = 8000,
                        model_type: str = "unigram", character_coverage: float = 1.0,
                        max_sentences: int = 1_000_000) -> str:
  """Trains a SentencePiece model with T5's special ids (pad 0, EOS 1, UNK 2, no BOS).

  The 100 sentinels are not part of the model: seqio appends them as extra ids.
  """
  import sentencepiece as spm  # a dependency of seqio; imported here as only training needs it

  if vocab_size < 16:
    raise UserError(f"vocab_size must be at least 16, got {vocab_size}")
  out_path = os.path.abspath(out_path)
  if os.path.isdir(out_path):
    raise UserError(f"{out_path}: is a directory; give the path of the .model file to write")
  try:
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
  except OSError as e:
    raise UserError(f"{out_path}: cannot create its directory ({e.strerror})") from None
  with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus.txt")
    n = 0
    with open(corpus, "w", encoding="utf-8") as f:
      for text in texts:
        text = " ".join(text.split())
        if text:
          f.write(text + "\n")
          n += 1
    if n == 0:
      raise UserError("no text to train a vocabulary on")
    prefix = os.path.join(tmp, "spm")
    try:
      spm.SentencePieceTrainer.train(
          input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
          character_coverage=character_coverage, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
          input_sentence_size=max_sentences, num_threads=2, minloglevel=2)
    except RuntimeError as e:
      raise UserError(f"sentencepiece training failed: {str(e).splitlines()[-1]}") from None
    os.replace(prefix + ".model", out_path)
  _CACHE.pop(out_path, None)
  return out_path
