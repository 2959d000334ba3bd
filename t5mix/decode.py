"""Batched autoregressive decoding with a KV cache: greedy, temperature/top-k sampling, beam search.

Each function jit-compiles once per (model structure, input shape, static options) and loops over steps with
`jax.lax.while_loop`, stopping early once every sequence has emitted EOS. The cache is a plain pytree passed
through the loop (see `T5.init_cache` / `T5.decode_step`).

`inputs` [B, L] int, right-padded with 0: the encoder input tokens for encoder-decoder models, the prompt
(the prefix-LM "inputs") for decoder-only models. Returns [B, max_decode_len] int32 tokens, EOS included, 0 after.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

EOS_ID = 1
BEAM_NEG_INF = -1.0e7  # as in t5x: finite, so scores can still be compared and divided
LENGTH_PENALTY = 0.6  # beam search's alpha, t5x's default


def greedy(model, inputs, *, max_decode_len: int, eos_id: int = EOS_ID) -> jax.Array:
  graphdef, state = nnx.split(model)
  return _greedy(graphdef, state, inputs, max_decode_len=max_decode_len, eos_id=eos_id)


def sample(model, inputs, rng, *, max_decode_len: int, temperature: float = 1.0, top_k: int = 0,
           eos_id: int = EOS_ID) -> jax.Array:
  """Samples from softmax(logits / temperature), restricted to the top_k tokens if top_k > 0.

  temperature 0 means greedy. rng: a jax.random key; step i uses fold_in(rng, i).
  """
  if temperature == 0:
    return greedy(model, inputs, max_decode_len=max_decode_len, eos_id=eos_id)
  graphdef, state = nnx.split(model)
  return _sample(graphdef, state, inputs, rng, jnp.float32(temperature), max_decode_len=max_decode_len,
                 top_k=top_k, eos_id=eos_id)


def beam_search(model, inputs, *, max_decode_len: int, beam_size: int = 4,
                alpha: float = LENGTH_PENALTY, eos_id: int = EOS_ID, return_scores: bool = False):
  """The best of `beam_size` beams by log-prob / ((5 + length) / 6)**alpha (t5x / GNMT length penalty).

  With return_scores, returns (tokens, scores [B]).
  """
  graphdef, state = nnx.split(model)
  tokens, scores = _beam_search(graphdef, state, inputs, jnp.float32(alpha), max_decode_len=max_decode_len,
                                beam_size=beam_size, eos_id=eos_id)
  return (tokens, scores) if return_scores else tokens


def _prefill(model, inputs, max_decode_len):
  """Runs the model over what precedes the first output token: (logits for it [B, V], cache)."""
  batch, in_len = inputs.shape
  if model.encoder is not None:
    segments = (inputs != 0).astype(jnp.int32)
    encoded = model.encode(inputs, segments)
    cache = model.init_cache(batch, 1 + max_decode_len, encoded, segments)
    logits, cache = model.decode_step(jnp.zeros((batch, 1), jnp.int32), cache)  # 0 = decoder start token
    return logits[:, -1], cache
  # Prefix-LM: the prompt is [0, inputs...], fully visible within itself. We right-align the prompts
  # (left padding, masked out), so every row starts generating at the same cache index; relative
  # position biases only see offsets between tokens, so the padding changes nothing.
  lengths = 1 + jnp.sum(inputs != 0, axis=1)
  prompt = jnp.concatenate([jnp.zeros((batch, 1), inputs.dtype), inputs], axis=1)
  width = in_len + 1
  source = (jnp.arange(width)[None, :] - (width - lengths)[:, None]) % width
  prompt = jnp.take_along_axis(prompt, source, axis=1)
  valid = jnp.arange(width)[None, :] >= (width - lengths)[:, None]
  cache = model.init_cache(batch, width + max_decode_len)
  logits, cache = model.decode_step(prompt, cache, valid=valid, prefix=True)
  return logits[:, -1], cache


def _decode_loop(model, inputs, max_decode_len, eos_id, choose):
  """Shared by greedy and sample: choose(step, logits [B, V]) -> tokens [B]."""
  logits, cache = _prefill(model, inputs, max_decode_len)
  batch = inputs.shape[0]

  def emit(step, logits, done, out):
    token = jnp.where(done, 0, choose(step, logits)).astype(jnp.int32)
    out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
    return token, done | (token == eos_id), out

  # The loop emits all but the last token, each followed by the model step that gives the next
  # token's logits; the last token is emitted after it, so no model step runs whose logits go unused.
  def cond(state):
    step, _, _, done, _ = state
    return (step < max_decode_len - 1) & ~jnp.all(done)

  def body(state):
    step, logits, cache, done, out = state
    token, done, out = emit(step, logits, done, out)
    logits, cache = model.decode_step(token[:, None], cache)
    return step + 1, logits[:, -1], cache, done, out

  out = jnp.zeros((batch, max_decode_len), jnp.int32)
  state = (jnp.int32(0), logits, cache, jnp.zeros((batch,), bool), out)
  step, logits, _, done, out = jax.lax.while_loop(cond, body, state)
  # If every row ended early, `done` makes this write a 0 where out already holds one.
  return emit(step, logits, done, out)[2]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_decode_len", "eos_id"))
def _greedy(graphdef, state, inputs, *, max_decode_len, eos_id):
  model = nnx.merge(graphdef, state)
  # top_k(…, 1) instead of argmax: the same first-maximum token, ~3x faster on XLA:CPU (a plain
  # reduction rather than argmax's two-operand one), which is ~10% of a small model's decode step.
  return _decode_loop(model, inputs, max_decode_len, eos_id, lambda step, logits: jax.lax.top_k(logits, 1)[1][:, 0])


@functools.partial(jax.jit, static_argnames=("graphdef", "max_decode_len", "top_k", "eos_id"))
def _sample(graphdef, state, inputs, rng, temperature, *, max_decode_len, top_k, eos_id):
  model = nnx.merge(graphdef, state)

  def choose(step, logits):
    logits = logits / temperature
    if top_k > 0:
      kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(jax.random.fold_in(rng, step), logits, axis=-1)

  return _decode_loop(model, inputs, max_decode_len, eos_id, choose)


def _length_penalty(alpha, length):
  return ((5.0 + length) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=("graphdef", "max_decode_len", "beam_size", "eos_id"))
def _beam_search(graphdef, state, inputs, alpha, *, max_decode_len, beam_size, eos_id):
  """t5x-style beam search: keep the beam_size best live (no EOS yet) and finished sequences."""
  model = nnx.merge(graphdef, state)
  batch, k = inputs.shape[0], beam_size
  logits, cache = _prefill(model, inputs, max_decode_len)
  # One copy per beam; only beam 0 is live at first, so the first step does not pick duplicates.
  logits, cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), (logits, cache))
  live_logprobs = jnp.tile(jnp.array([0.0] + [BEAM_NEG_INF] * (k - 1)), (batch, 1))
  seqs = jnp.zeros((batch, k, max_decode_len), jnp.int32)
  finished = (seqs, jnp.full((batch, k), BEAM_NEG_INF), jnp.zeros((batch, k), bool))  # seqs, scores, flags

  gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  def cond(state):
    step, _, _, live_logprobs, _, (_, fin_scores, fin_flags) = state
    # Stop when no live beam can still beat the worst finished one, even at the longest length.
    best_live = live_logprobs[:, 0] / _length_penalty(alpha, max_decode_len)
    worst_finished = jnp.where(jnp.all(fin_flags, axis=1), jnp.min(fin_scores, axis=1), BEAM_NEG_INF)
    return (step < max_decode_len) & ~jnp.all(worst_finished > best_live)

  def body(state):
    step, logits, cache, live_logprobs, live_seqs, (fin_seqs, fin_scores, fin_flags) = state
    vocab = logits.shape[-1]
    candidates = live_logprobs[:, :, None] + jax.nn.log_softmax(logits).reshape(batch, k, vocab)
    # 2k candidates: enough for k live ones even if k of them end in EOS.
    top_logprobs, top_ids = jax.lax.top_k(candidates.reshape(batch, k * vocab), 2 * k)
    top_beams, top_tokens = top_ids // vocab, top_ids % vocab
    top_seqs = gather(live_seqs, top_beams)
    top_seqs = jax.lax.dynamic_update_slice_in_dim(top_seqs, top_tokens[:, :, None], step, axis=2)
    is_eos = top_tokens == eos_id

    live_logprobs, live_idx = jax.lax.top_k(jnp.where(is_eos, BEAM_NEG_INF, top_logprobs), k)
    live_seqs, live_tokens = gather(top_seqs, live_idx), gather(top_tokens, live_idx)
    live_beams = gather(top_beams, live_idx)

    new_scores = jnp.where(is_eos, top_logprobs / _length_penalty(alpha, step + 1), BEAM_NEG_INF)
    all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)
    fin_scores, fin_idx = jax.lax.top_k(all_scores, k)
    fin_seqs = gather(jnp.concatenate([fin_seqs, top_seqs], axis=1), fin_idx)
    fin_flags = gather(jnp.concatenate([fin_flags, is_eos], axis=1), fin_idx)

    # Reorder the cache to follow the beams the live sequences came from, then feed their new tokens.
    # Only the self-attention keys and values differ between the beams of a row: the cross-attention
    # ones, the masks and the index are copies of the row's prefill, so they are not gathered (for
    # 128 input tokens that copy was most of a step's memory traffic).
    origin = (jnp.arange(batch)[:, None] * k + live_beams).reshape(-1)
    cache = {**cache, "layers": [{**layer, "k": layer["k"][origin], "v": layer["v"][origin]}
                                 for layer in cache["layers"]]}
    logits, cache = model.decode_step(live_tokens.reshape(-1, 1), cache)
    return step + 1, logits[:, -1], cache, live_logprobs, live_seqs, (fin_seqs, fin_scores, fin_flags)

  state = (jnp.int32(0), logits, cache, live_logprobs, seqs, finished)
  _, _, _, live_logprobs, live_seqs, (fin_seqs, fin_scores, fin_flags) = jax.lax.while_loop(cond, body, state)
  # A row with nothing finished (no EOS within max_decode_len) falls back to its live beams.
  any_finished = jnp.any(fin_flags, axis=1)
  tokens = jnp.where(any_finished[:, None], fin_seqs[:, 0], live_seqs[:, 0])
  scores = jnp.where(any_finished, fin_scores[:, 0], live_logprobs[:, 0] / _length_penalty(alpha, max_decode_len))
  return tokens, scores
