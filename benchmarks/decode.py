"""Greedy-decoding throughput: t5mix (KV cache, jitted while_loop) vs HuggingFace PyTorch generate, same weights.

    python benchmarks/decode.py [--batch 16] [--inputs-length 128] [--new-tokens 32] [--repeats 10] [--json out.json]
                                [--breakdown]

One t5mix model is built from a seed and exported with t5mix.hf_interop.save_hf_checkpoint; HF
T5ForConditionalGeneration loads that export, so both decode with identical float32 weights. Inputs are
random tokens, right-padded with 0 in some rows (HF gets attention_mask = inputs != 0). Both generate
exactly --new-tokens tokens: EOS is never a stopping point (t5mix eos_id=-1; HF eos_token_id=None), so
token 1 is just another token and the outputs stay comparable. Runs are interleaved (one of each in
turn) and each framework reports the median after warm-up; t5mix's compile happens in the warm-up.
Reports generated tokens/s (batch × new tokens / median time), the t5mix / hf_torch ratio, and the
fraction of generated tokens on which the two agree (reported, not asserted). Needs the `bench` peers
(`pip install -e .[test]`: torch, transformers); if they cannot run, t5mix is timed alone.
--breakdown also splits t5mix's time: the prefill (encoder, cross-attention keys and values, the
first decoder step) timed alone, the rest per token step, and the output projection's matmul alone
with the rate at which it reads the [d_model, vocab] weight.

    python benchmarks/decode.py --part beam [--beam-size 4] [--rounds 3] [...the shape flags above]

Beam search: t5mix `decode.beam_search` vs HF `generate(num_beams=4)`, the same weights (t5mix
imports the HF export: hf_interop.load_hf_checkpoint), inputs and lengths (exactly --new-tokens per
row: no EOS, so every beam runs to the end and the length penalty ranks equal lengths alike). Each
framework runs in its own process, the processes alternated over --rounds rounds; each warms up
twice (t5mix compiles), then times --repeats runs and reports their median. The table gives the
median of the rounds' medians and the min-max of all timed runs, and the share of tokens on which
the two best beams agree.

    python benchmarks/decode.py --part dtype --workdir W [--max-examples 300] [--rounds 3]
                                [--dtypes float32,bfloat16,bfloat16-weights,bfloat16-compute]

Decoding in bfloat16 (`t5mix eval --decode-dtype bfloat16`) against float32 on a trained run: its
tasks (the workdir's config.yaml, as `t5mix eval` reads them) decoded with `evaluate.Decoder` as
`t5mix eval` decodes them, the first --max-examples validation examples of each, scored with the
tasks' metrics. Each dtype in its own process, alternated over --rounds rounds; each evaluates once
to warm up (compile, cache the examples), then times one evaluation's decoding. Reports each task's
metrics in each, the share of greedy tokens that agree with the first (over the positions up to the
later EOS of each pair of rows) and the decoding speed-up. `bfloat16-weights` (weights rounded to
bfloat16, float32 computation) and `bfloat16-compute` (float32 weights, bfloat16 computation) tell
which part of bfloat16 decoding costs the agreement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# transformers imports TensorFlow when it is installed (t5mix needs it for seqio); not needed here.
os.environ.setdefault("USE_TF", "0")
# PyTorch's OpenMP workers spin-wait after each op by default; interleaved with the JAX runs, that
# spinning steals the cores from whichever framework runs next. Passive waiting keeps the runs apart.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from t5mix import checkpoints, decode, definitions, evaluate, metrics, registry  # noqa: E402
from t5mix import config as config_lib, eval_cli, vocab as vocab_lib  # noqa: E402
from t5mix.hf_interop import load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from t5mix.model import T5, T5Config  # noqa: E402

import quality  # noqa: E402  (write_results)
from train_throughput import SHAPE, TINY_SHAPE, interleaved_times  # noqa: E402  (the train benchmark's model)
NO_EOS = -1  # t5mix: argmax never returns -1, so no row ever stops early


def random_inputs(batch: int, length: int, vocab: int) -> np.ndarray:
  """Random tokens in [2, vocab); every other row from the second on is right-padded with 0 to a shorter length."""
  rng = np.random.default_rng(0)
  enc = rng.integers(2, vocab, (batch, length)).astype(np.int32)
  for i in range(1, batch, 2):
    enc[i, rng.integers(max(1, length // 4), length):] = 0
  return enc


def t5mix_runner(model: T5, enc: np.ndarray, new_tokens: int):
  inputs = jax.device_put(enc)

  def run():
    return np.asarray(jax.block_until_ready(
        decode.greedy(model, inputs, max_decode_len=new_tokens, eos_id=NO_EOS)))
  return run


def t5mix_breakdown(model: T5, enc: np.ndarray, new_tokens: int, repeats: int) -> dict:
  """Seconds of the prefill alone, of a whole greedy decode, per token step after the prefill, and of
  the output projection's matmul alone (with the GB/s at which it reads the weight), medians."""
  graphdef, state = nnx.split(model)
  inputs = jax.device_put(enc)
  prefill = jax.jit(lambda state, inputs: decode._prefill(nnx.merge(graphdef, state), inputs, new_tokens))
  weight = model.lm_head[...] if model.lm_head is not None else model.embedding[...].T
  hidden = jax.device_put(np.ones((enc.shape[0], weight.shape[0]), np.float32))
  project = jax.jit(lambda h, w: h @ w)
  runners = {"prefill": lambda: jax.block_until_ready(prefill(state, inputs)),
             "greedy": t5mix_runner(model, enc, new_tokens),
             "projection": lambda: jax.block_until_ready(project(hidden, weight))}
  for run in runners.values():  # compile, then warm up
    run()
    run()
  times = {k: statistics.median(v) for k, v in interleaved_times(runners, repeats).items()}
  step = (times["greedy"] - times["prefill"]) / max(1, new_tokens - 1)
  return {"prefill_s": times["prefill"], "greedy_s": times["greedy"], "token_step_s": step,
          "projection_s": times["projection"], "projection_weight_gb_per_s": weight.nbytes / times["projection"] / 1e9}


