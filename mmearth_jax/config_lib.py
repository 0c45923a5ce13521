"""Training configs: `configs/<recipe>.py:<variant>` files plus `--config.key=value` overrides.

A config file defines `get_config(variant: str) -> ml_collections.ConfigDict` (big_vision style).
Overrides are type-checked against the config's value: a misspelt key or a value of the wrong
type fails with a message naming the key.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Sequence

import ml_collections


class ConfigError(ValueError):
  pass


def _load_module(path: str):
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  name = "mmearth_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config(variant)")
  return module


def _keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in cfg.items():
    out.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      out += _keys(v, prefix + k + ".")
  return out


def _parse(key: str, text: str, current):
  """`text` as a value of the type of `current`."""
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ConfigError(f"config override {key}={text!r}: expected a {type(current).__name__} "
                      f"like {current!r}") from None
  if isinstance(current, bool):
    ok = isinstance(value, bool)
  elif isinstance(current, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(current, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    value = float(value) if ok else value
  elif isinstance(current, (tuple, list)):
    value = (value,) if not isinstance(value, (tuple, list)) else value
    value = type(current)(value)
    ok = True
  else:
    ok = current is None or isinstance(value, type(current))
  if not ok:
    raise ConfigError(f"config override {key}={text!r}: expected a {type(current).__name__} "
                      f"like {current!r}")
  return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Apply `key.sub=value` strings in place (the `--config.` prefix already removed)."""
  known = _keys(cfg)
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"config override {item!r} must look like key=value")
    key, text = item.split("=", 1)
    parent, leaf = cfg, key
    if "." in key:
      head, leaf = key.rsplit(".", 1)
      for part in head.split("."):
        parent = parent.get(part) if isinstance(parent, ml_collections.ConfigDict) else None
    if not isinstance(parent, ml_collections.ConfigDict) or leaf not in parent:
      close = difflib.get_close_matches(key, known, n=3)
      hint = f"; did you mean {' or '.join(close)}?" if close else ""
      raise ConfigError(f"config has no key {key!r}{hint}")
    current = parent[leaf]
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f"config key {key!r} is a section; override one of its fields")
    with parent.unlocked():
      parent[leaf] = _parse(key, text, current)


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`configs/mp_mae.py:atto` (variant optional) with overrides applied, locked."""
  path, _, variant = spec.partition(":")
  module = _load_module(path)
  try:
    cfg = module.get_config(variant)
  except KeyError as e:
    raise ConfigError(f"config {path!r}: {e.args[0]}") from None
  apply_overrides(cfg, overrides)
  cfg.lock()
  return cfg


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(other args, ["key=value", ...]) from `--config.key=value` / `--config.key value`."""
  rest, overrides, i = [], [], 0
  argv = list(argv)
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      body = a[len("--config."):]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise ConfigError(f"{a} needs a value")
        body, i = f"{body}={argv[i + 1]}", i + 1
      overrides.append(body)
    else:
      rest.append(a)
    i += 1
  return rest, overrides
