"""HuggingFace T5 directories (or Hub names) ↔ t5mix workdirs (`t5mix import-hf` / `t5mix export-hf`).

An imported workdir holds `model.yaml`, the vocabulary as `spiece.model` (when the HF directory
has one) and a step-0 checkpoint of parameters only, so `t5mix train --init-from WORKDIR` and
`t5mix eval` can use it like any trained workdir.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp
from flax import nnx

from t5mix import hf_interop
from t5mix.errors import UserError
from t5mix.model import T5, T5Config, load_model_config, save_model_config


def import_hf(hf_dir: str, workdir: str) -> str:
  """Writes a t5mix workdir from a HuggingFace T5 directory or Hub name; returns the checkpoint path."""
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise UserError(f"{workdir}: already holds checkpoints; import into a new workdir")
  config, params = hf_interop.load_hf_checkpoint(hf_interop.checkpoint_dir(hf_dir), copy_vocab_to=workdir)
  os.makedirs(workdir, exist_ok=True)
  model = T5.from_params(config, params)
  _, state = nnx.split(model, nnx.Param)
  save_model_config(config, os.path.join(workdir, "model.yaml"))
  manager = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"))
  manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"step": 0, "params": state})))
  manager.wait_until_finished()
  return os.path.join(ckpt_dir, "0")


def load_workdir_params(workdir: str, checkpoint: str | None = None) -> tuple[T5Config, T5]:
  """The model of a workdir (model.yaml) with the parameters of a checkpoint (default: latest)."""
  from t5mix.train import restore_params  # train owns the checkpoint layout
  model_yaml = os.path.join(workdir, "model.yaml")
  if not os.path.exists(model_yaml):
    raise UserError(f"{workdir}: not a t5mix workdir (no model.yaml)")
  config = load_model_config(model_yaml)
  abstract = nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  path = os.path.join(workdir, "checkpoints", checkpoint) if checkpoint else workdir
  params = restore_params(path, abstract_params)
  return config, nnx.merge(graphdef, params)


def export_hf(workdir: str, out_dir: str, checkpoint: str | None = None,
              vocab_file: str | None = None) -> None:
  """Writes config.json + model.safetensors (+ spiece.model and tokenizer files) for HuggingFace T5."""
  config, model = load_workdir_params(workdir, checkpoint)
  if config.adapter_size:
    raise UserError(f"{workdir}: the model has adapter layers, which HuggingFace T5 does not have; "
                    f"evaluate it with t5mix (LoRA, by contrast, is folded into the weights on export)")
  from t5mix import peft
  model = peft.merge_lora_model(model)  # LoRA folded into the weights (same outputs)
  config = model.config
  if vocab_file is None:
    candidate = os.path.join(workdir, hf_interop.VOCAB_FILE)
    vocab_file = candidate if os.path.exists(candidate) else None
  hf_interop.save_hf_checkpoint(model, config, out_dir, vocab_file=vocab_file)
