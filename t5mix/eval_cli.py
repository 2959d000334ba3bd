"""`t5mix eval`, `t5mix predict` and `t5mix embed`: argument parsing and printing.

Kept apart from evaluate.py/predict.py so that building the parser imports nothing heavy
(cli.py imports TensorFlow and JAX only after parsing). All three read a workdir, and load the
definitions its config.yaml names (data.tasks_dir, data.module, data.vocab) as `t5mix train
--config` does, so a run on user-defined tasks is evaluated on those same tasks.
"""

from __future__ import annotations

import argparse
import os

BEAM_SIZE_HELP = ("1 = greedy, >1 = beam search, for every task (default: each task's own "
                  "beam_size, greedy where its definition names none)")
DECODE_DTYPE_HELP = ("decode a copy of the model that computes in this dtype and holds its "
                     "weights in it; bfloat16 halves the weight bytes each step reads (faster on "
                     "GPUs and TPUs), and its outputs differ slightly from float32's (default: the "
                     "model as trained)")


def add_parsers(sub, common) -> None:
  p = sub.add_parser(
      "eval", help="score a run's checkpoints on its tasks' validation metrics",
      description="Decode every task of the run's mixture that has metrics and the split, on each "
                  "chosen checkpoint; print how many examples the lengths cut, a table (steps x "
                  "tasks, * = best checkpoint per task; for classification tasks, rows for a "
                  "constant answer: the train split's majority label and the best single label) "
                  "and the average of task means, and warn when a checkpoint answers one label "
                  "for every example; write eval/results.json and eval/metrics.png into the "
                  "workdir. A checkpoint that cannot be restored is skipped.")
  p.add_argument("--workdir", required=True, help="the run's workdir")
  p.add_argument("--checkpoints", default="all", metavar="all|latest|best|N,M",
                 help="which checkpoints (default: all; best: those keep_best kept)")
  p.add_argument("--split", default="validation", help="split to score (default: validation)")
  p.add_argument("--tasks", metavar="T1,T2", help="tasks or mixtures to score (default: the run's "
                                                    "mixture)")
  p.add_argument("--beam-size", type=int, metavar="K", help=BEAM_SIZE_HELP)
  p.add_argument("--decode-dtype", choices=("float32", "bfloat16"), help=DECODE_DTYPE_HELP)
  p.add_argument("--max-examples", type=int, metavar="N", help="at most N examples per task")
  p.add_argument("--batch-size", type=int, default=64, help="decoding batch size (default: 64)")
  p.add_argument("--inputs-length", type=int, metavar="N",
                 help="truncate inputs to N tokens (default: the run's data.inputs_length)")
  p.add_argument("--targets-length", type=int, metavar="N",
                 help="decode at most N tokens for tasks that set no max_decode_length "
                      "(default: the run's data.targets_length)")
  p.set_defaults(workdir_config=True)
  common(p)

  p = sub.add_parser(
      "predict", help="predict raw inputs with a run's model",
      description="Format raw inputs with the task's template, decode, postprocess. TEXT "
                  "arguments fill the template's single field (e.g. the sentence of "
                  "demo_sentiment); for tasks with several fields (QA: question, context) pass "
                  "--input FILE.jsonl, one JSON object of the task's data columns per line "
                  "(no label needed), e.g. {\"question\": \"...\", \"context\": \"...\"}. NER "
                  "takes {\"sentence\": \"text\"} or {\"tokens\": [...]}.",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("texts", nargs="*", metavar="TEXT", help="inputs (the template's single field)")
  p.add_argument("--workdir", required=True, help="the run's workdir")
  p.add_argument("--task", required=True, help="task whose template and postprocessor to use")
  p.add_argument("--input", metavar="FILE.jsonl", help="JSON lines of the task's fields")
  p.add_argument("--output", metavar="FILE.jsonl", help="write predictions as JSON lines")
  p.add_argument("--checkpoint", metavar="STEP", help="checkpoint step (default: latest)")
  p.add_argument("--beam-size", type=int, metavar="K", help=BEAM_SIZE_HELP)
  p.add_argument("--decode-dtype", choices=("float32", "bfloat16"), help=DECODE_DTYPE_HELP)
  p.add_argument("--batch-size", type=int, default=64, help="decoding batch size (default: 64)")
  p.set_defaults(workdir_config=True)
  common(p)

  p = sub.add_parser(
      "embed", help="mean-pooled encoder embeddings of a task's examples",
      description="Encode each example's inputs and average the encoder outputs over its tokens "
                  "(padding excluded). Writes FILE.npy ([examples, d_model] float32) and, beside "
                  "it, FILE.jsonl with each row's inputs and targets text.")
  p.add_argument("--workdir", required=True, help="the run's workdir")
  p.add_argument("--task", required=True)
  p.add_argument("--split", default="validation", help="default: validation")
  p.add_argument("--out", required=True, metavar="FILE.npy")
  p.add_argument("--checkpoint", metavar="STEP", help="checkpoint step (default: latest)")
  p.add_argument("--max-examples", type=int, metavar="N")
  p.add_argument("--batch-size", type=int, default=64)
  p.set_defaults(workdir_config=True)
  common(p)

  p = sub.add_parser(
      "compare", help="runs side by side: scores, steps, tokens, minutes, differing settings",
      description="For each run: each task's mean metric and the GLUE-style average at its best "
                  "checkpoint (by average) and its latest evaluated one, from its last `t5mix "
                  "eval` (eval/results.json; a run without it is listed as not evaluated), and "
                  "the steps, tokens seen and training minutes of its newest checkpoint. Then the "
                  "settings in which the runs differ (config keys, --init-from, the mixture's "
                  "rate, temperature and per-task rates).")
  p.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="the runs' workdirs")
  p.add_argument("--out", metavar="REPORT.md", help="also write the comparison as markdown")
  p.add_argument("--plot", metavar="FIG.png",
                 help="a grouped bar chart of each run's best-checkpoint scores per task")


