"""Starting the multi-process JAX runtime: TPU pods, SLURM, or an explicit coordinator.

Must run before anything touches a JAX backend. Sources, first found wins:
1. explicit: `--coordinator HOST:PORT --num-processes N --process-id I`, or the environment
   variables MMEARTH_COORDINATOR / MMEARTH_NUM_PROCESSES / MMEARTH_PROCESS_ID;
2. SLURM with more than one task (`srun`, one process per GPU): JAX reads SLURM's variables;
3. a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists several hosts): JAX auto-detects;
otherwise a single process, and nothing is initialised.
"""
from __future__ import annotations

import os
from typing import Mapping

import jax


def _env_int(env: Mapping[str, str], key: str) -> int | None:
  value = env.get(key)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def plan(coordinator: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, env: Mapping[str, str] | None = None) -> dict | None:
  """The keyword arguments for `jax.distributed.initialize`, or None for a single process."""
  env = os.environ if env is None else env
  coordinator = coordinator or env.get("MMEARTH_COORDINATOR") or None
  num_processes = num_processes if num_processes is not None else _env_int(
      env, "MMEARTH_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int(env, "MMEARTH_PROCESS_ID")
  if coordinator or num_processes is not None or process_id is not None:
    missing = [name for name, v in [("--coordinator / MMEARTH_COORDINATOR", coordinator),
                                    ("--num-processes / MMEARTH_NUM_PROCESSES", num_processes),
                                    ("--process-id / MMEARTH_PROCESS_ID", process_id)] if v is None]
    if missing:
      raise ValueError(f"an explicit multi-process launch also needs {', '.join(missing)}")
    if ":" not in coordinator:
      raise ValueError(f"coordinator {coordinator!r} must be HOST:PORT")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process id {process_id} is not in [0, {num_processes})")
    return {"coordinator_address": coordinator, "num_processes": num_processes,
            "process_id": process_id}
  if (_env_int(env, "SLURM_NTASKS") or 1) > 1 and "SLURM_JOB_ID" in env:
    return {}  # jax's SlurmCluster reads SLURM_* (one process per task)
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return {}  # jax's TPU cluster detection
  return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Start jax.distributed if the flags or environment ask for it; True if it started."""
  kwargs = plan(coordinator, num_processes, process_id)
  if kwargs is None:
    return False
  platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
  if platforms.startswith("cpu"):
    # CPU processes need a collectives library to form one mesh across processes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return True
