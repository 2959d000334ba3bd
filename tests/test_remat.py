"""model.remat and model.scan_layers: the loss and gradients of the plain model (they change only what
the backward pass keeps and how the layers compile), with dropout on, and one parameter layout, so
checkpoints, --init-from and HF import/export work either way."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5mix.hf_interop import load_hf_checkpoint, save_hf_checkpoint
from t5mix.model import T5, T5Config

CONFIG = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_heads=2, num_encoder_layers=2,
                  num_decoder_layers=3, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                  dropout_rate=0.2)


def _batch():
  rng = np.random.default_rng(0)
  tokens = lambda length: rng.integers(2, 64, (3, length)).astype(np.int32)  # noqa: E731
  batch = {"encoder_input_tokens": tokens(10), "decoder_input_tokens": tokens(6),
           "decoder_target_tokens": tokens(6)}
  batch["encoder_input_tokens"][1, 7:] = 0
  return batch


def loss_and_grads(config, params, dropout: bool):
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0))))
  batch = _batch()

  def loss_fn(params):
    logits = nnx.merge(graphdef, params)(batch, deterministic=not dropout, rngs=nnx.Rngs(dropout=jax.random.key(1)))
    targets = batch["decoder_target_tokens"][..., None]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets, axis=-1))
  return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.fixture(scope="module")
def params():
  return nnx.state(T5(CONFIG, rngs=nnx.Rngs(0)), nnx.Param)


@pytest.fixture(scope="module")
def plain(params):
  """{dropout: the plain model's (loss, grads)}, each computed when first asked for."""
  return {dropout: functools.cache(functools.partial(loss_and_grads, CONFIG, params, dropout))
          for dropout in (False, True)}


# Dropout's random bits make XLA:CPU compile ~5x longer (20-30 s each), so with dropout: slow.
@pytest.mark.parametrize("remat,scan,dropout", [
    ("full", True, False),
    pytest.param("full", True, True, marks=pytest.mark.slow),
    pytest.param("none", True, True, marks=pytest.mark.slow),
    pytest.param("dots_saveable", False, True, marks=pytest.mark.slow),
    pytest.param("full", False, True, marks=pytest.mark.slow),
])
def test_same_loss_and_gradients(params, plain, remat, scan, dropout):
  loss, grads = loss_and_grads(dataclasses.replace(CONFIG, remat=remat, scan_layers=scan), params, dropout)
  plain_loss, plain_grads = plain[dropout]()
  assert abs(float(loss) - float(plain_loss)) <= 1e-6  # with dropout: the same masks were drawn
  worst = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, plain_grads)))
  assert worst <= 1e-6


def test_scanned_model_keeps_the_per_layer_layout(params, tmp_path):
  """A scan_layers model has the plain model's parameters (one module per layer), so it loads an
  unscanned checkpoint (--init-from) or an HF import as it is, and exports as one."""
  scanned_config = dataclasses.replace(CONFIG, scan_layers=True, remat="full")
  scanned = nnx.eval_shape(lambda: T5(scanned_config, rngs=nnx.Rngs(0)))
  shapes = lambda state: {p: v.shape for p, v in nnx.to_flat_state(state)}  # noqa: E731
  assert shapes(nnx.state(scanned, nnx.Param)) == shapes(params)
  model = T5.from_params(scanned_config, nnx.to_pure_dict(params))
  save_hf_checkpoint(model, scanned_config, tmp_path)
  config, loaded = load_hf_checkpoint(tmp_path)
  restored = nnx.state(T5.from_params(config, loaded), nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, restored, params)
