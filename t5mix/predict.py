"""Using a trained run: `t5mix predict` (raw inputs → decoded, postprocessed predictions) and
`t5mix embed` (mean-pooled encoder embeddings of a task's examples, for probes and clustering).

Raw inputs are formatted exactly as training formatted the task's records
(`registry.format_inputs`: the task's template over the record's columns), so a prediction sees
the same prefix ("sentiment: ...") the model was trained on.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import seqio
from flax import nnx

from t5mix import checkpoints, evaluate, metrics, registry
from t5mix.errors import UserError


def load(workdir: str, checkpoint: str | None):
  """(run, graphdef, params, step) of one checkpoint (default: the latest)."""
  run = checkpoints.open_run(workdir)
  if checkpoint is not None and not str(checkpoint).strip().isdigit():
    raise UserError(f"--checkpoint {checkpoint!r}: expected a step number")
  step = checkpoints.choose_steps(workdir, str(checkpoint).strip() if checkpoint is not None
                                  else "latest")[0]
  graphdef, abstract = checkpoints.abstract_model(run.model_config)
  return run, graphdef, checkpoints.restore_step_params(workdir, step, abstract), step


def get_task(name: str) -> seqio.Task:
  provider = registry.get_task_or_mixture(name)
  if not isinstance(provider, seqio.Task):
    raise UserError(f"{name!r} is a mixture; --task takes one task (see `t5mix tasks`)")
  return provider


# ---------------------------------------------------------------------------------------------
# predict


def read_records(task: seqio.Task, texts: Sequence[str], input_path: str | None) -> list[dict]:
  """The raw records to predict: JSON lines of --input, or TEXT arguments filling the template's
  single field."""
  if texts and input_path:
    raise UserError("give TEXT arguments or --input FILE.jsonl, not both")
  if input_path:
    if not os.path.isfile(input_path):
      raise UserError(f"{input_path}: no such input file")
    records = []
    with open(input_path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except ValueError as e:
          raise UserError(f"{input_path}:{number}: not valid JSON ({e.args[0].split(':')[0]})") from None
        if isinstance(record, str):
          record = text_record(task, record)
        if not isinstance(record, dict):
          raise UserError(f"{input_path}:{number}: expected a JSON object of the task's fields "
                          f"({_fields_hint(task)}) or a string, found {type(record).__name__}")
        record["_line"] = number
        records.append(record)
    if not records:
      raise UserError(f"{input_path}: empty input file (expected one JSON object per line, "
                      f"with the fields {_fields_hint(task)})")
    return records
  if not texts:
    raise UserError(f"nothing to predict: give TEXT arguments or --input FILE.jsonl (JSON lines "
                    f"with the fields {_fields_hint(task)})")
  return [text_record(task, text) for text in texts]


def _fields_hint(task: seqio.Task) -> str:
  spec = getattr(task, "t5mix_spec", None)
  if spec is None:
    return "inputs"
  fields = registry.input_fields(spec)
  return ", ".join(fields) if fields else "the columns of the task's data, without the label"


def text_record(task: seqio.Task, text: str) -> dict:
  spec = getattr(task, "t5mix_spec", None)
  if spec is None:
    return {"inputs": text}
  fields = registry.input_fields(spec)
  if len(fields) != 1:
    named = f"{len(fields)} fields ({', '.join(fields)})" if fields else "the columns of its data"
    raise UserError(f"task {task.name!r} reads {named}; pass JSON lines with them via --input "
                    f"FILE.jsonl instead of TEXT")
  return {fields[0]: text}


def format_inputs(task: seqio.Task, record: dict, where: str) -> str:
  spec = getattr(task, "t5mix_spec", None)
  if spec is None:  # a plain seqio task: the input text as given
    if not isinstance(record.get("inputs"), str):
      raise UserError(f"{where}: expected an 'inputs' text")
    return record["inputs"]
  return registry.format_inputs(spec, record, where)


def parse(task: seqio.Task, prediction: str) -> Any:
  """The postprocessed prediction in JSON form: a label word (or null if the text is none),
  the answer or generated text, or [[type, text], ...] entities."""
  spec = getattr(task, "t5mix_spec", None)
  if task.postprocess_fn is None:
    return prediction
  value = task.postprocess_fn(prediction, example=None, is_target=False)
  if spec is not None and spec.kind == "classification":
    words = list(dict.fromkeys(spec.label_map.values()))
    return words[value] if value != metrics.INVALID_LABEL else None
  if spec is not None and spec.kind == "ner":
    return [list(entity) for entity in value]
  return value if isinstance(value, (str, int, float, list, dict, type(None))) else str(value)


def predict(workdir: str, task_name: str, texts: Sequence[str] = (), input_path: str | None = None,
            *, checkpoint: str | None = None, beam_size: int | None = None,
            batch_size: int = evaluate.DEFAULT_BATCH_SIZE,
            decode_dtype: str | None = None) -> tuple[int, list[dict]]:
  """(step, [{"record", "inputs", "prediction", "parsed"}, ...]), decoded with the task's settings
  (`evaluate.task_decoder`; `beam_size` overrides its beam size; `decode_dtype`: decode a copy of
  the model in that dtype)."""
  checkpoints.check_workdir(workdir)
  task = get_task(task_name)
  records = read_records(task, texts, input_path)
  where = lambda r: f"{input_path}:{r['_line']}" if input_path else "TEXT"  # noqa: E731
  inputs = [format_inputs(task, r, where(r)) for r in records]
  run, graphdef, params, step = load(workdir, checkpoint)
  evaluate.check_vocabulary(task, run.model_config)
  vocab = task.output_features["inputs"].vocabulary
  lengths = run.lengths
  decoder = evaluate.task_decoder(task, graphdef, max_decode_len=lengths["targets"],
                                  beam_size=beam_size, batch_size=min(batch_size, len(inputs)),
                                  dtype=decode_dtype)
  tokens = decoder(params, evaluate.tokenize_inputs(inputs, vocab, lengths["inputs"]))
  results = []
  for record, text, row in zip(records, inputs, tokens):
    prediction = vocab.decode(row.tolist())
    record = {k: v for k, v in record.items() if k != "_line"}
    results.append({"record": record, "inputs": text, "prediction": prediction,
                    "parsed": parse(task, prediction)})
  return step, results


def write_jsonl(rows: Sequence[dict], path: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  except OSError as e:
    raise UserError(f"{path}: cannot write ({e.strerror})") from None


# ---------------------------------------------------------------------------------------------
# embed


@functools.partial(jax.jit, static_argnums=0)
def _mean_pooled(graphdef, params, tokens):
  """Mean of the encoder outputs over the non-padding positions: [B, L] → [B, d_model] float32."""
  model = nnx.merge(graphdef, params)
  mask = (tokens != 0)
  hidden = model.encode(tokens, mask.astype(jnp.int32)).astype(jnp.float32)
  weights = mask[..., None].astype(jnp.float32)
  return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def encode_split(task: seqio.Task, split: str, lengths: dict[str, int], graphdef, params, *,
                 max_examples: int | None = None,
                 batch_size: int = evaluate.DEFAULT_BATCH_SIZE) -> tuple[np.ndarray, list[dict]]:
  """[N, d_model] float32 mean-pooled encoder outputs of a split's first N examples (all, or
  max_examples), in the split's order, and each row's inputs/targets text. Rows are encoded
  shortest first in narrow batches (evaluate.width_batches): padding is masked, so that changes
  only the cost."""
  if split not in task.splits:
    raise UserError(f"task {task.name!r} has no split {split!r}; it has {', '.join(task.splits)}")
  if max_examples is not None and max_examples < 1:
    raise UserError(f"--max-examples must be at least 1, got {max_examples}")
  ds = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1, seed=0)
  if max_examples:
    ds = ds.take(max_examples)
  rows, texts = [], []
  vocab = task.output_features["inputs"].vocabulary
  for ex in ds.as_numpy_iterator():
    row = np.zeros(lengths["inputs"], np.int32)
    row[:len(ex["inputs"])] = ex["inputs"]
    rows.append(row)
    texts.append({"inputs": _text(ex.get("inputs_pretokenized"), vocab, ex["inputs"]),
                  "targets": _text(ex.get("targets_pretokenized"), vocab, ex["targets"])})
  if not rows:
    raise UserError(f"task {task.name!r} split {split!r} has no examples")
  tokens = np.stack(rows)
  embeddings = None
  for batch, width in evaluate.width_batches(tokens, batch_size):
    chunk = tokens[batch, :width]
    if len(tokens) > batch_size:  # the last batch in the shape the others compiled for
      chunk = evaluate.pad_rows(chunk, batch_size)
    pooled = np.asarray(_mean_pooled(graphdef, params, chunk), np.float32)[:len(batch)]
    if embeddings is None:
      embeddings = np.zeros((len(tokens), pooled.shape[1]), np.float32)
    embeddings[batch] = pooled
  return embeddings, texts


def embed(workdir: str, task_name: str, out_path: str, *, split: str = "validation",
          checkpoint: str | None = None, max_examples: int | None = None,
          batch_size: int = evaluate.DEFAULT_BATCH_SIZE) -> tuple[int, np.ndarray, str]:
  """Writes [N, d_model] float32 embeddings to out_path (.npy) and the examples' inputs/targets
  text, row by row, to the .jsonl beside it; returns (step, embeddings, jsonl path)."""
  checkpoints.check_workdir(workdir)
  task = get_task(task_name)
  run, graphdef, params, step = load(workdir, checkpoint)
  check_encoder(run, workdir, "embed")
  evaluate.check_vocabulary(task, run.model_config)
  embeddings, texts = encode_split(task, split, run.lengths, graphdef, params,
                                   max_examples=max_examples, batch_size=batch_size)
  out_dir = os.path.dirname(os.path.abspath(out_path))
  try:
    os.makedirs(out_dir, exist_ok=True)
    with open(out_path, "wb") as f:  # exactly this path (np.save would append .npy)
      np.save(f, embeddings)
  except OSError as e:
    raise UserError(f"{out_path}: cannot write ({e.strerror})") from None
  jsonl_path = os.path.splitext(out_path)[0] + ".jsonl"
  write_jsonl(texts, jsonl_path)
  return step, embeddings, jsonl_path


def check_encoder(run: checkpoints.Run, workdir: str, command: str) -> None:
  if run.model_config.architecture != "encoder_decoder":
    raise UserError(f"{workdir}: {command} needs an encoder (this model is "
                    f"{run.model_config.architecture})")


def _text(pretokenized, vocab, tokens) -> str:
  if pretokenized is not None:
    return pretokenized.decode("utf-8") if isinstance(pretokenized, bytes) else str(pretokenized)
  return vocab.decode([int(t) for t in tokens])
