"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from flags or the environment.

`t5mix train` runs several processes, each driving its local devices: one per host (a TPU VM
worker, a GPU node) or one per GPU (what jax sets up under srun and mpirun: each task gets the
GPU of its local rank). Together they form one global device mesh. The processes find each other
through a coordinator (process 0's address).

  explicit:  --distributed (or any of the flags below) with --coordinator-address HOST:PORT
             --num-processes N --process-id I, or the same in JAX_COORDINATOR_ADDRESS,
             JAX_PROCESS_COUNT (JAX_NUM_PROCESSES), JAX_PROCESS_ID
  automatic: JAX_COORDINATOR_ADDRESS in the environment; a SLURM step of more than one task
             (srun); Open MPI (mpirun); a multi-host Cloud TPU (TPU_WORKER_HOSTNAMES lists more
             than one worker, or MEGASCALE_COORDINATOR_ADDRESS): jax detects the rest.
  never:     --no-distributed.

Must run before anything touches JAX devices. On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import os

from t5mix.errors import UserError


def detected_environment(env=os.environ) -> str | None:
  """The multi-process launcher this process runs under, or None."""
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if _int(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")) > 1 and "SLURM_PROCID" in env and (
      "SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
    return "SLURM"
  if _int(env.get("OMPI_COMM_WORLD_SIZE")) > 1:
    return "Open MPI"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "Cloud TPU"
  return None


def _int(text) -> int:
  try:
    return int(text)
  except (TypeError, ValueError):
    return 0


def initialize(distributed: bool | None = None, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               env=os.environ) -> bool:
  """Calls jax.distributed.initialize when asked to or when a launcher is detected.

  distributed: True (always), False (never) or None (when flags or the environment say so).
  Returns whether it initialized.
  """
  explicit = any(x is not None for x in (coordinator_address, num_processes, process_id))
  if distributed is False:
    if explicit:
      raise UserError("--no-distributed contradicts --coordinator-address/--num-processes/"
                      "--process-id")
    return False
  launcher = detected_environment(env)
  if not (distributed or explicit or launcher):
    return False
  import jax
  from jax._src import distributed as jax_distributed
  from jax._src import xla_bridge
  if jax_distributed.global_state.client is not None:
    return True  # already initialized (e.g. by the caller)
  if xla_bridge.backends_are_initialized():
    raise UserError("--distributed: JAX devices were already in use before "
                    "jax.distributed.initialize; start a fresh process")
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and (env.get("JAX_PROCESS_COUNT") or env.get("JAX_NUM_PROCESSES")):
    num_processes = _int(env.get("JAX_PROCESS_COUNT") or env.get("JAX_NUM_PROCESSES"))
  if process_id is None and env.get("JAX_PROCESS_ID", "") != "":
    process_id = _int(env.get("JAX_PROCESS_ID"))
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in env:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except (ValueError, TypeError, RuntimeError) as e:
    how = f"detected {launcher}" if launcher and not explicit else "flags"
    raise UserError(f"jax.distributed.initialize failed ({how}: coordinator "
                    f"{coordinator_address or 'auto'}, processes {num_processes or 'auto'}, "
                    f"process id {process_id if process_id is not None else 'auto'}): "
                    f"{str(e).splitlines()[0][:200]}") from None
  return True


def hide_accelerators_from_tensorflow() -> None:
  """TensorFlow only runs the input pipeline: keep it off the GPUs/TPUs that JAX uses (it
  would otherwise reserve most of their memory)."""
  import tensorflow as tf
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # devices already initialized, or no such device type
      pass


def is_primary() -> bool:
  """Process 0: the one that prints progress and writes logs and config files."""
  import jax
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process reaches this point (nothing to wait for in one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
