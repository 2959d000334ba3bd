"""HuggingFace T5 checkpoints (config.json + model.safetensors) to and from our parameters.

Covers T5 v1.0 (relu, tied embeddings), v1.1, flan-t5 and mT5 (gated-gelu, untied lm_head). Weights are read
with `safetensors` only: never torch.load / pickle, which can run code from the file.

Params are the nested dict of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`; `T5.from_params` builds a model.
"""

import json
import math
import pathlib
import shutil

import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from t5mix.errors import UserError
from t5mix.model import T5, T5Config

VOCAB_FILE = "spiece.model"
# Copies of `shared.weight` that HF may or may not write next to it.
_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _name_map(config: T5Config) -> dict:
  """Our param path (a tuple) -> (HF tensor name, number of leading 'input' axes, or None to copy as is).

  A torch Linear weight is [out, in]; ours is [*in_axes, *out_axes], e.g. query [embed, heads, kv] and
  out [heads, kv, embed]; so ours = hf.T.reshape(our_shape) and hf = ours.reshape(prod(in_axes), -1).T.
  """
  gated = config.feed_forward_proj == "gated-gelu"
  names = {("embedding",): ("shared.weight", None)}
  if not config.tie_word_embeddings:
    names[("lm_head",)] = ("lm_head.weight", 1)
  stacks = [("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)]
  for stack, num_layers in stacks:
    names[(stack, "relpos_bias")] = (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", None)
    names[(stack, "final_norm", "scale")] = (f"{stack}.final_layer_norm.weight", None)
    for i in range(num_layers):
      hf = f"{stack}.block.{i}.layer"
      attentions = [("self_attention", f"{hf}.0.SelfAttention", f"{hf}.0.layer_norm")]
      if stack == "decoder":
        attentions.append(("cross_attention", f"{hf}.1.EncDecAttention", f"{hf}.1.layer_norm"))
      for ours, hf_attention, hf_norm in attentions:
        names[(stack, "layers", i, f"{ours}_norm", "scale")] = (f"{hf_norm}.weight", None)
        for proj, hf_proj, n_in in [("query", "q", 1), ("key", "k", 1), ("value", "v", 1), ("out", "o", 2)]:
          names[(stack, "layers", i, ours, proj)] = (f"{hf_attention}.{hf_proj}.weight", n_in)
      mlp = len(attentions)
      names[(stack, "layers", i, "mlp_norm", "scale")] = (f"{hf}.{mlp}.layer_norm.weight", None)
      for w in ["wi_0", "wi_1", "wo"] if gated else ["wi", "wo"]:
        names[(stack, "layers", i, "mlp", w)] = (f"{hf}.{mlp}.DenseReluDense.{w}.weight", 1)
  return names


def _config_from_hf(d: dict, source: str) -> T5Config:
  if d.get("model_type", "t5") not in ("t5", "mt5"):
    raise UserError(f"{source}: model_type {d.get('model_type')!r} is not supported (only t5, mt5)")
  if not d.get("is_encoder_decoder", True):
    raise UserError(f"{source}: only encoder-decoder T5 checkpoints are supported")
  proj = d.get("feed_forward_proj", "relu")
  if proj not in ("relu", "gated-gelu"):
    raise UserError(f"{source}: feed_forward_proj {proj!r} is not supported (only relu, gated-gelu)")
  try:
    return T5Config(
        vocab_size=d["vocab_size"],
        d_model=d["d_model"],
        d_kv=d["d_kv"],
        d_ff=d["d_ff"],
        num_heads=d["num_heads"],
        num_encoder_layers=d["num_layers"],
        num_decoder_layers=d.get("num_decoder_layers") or d["num_layers"],
        relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
        dropout_rate=float(d.get("dropout_rate", 0.1)),
        layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
        feed_forward_proj=proj,
        tie_word_embeddings=d.get("tie_word_embeddings", True),  # HF's default
    )
  except KeyError as e:
    raise UserError(f"{source}: missing key {e}") from None


def _config_to_hf(config: T5Config) -> dict:
  return {
      "architectures": ["T5ForConditionalGeneration"],
      "model_type": "t5",
      "vocab_size": config.vocab_size,
      "d_model": config.d_model,
      "d_kv": config.d_kv,
      "d_ff": config.d_ff,
      "num_heads": config.num_heads,
      "num_layers": config.num_encoder_layers,
      "num_decoder_layers": config.num_decoder_layers,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "dropout_rate": config.dropout_rate,
      "layer_norm_epsilon": config.layer_norm_epsilon,
      "initializer_factor": 1.0,
      "feed_forward_proj": config.feed_forward_proj,
      "tie_word_embeddings": config.tie_word_embeddings,
      "is_encoder_decoder": True,
      "use_cache": True,
      "pad_token_id": 0,
      "eos_token_id": 1,
      "decoder_start_token_id": 0,
      "torch_dtype": "float32",
  }


def _read_tensors(hf_dir: pathlib.Path) -> dict:
  """All tensors as float32 numpy arrays, from model.safetensors or a sharded index."""
  index = hf_dir / "model.safetensors.index.json"
  if (hf_dir / "model.safetensors").exists():
    files = [hf_dir / "model.safetensors"]
  elif index.exists():
    files = [hf_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
  elif list(hf_dir.glob("*.bin")):
    raise UserError(f"{hf_dir}: only safetensors checkpoints are supported (found a pickled .bin); "
                    "re-save it with save_pretrained(dir, safe_serialization=True)")
  else:
    raise UserError(f"{hf_dir}: no model.safetensors found")
  tensors = {}
  for f in files:
    if not f.exists():
      raise UserError(f"{f}: file not found (listed in {index.name})")
    # The flax framework reads bfloat16 too (numpy has no bfloat16).
    with safe_open(str(f), framework="flax") as st:
      for name in st.keys():
        tensors[name] = np.asarray(st.get_tensor(name), np.float32)
  return tensors


def load_hf_checkpoint(hf_dir, *, copy_vocab_to=None) -> tuple[T5Config, dict]:
  """(config, params) from a HF T5 directory; `T5.from_params(config, params)` makes the model.

  copy_vocab_to: a directory to copy the checkpoint's spiece.model into, if there is one.
  """
  hf_dir = pathlib.Path(hf_dir)
  config_file = hf_dir / "config.json"
  if not config_file.exists():
    raise UserError(f"{config_file}: file not found (is {hf_dir} a HuggingFace T5 checkpoint directory?)")
  try:
    config = _config_from_hf(json.loads(config_file.read_text()), str(config_file))
  except json.JSONDecodeError as e:
    raise UserError(f"{config_file}: invalid JSON: {e}") from None
  tensors = _read_tensors(hf_dir)
  if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:
    tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
  ignored = set(_TIED_COPIES) | ({"lm_head.weight"} if config.tie_word_embeddings else set())

  flat = {}
  names = _name_map(config)
  abstract = nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0)))
  shapes = {path: v.shape for path, v in nnx.to_flat_state(nnx.state(abstract))}
  for path, (name, n_in) in names.items():
    if name not in tensors:
      raise UserError(f"{hf_dir}: tensor {name} is missing from the checkpoint")
    x = tensors[name]
    x = x if n_in is None else x.T
    if math.prod(x.shape) != math.prod(shapes[path]):
      raise UserError(f"{hf_dir}: tensor {name} has shape {tensors[name].shape}, which does not fit {config}")
    flat[path] = x.reshape(shapes[path])
  unexpected = sorted(set(tensors) - {name for name, _ in names.values()} - ignored)
  if unexpected:
    raise UserError(f"{hf_dir}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all); "
                    "is this a T5ForConditionalGeneration checkpoint?")

  if copy_vocab_to is not None and (hf_dir / VOCAB_FILE).exists():
    pathlib.Path(copy_vocab_to).mkdir(parents=True, exist_ok=True)
    shutil.copy(hf_dir / VOCAB_FILE, pathlib.Path(copy_vocab_to) / VOCAB_FILE)
  return config, nnx.to_pure_dict(nnx.from_flat_state(flat))


def save_hf_checkpoint(model_or_params, config: T5Config, hf_dir, *, vocab_file=None) -> None:
  """Writes config.json and model.safetensors (float32) in HF T5ForConditionalGeneration layout.

  model_or_params: a `T5` or its params dict. vocab_file: a spiece.model to copy alongside.
  """
  if config.architecture != "encoder_decoder":
    raise UserError("only encoder_decoder models can be exported to the HuggingFace T5 layout")
  params = model_or_params
  if isinstance(model_or_params, nnx.Module):
    params = nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
  flat = {path: np.asarray(v, np.float32) for path, v in nnx.to_flat_state(nnx.State(params))}
  tensors = {}
  for path, (name, n_in) in _name_map(config).items():
    if path not in flat:
      raise UserError(f"parameter {'.'.join(map(str, path))} is missing; does the model match the config?")
    x = flat[path]
    tensors[name] = np.ascontiguousarray(x if n_in is None else x.reshape(math.prod(x.shape[:n_in]), -1).T)
  hf_dir = pathlib.Path(hf_dir)
  hf_dir.mkdir(parents=True, exist_ok=True)
  (hf_dir / "config.json").write_text(json.dumps(_config_to_hf(config), indent=2) + "\n")
  save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})  # transformers wants "format"
  if vocab_file is not None:
    if not pathlib.Path(vocab_file).exists():
      raise UserError(f"{vocab_file}: vocabulary file not found")
    shutil.copy(vocab_file, hf_dir / VOCAB_FILE)
