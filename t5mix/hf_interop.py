"""HuggingFace T5 checkpoints (config.json + model.safetensors) to and from our parameters.

Covers T5 v1.0 (relu, tied embeddings), v1.1, flan-t5 and mT5 (gated-gelu, untied lm_head). Weights are read
with `safetensors` only: never torch.load / pickle, which can run code from the file. A checkpoint is a local
directory or a HuggingFace Hub name, which `huggingface_hub` resolves through its cache.

Params are the nested dict of `nnx.to_pure_dict(nnx.state(model, nnx.Param))`; `T5.from_params` builds a model.
"""

import json
import math
import os
import pathlib
import shutil

import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from t5mix.errors import UserError
from t5mix.model import T5, T5Config
from t5mix.vocab import EXTRA_IDS, WORKDIR_VOCAB_FILE

VOCAB_FILE = WORKDIR_VOCAB_FILE  # HF's name, also a workdir's
# What import reads from a Hub repository (never the pickled *.bin weights); tokenizer files for
# anyone who uses the cached copy with transformers.
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", VOCAB_FILE,
             "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"]
# transformers' T5Tokenizer over spiece.model: T5's special tokens and seqio's sentinels, the
# same ids as t5mix's SentencePiece vocabularies.
_SPECIAL_TOKENS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
_TOKENIZER_CONFIG = {"tokenizer_class": "T5Tokenizer", **_SPECIAL_TOKENS, "extra_ids": EXTRA_IDS}
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
    try:
      # The flax framework reads bfloat16 too (numpy has no bfloat16).
      with safe_open(str(f), framework="flax") as st:
        for name in st.keys():
          tensors[name] = np.asarray(st.get_tensor(name), np.float32)
    except SafetensorError as e:
      raise UserError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
  return tensors


def checkpoint_dir(name: str) -> pathlib.Path:
  """The directory of a checkpoint: `name` itself, or for a Hub name (`org/name`, `name`,
  optionally `@revision`) that is not a local path, its snapshot in huggingface_hub's cache.

  Missing files are downloaded unless HF_HUB_OFFLINE is set; HF_HOME / HF_HUB_CACHE say where
  the cache is.
  """
  import huggingface_hub
  from huggingface_hub import errors

  repo_id, _, revision = name.partition("@")
  try:
    huggingface_hub.utils.validate_repo_id(repo_id)
  except errors.HFValidationError:  # a path (load_hf_checkpoint says if it is missing)
    return pathlib.Path(name)
  if os.path.exists(name):
    return pathlib.Path(name)
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(repo_id, revision=revision or None,
                                                          allow_patterns=HUB_FILES))
  except errors.LocalEntryNotFoundError:  # offline, or the Hub unreachable, and not in the cache
    cache = huggingface_hub.constants.HF_HUB_CACHE
    download = f"huggingface-cli download {repo_id}" + (f" --revision {revision}" if revision else "")
    raise UserError(
        f"{name}: not a local directory, and not in the HuggingFace cache {cache} (the Hub is "
        f"unreachable or HF_HUB_OFFLINE is set); run `{download}` on a machine with internet and "
        f"copy its cache to {cache} (or point HF_HUB_CACHE at the copy), or pass a local checkpoint "
        f"directory") from None
  except errors.RepositoryNotFoundError:
    raise UserError(f"{name}: not a local directory, nor a model on the HuggingFace Hub that you may "
                    f"read (a private or gated one needs `huggingface-cli login`)") from None
  except errors.RevisionNotFoundError:
    raise UserError(f"{name}: the HuggingFace Hub model {repo_id} has no revision {revision!r}") from None
  except OSError as e:  # other HTTP and connection errors
    raise UserError(f"{name}: cannot download from the HuggingFace Hub ({str(e).splitlines()[0]})") from None


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
    # The contents only: not the source's mode (a shared or cached copy may be read-only).
    shutil.copyfile(hf_dir / VOCAB_FILE, pathlib.Path(copy_vocab_to) / VOCAB_FILE)
  return config, nnx.to_pure_dict(nnx.from_flat_state(flat))


def save_hf_checkpoint(model_or_params, config: T5Config, hf_dir, *, vocab_file=None) -> None:
  """Writes config.json and model.safetensors (float32) in HF T5ForConditionalGeneration layout.

  model_or_params: a `T5` or its params dict. vocab_file: a spiece.model to copy alongside, with
  the tokenizer files that make the directory loadable by transformers' AutoTokenizer.
  """
  if config.architecture != "encoder_decoder":
    raise UserError("only encoder_decoder models can be exported to the HuggingFace T5 layout")
  if vocab_file is not None and not pathlib.Path(vocab_file).is_file():
    raise UserError(f"{vocab_file}: vocabulary file not found")
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
  weights = hf_dir / "model.safetensors"
  save_file(tensors, str(weights), metadata={"format": "pt"})  # transformers wants "format"
  # save_file renames a private (0600) temporary file into place; give it the mode of a new file.
  umask = os.umask(0)
  os.umask(umask)
  weights.chmod(0o666 & ~umask)
  if vocab_file is not None:
    shutil.copyfile(vocab_file, hf_dir / VOCAB_FILE)
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2) + "\n")
    (hf_dir / "special_tokens_map.json").write_text(json.dumps(_SPECIAL_TOKENS, indent=2) + "\n")