def hf_torch_runner(hf_dir: str, enc: np.ndarray, new_tokens: int):
  import torch
  import transformers
  model = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
  input_ids = torch.tensor(enc, dtype=torch.long)
  attention_mask = torch.tensor(enc != 0, dtype=torch.long)
  # Greedy with the cache, and no EOS: generation always runs max_new_tokens steps (min_new_tokens would
  # instead mask EOS's logit, which changes the argmax wherever EOS wins, unlike t5mix with eos_id=-1).
  # A generation_config passed to generate() gets its None fields filled from the model's (eos_token_id=1),
  # so the model's own is changed instead.
  model.generation_config.update(num_beams=1, do_sample=False, use_cache=True, max_new_tokens=new_tokens,
                                 min_new_tokens=None, eos_token_id=None, pad_token_id=0, decoder_start_token_id=0)

  def run():
    with torch.inference_mode():
      out = model.generate(input_ids=input_ids, attention_mask=attention_mask)
    return out[:, 1:].numpy()  # drop the decoder start token
  return run


def greedy_part(args):
  """Greedy decoding, t5mix and HF PyTorch interleaved in this process (the module's docstring)."""
  shape = TINY_SHAPE if args.tiny else SHAPE
  c = T5Config(**shape)
  enc = random_inputs(args.batch, args.inputs_length, c.vocab_size)
  model = T5(c, rngs=nnx.Rngs(args.seed))
  runners, errors = {}, {}
  with tempfile.TemporaryDirectory() as hf_dir:
    save_hf_checkpoint(model, c, hf_dir)
    for name, make in [("t5mix", lambda: t5mix_runner(model, enc, args.new_tokens)),
                       ("hf_torch", lambda: hf_torch_runner(hf_dir, enc, args.new_tokens))]:
      if args.only and name not in args.only:
        continue
      try:
        runners[name] = make()
      except Exception as e:  # a peer that cannot run here is reported, not fatal
        errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"

  outputs, compile_s = {}, {}
  for name in list(runners):
    try:
      t = time.perf_counter()
      outputs[name] = runners[name]()  # t5mix: compiles here
      compile_s[name] = time.perf_counter() - t
      runners[name]()
      assert outputs[name].shape == (args.batch, args.new_tokens), outputs[name].shape
    except Exception as e:
      errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
      runners.pop(name)
  times = interleaved_times(runners, args.repeats)

  tokens = args.batch * args.new_tokens
  results = {"machine": {"devices": str(jax.devices()), "cpu_count": os.cpu_count()},
             "shape": shape, "batch": args.batch, "inputs_length": args.inputs_length,
             "new_tokens": args.new_tokens, "repeats": args.repeats, "frameworks": {}, "unavailable": errors}
  print(f"greedy decoding: batch {args.batch}, inputs {args.inputs_length} "
        f"({int((enc != 0).sum())} non-padding tokens), {args.new_tokens} new tokens per row")
  print(f"{'framework':<10} {'median s/batch':>15} {'ms/step':>8} {'tokens/s':>10} {'first run s':>12}")
  for name, ts in times.items():
    median = statistics.median(ts)
    r = {"median_s": median, "min_s": min(ts), "tokens_per_s": tokens / median,
         "ms_per_new_token_step": 1e3 * median / args.new_tokens, "first_run_s": compile_s[name]}
    results["frameworks"][name] = r
    print(f"{name:<10} {median:>15.4f} {r['ms_per_new_token_step']:>8.2f} {r['tokens_per_s']:>10,.0f} "
          f"{compile_s[name]:>12.2f}")
  fw = results["frameworks"]
  if "t5mix" in fw and "hf_torch" in fw:
    ratio = fw["t5mix"]["tokens_per_s"] / fw["hf_torch"]["tokens_per_s"]
    results["t5mix_over_hf_torch"] = ratio
    print(f"t5mix / hf_torch: {ratio:.2f}x tokens/s")
    a, b = outputs["t5mix"], outputs["hf_torch"]
    same = a == b
    # Positions up to and including each row's first disagreement (after it, the two decode different prefixes).
    first_diff = np.where(same.all(axis=1), args.new_tokens, np.argmin(same, axis=1))
    results["agreement"] = {"token_fraction": float(same.mean()), "rows_identical": int(same.all(axis=1).sum()),
                            "rows": args.batch, "first_difference_per_row": first_diff.tolist()}
    print(f"greedy outputs agree on {same.mean():.2%} of tokens; "
          f"{int(same.all(axis=1).sum())}/{args.batch} rows identical")
  for name, e in errors.items():
    print(f"{name}: unavailable ({e})")
  if args.breakdown:
    b = results["t5mix_breakdown"] = t5mix_breakdown(model, enc, args.new_tokens, args.repeats)
    print(f"t5mix: prefill {1e3 * b['prefill_s']:.1f} ms of {1e3 * b['greedy_s']:.1f}; then "
          f"{1e3 * b['token_step_s']:.2f} ms per token step, of which the output projection alone "
          f"{1e3 * b['projection_s']:.2f} ms (reading its weight at {b['projection_weight_gb_per_s']:.1f} GB/s)")
  return results


