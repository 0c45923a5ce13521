"""Orbax checkpoints of the train state beside the Grain iterator state.

One checkpoint per saved step, `<workdir>/checkpoints/<step>/` with two items:
  state: {step, params, opt_state, rng} as sharded arrays (restored onto any mesh);
  data:  the Grain iterator position of each process (restoring needs the same process count).
Saves are asynchronous (training continues while files are written); Orbax writes each step to a
temporary name and renames it when complete, so a half-written step is never taken for a
checkpoint. A step that exists but cannot be read is reported, moved to
`<workdir>/checkpoints_unreadable/`, and the previous step is used.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import type_handlers

# Replica-parallel saving splits each replicated array across its replicas, which compiles a
# slicing program per array shape: the first save of a small model on 8 devices took 26 s instead
# of 1 s. Keep it for arrays big enough to gain from it (large replicated tensors on a pod).
REPLICA_PARALLEL_MIN_BYTES = 4 << 20


def _register_array_handler() -> None:
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)  # Orbax warns that it replaces its default handler
  try:
    type_handlers.register_type_handler(
        jax.Array, type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES), override=True)
  finally:
    absl_log.setLevel(level)


_register_array_handler()


class Checkpointer:
  """Saves every `every_steps` steps (and when forced), keeps the last `keep`."""

  def __init__(self, directory: str, *, every_steps: int, keep: int, use_async: bool = True,
               log: Callable[[str], None] = print):
    self.directory = os.path.abspath(directory)
    self.every_steps = every_steps
    self.log = log
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=use_async),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def due(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state: Any, data_iter: grain.DatasetIterator | None) -> None:
    """Starts writing `state` (and the iterator position) as `step`; returns before it's done."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: Any, data_iter: grain.DatasetIterator | None) -> Any | None:
    """The newest readable checkpoint restored with `abstract_state`'s shardings, or None.

    `data_iter` is moved to the saved position. Unreadable steps are moved aside.
    """
    for step in reversed(self.all_steps()):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
        self.log(f"checkpoint {self.directory}/{step} is unreadable "
                 f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                 "moving it aside and trying the previous one")
        self._set_aside(step)
        continue
      return restored["state"]
    return None

  def _set_aside(self, step: int) -> None:
    # Every process must agree the step is gone before any of them saves again.
    jax.experimental.multihost_utils.sync_global_devices(f"set_aside_{step}")
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      dst_root = self.directory.rstrip("/") + "_unreadable"
      os.makedirs(dst_root, exist_ok=True)
      dst = os.path.join(dst_root, str(step))
      n = 0
      while os.path.exists(dst):
        n += 1
        dst = os.path.join(dst_root, f"{step}.{n}")
      shutil.move(src, dst)
      self.log(f"moved unreadable checkpoint to {dst}")
    jax.experimental.multihost_utils.sync_global_devices(f"set_aside_done_{step}")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until every started save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
