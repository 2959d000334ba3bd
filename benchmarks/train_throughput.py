"""Train-step throughput: t5mix vs HuggingFace T5 (PyTorch, and Flax where it still runs), same run.

    python benchmarks/train_throughput.py [--steps 12] [--batch 16] [--json out.json]
    python benchmarks/train_throughput.py --preset gpu-base     # on a GPU: t5-base, bfloat16

Every framework trains the same T5 shape on the same random batch with AdamW in float32; steps
are interleaved (one step of each in turn) so that machine noise hits all alike, and each
reports the median step time after warm-up. Also measures this machine's matmul peak with a
large jnp.dot and reports model FLOP/s as a fraction of it (MFU on this machine). Needs the
`bench` peers (`pip install -e .[test]`: torch, transformers); a peer that cannot run is listed
with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# PyTorch's OpenMP workers spin-wait after each op by default; interleaved with the JAX steps, that
# spinning steals the cores from whichever framework runs next. Passive waiting keeps the runs apart.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from t5mix import config as config_lib, host_memory  # noqa: E402
from t5mix.model import T5, T5Config  # noqa: E402
from t5mix.train import TrainState, make_train_step  # noqa: E402

SHAPE = dict(vocab_size=32128, d_model=256, d_kv=64, d_ff=1024, num_heads=4, num_encoder_layers=4,
             num_decoder_layers=4, dropout_rate=0.0, feed_forward_proj="gated-gelu",
             tie_word_embeddings=False)
# --tiny in the other scripts: a toy model for the smoke tests (tests/test_benchmarks_smoke.py), not for numbers.
TINY_SHAPE = dict(SHAPE, vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_encoder_layers=2,
                  num_decoder_layers=2)
# --preset gpu-base: T5 v1.1 base (configs/model/base.yaml) in bfloat16, for a lent GPU; t5mix alone
# (the peers here are CPU builds), MFU against a bfloat16 matmul peak measured in the same run.
GPU_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_encoder_layers=12,
                num_decoder_layers=12, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False, dtype="bfloat16")
PRESETS = {  # shape, batch, inputs length, targets length, matmul-peak dtype and size
    "cpu": (SHAPE, 16, 128, 32, jnp.float32, 2048),
    "gpu-base": (GPU_BASE, 64, 512, 128, jnp.bfloat16, 8192),
}


def model_flops_per_step(c: T5Config, batch: int, enc_len: int, dec_len: int) -> float:
  """Matmul FLOPs of one training step (forward ×3), counted from the architecture."""
  inner = c.num_heads * c.d_kv
  ffn = (3 if c.feed_forward_proj == "gated-gelu" else 2) * c.d_model * c.d_ff
  enc = c.num_encoder_layers * (4 * c.d_model * inner * enc_len + 2 * enc_len * enc_len * inner
                                + ffn * enc_len)
  dec = c.num_decoder_layers * (
      4 * c.d_model * inner * dec_len + 2 * dec_len * dec_len * inner          # self-attention
      + 2 * c.d_model * inner * dec_len + 2 * c.d_model * inner * enc_len       # cross q,o / k,v
      + 2 * dec_len * enc_len * inner + ffn * dec_len)
  head = c.d_model * c.vocab_size * dec_len
  return 3 * 2 * batch * (enc + dec + head)


def matmul_peak(n: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def interleaved_times(runners: dict, rounds: int) -> dict[str, list[float]]:
  """Calls each runner once per round, in turn, `rounds` times: {name: seconds of each call}.

  Interleaving spreads a slow spell of a shared machine over every runner alike."""
  times = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      t = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t)
  return times


def batch_arrays(batch: int, enc_len: int, dec_len: int, vocab: int):
  rng = np.random.default_rng(0)
  enc = rng.integers(2, vocab, (batch, enc_len)).astype(np.int32)
  tgt = rng.integers(2, vocab, (batch, dec_len)).astype(np.int32)
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
  return enc, dec_in, tgt


def t5mix_step(c: T5Config, enc, dec_in, tgt):
  """(jitted train step with the state donated, initial state, device batch, dropout key)."""
  model = T5(c, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tc = config_lib.load(None, ["z_loss=0", "optimizer.name=adamw", "optimizer.clip_norm=0",
                              "optimizer.schedule=constant", "optimizer.warmup_steps=0",
                              "optimizer.learning_rate=1e-4"])
  optimizer = optax.adamw(1e-4)
  state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": tgt,
           "decoder_loss_weights": np.ones_like(tgt), "task_ids": np.ones_like(tgt)}
  step_fn = jax.jit(make_train_step(graphdef, optimizer, tc, num_tasks=1), donate_argnums=(0,))
  return step_fn, state, jax.device_put(batch), jax.random.key(0)


def t5mix_runner(c: T5Config, enc, dec_in, tgt, compiler_options: dict | None = None):
  """compiler_options: XLA debug options for this step's compilation alone (ablate_train_step.py)."""
  step_fn, state, batch, key = t5mix_step(c, enc, dec_in, tgt)
  if compiler_options:
    step_fn = step_fn.lower(state, batch, key).compile(compiler_options=compiler_options)
  box = [state]

  def step():
    box[0], metrics = step_fn(box[0], batch, key)
    metrics["loss"].block_until_ready()
  return step


