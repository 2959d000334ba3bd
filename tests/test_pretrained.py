"""The real pretrained T5 of ../shared/models/flan-t5-small-kd through `t5mix import-hf`, t5mix's
own forward pass and greedy decoding, its vocabulary, and `t5mix export-hf`, each against
transformers. Skipped where the shared model is absent (it is present on dev machines and in CI).
Tests that run or write the 77M-parameter model take 15-30 s each on CPU: marked slow."""

import contextlib
import io
import os
import pathlib
import stat

import jax
import numpy as np
import pytest
import seqio

from t5mix import checkpoints, cli, decode

MODEL_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "models" / "flan-t5-small-kd"
pytestmark = pytest.mark.skipif(not MODEL_DIR.is_dir(), reason=f"{MODEL_DIR} is not here")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

PROMPTS = [
    "translate English to German: The house is wonderful.",
    "question: Who wrote Hamlet? context: Hamlet is a tragedy written by William Shakespeare "
    "sometime between 1599 and 1601.",
    "summarize: The tower is 324 metres tall, about the same height as an 81-storey building, "
    "and the tallest structure in Paris.",
    "translate English to French: How old are you?",
]
MAX_DECODE_LEN = 32


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(workdir, stdout) of `t5mix import-hf MODEL_DIR --out WORKDIR`."""
  workdir = tmp_path_factory.mktemp("pretrained") / "wd"
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    assert cli.main(["import-hf", str(MODEL_DIR), "--out", str(workdir)]) == 0
  return workdir, stdout.getvalue()


@pytest.fixture(scope="module")
def ours(imported):
  """t5mix's model, restored from the imported workdir's checkpoint."""
  return checkpoints.load_workdir_params(str(imported[0]))[1]


@pytest.fixture(scope="module")
def hf():
  return transformers.T5ForConditionalGeneration.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.T5Tokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def vocab(imported):
  return seqio.SentencePieceVocabulary(str(imported[0] / "spiece.model"), extra_ids=100)


@pytest.fixture(scope="module")
def hf_greedy(hf, tokenizer):
  """transformers' greedy decoding of PROMPTS: [B, 1 + n] ids, decoder start token first."""
  batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
  with torch.no_grad():
    return hf.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=MAX_DECODE_LEN).numpy()


def encoder_inputs(vocab):
  """PROMPTS as t5mix feeds them: seqio's ids + EOS, right-padded with 0."""
  rows = [vocab.encode(p) + [1] for p in PROMPTS]
  out = np.zeros((len(rows), max(map(len, rows))), np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


def hf_logits(model, enc, dec):
  with torch.no_grad():
    return model(input_ids=torch.tensor(enc, dtype=torch.long), attention_mask=torch.tensor(enc != 0),
                 decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()


def test_import_writes_the_vocabulary_and_a_fine_tune_hint(imported):
  workdir, stdout = imported
  assert (workdir / "spiece.model").is_file()
  assert (workdir / "spiece.model").read_bytes() == (MODEL_DIR / "spiece.model").read_bytes()
  assert stdout.strip() == (
      f"wrote {workdir}/checkpoints/0; fine-tune with: t5mix train --init-from {workdir} "
      f"--set data.mixture=NAME --workdir RUN (the model and its vocabulary come from {workdir})")


def test_imported_vocabulary_tokenises_like_t5(vocab, tokenizer):
  sentences = PROMPTS + ["Ünïcödé, numbers 3.14159 and   spaces", "<extra_id_0> fills a span"]
  for sentence in sentences:
    assert vocab.encode(sentence) + [1] == tokenizer(sentence).input_ids, sentence  # T5Tokenizer adds EOS
  assert vocab.encode("<extra_id_0>") == [32099]
  assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == 32099
  assert vocab.decode([32099]) == tokenizer.decode([32099]) == "<extra_id_0>"


@pytest.mark.slow
def test_logits_match_transformers(ours, hf, vocab, hf_greedy):
  enc = encoder_inputs(vocab)
  dec = hf_greedy[:, :16]  # teacher-forced on real continuations (pad 0 after EOS)
  logits = jax.jit(lambda model, batch: model(batch))(
      ours, {"encoder_input_tokens": enc, "decoder_input_tokens": dec})
  reference = hf_logits(hf, enc, dec)
  assert np.max(np.abs(reference)) > 10  # real, not near-zero, logits
  assert float(np.max(np.abs(np.asarray(logits) - reference))) <= 1e-3


@pytest.mark.slow
def test_greedy_decoding_matches_transformers(ours, vocab, tokenizer, hf_greedy):
  tokens = np.asarray(decode.greedy(ours, encoder_inputs(vocab), max_decode_len=MAX_DECODE_LEN))
  texts = [vocab.decode(row.tolist()) for row in tokens]
  assert texts[0] == "Das Haus ist wunderbar."
  assert texts[1] == "William Shakespeare"
  assert texts == tokenizer.batch_decode(hf_greedy, skip_special_tokens=True)
  for row, reference in zip(tokens, hf_greedy[:, 1:]):  # the same ids up to and including EOS
    n = list(reference).index(1) + 1 if 1 in reference else len(reference)
    assert row[:n].tolist() == reference[:n].tolist()


@pytest.mark.slow
def test_export_loads_in_transformers(imported, hf, tokenizer, tmp_path):
  out = tmp_path / "exported"
  with contextlib.redirect_stdout(io.StringIO()):
    assert cli.main(["export-hf", "--workdir", str(imported[0]), "--out", str(out)]) == 0
  exported_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  for sentence in PROMPTS + ["<extra_id_0> fills a span"]:
    assert exported_tokenizer(sentence).input_ids == tokenizer(sentence).input_ids
  exported = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  enc = tokenizer(PROMPTS, return_tensors="np", padding=True).input_ids
  dec = np.zeros((len(PROMPTS), 8), np.int64)
  np.testing.assert_array_equal(hf_logits(exported, enc, dec), hf_logits(hf, enc, dec))  # lossless
  umask = os.umask(0)
  os.umask(umask)
  for name in ["model.safetensors", "config.json", "spiece.model"]:
    assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name
