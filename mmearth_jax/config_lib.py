"""Configs: `<name>:<variant>` (a config shipped with the package, e.g. `mp_mae:atto`) or
`<file.py>:<variant>` (e.g. `configs/mp_mae.py:atto`, or a user's own file), plus
`--config.key=value` overrides.

A config file defines `get_config(variant: str) -> ml_collections.ConfigDict` (big_vision style)
and starts from `base_config()`, which holds every section a training config has with its
defaults. Config files import only light modules (this one, `mmearth_jax.models.variants`),
never the trainer. Overrides are type-checked against the config's value: a misspelt key or a
value of the wrong type fails with a message naming the key.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
from typing import Sequence

import ml_collections


class ConfigError(ValueError):
  pass


def _load_module(path: str):
  """The config module at `path`, or the packaged config of that name (`mp_mae`,
  `configs/mp_mae.py` from outside the repository: the same file, shipped in the package)."""
  if os.path.isfile(path):
    name = "mmearth_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  else:
    folder, file = os.path.split(path)
    name = file.removesuffix(".py")
    if folder not in ("", "configs") or name not in packaged_configs():
      raise ConfigError(f"config file {path!r} does not exist, and no config of that name ships "
                        f"with mmearth_jax (those are: {', '.join(packaged_configs())})")
    module = importlib.import_module(f"mmearth_jax.configs.{name}")
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config(variant)")
  return module


def packaged_configs() -> list[str]:
  """Names of the configs shipped in `mmearth_jax.configs` (the repository's configs/)."""
  import mmearth_jax.configs as package
  return sorted(os.path.splitext(f)[0] for folder in package.__path__
                for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))


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
  """`mp_mae:atto` or `configs/mp_mae.py:atto` (variant optional) with overrides applied,
  locked."""
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


# ----------------------------------------------------------------------------------------------
# The sections of a training config, with their defaults.


def base_config() -> ml_collections.ConfigDict:
  """Sections every training config has; a config file fills in method, model and objective."""
  c = ml_collections.ConfigDict()
  c.method = "mp_mae"  # a key of mmearth_jax.methods.METHODS
  c.seed = 0  # parameter init and per-step randomness (masks, drop-path)
  c.data = data_config()
  c.optimizer = optimizer_config()
  c.mesh = mesh_config()
  c.train = ml_collections.ConfigDict()
  c.train.num_epochs = 1.0  # passes over the training shards (the paper's epochs)
  c.train.num_steps = 0  # > 0: this many batches instead of num_epochs
  c.train.warmup_epochs = 0.0  # > 0: warmup length in epochs, else optimizer.warmup_steps
  c.train.log_every = 50
  c.train.progress = "auto"  # progress bar: auto (when a terminal), on, off
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.checkpoint.use_async = True
  c.init_from = ""  # a pretrained CHECKPOINT (see mmearth_jax.pretrained) to start from
  c.eval = eval_config()  # periodic kNN / probes of the encoder
  return c


def data_config() -> ml_collections.ConfigDict:
  """The data section: the MMEarth shards through `mmearth_jax.data.pipeline`."""
  c = ml_collections.ConfigDict()
  c.path = ""  # folder written by `mmearth-jax convert`
  c.input = "s2"  # Sentinel-2 input bands: s2 (12, no B10), rgb, s2_all, or "B4,B3,B2"
  c.outputs = "all"  # all, s2_only, rgb_only, pixel_only, image_only, or "sentinel1,biome"
  c.crop = 0  # crop size in pixels; 0 = the paper's (128 -> 112, 64 -> 56)
  c.upstream_compat = False  # reproduce MMEarth-train's data quirks exactly (see data.pipeline)
  c.global_batch_size = 32
  c.seed = 0
  c.num_epochs = 0  # 0 = repeat forever
  c.workers = 0  # worker processes (0: decode in this process with read_threads threads)
  c.read_threads = 4  # threads when workers = 0 (decoding and numpy release the GIL)
  c.prefetch = 8  # batches buffered ahead when workers = 0
  return c


def optimizer_config() -> ml_collections.ConfigDict:
  """The optimiser section (MMEarth's pretraining recipe; see `mmearth_jax.optim`)."""
  c = ml_collections.ConfigDict()
  c.base_lr = 1.5e-4  # scaled by global_batch / 256
  c.min_lr = 0.0
  c.b1 = 0.9
  c.b2 = 0.95
  c.weight_decay = 0.05
  c.warmup_steps = 0
  c.warmup_init_lr = 0.0  # the (absolute) lr the warmup starts from
  c.schedule = "mae"  # mae or timm_cosine (SimMIM / GFM); see mmearth_jax.optim
  # Which tensors get weight decay: timm (MAE-family upstreams), simmim (GFM) or exempt_tokens.
  c.decay_rule = "timm"
  c.clip_grad_norm = 0.0  # 0 = no clipping
  c.grad_accum_steps = 1
  c.layer_decay = 1.0  # 1 = off; fine-tuning uses 0.9 (ConvNeXt V2) / 0.75 (MAE)
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """The mesh section (see `mmearth_jax.parallel.mesh`)."""
  c = ml_collections.ConfigDict()
  c.data = -1  # -1: whatever the other axes leave
  c.fsdp = 1
  c.tensor = 1
  c.num_devices = 0  # 0: all devices of the job; else the first n (single process only)
  # (regex over "a/b/kernel" parameter paths, tactic); first match wins. Tactics, space
  # separated: "fsdp" (largest dimension divisible by the fsdp size), "tensor:<dim>",
  # "replicate".
  c.rules = ((r".*", "fsdp"),)
  c.fsdp_min_size = 2 ** 14  # tensors with fewer elements stay replicated
  return c


def eval_config() -> ml_collections.ConfigDict:
  """The eval section: periodic evaluation of the encoder (see `mmearth_jax.eval.evaluate`)."""
  c = ml_collections.ConfigDict()
  c.every_steps = 0  # 0: no evaluation during training
  c.dataset = ""  # geobench:<task dir> | tfds:<name> | mmearth:<shards> (see eval.datasets)
  c.data_dir = ""  # TFDS data_dir
  c.train_split = "train"
  c.test_split = "test"
  c.partition = "default"  # GEO-Bench partition (label fraction), e.g. 0.01x_train
  c.max_examples = 0  # > 0: at most this many examples per split
  c.image_size = 0  # > 0: resize/crop the images to this size
  c.evaluators = "knn,lsq"  # any of knn, linear, lsq
  c.knn_k = (10, 20, 100, 200)
  c.batch_size = 128
  c.scales = (1.0,)  # fractions of the native resolution to evaluate at (Scale-MAE: 4 of them)
  c.gsd = 0.0  # > 0: the GSD scale a Scale-MAE encoder is told at native resolution
  return c
