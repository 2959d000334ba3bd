import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5mix.errors import UserError
from t5mix.model import T5, T5Config, load_model_config

ARCHS = ["encoder_decoder", "decoder_only"]


def tiny(**overrides):
  base = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
              relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0)
  return T5Config(**{**base, **overrides})


@nnx.jit
def forward(model, batch):  # jit: much faster than running the tiny model op by op
  return model(batch)


def token_loss(logits, targets):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]


# --- config --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "small", "base", "large"])
def test_named_configs_load(name):
  config = load_model_config(name)
  assert config.architecture == "encoder_decoder"
  assert config.feed_forward_proj == "gated-gelu" and not config.tie_word_embeddings


def test_t5_1_1_small_has_the_published_parameter_count():
  model = nnx.eval_shape(lambda: T5(load_model_config("small"), rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model))) == 76_961_152  # google/t5-v1_1-small


def test_config_errors(tmp_path):
  with pytest.raises(UserError, match="'d_modle'"):
    T5Config.from_dict({**tiny().to_dict(), "d_modle": 3})
  with pytest.raises(UserError, match="feed_forward_proj"):
    tiny(feed_forward_proj="swiglu")
  with pytest.raises(UserError, match="num_heads"):
    tiny(num_heads="4")
  with pytest.raises(UserError, match="'remat' must be one of none, dots_saveable, full"):
    tiny(remat="yes")
  with pytest.raises(UserError, match="'scan_layers' must be a bool"):
    tiny(scan_layers="true")
  with pytest.raises(UserError, match="unknown model config 'huge'"):
    load_model_config("huge")
  path = tmp_path / "m.yaml"
  path.write_text("vocab_size: 8\nd_model: 8\nfoo: 1\n")
  with pytest.raises(UserError, match="m.yaml: unknown key 'foo'"):
    load_model_config(str(path))
  path.write_text("vocab_size: 8\n")
  with pytest.raises(UserError, match="m.yaml"):
    load_model_config(str(path))
  path.write_text("\n".join(f"{k}: {v}" for k, v in tiny(dropout_rate=0.1).to_dict().items()) + "\n")
  assert load_model_config(str(path)) == tiny(dropout_rate=0.1)


# --- structure -------------------------------------------------------------------------------------------------


