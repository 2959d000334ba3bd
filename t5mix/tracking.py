"""Where a run's logs go: TensorBoard event files (WORKDIR/tensorboard) and, when
`logging.wandb.project` is set, a Weights & Biases run with the same scalars and samples, the
resolved config and the mixture's rate table. Process 0 writes for all; the others get a tracker
that writes nothing.

wandb is an optional extra (`pip install -e ".[wandb]"`). A resumed run continues its wandb run:
the run's id is kept in WORKDIR/wandb_run_id. wandb drops what a resumed run logs at steps it has
already seen (the steps between the last checkpoint and an interruption, run again).
"""

from __future__ import annotations

import os
from typing import Callable

import tensorflow as tf

from t5mix import checkpoints, distributed
from t5mix import config as config_lib
from t5mix.errors import UserError, first_line

try:  # the optional extra; asking for wandb without it is `check`'s error
  import wandb
except ImportError:
  wandb = None

SAMPLE_COLUMNS = ("input", "target", "prediction")


def check(c: config_lib.TrainConfig) -> None:
  """Before a run starts: wandb asked for (logging.wandb.project) but not installed is an error."""
  if c.logging.wandb.project and wandb is None:
    raise UserError("config key 'logging.wandb': wandb is not installed; install it with "
                    "pip install -e \".[wandb]\" (or leave logging.wandb.project unset)")


class Tracker:
  """Scalars and sample tables of a run, to TensorBoard and (`run`, optional) wandb."""

  def __init__(self, writer, run=None):
    self.writer, self.run = writer, run

  @classmethod
  def open(cls, c: config_lib.TrainConfig, workdir: str, run_info: dict,
           log: Callable[[str], None] = print) -> "Tracker":
    """run_info: run.json's content (--init-from, the mixture's rates), for wandb's config."""
    if not distributed.is_primary():
      return cls(tf.summary.create_noop_writer())
    writer = tf.summary.create_file_writer(os.path.join(workdir, checkpoints.TENSORBOARD_DIR))
    return cls(writer, _start_wandb(c, workdir, run_info, log) if c.logging.wandb.project else None)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    with self.writer.as_default(step=step):
      for tag, value in values.items():
        tf.summary.scalar(tag, value)
    if self.run is not None:
      self.run.log(dict(values), step=step)

  def samples(self, step: int, task: str, rows: list[dict[str, str]]) -> None:
    """Examples with SAMPLE_COLUMNS as `samples/TASK`: TensorBoard text (a 2-D string tensor,
    shown as a table whose first row names the columns) and a wandb Table."""
    if not rows:
      return
    table = [[row[column] for column in SAMPLE_COLUMNS] for row in rows]
    with self.writer.as_default(step=step):
      tf.summary.text(f"samples/{task}", tf.constant([list(SAMPLE_COLUMNS)] + table))
    if self.run is not None:
      self.run.log({f"samples/{task}": wandb.Table(columns=list(SAMPLE_COLUMNS), data=table)},
                   step=step)

  def __enter__(self) -> "Tracker":
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    """Flushes; a wandb run ends marked failed when the run stopped on an exception."""
    self.writer.flush()
    if self.run is not None:
      self.run.finish(exit_code=0 if exc_type is None else 1)
      self.run = None


def _start_wandb(c: config_lib.TrainConfig, workdir: str, run_info: dict, log):
  settings = c.logging.wandb
  id_path = os.path.join(workdir, checkpoints.WANDB_RUN_ID_FILE)
  run_id = None
  if os.path.exists(id_path):
    with open(id_path) as f:
      run_id = f.read().strip() or None
  try:
    run = wandb.init(project=settings.project, entity=settings.entity, mode=settings.mode,
                     dir=workdir, id=run_id, resume="allow" if run_id else None,
                     config={**config_lib.to_dict(c), "run": run_info}, allow_val_change=True,
                     settings=wandb.Settings(silent=True, console="off"))  # our stdout stays ours
  except wandb.errors.Error as e:
    raise UserError(f"config key 'logging.wandb': cannot start a wandb run ({first_line(e)}); "
                    "without network, use logging.wandb.mode offline") from None
  with open(id_path, "w") as f:
    f.write(run.id)
  where = run.url if settings.mode == "online" else f"{settings.mode}, files in {run.dir}"
  log(f"wandb: {'resumed' if run_id else 'started'} run {run.id} of project {settings.project} ({where})")
  return run
