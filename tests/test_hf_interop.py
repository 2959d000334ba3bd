import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t5mix.errors import UserError
from t5mix.hf_interop import load_hf_checkpoint, save_hf_checkpoint
from t5mix.model import T5, T5Config

# T5 v1.0 (relu, tied, logits rescaled) and v1.1 / flan-t5 (gated-gelu, untied) settings.
VARIANTS = {"v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
            "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}
SIZES = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=3,
             relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0)


@nnx.jit
def forward(model, batch):
  return model(batch)


def example_batch():
  rng = np.random.default_rng(0)
  enc = rng.integers(2, 128, (3, 30)).astype(np.int32)
  enc[1, 20:] = 0
  enc[2, 5:] = 0
  dec = rng.integers(2, 128, (3, 25)).astype(np.int32)
  dec[:, 0] = 0
  return enc, dec


def hf_model(variant):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  s = {**SIZES, **VARIANTS[variant]}
  config = transformers.T5Config(
      vocab_size=s["vocab_size"], d_model=s["d_model"], d_kv=s["d_kv"], d_ff=s["d_ff"], num_heads=s["num_heads"],
      num_layers=s["num_encoder_layers"], num_decoder_layers=s["num_decoder_layers"],
      relative_attention_num_buckets=s["relative_attention_num_buckets"],
      relative_attention_max_distance=s["relative_attention_max_distance"], dropout_rate=0.0,
      feed_forward_proj=s["feed_forward_proj"], tie_word_embeddings=s["tie_word_embeddings"])
  return transformers.T5ForConditionalGeneration(config).eval()


def hf_logits(model, enc, dec):
  import torch
  with torch.no_grad():
    return model(input_ids=torch.tensor(enc, dtype=torch.long), attention_mask=torch.tensor(enc != 0),
                 decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_huggingface(variant, tmp_path):
  hf = hf_model(variant)
  hf.save_pretrained(tmp_path, safe_serialization=True)
  config, params = load_hf_checkpoint(tmp_path)
  assert config == T5Config(**{**SIZES, **VARIANTS[variant]})
  enc, dec = example_batch()
  ours = forward(T5.from_params(config, params), {"encoder_input_tokens": enc, "decoder_input_tokens": dec})
  assert float(np.max(np.abs(np.asarray(ours) - hf_logits(hf, enc, dec)))) <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_huggingface_loads_our_export(variant, tmp_path):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  config = T5Config(**{**SIZES, **VARIANTS[variant]})
  model = T5(config, rngs=nnx.Rngs(0))
  save_hf_checkpoint(model, config, tmp_path)
  hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
  enc, dec = example_batch()
  ours = forward(model, {"encoder_input_tokens": enc, "decoder_input_tokens": dec})
  assert float(np.max(np.abs(np.asarray(ours) - hf_logits(hf, enc, dec)))) <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_import_round_trip_is_lossless(variant, tmp_path):
  config = T5Config(**{**SIZES, **VARIANTS[variant]})
  model = T5(config, rngs=nnx.Rngs(0))
  vocab = tmp_path / "my.model"
  vocab.write_bytes(b"not really sentencepiece")
  save_hf_checkpoint(model, config, tmp_path / "hf", vocab_file=vocab)
  assert (tmp_path / "hf" / "spiece.model").read_bytes() == vocab.read_bytes()
  config2, params = load_hf_checkpoint(tmp_path / "hf", copy_vocab_to=tmp_path / "copied")
  assert config2 == config
  assert (tmp_path / "copied" / "spiece.model").read_bytes() == vocab.read_bytes()
  original = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert jax.tree.structure(params) == jax.tree.structure(original)
  for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  enc, dec = example_batch()
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec}
  np.testing.assert_array_equal(forward(model, batch), forward(T5.from_params(config2, params), batch))
  # Params (not only models) can be exported too.
  save_hf_checkpoint(params, config2, tmp_path / "hf2")
  assert (tmp_path / "hf2" / "model.safetensors").read_bytes() == (tmp_path / "hf" / "model.safetensors").read_bytes()


def test_bfloat16_checkpoints_load_as_float32(tmp_path):
  from safetensors.flax import load_file, save_file
  config = T5Config(**SIZES)
  save_hf_checkpoint(T5(config, rngs=nnx.Rngs(0)), config, tmp_path)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  save_file({k: v.astype(jnp.bfloat16) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"),
            metadata={"format": "pt"})
  _, params = load_hf_checkpoint(tmp_path)
  embedding = params["embedding"]
  assert embedding.dtype == np.float32
  np.testing.assert_array_equal(embedding, np.asarray(tensors["shared.weight"].astype(jnp.bfloat16), np.float32))


def test_errors(tmp_path):
  with pytest.raises(UserError, match="config.json"):
    load_hf_checkpoint(tmp_path)
  config = T5Config(**SIZES)
  save_hf_checkpoint(T5(config, rngs=nnx.Rngs(0)), config, tmp_path)
  hf_config = json.loads((tmp_path / "config.json").read_text())

  (tmp_path / "config.json").write_text(json.dumps({**hf_config, "feed_forward_proj": "gated-silu"}))
  with pytest.raises(UserError, match="gated-silu"):
    load_hf_checkpoint(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**hf_config, "num_decoder_layers": 4}))
  with pytest.raises(UserError, match=r"tensor decoder\.block\.3\..* is missing"):
    load_hf_checkpoint(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**hf_config, "d_ff": 48}))
  with pytest.raises(UserError, match="shape"):
    load_hf_checkpoint(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(hf_config))
  (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
  with pytest.raises(UserError, match="only safetensors"):
    load_hf_checkpoint(tmp_path)

  decoder_only = T5Config(**{**SIZES, "architecture": "decoder_only"})
  with pytest.raises(UserError, match="encoder_decoder"):
    save_hf_checkpoint(T5(decoder_only, rngs=nnx.Rngs(0)), decoder_only, tmp_path / "x")
  with pytest.raises(UserError, match="missing"):
    save_hf_checkpoint({"embedding": jnp.zeros((128, 32))}, config, tmp_path / "y")
