"""The `t5mix` command line.

Every command takes the user's own definitions with `--tasks-dir DIR_OR_FILE` (YAML) and
`--module NAME_OR_FILE.py` (Python), repeatable, on top of the built-in ones. A problem with the
user's input prints `t5mix: error: <one line>` and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys

from t5mix import eval_cli  # light: parsers and commands of eval/predict/embed

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported


def _common(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("definitions")
  group.add_argument("--tasks-dir", action="append", default=[], metavar="PATH",
                     help="YAML file or directory of task/mixture definitions (repeatable)")
  group.add_argument("--module", action="append", default=[], metavar="NAME",
                     help="Python module (dotted name or .py file) that registers tasks (repeatable)")
  group.add_argument("--vocab", metavar="PATH",
                     help="the vocabulary every task is tokenised with: a SentencePiece .model, "
                          "'byte', 'demo' or 't5' (default: a workdir's or --init-from's, else "
                          "what each task names; $T5MIX_VOCAB or byte for tasks that name none)")
  group.add_argument("--tfds-data-dir", metavar="DIR",
                     help="where TFDS datasets are prepared (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")


def _distributed_flags(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group(
      "multi-process (one process per host, or per GPU; see t5mix/distributed.py)",
      "Started automatically under srun (SLURM), mpirun (Open MPI), a multi-host Cloud TPU, or "
      "with JAX_COORDINATOR_ADDRESS / JAX_PROCESS_COUNT / JAX_PROCESS_ID set.")
  group.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None,
                     help="call jax.distributed.initialize (default: when the flags below or a "
                          "launcher's environment say so)")
  group.add_argument("--coordinator-address", metavar="HOST:PORT",
                     help="process 0's address, the same for all processes")
  group.add_argument("--num-processes", type=int, metavar="N", help="number of processes")
  group.add_argument("--process-id", type=int, metavar="I", help="this process, 0 .. N-1")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="t5mix", description="Multitask T5 training with temperature-based dataset mixing.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

  p = sub.add_parser("tasks", help="list registered tasks and mixtures",
                     description="List tasks (name, kind, source, splits with sizes, metrics) and mixtures.")
  p.add_argument("--no-counts", action="store_true", help="do not read data to count examples")
  _common(p)

  p = sub.add_parser("show", help="print examples of a task, or the rate table of a mixture",
                     description="For a task: the first N examples as inputs -> targets with token "
                                 "lengths, then how many examples of the split the lengths cut "
                                 "(for QA also how many lose the answer). For a mixture: each "
                                 "task's examples, capped examples, rate and expected examples per "
                                 "1,000 sampled.")
  p.add_argument("name", help="task or mixture name")
  p.add_argument("--split", default="train", help="split to show (default: train)")
  p.add_argument("-n", type=int, default=5, help="number of examples (default: 5)")
  p.add_argument("--plot", metavar="FILE.png", help="mixture: also write a bar chart of the rates")
  p.add_argument("--inputs-length", type=int, default=128,
                 help="inputs length to count truncation against; for span-corruption tasks, the "
                      "one that sets the chunk size (default: 128, as data.inputs_length)")
  p.add_argument("--targets-length", type=int, default=32,
                 help="targets length to count truncation against (default: 32, as "
                      "data.targets_length)")
  _common(p)

  p = sub.add_parser("train", help="train a model on a task or mixture",
                     description="Train per a YAML config (configs/*.yaml) with dotted overrides. "
                                 "Rerunning the same command in the same workdir resumes from its "
                                 "latest checkpoint. SIGTERM/Ctrl-C save a checkpoint before exit.")
  p.add_argument("--config", help="YAML config file or a name in configs/ (default: the built-in "
                                  "demo settings: tiny model, demo mixture, CPU-sized)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config key, e.g. --set optimizer.learning_rate=3e-4 (repeatable)")
  p.add_argument("--workdir", default="workdirs/demo", help="where checkpoints, logs and the "
                                                            "resolved config go (default: workdirs/demo)")
  p.add_argument("--init-from", metavar="WORKDIR_OR_CKPT",
                 help="start from these parameters (fresh optimizer, step 0): fine-tuning")
  p.add_argument("--quiet", action="store_true", help="no per-step progress lines")
  p.add_argument("--cache-dir", action="append", default=[], metavar="DIR",
                 help="where `t5mix cache` wrote the tasks' caches (repeatable; adds to "
                      "data.cache_dirs); read with --set data.use_cached=true")
  _distributed_flags(p)
  _common(p)

  p = sub.add_parser("cache", help="preprocess tasks once, offline, on Apache Beam (seqio's cache)",
                     description="Run the deterministic part of the tasks' preprocessing (reading, "
                                 "formatting, tokenising) in seqio's Beam caching pipeline and "
                                 "write seqio's cache layout (TFRecord shards, info.*.json, "
                                 "stats.*.json) under --output-dir; train on it with --cache-dir "
                                 "DIR --set data.use_cached=true. Options after `--` go to Beam, "
                                 "e.g. -- --direct_num_workers 2 --direct_running_mode "
                                 "multi_processing. Needs the extra: pip install -e \".[cache]\" && "
                                 "pip install --no-deps apache-beam==2.78.0 (README, Scaling out).")
  p.add_argument("names", nargs="+", metavar="TASK_OR_MIXTURE", help="tasks or mixtures to cache")
  p.add_argument("--output-dir", required=True, metavar="DIR",
                 help="where the caches go (local, or gs:// and the like for a cluster runner)")
  p.add_argument("--runner", default="DirectRunner",
                 help="Beam runner: DirectRunner (default), DataflowRunner, FlinkRunner or SparkRunner")
  p.add_argument("--overwrite", action="store_true",
                 help="replace caches made from another definition (they are an error otherwise)")
  p.add_argument("--min-shards", type=int, default=64, metavar="N",
                 help="TFRecord shards per split, at least (default: 64, as seqio_cache_tasks)")
  _common(p)

  p = sub.add_parser("import-hf", help="make a workdir from a HuggingFace T5 checkpoint",
                     description="Read config.json + model.safetensors (never pickle) of a T5 v1.0, "
                                 "v1.1, flan-t5 or mT5 checkpoint; write model.yaml, spiece.model "
                                 "and a step-0 parameter checkpoint into --out.")
  p.add_argument("hf_dir", metavar="HF_DIR_OR_NAME",
                 help="a checkpoint directory, or a HuggingFace Hub name (google/flan-t5-small, "
                      "optionally @REVISION) taken from the HF cache (HF_HOME, HF_HUB_CACHE) or "
                      "downloaded into it unless HF_HUB_OFFLINE=1")
  p.add_argument("--out", required=True, metavar="WORKDIR")

  p = sub.add_parser("export-hf", help="write a workdir's parameters as a HuggingFace T5 directory",
                     description="Write config.json + model.safetensors (+ spiece.model and "
                                 "tokenizer files) loadable by transformers' "
                                 "T5ForConditionalGeneration and AutoTokenizer.")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True, metavar="HF_DIR")
  p.add_argument("--checkpoint", metavar="STEP", help="checkpoint step (default: latest)")
  p.add_argument("--vocab-file", help="SentencePiece model to copy as spiece.model")

  p = sub.add_parser("adapters", help="adapter / LoRA files of fine-tuning runs (t5mix/adapters.py)")
  asub = p.add_subparsers(dest="adapters_command", metavar="COMMAND", required=True)
  a = asub.add_parser("export", help="write the trained adapter/LoRA (and norm) params of a run",
                      description="Write the parameters that an adapters or lora run trains, as "
                                  "safetensors with the adapter settings in its metadata.")
  a.add_argument("--workdir", required=True)
  a.add_argument("--out", required=True, metavar="FILE.safetensors")
  a.add_argument("--checkpoint", metavar="STEP", help="checkpoint step (default: latest)")
  a = asub.add_parser("merge", help="base workdir + adapter file -> a workdir for eval / export-hf",
                      description="Combine a base workdir's parameters with an adapter file into a "
                                  "new workdir (model.yaml, config.yaml, step-0 checkpoint); LoRA "
                                  "is folded into the weights unless --keep-lora.")
  a.add_argument("--base", required=True, metavar="WORKDIR")
  a.add_argument("--adapters", required=True, metavar="FILE.safetensors")
  a.add_argument("--out", required=True, metavar="WORKDIR")
  a.add_argument("--keep-lora", action="store_true", help="keep LoRA params separate (no folding)")

  p = sub.add_parser("vocab", help="vocabulary tools")
  vsub = p.add_subparsers(dest="vocab_command", metavar="COMMAND", required=True)
  v = vsub.add_parser("train", help="train a SentencePiece vocabulary on the text of tasks",
                      description="Train a SentencePiece model (pad 0, EOS 1, UNK 2; seqio adds "
                                  "T5's 100 sentinels) on the inputs and targets of a task or mixture.")
  v.add_argument("--mixture", "--task", dest="name", required=True, help="task or mixture name")
  v.add_argument("--out", required=True, help="output .model file")
  v.add_argument("--vocab-size", type=int, default=8000, help="pieces, sentinels excluded (default: 8000)")
  v.add_argument("--split", default="train")
  v.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
  _common(v)
  eval_cli.add_parsers(sub, _common)  # eval, predict, embed
  eval_cli.add_probe_parser(sub, _common)
  return parser


def _load_definitions(args) -> None:
  """Registers the built-in definitions and the user's: flags, the run config, and for
  eval/predict/embed the workdir's config.yaml. Sets the vocabulary every task tokenises with:
  --vocab, or the workdir's (`train` decides its own: train.decide_vocabulary)."""
  from t5mix import config as config_lib
  from t5mix import definitions, registry
  from t5mix import vocab as vocab_lib
  tasks_dir = [os.path.abspath(p) for p in getattr(args, "tasks_dir", [])]
  modules = [os.path.abspath(m) if m.endswith(".py") else m for m in getattr(args, "module", [])]
  vocab = getattr(args, "vocab", None)
  if vocab not in (None, *vocab_lib.NAMES):
    vocab = os.path.abspath(vocab)
  if getattr(args, "workdir_config", False):  # eval/predict/embed: the run's own config.yaml
    args.config, vocab = eval_cli.workdir_definitions(args.workdir, vocab)
  c = None
  if args.command == "train" or getattr(args, "config", None):  # a run config names definitions
    c = config_lib.load(args.config, getattr(args, "set", []))
    tasks_dir += [os.path.abspath(p) for p in c.data.tasks_dir]
    modules += [os.path.abspath(m) if m.endswith(".py") else m for m in c.data.module]
  if getattr(args, "tfds_data_dir", None):
    registry.TFDS_DATA_DIR = args.tfds_data_dir
  definitions.load(tasks_dir, modules)
  if args.command == "train":  # the run saves them all in its config.yaml, for eval and resume
    cache_dirs = c.data.cache_dirs + [d if "://" in d else os.path.abspath(d) for d in args.cache_dir]
    args.run_config = dataclasses.replace(c, data=dataclasses.replace(
        c.data, tasks_dir=list(dict.fromkeys(tasks_dir)), module=list(dict.fromkeys(modules)),
        vocab=vocab or c.data.vocab, cache_dirs=list(dict.fromkeys(cache_dirs))))
    return
  if vocab:
    registry.RUN_VOCABULARY = vocab_lib.get_vocabulary(vocab)
    vocab_lib.check_vocabulary(registry.RUN_VOCABULARY)
  if c is not None and getattr(args, "workdir_config", False):
    edited = definitions.changed_files(c.data.hashes)
    if edited:
      print(f"note: edited since {args.workdir}'s run was trained: {', '.join(edited)}",
            file=sys.stderr)