# --- beam search: each framework in its own process ----------------------------------------------


def beam_worker(args) -> dict:
  """Times one framework's beam search on the HF export in --hf-dir and the inputs in --inputs."""
  enc = np.load(args.inputs)
  if args.worker == "beam-t5mix":
    config, params = load_hf_checkpoint(args.hf_dir)
    model = T5.from_params(config, params)
    inputs = jax.device_put(enc)

    def run():
      return np.asarray(jax.block_until_ready(decode.beam_search(
          model, inputs, max_decode_len=args.new_tokens, beam_size=args.beam_size, eos_id=NO_EOS)))
  else:
    import torch
    import transformers
    model = transformers.T5ForConditionalGeneration.from_pretrained(args.hf_dir).eval()
    input_ids = torch.tensor(enc, dtype=torch.long)
    attention_mask = torch.tensor(enc != 0, dtype=torch.long)
    # As in hf_torch_runner: no EOS, so every beam runs max_new_tokens steps (t5mix: eos_id=-1).
    model.generation_config.update(num_beams=args.beam_size, do_sample=False, use_cache=True,
                                   max_new_tokens=args.new_tokens, min_new_tokens=None, eos_token_id=None,
                                   pad_token_id=0, decoder_start_token_id=0, early_stopping=False)

    def run():
      with torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask)[:, 1:].numpy()
  outputs = run()  # t5mix compiles here
  run()
  times = interleaved_times({"run": run}, args.repeats)["run"]
  return {"times_s": times, "median_s": statistics.median(times), "outputs": outputs.tolist()}


