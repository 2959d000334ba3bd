"""Fine-tuning strategies on the demo data: trainable parameters and measured results.

    python benchmarks/finetune_strategies.py                      # CPU-sized default run
    python benchmarks/finetune_strategies.py --pretrain-steps 1000 --finetune-steps 1000

1. Pre-trains configs/pretrain_span_corruption.yaml (the `mini` model, span corruption on
   demo_text) for --pretrain-steps.
2. Fine-tunes it with each configs/finetune_<strategy>.yaml for --finetune-steps on
   demo_supervised (demo_sentiment, demo_qa, demo_ner, temperature-mixed), from the same
   pre-trained parameters, with the recipe's hyperparameters.
3. Reports per strategy: trainable parameters (for `mini` and for t5-small, configs/model/small.yaml),
   the final training loss per task (mean over the last --log-every steps, with dropout),
   the validation loss per task (teacher-forced, no dropout, the whole validation split), the
   eval metrics of t5mix/evaluate.py when it exists (greedy decoding, --eval-examples per task)
   and the training time. "pretrained only" is the starting point, not fine-tuned.

Writes WORKDIR/results.json and the table under "## Fine-tuning strategies" in
benchmarks/RESULTS.md (that section only; other sections are kept). Everything runs offline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name → (recipe in configs/, extra overrides)
VARIANTS = {
    "full": ("finetune_full", []),
    "gradual_unfreezing": ("finetune_gradual_unfreezing", []),
    "adapters": ("finetune_adapters", []),
    "lora": ("finetune_lora", []),
    "lora_all": ("finetune_lora", ["finetune.lora_targets=[all]"]),
}
TASKS = ("demo_sentiment", "demo_qa", "demo_ner")
SECTION = "## Fine-tuning strategies"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "bench_finetune"))
  p.add_argument("--pretrain-steps", type=int, default=300)
  p.add_argument("--finetune-steps", type=int, default=300)
  p.add_argument("--strategies", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
  p.add_argument("--log-every", type=int, default=25)
  p.add_argument("--eval-examples", type=int, default=100,
                 help="examples per task for t5mix.evaluate (0: skip decoding eval)")
  p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
  p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
  p.add_argument("--keep", action="store_true", help="reuse finished runs in --workdir instead of retraining")
  return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Trainable parameters (abstract models: nothing is allocated).


def trainable_counts(recipe: str, model: str, overrides=()) -> dict:
  import jax
  from flax import nnx

  from t5mix import config as config_lib
  from t5mix import finetune, train
  from t5mix.model import T5
  c = config_lib.load(recipe, [f"model={model}", *overrides])
  model_config = train.build_model(c)
  params = nnx.state(nnx.eval_shape(lambda: T5(model_config, rngs=nnx.Rngs(0))), nnx.Param)
  plan = finetune.make_plan(c, params)
  total = sum(x.size for x in jax.tree.leaves(params))
  out = {"total": int(total), "trainable": plan.trainable_count()}
  if plan.strategy == "gradual_unfreezing":
    out["stage_1"] = plan.trainable_count(1)
    out["stages"] = plan.num_stages
  return out


def describe_recipe(c) -> str:
  f = c.finetune
  lr = f"lr {c.optimizer.learning_rate:g} {c.optimizer.schedule}"
  if f.strategy == "adapters":
    where = "FFN + attention" if f.adapter_after_attention else "after each FFN"
    return f"d={f.adapter_size} {where}; {lr}"
  if f.strategy == "lora":
    return f"r={f.lora_rank}, alpha={f.lora_alpha:g} on {'+'.join(f.lora_targets)}; {lr}"
  if f.strategy == "gradual_unfreezing":
    return f"1 block/stage top-down; {lr}"
  return lr


# ---------------------------------------------------------------------------------------------
# Training and measuring.


PROGRESS = re.compile(r"^step\s+(\d+)/\d+\s+loss ([\d.]+).*?\|\s(.*?)(?:\s+\|\sstage.*)?$")


def run_train(config_path, workdir, overrides, init_from=None, keep=False):
  from t5mix import config as config_lib
  from t5mix import train
  done = os.path.join(workdir, "bench_train.json")
  key = {"recipe": open(config_path).read(), "overrides": list(overrides), "init_from": init_from}
  if keep and os.path.exists(done):
    previous = json.load(open(done))
    if previous.get("key") == key:  # the same run: reuse it
      return previous
  shutil.rmtree(workdir, ignore_errors=True)
  c = config_lib.load(config_path, overrides)
  lines = []

  def log(line):
    lines.append(line)
    print(f"  {line}", flush=True)

  start = time.time()
  train.train(c, workdir, init_from=init_from, log=log)
  seconds = time.time() - start
  last = [m for m in (PROGRESS.match(line) for line in lines) if m][-1]
  task_loss = {k: float(v) for k, v in (kv.split("=") for kv in last.group(3).split())}
  result = {"train_loss": float(last.group(2)), "train_task_loss": task_loss, "seconds": seconds,
            "steps": c.steps, "key": key}
  json.dump(result, open(done, "w"))
  return result


def validation_loss(workdir: str, lengths: dict) -> dict:
  """Teacher-forced per-task loss over the whole validation split of demo_supervised (no dropout)."""
  import jax
  import numpy as np
  from flax import nnx

  from t5mix import checkpoints, input_pipeline, train
  _, model = checkpoints.load_workdir_params(workdir)
  graphdef, params = nnx.split(model, nnx.Param)
  names = [t.name for t in input_pipeline.leaf_tasks("demo_supervised")]

  @jax.jit
  def sums(params, batch):
    logits = nnx.merge(graphdef, params)(batch)
    losses = train.token_losses(logits, batch["decoder_target_tokens"])  # no z-loss: plain cross entropy
    return train.batch_metrics(batch, losses, len(names))

  ds = input_pipeline.get_dataset("demo_supervised", "validation", lengths, seed=0, shuffle=False,
                                  pack=True, num_epochs=1).batch(32)
  loss, tokens = np.zeros(len(names) + 1), np.zeros(len(names) + 1)
  for batch in ds.as_numpy_iterator():
    m = jax.device_get(sums(params, batch))
    loss += m["task_loss_sum"]
    tokens += m["task_tokens"]
  per_task = {n: float(loss[i + 1] / tokens[i + 1]) for i, n in enumerate(names)}
  per_task["all"] = float(loss[1:].sum() / tokens[1:].sum())
  return per_task


def eval_metrics(workdir: str, examples: int) -> dict | None:
  """Per-task mean of the task's metrics (t5mix.evaluate), or None if it is not there."""
  if not examples:
    return None
  try:
    from t5mix import evaluate
  except ImportError:
    return None
  if not hasattr(evaluate, "run_eval"):
    return None
  results = evaluate.run_eval(workdir, evaluate.EvalOptions(max_examples=examples, batch_size=50),
                              log=lambda line: print(f"  {line}", flush=True))
  step = list(results["steps"])[-1]
  entry = results["steps"][step]
  return {"task_means": entry["task_means"], "metrics": entry["metrics"], "average": entry["average"]}


