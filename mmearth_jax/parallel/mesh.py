"""The device mesh and how arrays are laid out on it.

Axes: `data` (pure data parallelism: parameters replicated), `fsdp` (data parallelism with
parameters and optimizer state sharded, gathered layer by layer by XLA), `tensor` (the hidden
dimension of ViT attention/MLP matrices split, Megatron style). A batch is split over
(`data`, `fsdp`) and replicated over `tensor`.

Parameter shardings are data, not code: a list of (regex over the parameter path, tactic)
rules, first match wins (see `param_specs`).
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmearth_jax import config_lib

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# ViT rules for a `tensor` axis: column-parallel qkv/fc1, row-parallel proj/fc2 (Megatron).
VIT_TENSOR_RULES = (
    (r"(qkv|fc1)/kernel$", "tensor:-1 fsdp"),
    (r"(qkv|fc1)/bias$", "tensor:-1"),
    (r"(attn/proj|fc2)/kernel$", "tensor:0 fsdp"),
    (r".*", "fsdp"),
)


def default_config() -> ml_collections.ConfigDict:
  """The mesh section of a training config; its defaults live in `config_lib.mesh_config`."""
  return config_lib.mesh_config()


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes (data, fsdp, tensor) from the config's sizes (one may be -1)."""
  if devices is None:
    devices = jax.devices()
    if cfg.num_devices:
      if jax.process_count() > 1:
        raise ValueError("config mesh.num_devices must be 0 in a multi-process job (every "
                         "process's devices belong to the mesh)")
      if cfg.num_devices > len(devices):
        raise ValueError(f"config mesh.num_devices = {cfg.num_devices} but only "
                         f"{len(devices)} devices are present")
      devices = devices[:cfg.num_devices]
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  n = len(devices)
  if sizes.count(-1) > 1:
    raise ValueError(f"config mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
  if -1 in sizes:
    rest = math.prod(s for s in sizes if s != -1)
    if rest <= 0 or n % rest:
      raise ValueError(f"config mesh: {n} devices cannot be split as data,fsdp,tensor = {sizes}")
    sizes[sizes.index(-1)] = n // rest
  if math.prod(sizes) != n or min(sizes) < 1:
    raise ValueError(f"config mesh: data * fsdp * tensor = {sizes} must equal the {n} devices")
  try:  # topology-aware order (ICI rings on TPU); fails for device subsets
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(sizes, devices=list(devices))
  except Exception:  # noqa: BLE001 - any failure: plain order is correct, only maybe slower
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data and fsdp; everything else replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _spec(shape: tuple[int, ...], tactic: str, mesh: Mesh, min_size: int) -> P:
  dims: list[Any] = [None] * len(shape)
  for part in tactic.split():
    if part == "replicate":
      return P()
    if part.startswith("tensor:"):
      d = int(part.split(":")[1]) % len(shape)
      if mesh.shape["tensor"] > 1 and shape[d] % mesh.shape["tensor"] == 0:
        dims[d] = "tensor"
    elif part == "fsdp":
      k = mesh.shape["fsdp"]
      if k == 1 or math.prod(shape) < min_size:
        continue
      free = [d for d in range(len(shape)) if dims[d] is None and shape[d] % k == 0]
      if free:  # the largest dimension the fsdp size divides
        dims[max(free, key=lambda d: shape[d])] = "fsdp"
    else:
      raise ValueError(f"unknown sharding tactic {part!r} in {tactic!r}; use fsdp, "
                       "tensor:<dim> or replicate")
  while dims and dims[-1] is None:
    dims.pop()
  return P(*dims)


def param_specs(params: Any, mesh: Mesh, rules: Sequence[tuple[str, str]],
                min_size: int = 2 ** 14) -> Any:
  """PartitionSpec per parameter (same tree as `params`; leaves need only `.shape`)."""
  compiled = [(re.compile(pattern), tactic) for pattern, tactic in rules]
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, leaf in flat.items():
    name = "/".join(path)
    tactic = next((t for r, t in compiled if r.search(name)), "replicate")
    out[path] = _spec(tuple(leaf.shape), tactic, mesh, min_size) if leaf.ndim else P()
  return traverse_util.unflatten_dict(out)


def to_shardings(specs: Any, mesh: Mesh) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def global_batch(local: Any, sharding: NamedSharding) -> Any:
  """This host's slice of the batch (numpy) -> global jax.Arrays split over the batch axes."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local)