def run_worker(args, worker: str, *extra: str) -> dict:
  """This script as a `--worker` process, with this run's shape flags; its JSON result."""
  command = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--batch", str(args.batch),
             "--inputs-length", str(args.inputs_length), "--new-tokens", str(args.new_tokens),
             "--repeats", str(args.repeats), "--beam-size", str(args.beam_size), *extra]
  proc = subprocess.run(command, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"worker {worker} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def alternated(args, workers: dict[str, tuple]) -> dict[str, list[dict]]:
  """{name: its results, one per round}: each worker (name -> worker, extra flags) once per round, in turn."""
  results = {name: [] for name in workers}
  for round_ in range(args.rounds):
    for name, (worker, extra) in workers.items():
      results[name].append(run_worker(args, worker, *extra))
      print(f"round {round_ + 1}: {name} {results[name][-1]['median_s']:.3f} s", flush=True)
  return results


def spread(rounds: list[dict], key: str = "times_s") -> dict:
  """The median of the rounds' medians and the min-max of every timed run."""
  every = [t for r in rounds for t in r[key]]
  return {"median_s": statistics.median(r["median_s"] for r in rounds), "min_s": min(every), "max_s": max(every),
          "round_medians_s": [r["median_s"] for r in rounds]}


def token_agreement(a: np.ndarray, b: np.ndarray, eos_id: int = decode.EOS_ID) -> dict:
  """The share of tokens on which two decodings [N, L] agree, over the positions up to the later
  EOS of each pair of rows (the zeros after both ended are not counted), and the identical rows."""
  def ends(x):  # positions up to and including each row's EOS (all of them if it has none)
    has = (x == eos_id).any(axis=1)
    return np.where(has, np.argmax(x == eos_id, axis=1) + 1, x.shape[1])
  counted = np.arange(a.shape[1])[None, :] < np.maximum(ends(a), ends(b))[:, None]
  same = (a == b) | ~counted
  return {"token_fraction": float((a == b)[counted].mean()), "tokens": int(counted.sum()),
          "rows_identical": int(same.all(axis=1).sum()), "rows": int(a.shape[0])}


def beam_part(args):
  shape = TINY_SHAPE if args.tiny else SHAPE
  c = T5Config(**shape)
  enc = random_inputs(args.batch, args.inputs_length, c.vocab_size)
  with tempfile.TemporaryDirectory() as tmp:
    save_hf_checkpoint(T5(c, rngs=nnx.Rngs(args.seed)), c, tmp)
    np.save(os.path.join(tmp, "inputs.npy"), enc)
    flags = ("--hf-dir", tmp, "--inputs", os.path.join(tmp, "inputs.npy"))
    rounds = alternated(args, {"t5mix": ("beam-t5mix", flags), "hf_torch": ("beam-hf", flags)})
  fw = {name: spread(r) for name, r in rounds.items()}
  agreement = token_agreement(np.array(rounds["t5mix"][0]["outputs"]), np.array(rounds["hf_torch"][0]["outputs"]),
                              eos_id=NO_EOS)
  ratio = fw["hf_torch"]["median_s"] / fw["t5mix"]["median_s"]
  tokens = args.batch * args.new_tokens
  print(f"beam search ({args.beam_size} beams): batch {args.batch}, inputs {args.inputs_length}, "
        f"{args.new_tokens} new tokens per row; {args.rounds} rounds x {args.repeats} runs per framework")
  print(f"{'framework':<10} {'median s/batch':>15} {'min-max':>15} {'tokens/s':>10}")
  for name, r in fw.items():
    print(f"{name:<10} {r['median_s']:>15.3f} {r['min_s']:>7.3f}-{r['max_s']:<7.3f} {tokens / r['median_s']:>10,.0f}")
  print(f"t5mix / hf_torch: {ratio:.2f}x; best beams agree on {agreement['token_fraction']:.2%} of tokens, "
        f"{agreement['rows_identical']}/{agreement['rows']} rows identical")
  return {"shape": shape, "beam_size": args.beam_size, "frameworks": fw, "t5mix_over_hf_torch": ratio,
          "agreement": agreement}


def beam_markdown(r: dict, args) -> list[str]:
  tokens = args.batch * args.new_tokens
  lines = [f"Beam search, {r['beam_size']} beams: batch {args.batch} × {args.inputs_length} input tokens, exactly "
           f"{args.new_tokens} new tokens per row, `decode.py`'s model (d_model {r['shape']['d_model']}, "
           f"{r['shape']['num_encoder_layers']}+{r['shape']['num_decoder_layers']} layers, vocab "
           f"{r['shape']['vocab_size']:,}), float32, the same weights and inputs; each framework in its own "
           f"process, alternated over {args.rounds} rounds of {args.repeats} runs after 2 warm-up: median of "
           "the rounds' medians, min-max of all runs.", "",
           "| framework | s/batch | min-max | generated tokens/s |", "|---|---:|---:|---:|"]
  for name, label in (("t5mix", "t5mix `decode.beam_search`"), ("hf_torch", "HF PyTorch `generate(num_beams=4)`")):
    f = r["frameworks"][name]
    lines.append(f"| {label} | {f['median_s']:.3f} | {f['min_s']:.3f}-{f['max_s']:.3f} | "
                 f"{tokens / f['median_s']:,.0f} |")
  a = r["agreement"]
  lines += ["", f"t5mix / HF: **{r['t5mix_over_hf_torch']:.2f}×**; the best beams agree on "
                f"{a['token_fraction']:.2%} of tokens ({a['rows_identical']}/{a['rows']} rows identical)."]
  return lines


# --- decoding in bfloat16 on a trained run ------------------------------------------------------


class TimedDecoder:
  """An evaluate.Decoder that adds up the seconds it decodes and keeps its last outputs."""

  def __init__(self, decoder: evaluate.Decoder):
    self.decoder, self.seconds, self.outputs = decoder, 0.0, None

  def __call__(self, params, inputs):
    t = time.perf_counter()
    self.outputs = self.decoder(params, inputs)
    self.seconds += time.perf_counter() - t
    return self.outputs


# --dtypes beyond --decode-dtype's, to tell what costs the agreement: bfloat16 in one part only.
VARIANTS = {"bfloat16-weights": "the weights rounded to bfloat16, float32 computation",
            "bfloat16-compute": "float32 weights, bfloat16 computation"}


def dtype_worker(args) -> dict:
  """One evaluation's decoding of the run's tasks in --decode-dtype (or a VARIANTS one), after one
  to warm up."""
  config_path, vocab = eval_cli.workdir_definitions(args.workdir, None)
  c = config_lib.load(config_path)
  definitions.load(c.data.tasks_dir, c.data.module)
  registry.RUN_VOCABULARY = vocab_lib.get_vocabulary(vocab)
  run = checkpoints.open_run(args.workdir)
  step = checkpoints.choose_steps(args.workdir, "latest")[0]
  graphdef, abstract = checkpoints.abstract_model(run.model_config)
  params = checkpoints.restore_step_params(args.workdir, step, abstract)
  dtype = args.decode_dtype
  if dtype == "bfloat16-weights":
    params, dtype = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params), None
  elif dtype == "bfloat16-compute":
    graphdef, _ = checkpoints.abstract_model(dataclasses.replace(run.model_config, dtype="bfloat16"))
    dtype = None
  tasks = evaluate.eval_tasks([c.data.mixture], "validation", explicit=False)
  lengths = run.lengths
  decoders = {task.name: TimedDecoder(evaluate.task_decoder(
      task, graphdef, max_decode_len=lengths["targets"], batch_size=args.decode_batch, dtype=dtype))
      for task in tasks}
  evaluator = evaluate.Evaluator(tasks, decoders, lengths=lengths, max_examples=args.max_examples)
  evaluator.evaluate(params, step)  # compiles, caches the examples
  for d in decoders.values():
    d.seconds = 0.0
  scores = evaluator.evaluate(params, step)
  seconds = sum(d.seconds for d in decoders.values())
  return {"step": step, "metrics": scores, "examples": evaluator.examples, "times_s": [seconds],
          "median_s": seconds, "outputs": {name: d.outputs.tolist() for name, d in decoders.items()}}


