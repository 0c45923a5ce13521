"""Scale-MAE: a ViT MAE with GSD-scaled position encoding and a two-scale Laplacian decoder,
trained on scale-augmented images. Recipes: configs/scale_mae.py.

Specs: {"arch": "scale_mae", <the ViT keys>, "decoder_embed_dim", "decoder_depth",
"decoder_num_heads", "fcn_dim", "fcn_layers", "independent_fcn_head", "progressive",
"out_chans"}, and the plain MAE it extends (imported from PyTorch), {"arch": "mae", <the ViT
keys>, "decoder_embed_dim", "decoder_depth", "decoder_num_heads"}. A ViT's "pos_layout"
("concat", MAE's and the released Scale-MAE's; or "interleave", the Scale-MAE paper's) orders
its sin-cos channels. The encoder's parameters are params["encoder"].
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import jax.numpy as jnp
import ml_collections

from mmearth_jax.config_lib import ConfigError
from mmearth_jax.methods import base, encoders
from mmearth_jax.models.scale_mae import ScaleMAE
from mmearth_jax.models.variants import VIT
from mmearth_jax.models.vit import MAE
from mmearth_jax.objectives.scale_mae import scale_mae_loss

NAME = "scale_mae"
POS_LAYOUTS = {"code": "concat", "paper": "interleave"}  # config model.pos_variant -> spec


def spec_from_config(config: Mapping[str, Any]) -> dict:
  m, d = config["model"], config["data"]
  bands, in_chans = base.image_bands(d)
  if m["pos_variant"] not in POS_LAYOUTS:
    raise ConfigError(f"config model.pos_variant = {m['pos_variant']!r}; choose from "
                           f"{list(POS_LAYOUTS)}")
  enc = encoders.vit_spec(m, img_size=d["scale"]["input_size"], bands=bands, in_chans=in_chans,
                          pos_layout=POS_LAYOUTS[m["pos_variant"]])
  return {**enc, "arch": NAME, "decoder_embed_dim": int(m["decoder_embed_dim"]),
          "decoder_depth": int(m["decoder_depth"]),
          "decoder_num_heads": int(m["decoder_num_heads"]), "fcn_dim": int(m["fcn_dim"]),
          "fcn_layers": int(m["fcn_layers"]),
          "independent_fcn_head": bool(m["independent_fcn_head"]),
          "progressive": bool(m["progressive"]), "out_chans": in_chans}


def make_data(config: ml_collections.ConfigDict) -> tuple[Iterator, base.DataInfo]:
  from mmearth_jax.data import scale_aug  # grain: only where data is read
  data_cfg = ml_collections.ConfigDict(config.data.to_dict())
  data_cfg.num_epochs = 0  # the loop decides when to stop; the pipeline repeats
  it, info = scale_aug.make_dataset(data_cfg)
  return iter(it), base.DataInfo(info["num_records"], _tuple(info["bands"]),
                                 input_size=int(config.data.scale.input_size),
                                 **base.source_facts(config.data))


def task(config: ml_collections.ConfigDict, info: base.DataInfo) -> base.Task:
  del info  # Scale-MAE reconstructs its own (scale-augmented) input
  c, o = config.model, config.objective
  size = VIT.get(c.variant)
  if size is None:
    raise ConfigError(f"config model.variant = {c.variant!r}: not a ViT variant; choose "
                           f"from {list(VIT)}")
  model = ScaleMAE(patch_size=c.patch_size, embed_dim=c.embed_dim or size["embed_dim"],
                   depth=c.depth or size["depth"], num_heads=c.num_heads or size["num_heads"],
                   decoder_embed_dim=c.decoder_embed_dim, decoder_depth=c.decoder_depth,
                   decoder_num_heads=c.decoder_num_heads, fcn_dim=c.fcn_dim,
                   fcn_layers=c.fcn_layers, independent_fcn_head=c.independent_fcn_head,
                   progressive=c.progressive, mask_ratio=o.mask_ratio,
                   pos_variant=c.pos_variant, absolute_scale=c.absolute_scale,
                   drop_path_rate=c.drop_path_rate, dtype=base.dtype(config), remat=c.remat)

  def init(rng, batch):
    images = base.example_images(batch)
    return model.init({"params": rng, "masking": rng}, images, jnp.ones((1,)))["params"]

  def loss(params, batch, rng):
    total, terms = scale_mae_loss(model, params, batch, rng, band_config=tuple(o.band_config),
                                  high_loss=o.high_loss, l1_weight=o.l1_weight)
    return total, {f"loss/{k}": v for k, v in terms.items()}

  return base.Task(init, loss, None, 0, batch_keys=("image", "target", "gsd"))


def _tuple(bands: Sequence[str] | None) -> tuple[str, ...] | None:
  return tuple(bands) if bands is not None else None


def _mae_decoder(spec: Mapping[str, Any]) -> dict:
  return dict(decoder_embed_dim=int(spec["decoder_embed_dim"]),
              decoder_depth=int(spec["decoder_depth"]),
              decoder_num_heads=int(spec["decoder_num_heads"]))


def _build(spec: Mapping[str, Any], dtype: Any = jnp.float32) -> ScaleMAE:
  pos_variant = {v: k for k, v in POS_LAYOUTS.items()}[spec.get("pos_layout", "concat")]
  return ScaleMAE(**_mae_decoder(spec), fcn_dim=int(spec["fcn_dim"]),
                  fcn_layers=int(spec["fcn_layers"]),
                  independent_fcn_head=bool(spec["independent_fcn_head"]),
                  progressive=bool(spec.get("progressive", False)),
                  out_chans=int(spec.get("out_chans", 0)), pos_variant=pos_variant,
                  **encoders.vit_sizes(spec, dtype))


def _encoder_spec(spec: Mapping[str, Any]) -> dict:
  return {"arch": "vit", **{k: spec[k] for k in encoders.VIT_KEYS if k in spec}}


def _export(spec: Mapping[str, Any], params: Mapping, layout: str, conv_mlp=None) -> dict:
  """"scale_mae": the release's full `MaskedAutoencoderViT` (loadable with strict=True);
  "timm": the encoder."""
  if layout != "scale_mae":
    return encoders.export_vit(spec, params["encoder"])
  if spec.get("pos_layout", "concat") != "concat":
    raise ValueError(f"this Scale-MAE uses pos_layout {spec.get('pos_layout')!r} (the paper's "
                     "interleaved sin-cos channels); the released code, which this layout "
                     "feeds, uses 'concat', so its weights would not fit")
  from mmearth_jax.interop import torch_scale_mae as tsm  # torch: only when exporting
  return tsm.flax_to_torch_scale_mae(params, img_size=encoders.img_size(spec))


def _export_mae(spec: Mapping[str, Any], params: Mapping, layout: str, conv_mlp=None) -> dict:
  """"mae": MAE's encoder and decoder; "timm": the encoder."""
  if layout != "mae":
    return encoders.export_vit(spec, params["encoder"])
  from mmearth_jax.interop import torch_vit as tv  # torch: only when exporting
  return tv.flax_to_torch_vit(params, img_size=encoders.img_size(spec))


ARCHS = (
    base.Arch(NAME, build=_build, encoder_spec=_encoder_spec,
              export_layouts=("scale_mae", "timm"), export=_export),
    base.Arch("mae", build=lambda spec, dtype=jnp.float32: MAE(
        **_mae_decoder(spec), **encoders.vit_sizes(spec, dtype)),
        encoder_spec=_encoder_spec, export_layouts=("timm", "mae"), export=_export_mae),
)