# ---------------------------------------------------------------------------------------------
# The report.


def table(results: dict, args) -> str:
  rows = results["rows"]
  has_eval = any(r.get("eval") for r in rows)
  head = ["strategy", "settings", "trainable (t5-small)", "trainable (mini)",
          "train loss sent/qa/ner", "val loss sent/qa/ner (all)"]
  if has_eval:
    head += ["eval sent/qa/ner (avg)"]
  head += ["time"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

  def pct(n, total):
    return f"{n / 1e6:.2f}M ({100 * n / total:.1f}%)" if n >= 1e5 else f"{n / 1e3:.1f}K ({100 * n / total:.2f}%)"

  for r in rows:
    small, mini = r.get("params_small"), r.get("params_mini")
    if small is None:
      counts_small = counts_mini = "—"
    elif "stage_1" in small:
      counts_small = f"{pct(small['stage_1'], small['total'])} → {pct(small['trainable'], small['total'])}"
      counts_mini = f"{pct(mini['stage_1'], mini['total'])} → {pct(mini['trainable'], mini['total'])}"
    else:
      counts_small, counts_mini = pct(small["trainable"], small["total"]), pct(mini["trainable"], mini["total"])
    train_loss = ("/".join(f"{r['train_task_loss'][t]:.3f}" for t in TASKS) if r.get("train_task_loss") else "—")
    val = r["val_loss"]
    cells = [r["name"], r["settings"], counts_small, counts_mini, train_loss,
             "/".join(f"{val[t]:.3f}" for t in TASKS) + f" ({val['all']:.3f})"]
    if has_eval:
      e = r.get("eval")
      cells.append("/".join(f"{e['task_means'][t]:.1f}" for t in TASKS) + f" ({e['average']:.1f})" if e else "—")
    cells.append(f"{r['seconds'] / 60:.1f} min" if r.get("seconds") else "—")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def section_text(results: dict, args) -> str:
  cmd = "python benchmarks/finetune_strategies.py"
  if args.pretrain_steps != 300 or args.finetune_steps != 300:
    cmd += f" --pretrain-steps {args.pretrain_steps} --finetune-steps {args.finetune_steps}"
  eval_note = (f"eval = mean of each task's metrics (t5mix/evaluate.py: sentiment accuracy/F1, QA "
               f"EM/F1, NER span F1) on the first {args.eval_examples} validation examples, greedy "
               f"decoding; " if any(r.get("eval") for r in results["rows"]) else "")
  return f"""{SECTION}

`{cmd}` ({results['device']}, {results['date']}): the `mini` model pre-trained with
`configs/pretrain_span_corruption.yaml` for {args.pretrain_steps} steps on `demo_text`, then each
`configs/finetune_<strategy>.yaml` for {args.finetune_steps} steps on `demo_supervised` from the same
parameters. Trainable parameters are also given for t5-small (`configs/model/small.yaml`, 76.96M);
for gradual unfreezing, stage 1 → the last stage. Train loss = the last {args.log_every} steps' mean
(with dropout); val loss = teacher-forced cross entropy on the whole validation split (no dropout);
{eval_note}time = wall-clock of the fine-tuning run on a shared 2-core CPU. Learning rates are the
recipes': the best of a short sweep of this same run (full: 1e-3, 3e-3, 1e-2 → 3e-3, also used for
gradual unfreezing; adapters: 3e-3, 1e-2 → 1e-2; LoRA: 3e-3, 1e-2, 3e-2 → 1e-2, 3e-2 being only
marginally better for query+value).

{table(results, args)}
"""


def write_section(path: str, text: str) -> None:
  """Replaces (or appends) our section of RESULTS.md; other sections stay as they are."""
  old = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
  start = old.find(SECTION)
  if start < 0:
    new = old.rstrip("\n") + "\n\n" + text
  else:
    nxt = old.find("\n## ", start + len(SECTION))
    new = old[:start] + text + (old[nxt:] if nxt >= 0 else "")
  with open(path, "w") as f:
    f.write(new)


def main(argv=None):
  args = parse_args(argv)
  from t5mix import cli
  cli._import_quietly()
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)
  import jax

  from t5mix import config as config_lib
  from t5mix import definitions
  definitions.load()
  strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
  common = [f"log_every={args.log_every}"]
  os.makedirs(args.workdir, exist_ok=True)
  pretrain = os.path.join(args.workdir, "pretrain")
  recipe = lambda name: os.path.join(ROOT, "configs", f"{name}.yaml")  # noqa: E731
  lengths = {"inputs": 128, "targets": 32}

  print(f"pre-training {args.pretrain_steps} steps -> {pretrain}", flush=True)
  pre = run_train(recipe("pretrain_span_corruption"), pretrain,
                  common + [f"steps={args.pretrain_steps}", f"checkpoint_every={args.pretrain_steps}"],
                  keep=args.keep)
  rows = [{"name": "pretrained only", "settings": "no fine-tuning", "val_loss": validation_loss(pretrain, lengths),
           "eval": None}]
  for strategy in strategies:
    if strategy not in VARIANTS:
      raise SystemExit(f"unknown strategy {strategy!r} (known: {', '.join(VARIANTS)})")
    name, extra = VARIANTS[strategy]
    path = recipe(name)
    workdir = os.path.join(args.workdir, strategy)
    print(f"fine-tuning: {strategy} ({args.finetune_steps} steps) -> {workdir}", flush=True)
    result = run_train(path, workdir, common + extra + [f"steps={args.finetune_steps}",
                                                        f"checkpoint_every={args.finetune_steps}"],
                       init_from=pretrain, keep=args.keep)
    c = config_lib.load(path, extra)
    row = {"name": strategy.replace("_", " "), "settings": describe_recipe(c), **result,
           "params_small": trainable_counts(path, "small", extra),
           "params_mini": trainable_counts(path, "mini", extra),
           "val_loss": validation_loss(workdir, lengths)}
    row["eval"] = eval_metrics(workdir, args.eval_examples)
    rows.append(row)
    print(f"  -> validation loss {row['val_loss']}, eval {row['eval'] and row['eval']['task_means']}", flush=True)
  results = {"device": f"{jax.devices()[0].platform} ({os.cpu_count()} cores)",
             "date": time.strftime("%Y-%m-%d"), "pretrain": pre, "rows": rows,
             "args": vars(args)}
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  text = section_text(results, args)
  print()
  print(text)
  if not args.no_write:
    write_section(args.results, text)
    print(f"wrote {args.results} ({SECTION!r} section) and {os.path.join(args.workdir, 'results.json')}")


if __name__ == "__main__":
  from t5mix import host_memory
  host_memory.reexec_with_hugepages()  # measure the process the `t5mix` command runs in
  main()
