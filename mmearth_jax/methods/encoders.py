"""The plain encoders every method trains: ConvNeXt V2 and ViT, as specs and archs.

A ConvNeXt V2 spec: {"arch": "convnextv2", "depths", "dims", "stem", "patch_size", "in_chans",
"num_classes", "bands"}; a ViT spec: {"arch": "vit", "patch_size", "embed_dim", "depth",
"num_heads", "mlp_ratio", "in_chans", "img_size", "bands", "pos_layout"}.

Also the segmenter fine-tuned on a ConvNeXt V2 (`mmearth-jax segment --config.out=DIR`):
{"arch": "unet_segmenter", "encoder": <ConvNeXt V2 spec>, "num_classes", "decoder_dims",
"class_names"}; its parameters hold the encoder's under "encoder".
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from mmearth_jax.config_lib import ConfigError
from mmearth_jax.methods.base import Arch
from mmearth_jax.models import unet
from mmearth_jax.models.convnextv2 import ConvNeXtV2, stage_geometries
from mmearth_jax.models.variants import CONVNEXTV2, VIT
from mmearth_jax.models.vit import ViT

VIT_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "in_chans", "img_size",
            "bands", "pos_layout")


def convnextv2_spec(variant: str, *, depths: Sequence[int] = (), dims: Sequence[int] = (),
                    stem: str = "mmearth", patch_size: int = 16,
                    bands: Sequence[str] | None = None, in_chans: int | None = None) -> dict:
  """The spec of a ConvNeXt V2 `variant` (`depths` / `dims` override its sizes)."""
  if variant not in CONVNEXTV2:
    raise ConfigError(f"config model.variant = {variant!r}: not a ConvNeXt V2 variant; choose "
                      f"from {list(CONVNEXTV2)}")
  d, w = CONVNEXTV2[variant]
  return {"arch": "convnextv2", "depths": list(depths or d), "dims": list(dims or w),
          "stem": stem, "patch_size": int(patch_size),
          "in_chans": int(in_chans if in_chans is not None else len(bands)), "num_classes": 0,
          "bands": list(bands) if bands is not None else None}


def vit_spec(model: Mapping[str, Any], *, img_size: int, bands: Sequence[str] | None,
             in_chans: int, pos_layout: str = "concat") -> dict:
  """The spec of the ViT a config's `model` section names (variant, patch_size; embed_dim,
  depth and num_heads override the variant's when > 0)."""
  if model["variant"] not in VIT:
    raise ConfigError(f"config model.variant = {model['variant']!r}: not a ViT variant; choose "
                      f"from {list(VIT)}")
  size = VIT[model["variant"]]
  return {"arch": "vit", "patch_size": int(model["patch_size"]),
          "embed_dim": int(model["embed_dim"] or size["embed_dim"]),
          "depth": int(model["depth"] or size["depth"]),
          "num_heads": int(model["num_heads"] or size["num_heads"]), "mlp_ratio": 4.0,
          "in_chans": int(in_chans), "img_size": int(img_size),
          "bands": list(bands) if bands is not None else None, "pos_layout": pos_layout}


def vit_sizes(spec: Mapping[str, Any], dtype: Any) -> dict:
  """The constructor arguments a ViT spec shares with MAE and Scale-MAE."""
  return dict(patch_size=int(spec["patch_size"]), embed_dim=int(spec["embed_dim"]),
              depth=int(spec["depth"]), num_heads=int(spec["num_heads"]),
              mlp_ratio=float(spec.get("mlp_ratio", 4.0)), dtype=dtype)


def convnextv2_sizes(spec: Mapping[str, Any], dtype: Any) -> dict:
  """The constructor arguments a ConvNeXt V2 spec shares with the models built on it."""
  return dict(depths=tuple(spec["depths"]), dims=tuple(spec["dims"]), stem=spec["stem"],
              patch_size=int(spec["patch_size"]), dtype=dtype)


def _convnextv2_features(model, params, images, gsd):
  del gsd  # no position encoding
  return model.apply({"params": params}, images, method="features")


def _vit_features(model, params, images, gsd):
  out = model.apply({"params": params}, images, pos_scale=None if gsd is None else float(gsd))
  return out[:, 0]  # the CLS token after the final norm (MAE's and Scale-MAE's kNN features)


def _convnextv2_dense(model, params, images, gsd):
  del gsd
  return model.apply({"params": params}, images)  # the last stage's map, as a U-Net reads it


