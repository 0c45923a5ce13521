"""The pretraining methods, one module each, and the registry everything else looks them up in.

The trainer, the pretrained-model loader, the evaluators, the CLI and the PyTorch exporters
find what they need about a method here, by the config's `method` or a spec's `arch`; nothing
outside the method modules branches on either. What a method module provides is listed in
`methods.base`; adding a method is one module here, one line in METHODS and one config file.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Mapping

import jax.numpy as jnp

from mmearth_jax.config_lib import ConfigError
from mmearth_jax.methods import dense_contrastive, encoders, gfm, mp_mae, scale_mae
from mmearth_jax.methods.base import DTYPES, Arch, DataInfo, Task

METHODS: dict[str, ModuleType] = {m.NAME: m for m in (mp_mae, scale_mae, gfm, dense_contrastive)}
# Every model kind a spec can name: the plain encoders and each method's models.
ARCHS: dict[str, Arch] = {a.name: a for a in encoders.ARCHS}
ARCHS.update({a.name: a for m in METHODS.values() for a in m.ARCHS})

__all__ = ["METHODS", "ARCHS", "DTYPES", "Arch", "DataInfo", "Task", "get", "arch", "build",
           "encoder_spec", "encoder_params", "is_encoder", "geometry"]


def get(name: str) -> ModuleType:
  """The method module of a config's `method`."""
  if name not in METHODS:
    raise ConfigError(f"config method = {name!r}; choose from {sorted(METHODS)}")
  return METHODS[name]


def arch(spec: Mapping[str, Any]) -> Arch:
  """The `Arch` of a spec."""
  name = spec.get("arch")
  if name not in ARCHS:
    raise ValueError(f"spec arch {name!r} is unknown; choose from {sorted(ARCHS)}")
  return ARCHS[name]


def is_encoder(spec: Mapping[str, Any]) -> bool:
  return arch(spec).encoder_spec is None


def build(spec: Mapping[str, Any], dtype: Any = jnp.float32):
  """The Flax module `spec` describes."""
  return arch(spec).build(spec, dtype)


def encoder_spec(spec: Mapping[str, Any]) -> dict:
  """The spec of the encoder inside `spec` (itself if it is an encoder)."""
  a = arch(spec)
  return dict(spec) if a.encoder_spec is None else a.encoder_spec(spec)


def encoder_params(spec: Mapping[str, Any], params: Mapping) -> Mapping:
  """The encoder's parameters inside a model's `params`."""
  a = arch(spec)
  return params if a.encoder_spec is None else params[a.encoder_key]


def geometry(spec: Mapping[str, Any]) -> dict:
  """The grid facts of the encoder inside `spec` (`Arch.geometry`: patch size, input sizes,
  output stride, feature width)."""
  enc = encoder_spec(spec)
  return arch(enc).geometry(enc)