def test_param_paths_and_logical_axes():
  model = T5(tiny(), rngs=nnx.Rngs(0))
  flat = {".".join(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for name in ["embedding", "lm_head", "encoder.relpos_bias", "encoder.layers.0.self_attention.query",
               "decoder.layers.1.cross_attention.out", "decoder.layers.1.mlp.wi_0", "decoder.final_norm.scale"]:
    assert name in flat
  for name, v in flat.items():
    axes = v.get_metadata()["out_sharding"]
    assert len(axes) == v.shape.__len__() and v.dtype == jnp.float32, name
  assert flat["encoder.layers.0.self_attention.query"].get_metadata()["out_sharding"] == ("embed", "heads", "kv")
  # Every variable is a Param: nnx.split(model, nnx.Param) captures the whole model.
  assert len(jax.tree.leaves(nnx.state(model))) == len(flat)


def test_decoder_only_and_tied_variants_have_no_extra_params():
  flat = nnx.to_flat_state(nnx.state(T5(tiny(architecture="decoder_only", tie_word_embeddings=True), rngs=nnx.Rngs(0))))
  names = {".".join(map(str, p)) for p, _ in flat}
  assert not any(n.startswith(("encoder", "lm_head")) or "cross" in n for n in names)


def test_initialisation_scales_follow_t5():
  config = tiny(d_model=64, d_kv=16, d_ff=128, num_encoder_layers=4)
  model = T5(config, rngs=nnx.Rngs(0))
  std = lambda v: float(jnp.std(v[...]))
  attention = model.encoder.layers[0].self_attention
  assert std(model.embedding) == pytest.approx(1.0, rel=0.1)
  assert std(attention.query) == pytest.approx((64 * 16) ** -0.5, rel=0.1)
  assert std(attention.key) == pytest.approx(64**-0.5, rel=0.1)
  assert std(attention.out) == pytest.approx(64**-0.5, rel=0.1)
  assert std(model.encoder.layers[0].mlp.wo) == pytest.approx(128**-0.5, rel=0.1)
  assert float(jnp.min(model.decoder.final_norm.scale[...])) == 1.0


# --- forward -------------------------------------------------------------------------------------------------------


def test_forward_shapes_and_dropout():
  model = T5(tiny(dropout_rate=0.3), rngs=nnx.Rngs(0))
  batch = {"encoder_input_tokens": jnp.array([[5, 6, 7, 1, 0]]), "decoder_input_tokens": jnp.array([[0, 8, 9, 10]])}
  train_forward = nnx.jit(lambda model, batch, key: model(batch, deterministic=False, rngs=nnx.Rngs(dropout=key)))
  logits = forward(model, batch)
  assert logits.shape == (1, 4, 96) and logits.dtype == jnp.float32
  a = train_forward(model, batch, jax.random.key(1))
  b = train_forward(model, batch, jax.random.key(1))
  c = train_forward(model, batch, jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, logits) and not np.allclose(a, c)
  with pytest.raises(ValueError, match="rngs"):
    model(batch, deterministic=False)


def test_training_step_recipe():
  """The functional pattern a training loop uses: split once, merge inside jit, dropout from a key."""
  model = T5(tiny(dropout_rate=0.1), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  batch = {"encoder_input_tokens": jnp.array([[5, 6, 7, 1, 0]]), "decoder_input_tokens": jnp.array([[0, 8, 9, 10]]),
           "decoder_target_tokens": jnp.array([[8, 9, 10, 1]]), "decoder_loss_weights": jnp.ones((1, 4))}

  def loss_fn(params, batch, key):
    logits = nnx.merge(graphdef, params)(batch, deterministic=False, rngs=nnx.Rngs(dropout=key))
    return jnp.sum(token_loss(logits, batch["decoder_target_tokens"]) * batch["decoder_loss_weights"])

  loss_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  loss, grads = loss_and_grad(params, batch, jax.random.key(0))
  assert np.isfinite(loss)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  new_params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  nnx.update(model, new_params)  # write params back into the model object
  assert float(loss_and_grad(new_params, batch, jax.random.key(0))[0]) < float(loss)


def test_bfloat16_compute_is_close_to_float32():
  batch = {"encoder_input_tokens": jnp.array([[5, 6, 7, 8, 9, 1, 0, 0]] * 2),
           "decoder_input_tokens": jnp.array([[0, 8, 9, 10, 11, 12]] * 2)}
  f32 = T5(tiny(), rngs=nnx.Rngs(0))
  bf16 = T5.from_params(tiny(dtype="bfloat16"), nnx.to_pure_dict(nnx.state(f32)))
  a, b = forward(f32, batch), forward(bf16, batch)
  assert b.dtype == jnp.float32 and jax.tree.leaves(nnx.state(bf16))[0].dtype == jnp.float32
  assert float(jnp.max(jnp.abs(a - b))) < 0.05 * float(jnp.max(jnp.abs(a)))
  assert float(jnp.mean(jnp.argmax(a, -1) == jnp.argmax(b, -1))) >= 0.9


# --- packing ---------------------------------------------------------------------------------------------------------


def _pack(examples, length):
  """seqio-style packing of lists into (tokens, segment_ids, positions) rows of `length`."""
  tokens, segments, positions = (np.zeros(length, np.int32) for _ in range(3))
  start = 0
  for i, ex in enumerate(examples):
    tokens[start:start + len(ex)] = ex
    segments[start:start + len(ex)] = i + 1
    positions[start:start + len(ex)] = np.arange(len(ex))
    start += len(ex)
  return tokens, segments, positions


def _shift(targets):
  return [0] + list(targets[:-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_batch_gives_the_same_per_token_loss(arch):
  model = T5(tiny(architecture=arch), rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  inputs = [rng.integers(2, 96, n) for n in (5, 3, 6)]
  targets = [list(rng.integers(2, 96, n - 1)) + [1] for n in (4, 2, 3)]
  if arch == "encoder_decoder":
    alone = [{"encoder_input_tokens": _pack([x], 16)[0], "decoder_input_tokens": _pack([_shift(t)], 12)[0],
              "decoder_target_tokens": _pack([t], 12)[0]} for x, t in zip(inputs, targets)]
    enc, enc_seg, enc_pos = _pack(inputs, 16)
    dec_in, dec_seg, dec_pos = _pack([_shift(t) for t in targets], 12)
    packed = {"encoder_input_tokens": enc, "encoder_segment_ids": enc_seg, "encoder_positions": enc_pos,
              "decoder_input_tokens": dec_in, "decoder_target_tokens": _pack(targets, 12)[0],
              "decoder_segment_ids": dec_seg, "decoder_positions": dec_pos}
  else:  # PrefixLMFeatureConverter: targets = inputs + targets, prefix = inputs plus one position
    full = [list(x) + t for x, t in zip(inputs, targets)]
    prefix = [[1] * (len(x) + 1) + [0] * (len(t) - 1) for x, t in zip(inputs, targets)]
    alone = [{"decoder_input_tokens": _pack([_shift(f)], 32)[0], "decoder_target_tokens": _pack([f], 32)[0],
              "decoder_causal_attention": _pack([p], 32)[0]} for f, p in zip(full, prefix)]
    dec_in, dec_seg, dec_pos = _pack([_shift(f) for f in full], 32)
    packed = {"decoder_input_tokens": dec_in, "decoder_target_tokens": _pack(full, 32)[0],
              "decoder_causal_attention": _pack(prefix, 32)[0], "decoder_segment_ids": dec_seg,
              "decoder_positions": dec_pos}
  add_batch_dim = lambda b: {k: jnp.asarray(v)[None] for k, v in b.items()}
  packed = add_batch_dim(packed)
  packed_loss = token_loss(forward(model, packed), packed["decoder_target_tokens"])[0]
  start = 0
  for example in map(add_batch_dim, alone):
    n = int(jnp.sum(example["decoder_target_tokens"] != 0))
    loss = token_loss(forward(model, example), example["decoder_target_tokens"])[0, :n]
    np.testing.assert_allclose(packed_loss[start:start + n], loss, atol=1e-5, rtol=0)
    start += n


# --- prefix LM -------------------------------------------------------------------------------------------------------


def test_prefix_lm_visibility():
  model = T5(tiny(architecture="decoder_only"), rngs=nnx.Rngs(2))
  inputs, targets = [11, 12, 13, 14], [21, 22, 23, 24, 1]
  full = inputs + targets

  def logits(full):
    batch = {"decoder_input_tokens": jnp.array([_shift(full)]),
             "decoder_causal_attention": jnp.array([[1] * (len(inputs) + 1) + [0] * (len(targets) - 1)])}
    return np.asarray(forward(model, batch)[0])

  base = logits(full)
  for j in range(len(targets) - 1):  # change target j: it is fed at position len(inputs) + 1 + j
    changed = list(full)
    changed[len(inputs) + j] = 50
    out = logits(changed)
    fed_at = len(inputs) + 1 + j
    np.testing.assert_array_equal(out[:fed_at], base[:fed_at])
    assert not np.any(np.all(np.isclose(out[fed_at:], base[fed_at:]), axis=-1))
  for i in range(len(inputs)):  # the prefix is fully visible: an input token changes every position
    changed = list(full)
    changed[i] = 50
    assert not np.any(np.all(np.isclose(logits(changed), base), axis=-1))