def _vit_dense(model, params, images, gsd):
  """The patch tokens after the final norm, on the patch grid."""
  out = model.apply({"params": params}, images, pos_scale=None if gsd is None else float(gsd))
  n, h, w, _ = images.shape
  p = model.patch_size
  return out[:, 1:].reshape(n, h // p, w // p, out.shape[-1])


def convnextv2_geometry(spec: Mapping[str, Any]) -> dict:
  """A ConvNeXt V2's grid facts (see `Arch.geometry`): the final map's stride and the centre of
  its first cell in input pixels (traced through every conv), and the smallest input that still
  gives a 1 x 1 map (any size above it works; convolutions floor)."""
  stem, patch = spec["stem"], int(spec["patch_size"])
  last = stage_geometries(64, stem, patch)[-1]
  smallest = next(n for n in range(1, 4097) if stage_geometries(n, stem, patch)[-1].size >= 1)
  return {"patch_size": patch, "input_size": None, "min_input_size": smallest,
          "input_multiple": 1, "output_stride": int(last.b), "output_origin_px": float(last.a),
          "feature_dim": int(spec["dims"][-1])}


def vit_geometry(spec: Mapping[str, Any]) -> dict:
  """A ViT's grid facts: one token per patch; inputs must tile into whole patches."""
  patch = int(spec["patch_size"])
  size = img_size(spec)
  return {"patch_size": patch, "input_size": size if isinstance(size, int) else list(size),
          "min_input_size": patch, "input_multiple": patch, "output_stride": patch,
          "output_origin_px": patch / 2, "feature_dim": int(spec["embed_dim"])}


def export_convnextv2(params: Mapping, layout: str, conv_mlp: bool | None = None) -> dict:
  """A ConvNeXt V2 encoder's params -> a PyTorch state dict: "mmearth" (MMEarth's stem),
  "official" or "timm" (the 4x4 stem; `conv_mlp` forces timm's fc1/fc2 as 1x1 convs or Linears)."""
  from mmearth_jax.interop import convert_convnextv2 as cv  # torch: only when exporting
  mmearth_stem = "initial_conv" in params
  if layout == "mmearth" and not mmearth_stem:
    raise ValueError("layout 'mmearth' writes MMEarth's stem (initial_conv + depthwise stem); "
                     "this model has the official 4x4 stem: use layout 'official' or 'timm'")
  if layout in ("official", "timm") and mmearth_stem:
    raise ValueError(f"layout {layout!r} has only the official 4x4 stem, but this model uses "
                     "MMEarth's stem (initial_conv + depthwise stem conv): use layout "
                     "'mmearth'")
  return cv.flax_to_torch(params, layout, conv_mlp=conv_mlp)


def img_size(spec: Mapping[str, Any]) -> int | tuple[int, int]:
  """A ViT spec's input size (the position tables are written for it)."""
  img = spec.get("img_size", 224)
  return img if isinstance(img, int) else tuple(int(v) for v in img)


def export_vit(spec: Mapping[str, Any], params: Mapping) -> dict:
  """A ViT encoder's params -> timm's (and MAE's, Scale-MAE's) encoder keys."""
  from mmearth_jax.interop import torch_vit as tv  # torch: only when exporting
  return tv.flax_to_torch_vit(params, img_size=img_size(spec))


ARCHS = (
    Arch("convnextv2",
         build=lambda spec, dtype=jnp.float32: ConvNeXtV2(
             **convnextv2_sizes(spec, dtype), num_classes=int(spec.get("num_classes", 0))),
         export_layouts=("mmearth", "official", "timm"),
         export=lambda spec, params, layout, conv_mlp=None: export_convnextv2(params, layout,
                                                                              conv_mlp),
         features=_convnextv2_features,
         size_unit=lambda spec: 32,
         geometry=convnextv2_geometry,
         dense=_convnextv2_dense),
    Arch("vit",
         build=lambda spec, dtype=jnp.float32: ViT(
             **vit_sizes(spec, dtype), pos_layout=spec.get("pos_layout", "concat")),
         export_layouts=("timm", "mae", "scale_mae"),
         export=lambda spec, params, layout, conv_mlp=None: export_vit(spec, params),
         features=_vit_features,
         size_unit=lambda spec: int(spec["patch_size"]),
         geometry=vit_geometry,
         dense=_vit_dense),
    Arch("unet_segmenter",
         build=lambda spec, dtype=jnp.float32: unet.from_encoder_spec(
             spec["encoder"], spec["num_classes"], decoder_dims=tuple(spec["decoder_dims"]),
             dtype=dtype),
         encoder_spec=lambda spec: dict(spec["encoder"])),
)
ENCODERS = {a.name: a for a in ARCHS if a.encoder_spec is None}


def build(spec: Mapping[str, Any], dtype: Any = jnp.float32):
  """The encoder module of a ConvNeXt V2 or ViT spec."""
  if spec.get("arch") not in ENCODERS:
    raise ValueError(f"encoder arch {spec.get('arch')!r}; choose from {list(ENCODERS)}")
  return ENCODERS[spec["arch"]].build(spec, dtype)
