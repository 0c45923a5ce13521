"""Helpers shared by the PyTorch layout converters: flat parameter paths and tensor exchange."""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
import torch


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[tuple, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def to_numpy(x: Any) -> np.ndarray:
  if isinstance(x, torch.Tensor):
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:  # numpy has no bfloat16; via float32 is exact
      return np.asarray(jnp.asarray(x.float().numpy(), jnp.bfloat16))
    return x.numpy()
  return np.asarray(x)


def to_torch(a: np.ndarray) -> torch.Tensor:
  if a.dtype.name == "bfloat16":
    return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
  return torch.from_numpy(np.array(a, order="C"))  # an owned contiguous copy, not a view
