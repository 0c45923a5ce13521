"""Frozen-encoder evaluation: features of a train and a test split, then kNN and linear probes.

Used by `mmearth-jax knn` / `mmearth-jax probe` and, every `eval.every_steps`, inside training.

Multi-scale evaluation (Scale-MAE's protocol): with `scales` = fractions of the native resolution
(the paper: 0.125, 0.25, 0.5, 1), both splits are area-resized to each fraction (as the
reference's `interpolate(mode="area")`), the model is told GSD scale `gsd / fraction`, and every
metric is reported per scale as `<metric>@<percent>%` plus their mean as `<metric>@mean`. A size
is rounded to a whole number of patches (at least one); the GSD follows the size actually used.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np
from jax.sharding import Mesh

from mmearth_jax import config_lib, methods, pretrained
from mmearth_jax.eval import datasets, features, knn, probe
from mmearth_jax.ops import resize as resize_ops

EVALUATORS = ("knn", "linear", "lsq")


def default_config() -> ml_collections.ConfigDict:
  """The `eval` section of a training config: periodic evaluation of the encoder; its
  defaults live in `config_lib.eval_config`."""
  return config_lib.eval_config()


def parse_evaluators(spec: str | Sequence[str]) -> tuple[str, ...]:
  names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
  bad = [n for n in names if n not in EVALUATORS]
  if bad or not names:
    raise ValueError(f"evaluators {bad or names!r} unknown; choose from {EVALUATORS}")
  return tuple(names)


def load_splits(cfg: ml_collections.ConfigDict | Mapping[str, Any], bands: Sequence[str] | None,
                *, card: Mapping[str, Any] | None = None
                ) -> tuple[datasets.EvalData, datasets.EvalData]:
  """The train and test splits of `cfg.dataset` in the encoder's band order; `card` (the
  encoder's model card) goes to `datasets.load`, which normalises raw L1C sources with it."""
  if not bands:
    raise ValueError("the encoder does not name its input bands (spec 'bands'); pass them "
                     "explicitly (e.g. --bands B4,B3,B2)")
  kw = dict(data_dir=cfg["data_dir"] or None, partition=cfg["partition"],
            max_examples=cfg["max_examples"] or None, image_size=cfg["image_size"] or None,
            card=card)
  return (datasets.load(cfg["dataset"], cfg["train_split"], bands, **kw),
          datasets.load(cfg["dataset"], cfg["test_split"], bands, **kw))


def evaluate_features(train_x: np.ndarray, train: datasets.EvalData, test_x: np.ndarray,
                      test: datasets.EvalData, evaluators: Sequence[str] = ("knn", "lsq"),
                      ks: Sequence[int] = knn.DEFAULT_KS) -> dict[str, float]:
  out: dict[str, float] = {}
  args = (train_x, train.labels, test_x, test.labels, train.num_classes)
  kw = dict(multilabel=train.multilabel)
  if "knn" in evaluators:
    out.update(knn.knn_evaluate(*args, ks=ks, **kw))
  if "linear" in evaluators:
    out.update(probe.linear_probe(*args, **kw))
  if "lsq" in evaluators:
    out.update(probe.least_squares(*args, **kw))
  return out


_FEATURE_FNS: dict[tuple[str, float | None], Callable] = {}


def _features_fn(spec: Mapping[str, Any], gsd: float | None = None) -> Callable:
  """pretrained.features_fn, one function object per (spec, gsd): jit caches its compilation on
  the function's identity, so evaluations during training compile once, not every time."""
  key = (json.dumps(spec, sort_keys=True, default=str), gsd)
  if key not in _FEATURE_FNS:
    _FEATURE_FNS[key] = pretrained.features_fn(spec, gsd=gsd)
  return _FEATURE_FNS[key]


def split_features(fn, params: Any, train: datasets.EvalData, test: datasets.EvalData,
                   **kw) -> tuple[np.ndarray, np.ndarray]:
  """Features of both splits in one pass (one parameter placement, one compiled shape)."""
  if train.images.shape[1:] != test.images.shape[1:]:
    return (features.extract(fn, params, train.images, **kw),
            features.extract(fn, params, test.images, **kw))
  both = features.extract(fn, params, np.concatenate([train.images, test.images]), **kw)
  return both[:len(train.images)], both[len(train.images):]


def _patch(spec: Mapping[str, Any]) -> int:
  """The size unit an encoder input must be a multiple of (ViT: its patch; ConvNeXt: 32)."""
  enc = pretrained.encoder_spec(spec)
  return methods.arch(enc).size_unit(enc)


def scaled_size(size: int, fraction: float, unit: int) -> int:
  """`size * fraction` rounded to a whole number (>= 1) of `unit`s."""
  if not 0 < fraction <= 1:
    raise ValueError(f"eval scale {fraction} must be in (0, 1] (a fraction of native resolution)")
  return max(unit, int(round(size * fraction / unit)) * unit)


def _resized(data: datasets.EvalData, size: int) -> datasets.EvalData:
  if data.images.shape[1:3] == (size, size):
    return data
  return dataclasses.replace(data, images=resize_ops.resize(
      np.asarray(data.images, np.float32), (size, size), "area"))


def evaluate(spec: Mapping[str, Any], params: Any, train: datasets.EvalData,
             test: datasets.EvalData, *, evaluators: Sequence[str] = ("knn", "lsq"),
             ks: Sequence[int] = knn.DEFAULT_KS, batch_size: int = 128, mesh: Mesh | None = None,
             rules: Any = (), min_size: int = 2 ** 14, scales: Sequence[float] = (1.0,),
             gsd: float = 0.0) -> dict[str, float]:
  """Features of both splits from the encoder in `spec`/`params`, then every evaluator; at
  several resolutions when `scales` is not just (1.0,) or `gsd` is set (see the module doc)."""
  enc = pretrained.encoder_params(spec, params)
  pretrained.check_images(pretrained.encoder_spec(spec), train.images, train.name)
  kw = dict(batch_size=batch_size, mesh=mesh, rules=rules, min_size=min_size)
  if tuple(scales) == (1.0,) and not gsd:
    train_x, test_x = split_features(_features_fn(spec), enc, train, test, **kw)
    return evaluate_features(train_x, train, test_x, test, evaluators, ks)
  native = train.images.shape[1]
  out: dict[str, float] = {}
  per_scale = []
  for fraction in scales:
    size = scaled_size(native, float(fraction), _patch(spec))
    fn = _features_fn(spec, gsd * native / size if gsd else None)
    tr, te = _resized(train, size), _resized(test, size)
    train_x, test_x = split_features(fn, enc, tr, te, **kw)
    result = evaluate_features(train_x, tr, test_x, te, evaluators, ks)
    per_scale.append(result)
    out.update({f"{k}@{100 * float(fraction):g}%": v for k, v in result.items()})
  out.update({f"{k}@mean": float(np.mean([r[k] for r in per_scale])) for k in per_scale[0]})
  return out
