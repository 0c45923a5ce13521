"""Dense contrastive pretraining (Embedding Earth): InfoNCE between the dense features of two
views of each tile, made on device from the pipeline's Sentinel-2 crops. Recipes:
configs/dense_contrastive.py.

Spec: {"arch": "dense_contrastive", "encoder": <a convnextv2 spec>, "feature_stage",
"projector_hidden_dim", "projector_dim", "projector_layers"} (`models.dense_contrastive.
DenseContrastive`); the encoder's parameters are params["encoder"].
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import ml_collections

from mmearth_jax import optim
from mmearth_jax.config_lib import ConfigError
from mmearth_jax import modalities as M
from mmearth_jax.methods import base, encoders
from mmearth_jax.models.dense_contrastive import DenseContrastive, init_params
from mmearth_jax.objectives.dense_contrastive import dense_contrastive_loss, objective_kwargs

NAME = "dense_contrastive"
PROJECTOR_KEYS = ("feature_stage", "projector_hidden_dim", "projector_dim", "projector_layers")


def spec_from_config(config: Mapping[str, Any]) -> dict:
  m, o = config["model"], config["objective"]
  bands = M.resolve_input(config["data"]["input"])
  enc = encoders.convnextv2_spec(m["variant"], depths=m["depths"], dims=m["dims"],
                                 stem=m["stem"], patch_size=m["patch_size"], bands=bands)
  return {"arch": NAME, "encoder": enc, **{k: int(o[k]) for k in PROJECTOR_KEYS}}


def model_from_config(config: ml_collections.ConfigDict) -> DenseContrastive:
  """The module of a config's `model` and `objective` sections, with its training options."""
  m, o = config.model, config.objective
  if o.feature_stage not in (1, 2, 3, 4):
    raise ConfigError(f"config objective.feature_stage = {o.feature_stage!r}; choose 1, 2, 3 "
                      "or 4 (the ConvNeXt V2 stage whose map is contrasted)")
  if o.projector_layers < 1:
    raise ConfigError(f"config objective.projector_layers = {o.projector_layers} must be >= 1")
  spec = spec_from_config(config)
  return _build(spec, base.dtype(config)).clone(drop_path_rate=float(m.drop_path_rate),
                                                remat=bool(m.remat))


def make_data(config: ml_collections.ConfigDict) -> tuple[Iterator, base.DataInfo]:
  return base.shards_data(config)


def task(config: ml_collections.ConfigDict, info: base.DataInfo) -> base.Task:
  del info  # only the input image is read; the pipeline's targets go unused
  model = model_from_config(config)
  kw = objective_kwargs(config.objective)

  def init(rng, batch):
    return init_params(model, rng, batch["image"])

  def loss(params, batch, rng):
    return dense_contrastive_loss(model, params, batch, rng, **kw)

  return base.Task(init, loss, optim.convnextv2_layer_id, 12, batch_keys=("image",))


def _build(spec: Mapping[str, Any], dtype: Any = jnp.float32) -> DenseContrastive:
  enc = spec["encoder"]
  return DenseContrastive(depths=tuple(enc["depths"]), dims=tuple(enc["dims"]), stem=enc["stem"],
                          patch_size=int(enc["patch_size"]), dtype=dtype,
                          **{k: int(spec[k]) for k in PROJECTOR_KEYS})


ARCHS = (base.Arch(NAME, build=_build, encoder_spec=lambda spec: dict(spec["encoder"])),)
