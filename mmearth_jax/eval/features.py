"""Frozen-encoder features with the sharded model.

The batch is split over the mesh's data (and fsdp) axes, parameters follow the training sharding
rules, and the features come back replicated, so every process of a multi-host job holds all of
them. Each process passes the same full image array; it feeds only its slice of each batch.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from mmearth_jax.parallel import mesh as mesh_lib


def default_mesh() -> Mesh:
  return mesh_lib.make_mesh(mesh_lib.default_config())


class Sharded:
  """`fn(params, images)` jitted once over the mesh: each call takes host images (B, ...) and
  returns fn's output for them as numpy, B padded up to a batch every device (and process) can
  take an equal slice of. `batch` is that padded size for the `batch_size` asked for."""

  def __init__(self, fn: Callable[[Any, jax.Array], jax.Array], params: Any, *,
               batch_size: int = 128, mesh: Mesh | None = None, rules: Any = (),
               min_size: int = 2 ** 14):
    mesh = mesh or default_mesh()
    self.procs, self.me = jax.process_count(), jax.process_index()
    step = max(mesh.shape["data"] * mesh.shape["fsdp"], self.procs)
    self.step = step
    self.batch = max(step, (batch_size + step - 1) // step * step)
    self.in_sharding = mesh_lib.batch_sharding(mesh)
    pspecs = mesh_lib.param_specs(params, mesh, rules, min_size) if rules else jax.tree.map(
        lambda _: jax.sharding.PartitionSpec(), params)
    param_shardings = mesh_lib.to_shardings(pspecs, mesh)
    self.params = jax.device_put(params, param_shardings)
    self.jitted = jax.jit(fn, in_shardings=(param_shardings, self.in_sharding),
                          out_shardings=mesh_lib.replicated(mesh))

  def padded(self, n: int) -> int:
    """The batch size a call with `n` images runs at (n rounded up to the device count)."""
    return (n + self.step - 1) // self.step * self.step

  def batch_for(self, n: int) -> int:
    """One batch size for all calls over `n` images: as few calls as `self.batch` allows, each as
    small as covers n (25 tiles at batch 8: 4 calls of 8 would compute 7 padding tiles, 4 of 7
    compute 3; rounded up to the device count)."""
    calls = max(1, -(-n // self.batch))
    return min(self.batch, self.padded(-(-n // calls)))

  def __call__(self, images: np.ndarray, batch: int | None = None) -> np.ndarray:
    chunk = np.asarray(images, np.float32)
    n = len(chunk)
    batch = batch or self.padded(n)
    if n < batch:  # pad the batch; the padding's outputs are dropped
      chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
    per_proc = batch // self.procs
    local = chunk[self.me * per_proc:(self.me + 1) * per_proc]
    return np.asarray(self.jitted(self.params, mesh_lib.global_batch(local, self.in_sharding)))[:n]


def extract(fn: Callable[[Any, jax.Array], jax.Array], params: Any, images: np.ndarray, *,
            batch_size: int = 128, mesh: Mesh | None = None,
            rules: Any = (), min_size: int = 2 ** 14) -> np.ndarray:
  """fn(params, images (B, H, W, C)) -> (B, D) over all of `images`, in order, as numpy."""
  run = Sharded(fn, params, batch_size=batch_size, mesh=mesh, rules=rules, min_size=min_size)
  batch = run.batch_for(len(images))  # one shape for every batch: one compile
  out = [run(images[start:start + batch], batch) for start in range(0, len(images), batch)]
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
