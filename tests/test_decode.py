import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from flax import nnx

from t5mix import checkpoints, decode, evaluate
from t5mix.hf_interop import load_hf_checkpoint
from t5mix.model import T5, T5Config, save_model_config, with_dtype

ARCHS = ["encoder_decoder", "decoder_only"]
MAX_LEN = 8
NO_EOS = -1  # an id never produced, to decode exactly MAX_LEN tokens
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
  config = T5Config(vocab_size=48, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2,
                    num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                    dropout_rate=0.0, architecture=request.param)
  return T5(config, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def inputs():
  """Three right-padded inputs of different lengths."""
  x = np.random.default_rng(0).integers(2, 48, (3, 7)).astype(np.int32)
  x[1, 4:] = 0
  x[2, 2:] = 0
  return jnp.asarray(x)


@nnx.jit
def forward(model, batch):
  return model(batch)


def _reference_batch(model, x, out, width):
  """A one-row teacher-forced batch for input x and output prefix out, right-padded to a fixed width (so
  the jitted forward compiles once); returns it and the position whose logits predict the next token."""
  pad = lambda tokens: jnp.array([tokens + [0] * (width - len(tokens))])
  if model.encoder is not None:
    return {"encoder_input_tokens": pad(x), "decoder_input_tokens": pad([0] + out)}, len(out)
  prefix = [1] * (len(x) + 1)
  return {"decoder_input_tokens": pad([0] + x + out), "decoder_causal_attention": pad(prefix)}, len(x) + len(out)


def full_forward_argmax(model, inputs, max_len):
  """Reference decoding without a cache: recompute the whole forward pass for every new token, per example."""
  outputs = []
  for row in np.asarray(inputs):
    x = [int(t) for t in row if t != 0]
    out = []
    for _ in range(max_len):
      batch, position = _reference_batch(model, x, out, 32)
      out.append(int(jnp.argmax(forward(model, batch)[0, position])))
    outputs.append(out)
  return np.array(outputs)


def sequence_logprob(model, row, tokens):
  """log p(tokens | row) up to and including the first EOS, from one full forward pass; and that length."""
  x = [int(t) for t in np.asarray(row) if t != 0]
  tokens = np.asarray(tokens)
  n = int(np.argmax(tokens == decode.EOS_ID)) + 1 if decode.EOS_ID in tokens else len(tokens)
  out = [int(t) for t in tokens[:n]]
  batch, start = _reference_batch(model, x, out[:-1], 32)
  logits = forward(model, batch)[0, start - (n - 1):start + 1]
  return float(jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(n), jnp.array(out)])), n


def test_greedy_with_cache_equals_full_forward_argmax(model, inputs):
  out = decode.greedy(model, inputs, max_decode_len=MAX_LEN, eos_id=NO_EOS)
  assert out.shape == (3, MAX_LEN) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out, full_forward_argmax(model, inputs, MAX_LEN))


def test_shorter_decodes_are_prefixes_of_longer_ones(model, inputs):
  """The loop runs one model step fewer than it emits tokens (the last one is chosen after it), so
  check the shortest lengths, 1 included, against the longest decode."""
  full = np.asarray(decode.greedy(model, inputs, max_decode_len=MAX_LEN, eos_id=NO_EOS))
  for length in (1, 2):
    np.testing.assert_array_equal(decode.greedy(model, inputs, max_decode_len=length, eos_id=NO_EOS),
                                  full[:, :length])
  sampled = decode.sample(model, inputs, jax.random.key(0), max_decode_len=1, top_k=1, eos_id=NO_EOS)
  np.testing.assert_array_equal(sampled, full[:, :1])