def _import_quietly() -> None:
  """Imports TensorFlow and JAX with C++ start-up chatter (oneDNN, CUDA stubs) silenced."""
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    sys.stderr.flush()
    os.dup2(devnull, 2)
    import tensorflow  # noqa: F401
    import seqio  # noqa: F401
  finally:
    os.dup2(saved, 2)
    os.close(devnull)
    os.close(saved)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  beam_options = []
  if argv[:1] == ["cache"] and "--" in argv:  # the rest is Beam's, which Beam parses
    argv, beam_options = argv[:argv.index("--")], argv[argv.index("--") + 1:]
  args = build_parser().parse_args(argv)
  args.beam_options = beam_options
  _import_quietly()
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)
  from t5mix.errors import UserError
  try:
    if args.command == "train":  # before anything touches JAX devices
      from t5mix import distributed
      distributed.initialize(args.distributed, args.coordinator_address, args.num_processes,
                             args.process_id)
      distributed.hide_accelerators_from_tensorflow()
    _load_definitions(args)
    return COMMANDS[args.command](args) or 0
  except UserError as e:
    print(f"t5mix: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:  # Ctrl-C; in train also SIGTERM (train.Interrupted)
    signal_name = getattr(e, "signal_name", "SIGINT")
    if args.command == "train":  # outside the loop's save-and-exit: say what a rerun does
      from t5mix import checkpoints
      print(f"t5mix: {checkpoints.interrupted_message(args.workdir, signal_name)}", file=sys.stderr)
    else:
      print("t5mix: interrupted", file=sys.stderr)
    return 143 if signal_name == "SIGTERM" else 130


def cmd_tasks(args) -> int:
  import seqio
  from t5mix import mixing
  from t5mix.errors import UserError

  rows, errors = [], []
  for name in sorted(seqio.TaskRegistry.names()):
    task = seqio.TaskRegistry.get(name)
    spec = getattr(task, "t5mix_spec", None)
    splits = []
    for split in task.splits:
      count = "?"
      if not args.no_counts:
        try:
          n = task.num_input_examples(split)
          count = f"{n:,}" if n is not None else "?"
        except UserError as e:
          # An unprepared TFDS dataset is normal (the built-in ones are until `tfds build`).
          count = "not prepared" if "not prepared" in str(e) else "error"
          reason = str(e) if f"task {name!r}" in str(e) else f"task {name!r}: {e}"
          if count == "error" and reason not in errors:  # splits of one file fail alike
            errors.append(reason)
      splits.append(f"{split}={count}")
    # The names a definition's `metrics:` takes; a plain seqio task's are its functions' names.
    metrics = ",".join(spec.metric_names if spec else [f.__name__ for f in task.metric_fns]) or "-"
    rows.append((name, spec.kind if spec else "seqio", spec.source_description if spec else
                 type(task.source).__name__, " ".join(splits), metrics))
  _print_table(("task", "kind", "source", "splits", "metrics"), rows)
  print()
  rows = []
  for name in sorted(seqio.MixtureRegistry.names()):
    mixture = seqio.MixtureRegistry.get(name)
    spec = getattr(mixture, "t5mix_spec", None)
    rate = spec.rate if spec else "seqio"
    if spec and spec.rate == "temperature":
      rate += f" T={spec.temperature:g}"
    if spec and spec.maximum:
      rate += f" K={spec.maximum:,}"
    entries = [e if isinstance(e, str) else e["name"] for e in spec.tasks] if spec else [
        t.name for t in mixture.tasks]
    rows.append((name, rate, ", ".join(entries)))
  _print_table(("mixture", "rate", "tasks"), rows)
  del mixing
  for error in errors:  # after the tables, so that the reasons are the last lines one sees
    print(f"t5mix: error: {error}", file=sys.stderr)
  return 2 if errors else 0


def cmd_show(args) -> int:
  import seqio
  from t5mix import registry
  provider = registry.get_task_or_mixture(args.name)
  if isinstance(provider, seqio.Mixture):
    return _show_mixture(provider, args)
  return _show_task(provider, args)


def _show_task(task, args) -> int:
  from t5mix.errors import UserError
  from t5mix.vocab import check_vocabulary
  if args.split not in task.splits:
    raise UserError(f"task {task.name!r} has no split {args.split!r}; it has {', '.join(task.splits)}")
  vocab = task.output_features["targets"].vocabulary
  check_vocabulary(vocab)
  lengths = None
  spec = getattr(task, "t5mix_spec", None)
  if spec is not None and spec.kind == "text":  # span corruption needs lengths to chunk text
    from t5mix.span_corruption import random_spans_helper
    lengths = {"inputs": args.inputs_length,
               "targets": random_spans_helper(args.inputs_length, spec.noise_density,
                                              spec.mean_noise_span_length)[1]}
  ds = task.get_dataset(lengths, split=args.split, shuffle=False, seed=0)
  for i, ex in enumerate(ds.take(args.n).as_numpy_iterator()):
    inputs, targets = ex["inputs"], ex["targets"]
    print(f"[{i}] inputs ({len(inputs)} tokens): {vocab.decode(inputs.tolist())}")
    print(f"    targets ({len(targets)} tokens): {vocab.decode(targets.tolist())}")
  from t5mix import input_pipeline
  truncation = input_pipeline.count_truncation(
      task, args.split, {"inputs": args.inputs_length, "targets": args.targets_length})
  if truncation:  # span corruption has none: its chunks fit by construction
    print(truncation.describe())
  return 0


def _show_mixture(mixture, args) -> int:
  from t5mix import mixing
  rows = mixing.rate_table(mixture)
  spec = getattr(mixture, "t5mix_spec", None)
  if spec:
    how = spec.rate + (f", T={spec.temperature:g}" if spec.rate == "temperature" else "")
    how += f", K={spec.maximum:,}" if spec.maximum else ""
    print(f"mixture {mixture.name}: {how}")
  fmt = lambda n: f"{n:,}" if n is not None else "?"  # noqa: E731
  _print_table(("task", "examples", "capped", "rate %", "per 1,000"),
               [(r.task, fmt(r.examples), fmt(r.capped), f"{100 * r.rate:.2f}", f"{r.per_1000:.1f}")
                for r in rows], right=(1, 2, 3, 4))
  if args.plot:
    _plot_rates(mixture.name, rows, args.plot)
    print(f"wrote {args.plot}")
  return 0


def _plot_rates(name, rows, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
  ax.barh([r.task for r in rows][::-1], [100 * r.rate for r in rows][::-1], color="tab:blue")
  for i, r in enumerate(rows[::-1]):
    ax.text(100 * r.rate, i, f" {100 * r.rate:.1f}%", va="center")
  ax.set_xlabel("share of sampled examples (%)")
  ax.set_title(f"mixture {name}")
  ax.set_xlim(0, max(100 * r.rate for r in rows) * 1.2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def cmd_vocab(args) -> int:
  from t5mix import input_pipeline, registry, vocab
  from t5mix.errors import UserError

  def texts():
    for task in input_pipeline.leaf_tasks(args.name):
      spec = getattr(task, "t5mix_spec", None)
      if spec is None or spec.tfds and spec.kind == "text":
        raise UserError(f"task {task.name!r}: vocab train reads t5mix file/TFDS tasks only")
      if args.split not in spec.splits:
        continue
      for ex in registry.examples(spec, args.split):
        yield ex["inputs"]
        yield ex["targets"]

  path = vocab.train_sentencepiece(texts(), args.out, args.vocab_size, args.model_type)
  print(f"wrote {path} ({args.vocab_size} pieces + {vocab.EXTRA_IDS} sentinels)")
  return 0


def _print_table(header, rows, right=()) -> None:
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  def line(cells):
    return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
  print(line(header))
  print("  ".join("-" * w for w in widths))
  for row in rows:
    print(line(row))


def cmd_train(args) -> int:
  from t5mix import train
  with train.sigterm_interrupts():  # reported like Ctrl-C, not a silent end
    train.train(args.run_config, args.workdir, init_from=args.init_from, quiet=args.quiet)
  return 0


def cmd_cache(args) -> int:
  from t5mix import cache  # Apache Beam: the optional extra, a UserError when missing
  from t5mix import vocab as vocab_lib
  defs = cache.Definitions(  # as _load_definitions registered them here, for Beam's workers
      tuple(os.path.abspath(p) for p in args.tasks_dir),
      tuple(os.path.abspath(m) if m.endswith(".py") else m for m in args.module),
      args.vocab if args.vocab in (None, *vocab_lib.NAMES) else os.path.abspath(args.vocab),
      args.tfds_data_dir)
  output_dir = args.output_dir if "://" in args.output_dir else os.path.abspath(args.output_dir)
  written = cache.cache_tasks(args.names, output_dir, defs, runner=args.runner,
                              beam_options=args.beam_options, overwrite=args.overwrite,
                              min_shards=args.min_shards)
  if written:
    print(f"train on them with: t5mix train --cache-dir {shlex.quote(output_dir)} "
          "--set data.use_cached=true ...")
  return 0


def cmd_import_hf(args) -> int:
  from t5mix import convert
  from t5mix import vocab as vocab_lib
  path = convert.import_hf(args.hf_dir, args.out)
  out = shlex.quote(args.out)
  if os.path.exists(os.path.join(args.out, vocab_lib.WORKDIR_VOCAB_FILE)):
    source = f"the model and its vocabulary come from {out}"
  else:  # the HF checkpoint had no spiece.model
    source = f"the model comes from {out}; name its vocabulary with --vocab FILE.model"
  print(f"wrote {path}; fine-tune with: t5mix train --init-from {out} --set data.mixture=NAME "
        f"--workdir RUN ({source})")
  return 0


def cmd_export_hf(args) -> int:
  from t5mix import convert
  convert.export_hf(args.workdir, args.out, args.checkpoint, args.vocab_file)
  print(f"wrote {args.out}")
  return 0


def cmd_adapters(args) -> int:
  from t5mix import adapters
  if args.adapters_command == "export":
    count, size = adapters.export_adapters(args.workdir, args.out, args.checkpoint)
    print(f"wrote {args.out} ({count} tensors, {size / 1e6:.2f} MB)")
  else:
    path = adapters.merge_adapters(args.base, args.adapters, args.out, fold_lora=not args.keep_lora)
    print(f"wrote {path}; evaluate with: t5mix eval --workdir {args.out}")
  return 0


COMMANDS = {"tasks": cmd_tasks, "show": cmd_show, "train": cmd_train, "vocab": cmd_vocab,
            "cache": cmd_cache, "import-hf": cmd_import_hf, "export-hf": cmd_export_hf}

COMMANDS["adapters"] = cmd_adapters
COMMANDS.update(eval_cli.COMMANDS)


def run() -> None:
  """The `t5mix` command (pyproject's [project.scripts]): `main` in a process tuned for training."""
  from t5mix import host_memory
  host_memory.reexec_with_hugepages()  # first: it re-executes the process once
  sys.exit(main())


if __name__ == "__main__":
  run()
