"""HuggingFace T5 directories (or Hub names) ↔ t5mix workdirs (`t5mix import-hf` / `t5mix export-hf`).

An imported workdir holds `model.yaml`, the vocabulary as `spiece.model` (when the HF directory
has one) and a step-0 checkpoint of parameters only, so `t5mix train --init-from WORKDIR` and
`t5mix eval` can use it like any trained workdir.
"""

from __future__ import annotations

import os

from t5mix import checkpoints, hf_interop
from t5mix.errors import UserError
from t5mix.model import T5, merge_lora_model, save_model_config


def import_hf(hf_dir: str, workdir: str) -> str:
  """Writes a t5mix workdir from a HuggingFace T5 directory or Hub name; returns the checkpoint path."""
  if checkpoints.steps(workdir) or checkpoints.partial_writes(workdir):
    raise UserError(f"{workdir}: already holds checkpoints; import into a new workdir")
  config, params = hf_interop.load_hf_checkpoint(hf_interop.checkpoint_dir(hf_dir), copy_vocab_to=workdir)
  os.makedirs(workdir, exist_ok=True)
  save_model_config(config, os.path.join(workdir, checkpoints.MODEL_FILE))
  return checkpoints.save_params(workdir, T5.from_params(config, params))


def export_hf(workdir: str, out_dir: str, checkpoint: str | None = None,
              vocab_file: str | None = None) -> None:
  """Writes config.json + model.safetensors (+ spiece.model and tokenizer files) for HuggingFace T5."""
  config, model = checkpoints.load_workdir_params(workdir, checkpoint)
  if config.adapter_size:
    raise UserError(f"{workdir}: the model has adapter layers, which HuggingFace T5 does not have; "
                    f"evaluate it with t5mix (LoRA, by contrast, is folded into the weights on export)")
  model = merge_lora_model(model)  # LoRA folded into the weights (same outputs)
  if vocab_file is None:
    candidate = os.path.join(workdir, hf_interop.VOCAB_FILE)
    vocab_file = candidate if os.path.exists(candidate) else None
  hf_interop.save_hf_checkpoint(model, model.config, out_dir, vocab_file=vocab_file)