def hf_torch_runner(c: T5Config, enc, dec_in, tgt):
  import torch
  import transformers
  torch.manual_seed(0)
  hf_config = transformers.T5Config(
      vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_heads=c.num_heads,
      num_layers=c.num_encoder_layers, num_decoder_layers=c.num_decoder_layers, dropout_rate=0.0,
      feed_forward_proj=c.feed_forward_proj, tie_word_embeddings=c.tie_word_embeddings)
  model = transformers.T5ForConditionalGeneration(hf_config).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
  enc_t, dec_t, tgt_t = (torch.tensor(x, dtype=torch.long) for x in (enc, dec_in, tgt))

  def step():
    optimizer.zero_grad(set_to_none=True)
    out = model(input_ids=enc_t, decoder_input_ids=dec_t, labels=tgt_t)
    out.loss.backward()
    optimizer.step()
  return step


def hf_flax_runner(c: T5Config, enc, dec_in, tgt):
  import transformers
  if not hasattr(transformers, "FlaxT5ForConditionalGeneration"):
    raise RuntimeError("this transformers has no Flax T5")
  # transformers 4.x calls jnp.clip(x, a_min=…, a_max=…), which current JAX removed: shim it.
  _clip = jnp.clip

  def clip(x, a_min=None, a_max=None, **kw):
    return _clip(x, kw.get("min", a_min), kw.get("max", a_max))
  jnp.clip = clip
  hf_config = transformers.T5Config(
      vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_heads=c.num_heads,
      num_layers=c.num_encoder_layers, num_decoder_layers=c.num_decoder_layers, dropout_rate=0.0,
      feed_forward_proj=c.feed_forward_proj, tie_word_embeddings=c.tie_word_embeddings)
  model = transformers.FlaxT5ForConditionalGeneration(hf_config, seed=0)
  optimizer = optax.adamw(1e-4)
  params = model.params
  opt_state = optimizer.init(params)

  def loss_fn(params):
    logits = model(input_ids=enc, decoder_input_ids=dec_in, params=params, train=False).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, tgt).mean()

  @jax.jit
  def train_step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  box = [params, opt_state]

  def step():
    box[0], box[1], loss = train_step(box[0], box[1])
    loss.block_until_ready()
  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                      help="cpu: the default shape, float32, with the peers; gpu-base: t5-base bf16, t5mix alone")
  parser.add_argument("--steps", type=int, default=12, help="timed steps per framework (after 2 warm-up)")
  parser.add_argument("--batch", type=int, help="default: the preset's (16; gpu-base 64)")
  parser.add_argument("--inputs-length", type=int, help="default: the preset's (128; gpu-base 512)")
  parser.add_argument("--targets-length", type=int, help="default: the preset's (32; gpu-base 128)")
  parser.add_argument("--json", help="write results here")
  parser.add_argument("--only", nargs="*", help="subset of: t5mix hf_torch hf_flax")
  args = parser.parse_args()
  shape, batch, inputs_length, targets_length, peak_dtype, peak_n = PRESETS[args.preset]
  args.batch = args.batch or batch
  args.inputs_length = args.inputs_length or inputs_length
  args.targets_length = args.targets_length or targets_length
  if args.preset != "cpu":
    args.only = ["t5mix"]
  if args.only == ["t5mix"]:
    # Alone, t5mix is measured in the process the `t5mix` command runs in (t5mix/host_memory.py).
    # Not with the peers: huge pages slowed both JAX steps when torch shared the process
    # (benchmarks/RESULTS.md, "Host memory"), so the comparison runs with the system's defaults.
    host_memory.reexec_with_hugepages()
  hugepages = host_memory.TUNABLE in os.environ.get("GLIBC_TUNABLES", "")

  c = T5Config(**shape)
  enc, dec_in, tgt = batch_arrays(args.batch, args.inputs_length, args.targets_length, c.vocab_size)
  runners = {}
  errors = {}
  for name, make in [("t5mix", t5mix_runner), ("hf_torch", hf_torch_runner), ("hf_flax", hf_flax_runner)]:
    if args.only and name not in args.only:
      continue
    try:
      runners[name] = make(c, enc, dec_in, tgt)
      for _ in range(2):  # compile / warm up
        runners[name]()
    except Exception as e:  # a peer that cannot run here is reported, not fatal
      errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
      runners.pop(name, None)
  times = interleaved_times(runners, args.steps)
  peak = matmul_peak(peak_n, dtype=peak_dtype)
  flops = model_flops_per_step(c, args.batch, args.inputs_length, args.targets_length)
  tokens = args.batch * (args.inputs_length + args.targets_length)
  results = {"machine": {"devices": str(jax.devices()), "cpu_count": os.cpu_count()},
             "preset": args.preset, "shape": shape, "batch": args.batch, "inputs_length": args.inputs_length,
             "targets_length": args.targets_length, "matmul_peak_flops": peak,
             "model_flops_per_step": flops, "hugepage_malloc": hugepages, "frameworks": {},
             "unavailable": errors}
  print(f"{jnp.dtype(peak_dtype).name} matmul peak on this machine: {peak / 1e9:.1f} GFLOP/s; model FLOPs per step {flops / 1e9:.1f} G")
  print("malloc huge pages: " + ("on (as the t5mix command runs)" if hugepages else "off"))
  print(f"{'framework':<10} {'median s/step':>14} {'tokens/s':>10} {'MFU':>6}")
  for name, ts in times.items():
    median = statistics.median(ts)
    r = {"median_step_s": median, "tokens_per_s": tokens / median, "mfu": flops / median / peak}
    results["frameworks"][name] = r
    print(f"{name:<10} {median:>14.4f} {r['tokens_per_s']:>10,.0f} {100 * r['mfu']:>5.1f}%")
  base = results["frameworks"].get("t5mix")
  if base:
    for name, r in results["frameworks"].items():
      if name != "t5mix":
        print(f"t5mix / {name}: {base['tokens_per_s'] / r['tokens_per_s']:.2f}x tokens/s")
  for name, e in errors.items():
    print(f"{name}: unavailable ({e})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
