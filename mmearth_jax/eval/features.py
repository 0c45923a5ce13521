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


def extract(fn: Callable[[Any, jax.Array], jax.Array], params: Any, images: np.ndarray, *,
            batch_size: int = 128, mesh: Mesh | None = None,
            rules: Any = (), min_size: int = 2 ** 14) -> np.ndarray:
  """fn(params, images (B, H, W, C)) -> (B, D) over all of `images`, in order, as numpy."""
  mesh = mesh or default_mesh()
  replicas = mesh.shape["data"] * mesh.shape["fsdp"]
  procs, me = jax.process_count(), jax.process_index()
  # A global batch every device and process can take an equal slice of.
  step = max(replicas, procs)
  batch = max(step, (batch_size + step - 1) // step * step)
  batch = min(batch, (len(images) + step - 1) // step * step)
  in_sharding = mesh_lib.batch_sharding(mesh)
  pspecs = mesh_lib.param_specs(params, mesh, rules, min_size) if rules else jax.tree.map(
      lambda _: jax.sharding.PartitionSpec(), params)
  param_shardings = mesh_lib.to_shardings(pspecs, mesh)
  params = jax.device_put(params, param_shardings)
  jitted = jax.jit(fn, in_shardings=(param_shardings, in_sharding),
                   out_shardings=mesh_lib.replicated(mesh))
  per_proc = batch // procs
  out = []
  for start in range(0, len(images), batch):
    chunk = np.asarray(images[start:start + batch], np.float32)
    n = len(chunk)
    if n < batch:  # pad the last batch; the padding's features are dropped
      chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
    local = chunk[me * per_proc:(me + 1) * per_proc]
    feats = jitted(params, mesh_lib.global_batch(local, in_sharding))
    out.append(np.asarray(feats)[:n])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