def dtype_part(args):
  """Each of --dtypes against the first (float32)."""
  dtypes = args.dtypes.split(",")
  flags = ("--workdir", args.workdir, "--max-examples", str(args.max_examples), "--decode-batch", str(args.decode_batch))
  rounds = alternated(args, {dtype: ("dtype", (*flags, "--decode-dtype", dtype)) for dtype in dtypes})
  first = {dtype: r[0] for dtype, r in rounds.items()}  # decoding is deterministic: any round's outputs
  ref, tasks = first[dtypes[0]], list(first[dtypes[0]]["outputs"])
  outputs = lambda dtype, name: np.array(first[dtype]["outputs"][name])  # noqa: E731
  times = {dtype: spread(r) for dtype, r in rounds.items()}
  agreement = {dtype: {name: token_agreement(outputs(dtypes[0], name), outputs(dtype, name)) for name in tasks}
               for dtype in dtypes[1:]}
  every = {dtype: token_agreement(*(np.concatenate([outputs(d, n) for n in tasks]) for d in (dtypes[0], dtype)))
           for dtype in dtypes[1:]}
  print(f"{args.workdir} (step {ref['step']}), greedy in batches of {args.decode_batch}, the first "
        f"{args.max_examples} validation examples per task; {args.rounds} rounds")
  for dtype in dtypes[1:]:
    print(f"{dtype} against {dtypes[0]}:")
    for name, scores in ref["metrics"].items():
      for metric, value in scores.items():
        other = first[dtype]["metrics"][name][metric]
        print(f"  {name:<24} {metric:<10} {value:>8.2f} -> {other:>8.2f} ({other - value:+.2f}); tokens agree "
              f"{agreement[dtype][name]['token_fraction']:.2%}")
    print(f"  all tasks: tokens agree {every[dtype]['token_fraction']:.2%} ({every[dtype]['tokens']} tokens), "
          f"{every[dtype]['rows_identical']}/{every[dtype]['rows']} rows identical; decoding "
          f"{times[dtypes[0]]['median_s'] / times[dtype]['median_s']:.2f}x as fast")
  return {"workdir": args.workdir, "step": ref["step"], "examples": ref["examples"], "decode_batch": args.decode_batch,
          "dtypes": dtypes, "metrics": {dtype: first[dtype]["metrics"] for dtype in dtypes},
          "glue_average": {dtype: metrics.glue_average(first[dtype]["metrics"]) for dtype in dtypes},
          "agreement": agreement, "agreement_all": every, "times": times,
          "speedup": {dtype: times[dtypes[0]]["median_s"] / times[dtype]["median_s"] for dtype in dtypes[1:]}}