def add_probe_parser(sub, common) -> None:
  p = sub.add_parser(
      "probe", help="linear probe on frozen encoder features (feature-based transfer)",
      description="Mean-pool the encoder outputs of a classification task's examples (as `t5mix "
                  "embed` does), fit a logistic regression (scikit-learn, standardised features) "
                  "on the training split and print its accuracy on the held-out split beside the "
                  "majority class. --random-init probes a randomly initialised encoder of the "
                  "run's shape instead: the floor the trained encoder should clear.")
  p.add_argument("--workdir", required=True, help="the run's workdir (or a `t5mix import-hf` one)")
  p.add_argument("--task", required=True, help="a classification task")
  p.add_argument("--train-split", default="train", help="split to fit on (default: train)")
  p.add_argument("--split", default="validation", help="split to score (default: validation)")
  p.add_argument("--checkpoint", metavar="STEP", help="checkpoint step (default: latest)")
  p.add_argument("--random-init", action="store_true",
                 help="a random encoder of the run's shape instead of a checkpoint")
  p.add_argument("--max-train-examples", type=int, metavar="N", help="fit on the first N examples")
  p.add_argument("--max-examples", type=int, metavar="N", help="score the first N examples")
  p.add_argument("--inputs-length", type=int, metavar="N",
                 help="truncate inputs to N tokens (default: the run's data.inputs_length)")
  p.add_argument("--C", type=float, default=1.0, dest="regularization",
                 help="inverse L2 strength of the logistic regression (default: 1.0)")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--out", metavar="FILE.json", help="also write the numbers as JSON")
  p.set_defaults(workdir_config=True)
  common(p)


def workdir_definitions(workdir: str, vocab: str | None) -> tuple[str | None, str | None]:
  """(the run's config.yaml or None, the vocabulary to tokenise with) for a workdir command:
  --vocab if given, else the workdir's own (its spiece.model, else its config's data.vocab;
  a workdir from `t5mix import-hf` has spiece.model and no config.yaml)."""
  from t5mix import checkpoints
  from t5mix import vocab as vocab_lib
  checkpoints.check_workdir(workdir)
  config_path = os.path.join(workdir, "config.yaml")
  config_path = config_path if os.path.exists(config_path) else None
  return config_path, vocab or vocab_lib.workdir_vocabulary(workdir)


def cmd_eval(args) -> int:
  from t5mix import evaluate
  options = evaluate.EvalOptions(
      checkpoints=args.checkpoints, split=args.split,
      tasks=[t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
      beam_size=args.beam_size, max_examples=args.max_examples, batch_size=args.batch_size,
      inputs_length=args.inputs_length, targets_length=args.targets_length,
      decode_dtype=args.decode_dtype)
  evaluate.run_eval(args.workdir, options)
  return 0


def cmd_predict(args) -> int:
  from t5mix import predict
  step, results = predict.predict(args.workdir, args.task, args.texts, args.input,
                                  checkpoint=args.checkpoint, beam_size=args.beam_size,
                                  batch_size=args.batch_size, decode_dtype=args.decode_dtype)
  if args.output:
    predict.write_jsonl(results, args.output)
    print(f"wrote {len(results)} predictions (checkpoint {step}) to {args.output}")
    return 0
  for i, r in enumerate(results):
    print(f"[{i}] {r['inputs']}")
    note = "  (not a label word)" if r["parsed"] is None else ""
    print(f"    -> {r['prediction']}{note}")
  return 0


def cmd_embed(args) -> int:
  from t5mix import predict
  step, embeddings, jsonl = predict.embed(args.workdir, args.task, args.out, split=args.split,
                                          checkpoint=args.checkpoint,
                                          max_examples=args.max_examples,
                                          batch_size=args.batch_size)
  print(f"wrote {args.out} ({embeddings.shape[0]} x {embeddings.shape[1]} float32, checkpoint "
        f"{step}) and {jsonl}")
  return 0


def cmd_compare(args) -> int:
  from t5mix import compare
  compare.compare(args.workdirs, out=args.out, plot_path=args.plot)
  return 0


def cmd_probe(args) -> int:
  from t5mix import probe
  result = probe.run_probe(
      args.workdir, args.task, train_split=args.train_split, split=args.split,
      checkpoint=args.checkpoint, random_init=args.random_init,
      max_train_examples=args.max_train_examples, max_examples=args.max_examples,
      inputs_length=args.inputs_length, regularization=args.regularization,
      batch_size=args.batch_size)
  print(probe.describe(result))
  if args.out:
    probe.write_json(result, args.out)
    print(f"wrote {args.out}")
  return 0


COMMANDS = {"probe": cmd_probe, "eval": cmd_eval, "predict": cmd_predict, "embed": cmd_embed, "compare": cmd_compare}