def test_beam_size_1_and_top_k_1_equal_greedy(model, inputs):
  greedy = decode.greedy(model, inputs, max_decode_len=MAX_LEN, eos_id=NO_EOS)
  beam = decode.beam_search(model, inputs, max_decode_len=MAX_LEN, beam_size=1, alpha=0.0, eos_id=NO_EOS)
  sampled = decode.sample(model, inputs, jax.random.key(0), max_decode_len=MAX_LEN, top_k=1, eos_id=NO_EOS)
  np.testing.assert_array_equal(beam, greedy)
  np.testing.assert_array_equal(sampled, greedy)


def test_eos_stops_and_pads_with_zeros(model, inputs):
  free = np.asarray(decode.greedy(model, inputs, max_decode_len=MAX_LEN, eos_id=NO_EOS))
  eos = int(free[0, 2])  # pretend the third token of row 0 is EOS
  out = np.asarray(decode.greedy(model, inputs, max_decode_len=MAX_LEN, eos_id=eos))
  for row, free_row in zip(out, free):
    stop = int(np.argmax(free_row == eos)) + 1 if eos in free_row else MAX_LEN
    np.testing.assert_array_equal(row[:stop], free_row[:stop])
    assert not row[stop:].any()
  for tokens in [decode.beam_search(model, inputs, max_decode_len=MAX_LEN, beam_size=3, eos_id=eos),
                 decode.sample(model, inputs, jax.random.key(1), max_decode_len=MAX_LEN, eos_id=eos)]:
    for row in np.asarray(tokens):
      if eos in row:
        assert not row[int(np.argmax(row == eos)) + 1:].any()


def test_beam_search_scores_are_length_normalised_logprobs(model, inputs):
  tokens, scores = decode.beam_search(model, inputs, max_decode_len=4, beam_size=4, alpha=0.6, return_scores=True)
  for i in range(3):
    logprob, length = sequence_logprob(model, inputs[i], tokens[i])
    assert float(scores[i]) == pytest.approx(logprob / ((5 + length) / 6) ** 0.6, abs=1e-4)


def test_sampling_depends_on_the_key(model, inputs):
  a = decode.sample(model, inputs, jax.random.key(0), max_decode_len=MAX_LEN, temperature=2.0, eos_id=NO_EOS)
  b = decode.sample(model, inputs, jax.random.key(0), max_decode_len=MAX_LEN, temperature=2.0, eos_id=NO_EOS)
  c = decode.sample(model, inputs, jax.random.key(1), max_decode_len=MAX_LEN, temperature=2.0, eos_id=NO_EOS)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


class _Compiles(logging.Handler):
  def __init__(self):
    super().__init__()
    self.names = []

  def emit(self, record):
    msg = record.getMessage()
    if msg.startswith("Compiling "):
      self.names.append(msg.split()[1])


def test_second_call_with_the_same_shapes_does_not_recompile(model, inputs):
  calls = [
      lambda x, t: decode.greedy(model, x, max_decode_len=MAX_LEN),
      lambda x, t: decode.sample(model, x, jax.random.key(t), max_decode_len=MAX_LEN, temperature=1.0 + t, top_k=5),
      lambda x, t: decode.beam_search(model, x, max_decode_len=MAX_LEN, beam_size=2, alpha=0.6 + t),
  ]
  compiles = _Compiles()
  logging.getLogger("jax").addHandler(compiles)
  try:
    with jax.log_compiles():
      for call in calls:
        jax.block_until_ready(call(inputs, 0))
        before = list(compiles.names)
        # Other token values, another key, temperature and alpha: the same program.
        jax.block_until_ready(call(inputs[::-1], 1))
        new = [n for n in compiles.names[len(before):] if "_greedy" in n or "_sample" in n or "_beam" in n]
        assert not new, new
      assert len([n for n in compiles.names if "_greedy" in n or "_sample" in n or "_beam" in n]) <= 3
  finally:
    logging.getLogger("jax").removeHandler(compiles)


