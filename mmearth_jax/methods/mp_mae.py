"""MP-MAE (MMEarth): ConvNeXt V2 FCMAE on Sentinel-2 with a decoder head per pretext modality and
uncertainty-weighted losses. Recipes: configs/mp_mae.py.

Spec: {"arch": "mp_mae", <the ConvNeXt V2 encoder keys>, "decoder_dim", "outputs": {modality:
[bands]}}; the encoder's parameters are params["encoder"]. `model.weight_init` is a training
choice only: a built model's weights are loaded, so the spec does not record it. So is
`model.masked_geometry` (the masked forward's; the unmasked one is the same in both): a built
model runs the dense geometry of the reference's fine-tuning code and plain-torch twin.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import ml_collections

from mmearth_jax import optim
from mmearth_jax import modalities as M
from mmearth_jax.config_lib import ConfigError
from mmearth_jax.methods import base, encoders
from mmearth_jax.models.convnextv2 import MASKED_GEOMETRIES
from mmearth_jax.models.mp_mae import WEIGHT_INITS, MPMAE
from mmearth_jax.objectives.mp_mae import mp_mae_loss

NAME = "mp_mae"


def spec_from_config(config: Mapping[str, Any]) -> dict:
  m, d = config["model"], config["data"]
  bands = M.resolve_input(d["input"])
  outputs = M.resolve_outputs(d["outputs"], bands)
  enc = encoders.convnextv2_spec(m["variant"], depths=m["depths"], dims=m["dims"],
                                 stem=m["stem"], patch_size=m["patch_size"], bands=bands)
  return {**enc, "arch": NAME, "decoder_dim": int(m["decoder_dim"]),
          "outputs": {k: list(v) for k, v in outputs.items()}}


def make_data(config: ml_collections.ConfigDict) -> tuple[Iterator, base.DataInfo]:
  return base.shards_data(config)


def task(config: ml_collections.ConfigDict, info: base.DataInfo) -> base.Task:
  c, o = config.model, config.objective
  if c.weight_init not in WEIGHT_INITS:
    raise ConfigError(f"config model.weight_init = {c.weight_init!r}; choose from "
                      f"{list(WEIGHT_INITS)}")
  if c.masked_geometry not in MASKED_GEOMETRIES:
    raise ConfigError(f"config model.masked_geometry = {c.masked_geometry!r}; choose from "
                      f"{list(MASKED_GEOMETRIES)}")
  model = MPMAE(outputs=dict(info.outputs), variant=c.variant, depths=tuple(c.depths) or None,
                dims=tuple(c.dims) or None, stem=c.stem, patch_size=c.patch_size,
                decoder_dim=c.decoder_dim, drop_path_rate=c.drop_path_rate,
                dtype=base.dtype(config), remat=c.remat, weight_init=c.weight_init,
                masked_geometry=c.masked_geometry)
  names = list(info.outputs)

  def init(rng, batch):
    images = base.example_images(batch)
    grid = images.shape[1] // c.patch_size
    return model.init(rng, images, jnp.zeros((1, grid, grid)))["params"]

  def loss(params, batch, rng):
    total, losses = mp_mae_loss(model, params, batch, rng, mask_ratio=o.mask_ratio,
                                norm_pix=o.norm_pix, aggregation=o.aggregation, train=True,
                                valid_pixels=o.valid_pixels)
    aux = {f"loss/{k}": v for k, v in losses.items()}
    if o.aggregation == "uncertainty":  # the learned weight exp(-s) of each modality's loss
      aux.update({f"weight/{k}": jnp.exp(-params["log_vars"][i]) for i, k in enumerate(names)})
    return total, aux

  return base.Task(init, loss, optim.convnextv2_layer_id, 12)


def _build(spec: Mapping[str, Any], dtype: Any = jnp.float32) -> MPMAE:
  return MPMAE(outputs={k: tuple(v) for k, v in spec["outputs"].items()},
               decoder_dim=int(spec["decoder_dim"]), **encoders.convnextv2_sizes(spec, dtype))


def _encoder_spec(spec: Mapping[str, Any]) -> dict:
  keep = ("depths", "dims", "stem", "patch_size", "in_chans", "bands")
  return {"arch": "convnextv2", **{k: spec[k] for k in keep}, "num_classes": 0}


def _export(spec: Mapping[str, Any], params: Mapping, layout: str,
            conv_mlp: bool | None = None) -> dict:
  """"mmearth": the whole pretraining model in the reference's keys; "official" / "timm": the
  encoder."""
  if layout != "mmearth":
    return encoders.export_convnextv2(params["encoder"], layout, conv_mlp)
  from mmearth_jax.interop import convert_convnextv2 as cv  # torch: only when exporting
  return cv.mp_mae_flax_to_torch(params, {k: tuple(v) for k, v in spec["outputs"].items()})


ARCHS = (base.Arch(NAME, build=_build, encoder_spec=_encoder_spec,
                   export_layouts=("mmearth", "official", "timm"), export=_export),)
