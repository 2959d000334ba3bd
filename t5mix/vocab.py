"""Vocabularies: seqio's SentencePiece and byte vocabularies, and training a SentencePiece model.

Every vocabulary carries T5's 100 extra ids: the sentinels `<extra_id_0>` … `<extra_id_99>` that
span corruption uses, at the top of the id range (the first sentinel is `vocab_size - 1`).
Ids 0, 1, 2 are pad, EOS and UNK, as seqio and T5 expect.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Iterable

import seqio
import yaml
from huggingface_hub import try_to_load_from_cache  # reads the local hub cache only

from t5mix.errors import UserError

EXTRA_IDS = 100
ASSETS = os.path.join(os.path.dirname(__file__), "assets")
# The demo vocabulary ships with t5mix; it was trained on the demo tasks' text with
# `t5mix vocab train --mixture demo --vocab-size 2000 --out t5mix/assets/demo_spm.model`.
DEMO_VOCAB = os.path.join(ASSETS, "demo_spm.model")
# A workdir keeps the SentencePiece model its run tokenised with under this name (HF's name too).
WORKDIR_VOCAB_FILE = "spiece.model"
# T5's own 32k vocabulary (cc_all.32000, what every released T5 and flan-t5 uses). t5mix cannot
# ship or download it; "t5" finds it where a user already has it.
T5_VOCAB_ENV = "T5MIX_T5_VOCAB"
T5_HUB_REPO = "google-t5/t5-small"
NAMES = ("byte", "demo", "t5")


def t5_vocab_path() -> str | None:
  """T5's spiece.model: $T5MIX_T5_VOCAB, else a copy in the HuggingFace hub cache (read offline)."""
  path = os.environ.get(T5_VOCAB_ENV)
  if path:
    return os.path.abspath(os.path.expanduser(path))
  for repo in (T5_HUB_REPO, "t5-small", "google/flan-t5-small", "google/t5-v1_1-small"):
    cached = try_to_load_from_cache(repo, WORKDIR_VOCAB_FILE)
    if isinstance(cached, str):
      return cached
  return None


T5_VOCAB_MISSING = (f"vocabulary 't5' (T5's 32k SentencePiece model) not found: set "
                    f"{T5_VOCAB_ENV}=PATH/spiece.model, or `t5mix import-hf` a T5 checkpoint and "
                    "train with --init-from (its spiece.model is used), or name the .model file")


def resolve(spec: str | None, base_dir: str | None = None) -> str:
  """A vocabulary spec as a run records it: "byte", or the absolute path of a SentencePiece model
  ("demo" and "t5" become the files they name). Relative paths resolve against `base_dir`."""
  spec = spec or "demo"
  if spec == "byte":
    return spec
  if spec == "demo":
    return DEMO_VOCAB
  if spec == "t5":
    path = t5_vocab_path()
    if path is None:
      raise UserError(T5_VOCAB_MISSING)
    return path
  return os.path.normpath(os.path.join(base_dir or ".", os.path.expanduser(spec)))


def get_vocabulary(spec: str | None = None, base_dir: str | None = None) -> seqio.Vocabulary:
  """`spec` is "byte", "demo" (the default), "t5", or a path to a SentencePiece `.model` file.

  Relative paths resolve against `base_dir` (the directory of the file that named them).
  The model file is read lazily by seqio, so a task can name a vocabulary that
  `t5mix vocab train` has not written yet (check_vocabulary reports a missing one).
  """
  if spec == "byte":
    return seqio.ByteVocabulary(extra_ids=EXTRA_IDS)
  if spec == "t5" and t5_vocab_path() is None:
    return _sentencepiece(os.path.join(os.sep, "<t5 vocabulary: not found>"))  # reported on use
  return _sentencepiece(resolve(spec, base_dir))


def describe(vocab: seqio.Vocabulary) -> str:
  """How a vocabulary reads in messages and in a run's config: "byte", "demo" or its file."""
  path = getattr(vocab, "sentencepiece_model_file", None)
  if path is None:
    return "byte" if isinstance(vocab, seqio.ByteVocabulary) else type(vocab).__name__
  return "demo" if path == DEMO_VOCAB else path


def same(a: seqio.Vocabulary, b: seqio.Vocabulary) -> bool:
  """Whether two vocabularies tokenise alike: the same kind and extra ids, and for SentencePiece
  the same model file contents (so a copy in a workdir equals its source)."""
  if a is b:
    return True
  path_a = getattr(a, "sentencepiece_model_file", None)
  path_b = getattr(b, "sentencepiece_model_file", None)
  if path_a is None or path_b is None:
    return path_a is None and path_b is None and a == b
  if a.extra_ids != b.extra_ids:
    return False
  if os.path.realpath(path_a) == os.path.realpath(path_b):
    return True
  if not (os.path.isfile(path_a) and os.path.isfile(path_b)):
    return False
  return file_hash(path_a) == file_hash(path_b)


def workdir_vocabulary(workdir: str) -> str | None:
  """The vocabulary a workdir's model was trained with, as a spec: its spiece.model (written by
  `t5mix train` and `t5mix import-hf`), else its config.yaml's data.vocab, else None (unknown)."""
  path = os.path.join(workdir, WORKDIR_VOCAB_FILE)
  if os.path.isfile(path):
    return os.path.abspath(path)
  try:
    with open(os.path.join(workdir, "config.yaml")) as f:
      saved = (yaml.safe_load(f) or {}).get("data", {}).get("vocab")
  except (OSError, AttributeError, ValueError):
    return None
  return saved if isinstance(saved, str) else None


def file_hash(path: str) -> str:
  """A short content hash (sha256, 16 hex digits): runs record them to notice edited files."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()[:16]


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
  if path.endswith("<t5 vocabulary: not found>"):
    raise UserError(T5_VOCAB_MISSING)
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