def test_decoding_runs_inside_an_outer_jit(model, inputs):
  graphdef, state = nnx.split(model)

  @jax.jit
  def predict(state, x):
    return decode.greedy(nnx.merge(graphdef, state), x, max_decode_len=MAX_LEN, eos_id=NO_EOS)

  expected = decode.greedy(model, inputs, max_decode_len=MAX_LEN, eos_id=NO_EOS)
  np.testing.assert_array_equal(predict(state, inputs), expected)


# --- decoding in bfloat16 (--decode-dtype) --------------------------------------------------------


def test_bfloat16_copy_is_near_float32_and_is_what_decoders_decode(model, inputs):
  """`with_dtype(model, "bfloat16")`: every weight in bfloat16 and bfloat16 compute; its logits stay
  near float32's, and the eval/predict decoder with dtype bfloat16 decodes exactly that copy."""
  half = with_dtype(model, "bfloat16")
  assert {str(x.dtype) for x in jax.tree.leaves(nnx.state(half))} == {"bfloat16"}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model)))  # the original is kept
  batch, _ = _reference_batch(model, [5, 6, 7, 1], [8, 9], 32)
  full, approx = forward(model, batch), forward(half, batch)
  assert approx.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(approx - full))) <= 0.05 * float(jnp.max(jnp.abs(full)))
  graphdef, params = nnx.split(model, nnx.Param)
  decoder = evaluate.Decoder(graphdef, max_decode_len=MAX_LEN, batch_size=3, dtype="bfloat16")
  np.testing.assert_array_equal(decoder(params, np.asarray(inputs)),
                                decode.greedy(half, inputs, max_decode_len=MAX_LEN))


@pytest.mark.slow
def test_eval_and_predict_decode_dtype_flag(cli, tmp_path):
  """`--decode-dtype bfloat16` on `t5mix predict` and `t5mix eval` (a workdir holding a random tiny
  model): the usual output, and results.json records the dtype."""
  config = T5Config(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2,
                    num_decoder_layers=2, dropout_rate=0.0)
  save_model_config(config, tmp_path / checkpoints.MODEL_FILE)
  checkpoints.save_params(str(tmp_path), T5(config, rngs=nnx.Rngs(0)))
  rc, out, err = cli("predict", "--workdir", tmp_path, "--task", "demo_sentiment", "--decode-dtype", "bfloat16",
                     "the movie was great .")
  assert rc == 0, err
  assert out.startswith("[0] sentiment: the movie was great .\n    -> ")
  rc, out, err = cli("eval", "--workdir", tmp_path, "--tasks", "demo_sentiment", "--max-examples", 4,
                     "--targets-length", 4, "--decode-dtype", "bfloat16")
  assert rc == 0, err
  assert "greedy, bfloat16 weights" in out
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert results["decoding"]["dtype"] == results["task_decoding"]["demo_sentiment"]["dtype"] == "bfloat16"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "models" / "flan-t5-small-kd").is_dir(), reason="needs ../shared")
def test_bfloat16_greedy_agrees_with_float32_on_the_real_model():
  """The real pretrained T5 titling 32 CNN/DailyMail articles: 30 of 32 titles are identical
  (2026-12-08: the other two part after a few tokens and go their own way). On a fine-tuned model's
  held-out tasks, benchmarks/decode.py --part dtype measures the agreement and the metrics."""
  model_dir = SHARED / "models" / "flan-t5-small-kd"
  model = T5.from_params(*load_hf_checkpoint(model_dir))
  vocab = seqio.SentencePieceVocabulary(str(model_dir / "spiece.model"), extra_ids=100)
  with open(SHARED / "data" / "cnn_dailymail" / "validation-1000.jsonl") as f:
    articles = ["summarize: " + json.loads(next(f))["article"] for _ in range(32)]
  x = evaluate.tokenize_inputs(articles, vocab, 128)
  full = np.asarray(decode.greedy(model, x, max_decode_len=32))
  half = np.asarray(decode.greedy(with_dtype(model, "bfloat16"), x, max_decode_len=32))
  assert (full == half).all(axis=1).sum() >= 28