def dtype_markdown(r: dict, args) -> list[str]:
  ref, others = r["dtypes"][0], r["dtypes"][1:]
  named = "; ".join(f"{d}: {VARIANTS[d]}" for d in others if d in VARIANTS)
  lines = [f"`{r['workdir']}` (step {r['step']}), its tasks' first {args.max_examples} validation examples "
           f"each, greedy in batches of {r['decode_batch']} as `t5mix eval` decodes; each dtype in its own "
           f"process, alternated over {args.rounds} rounds. Token agreement with {ref}: over the positions up "
           f"to the later EOS of each pair of rows.{' ' + named + '.' if named else ''}", "",
           "| task | metric | " + " | ".join(r["dtypes"]) + " | " +
           " | ".join(f"{d} tokens agree (rows identical)" for d in others) + " |",
           "|---|---|" + "---:|" * (2 * len(others) + 1)]
  for name, scores in r["metrics"][ref].items():
    for metric, value in scores.items():
      cells = [f"{value:.2f}"] + [f"{r['metrics'][d][name][metric]:.2f} "
                                  f"({r['metrics'][d][name][metric] - value:+.2f})" for d in others]
      cells += [f"{r['agreement'][d][name]['token_fraction']:.2%} ({r['agreement'][d][name]['rows_identical']}/"
                f"{r['agreement'][d][name]['rows']})" for d in others]
      lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
  lines.append("")
  for d in others:
    every, t = r["agreement_all"][d], r["times"]
    lines.append(f"{d}: all tasks, {every['token_fraction']:.2%} of {every['tokens']:,} tokens agree "
                 f"({every['rows_identical']}/{every['rows']} rows identical); decoding time, median (min-max): "
                 f"{ref} {t[ref]['median_s']:.1f} s ({t[ref]['min_s']:.1f}-{t[ref]['max_s']:.1f}), {d} "
                 f"{t[d]['median_s']:.1f} s ({t[d]['min_s']:.1f}-{t[d]['max_s']:.1f}): "
                 f"**{r['speedup'][d]:.2f}×**.")
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--part", choices=("greedy", "beam", "dtype"), default="greedy")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--inputs-length", type=int, default=128)
  parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (exactly)")
  parser.add_argument("--repeats", type=int, default=10, help="timed runs per framework (after 2 warm-up)")
  parser.add_argument("--seed", type=int, default=0, help="t5mix model initialisation")
  parser.add_argument("--tiny", action="store_true", help="a toy model (smoke test only)")
  parser.add_argument("--json", help="write results here")
  parser.add_argument("--results", help="beam, dtype: write the table into this markdown file (RESULTS.md)")
  parser.add_argument("--only", nargs="*", help="greedy: subset of: t5mix hf_torch")
  parser.add_argument("--breakdown", action="store_true", help="greedy: also split t5mix's time (prefill, token step)")
  parser.add_argument("--beam-size", type=int, default=4, help="beam: beams")
  parser.add_argument("--rounds", type=int, default=3, help="beam, dtype: rounds of alternated processes")
  parser.add_argument("--workdir", help="dtype: a trained run")
  parser.add_argument("--max-examples", type=int, default=300, help="dtype: validation examples per task")
  parser.add_argument("--dtypes", default="float32,bfloat16",
                      help="dtype: what to compare, the first the reference; also " + ", ".join(VARIANTS))
  parser.add_argument("--decode-batch", type=int, default=evaluate.DEFAULT_BATCH_SIZE,
                      help="dtype: decoding batch size (default: t5mix eval's)")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
  parser.add_argument("--inputs", help=argparse.SUPPRESS)
  parser.add_argument("--decode-dtype", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(dtype_worker(args) if args.worker == "dtype" else beam_worker(args)))
    return
  if args.part == "dtype" and not args.workdir:
    parser.error("--part dtype needs --workdir")
  if args.results and args.part == "greedy":
    parser.error("--results: for --part beam or dtype")
  results = {"greedy": greedy_part, "beam": beam_part, "dtype": dtype_part}[args.part](args)
  results.update(machine={"devices": str(jax.devices()), "cpu_count": os.cpu_count()},
                 date=time.strftime("%Y-%m-%d"), argv=sys.argv[1:])
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  if args.results:
    lines = (beam_markdown if args.part == "beam" else dtype_markdown)(results, args)
    marker = f"decode-{args.part}"  # the VARIANTS comparison in a block of its own
    if args.part == "dtype" and any(d in VARIANTS for d in args.dtypes.split(",")):
      marker += "-variants"
    machine = f"Measured {results['date']} on {os.cpu_count()} CPU cores, jax {jax.__version__}."
    quality.write_results(args.results, "python benchmarks/decode.py " + " ".join(sys.argv[1:]),
                          [machine, "", *lines], marker=marker)


if __name__ == "__main__":
  main()
