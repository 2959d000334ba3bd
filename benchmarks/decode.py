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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from t5mix import decode  # noqa: E402
from t5mix.hf_interop import save_hf_checkpoint  # noqa: E402
from t5mix.model import T5, T5Config  # noqa: E402

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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--inputs-length", type=int, default=128)
  parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (exactly)")
  parser.add_argument("--repeats", type=int, default=10, help="timed runs per framework (after 2 warm-up)")
  parser.add_argument("--seed", type=int, default=0, help="t5mix model initialisation")
  parser.add_argument("--tiny", action="store_true", help="a toy model (smoke test only)")
  parser.add_argument("--json", help="write results here")
  parser.add_argument("--only", nargs="*", help="subset of: t5mix hf_torch")
  parser.add_argument("--breakdown", action="store_true", help="also split t5mix's time (prefill, token step)")
  args = parser.parse_args()

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
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
