"""Reading and writing PyTorch state dicts (`.pth` / `.pt` / `.bin` / `.ckpt` and `.safetensors`).

Reading never runs code from the file: pickles are opened with `torch.load(weights_only=True)`,
which only rebuilds tensors and plain containers. Training checkpoints of MMEarth and ConvNeXt V2
also hold `args` (an `argparse.Namespace`); that one class is allowed as well (still weights
only), everything else a pickle may name is refused with an error that says which file and why.

Writing is atomic (a temporary file in the target folder, then `os.replace`), so a crash never
leaves a file that looks complete. `.pth` files hold `{"model": state_dict}` as the reference
checkpoints do; `.safetensors` files hold the tensors plus their key order in the metadata
(safetensors itself sorts keys; the order matters for MP-MAE's `pred_dict`, which follows
`loss_fn.log_vars`).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
from typing import Any, Mapping

import numpy as np
import torch

from mmearth_jax.interop.trees import to_numpy

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
WRAPPERS = ("model", "state_dict", "model_state")
_ORDER_KEY = "mmearth_jax.key_order"


class StateDictError(ValueError):
  """A state-dict file that cannot be read or written; the message names the file."""


def _suffix(path: str) -> str:
  return os.path.splitext(path)[1].lower()


def _torch_load(path: str) -> Any:
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as first:
    if "weights only" not in str(first).lower():
      raise StateDictError(f"cannot read {path} as a PyTorch checkpoint: {first}") from first
    # Training checkpoints pickle their argparse arguments; allow exactly that class.
    try:
      with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      reason = str(e).strip().splitlines()
      detail = next((line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line),
                    reason[-1].strip() if reason else repr(first))
      raise StateDictError(
          f"refusing to load {path}: it pickles objects other than tensors and plain containers "
          f"({detail}). Only weights are read (torch.load weights_only=True), because unpickling "
          "arbitrary objects can run code. If you trust the file, re-save its state dict alone, "
          "e.g. torch.save(torch.load(path, weights_only=False)['model'], 'weights.pth').") from e
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    raise StateDictError(f"cannot read {path} as a PyTorch checkpoint: {e}") from e


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError, safe_open
  try:
    with safe_open(path, framework="np") as f:
      metadata = f.metadata() or {}
    try:
      from safetensors.numpy import load_file
      arrays = load_file(path)
    except TypeError:  # a dtype numpy lacks (bfloat16): read through torch, convert exactly
      from safetensors.torch import load_file as load_torch
      arrays = {k: to_numpy(v) for k, v in load_torch(path).items()}
  except (SafetensorError, OSError, ValueError) as e:
    raise StateDictError(f"cannot read {path} as safetensors: {e}") from e
  order = metadata.get(_ORDER_KEY)
  if order:
    try:
      keys = json.loads(order)
    except json.JSONDecodeError:
      keys = []
    if sorted(keys) == sorted(arrays):
      return {k: arrays[k] for k in keys}  # the order it was written in
  return arrays


def unwrap(obj: Any, path: str = "<state dict>") -> dict[str, np.ndarray]:
  """The tensors of a loaded checkpoint: a `model` / `state_dict` / `model_state` wrapper is
  opened (optimizer, epoch, scaler and args beside it are ignored); non-tensor entries dropped."""
  if not isinstance(obj, Mapping):
    raise StateDictError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of "
                         "names to tensors)")
  for name in WRAPPERS:
    if isinstance(obj.get(name), Mapping):
      obj = obj[name]
      break
  out = {str(k): to_numpy(v) for k, v in obj.items()
         if isinstance(v, (torch.Tensor, np.ndarray))}
  if not out:
    keys = ", ".join(map(str, list(obj)[:10]))
    raise StateDictError(f"{path} holds no tensors (keys: {keys or 'none'}); expected a state dict "
                         f"or a checkpoint with one under {' / '.join(WRAPPERS)}")
  return out


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """The state dict in `path` as numpy arrays (bfloat16 stays bfloat16 via ml_dtypes)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"state dict file {path} does not exist")
  if os.path.isdir(path):
    raise StateDictError(f"{path} is a folder; expected a {SAFETENSORS_SUFFIX} or "
                         f"{'/'.join(PICKLE_SUFFIXES)} file")
  suffix = _suffix(path)
  if suffix == SAFETENSORS_SUFFIX:
    return _load_safetensors(path)
  if suffix in PICKLE_SUFFIXES:
    return unwrap(_torch_load(path), path)
  raise StateDictError(f"{path}: unknown state-dict format {suffix or '(no suffix)'}; use "
                       f"{SAFETENSORS_SUFFIX} or one of {', '.join(PICKLE_SUFFIXES)}")


def _as_owned_tensor(v: Any, key: str) -> torch.Tensor:
  # Every tensor gets its own contiguous storage: safetensors refuses shared storage (MP-MAE's
  # decoder block is repeated under every modality), and views would drag whole buffers along.
  if isinstance(v, torch.Tensor):
    return v.detach().cpu().contiguous().clone()
  a = np.asarray(v)
  if a.dtype.name == "bfloat16":
    return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
  if a.dtype == object:
    raise StateDictError(f"{key}: not a numeric array")
  return torch.from_numpy(np.array(a, order="C", copy=True))


def save_state_dict(state_dict: Mapping[str, np.ndarray | torch.Tensor], path: str,
                    metadata: Mapping[str, str] | None = None) -> None:
  """Writes `state_dict` to `path`: `.safetensors`, else a pickle `{"model": state_dict}`
  (readable with weights_only=True). Atomic: a temporary file in the same folder is renamed.
  `metadata` (string values, e.g. the model card) goes into a `.safetensors` file's metadata; a
  pickle does not hold it."""
  path = os.path.abspath(path)
  folder = os.path.dirname(path)
  if not os.path.isdir(folder):
    raise StateDictError(f"cannot write {path}: folder {folder} does not exist")
  suffix = _suffix(path)
  if suffix != SAFETENSORS_SUFFIX and suffix not in PICKLE_SUFFIXES:
    raise StateDictError(f"{path}: unknown state-dict format {suffix or '(no suffix)'}; use "
                         f"{SAFETENSORS_SUFFIX} or one of {', '.join(PICKLE_SUFFIXES)}")
  tensors = {str(k): _as_owned_tensor(v, str(k)) for k, v in state_dict.items()}
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=folder)
  os.close(fd)
  try:
    if suffix == SAFETENSORS_SUFFIX:
      from safetensors.torch import save_file
      meta = {**{str(k): str(v) for k, v in (metadata or {}).items()}, "format": "pt",
              _ORDER_KEY: json.dumps(list(tensors))}
      save_file(tensors, tmp, metadata=meta)
    else:
      torch.save({"model": tensors}, tmp)
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
