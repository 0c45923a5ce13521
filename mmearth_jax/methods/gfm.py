"""GFM continual pretraining: a SimMIM student distilled from a frozen teacher of the same encoder
architecture (config.teacher.checkpoint, e.g. an ImageNet-22k model imported by `mmearth-jax
from-torch`). Recipes: configs/gfm.py.

Spec: {"arch": "gfm", "encoder": <a convnextv2 or vit spec>, "distill_layer", "teacher_dim"}
(`models.gfm.SimMIM`); the encoder's parameters are params["encoder"].
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mmearth_jax import optim
from mmearth_jax.config_lib import ConfigError
from mmearth_jax.methods import base, encoders
from mmearth_jax.models import gfm as gfm_model
from mmearth_jax.models.convnextv2 import ConvNeXtV2
from mmearth_jax.models.vit import ViT
from mmearth_jax.objectives.gfm import gfm_loss

NAME = "gfm"
INIT_STUDENT = ("random", "teacher")  # GFM's, or the student starts as the teacher


def encoder_spec_from_config(config: Mapping[str, Any]) -> dict:
  """The student's (and the teacher's) encoder: ConvNeXt V2 with the official 4x4 stem (what
  ImageNet checkpoints have; the FCMAE patch size is the mask patch) or a ViT."""
  m, d, o = config["model"], config["data"], config["objective"]
  bands, in_chans = base.image_bands(d)
  if m["arch"] == "convnextv2":
    return encoders.convnextv2_spec(m["variant"], depths=m["depths"], dims=m["dims"],
                                    stem="official", patch_size=o["mask_patch"], bands=bands,
                                    in_chans=in_chans)
  if m["arch"] == "vit":
    return encoders.vit_spec(m, img_size=d["resized_crop"]["size"], bands=bands,
                             in_chans=in_chans)
  raise ConfigError(f"config model.arch = {m['arch']!r}: GFM encoders are convnextv2 or vit")


def spec_from_config(config: Mapping[str, Any]) -> dict:
  return {"arch": NAME, "encoder": encoder_spec_from_config(config),
          "distill_layer": int(config["objective"]["distill_layer"]), "teacher_dim": 0}


def make_data(config: ml_collections.ConfigDict) -> tuple[Iterator, base.DataInfo]:
  from mmearth_jax.data import scale_aug  # grain: only where data is read
  data_cfg = ml_collections.ConfigDict(config.data.to_dict())
  data_cfg.num_epochs = 0  # the loop decides when to stop; the pipeline repeats
  it, info = scale_aug.make_crop_dataset(data_cfg)
  bands = tuple(info["bands"]) if info["bands"] is not None else None
  return iter(it), base.DataInfo(info["num_records"], bands,
                                 input_size=int(config.data.resized_crop.size),
                                 **base.source_facts(config.data))


def _encoder(config: ml_collections.ConfigDict) -> nn.Module:
  """The student's encoder module, with the training options (drop-path, remat)."""
  spec = encoder_spec_from_config(config)
  c, dtype = config.model, base.dtype(config)
  if spec["arch"] == "vit":
    return ViT(**encoders.vit_sizes(spec, dtype), drop_path_rate=c.drop_path_rate, remat=c.remat)
  return ConvNeXtV2(**encoders.convnextv2_sizes(spec, dtype), drop_path_rate=c.drop_path_rate,
                    remat=c.remat)


def task(config: ml_collections.ConfigDict, info: base.DataInfo) -> base.Task:
  del info  # the student reconstructs its own (augmented) input
  c, o, t = config.model, config.objective, config.teacher
  if t.init_student not in INIT_STUDENT:
    raise ConfigError(f"config teacher.init_student = {t.init_student!r}; choose 'random' "
                      "(GFM's) or 'teacher'")
  if not t.checkpoint:
    raise ConfigError("config teacher.checkpoint is empty: GFM needs a frozen teacher, e.g. a "
                      "model folder written by `mmearth-jax from-torch --checkpoint "
                      "convnextv2_base_22k_224_ema.pt --out DIR` (see configs/gfm.py)")
  encoder = _encoder(config)
  model = gfm_model.SimMIM(encoder=encoder, distill_layer=o.distill_layer)

  def init(rng, batch):
    images = base.example_images(batch)
    grid = (1, images.shape[1] // o.mask_patch, images.shape[2] // o.mask_patch)
    return model.init(rng, images, jnp.zeros(grid))["params"]

  def loss(params, batch, rng, teacher):
    total, terms = gfm_loss(model, params, teacher, batch, rng, mask_patch=o.mask_patch,
                            mask_ratio=o.mask_ratio, alpha=o.alpha, teacher_size=t.image_size)
    return total, {f"loss/{k}": v for k, v in terms.items()}

  def teacher(spec: Mapping[str, Any], params: Any) -> dict:
    return {"encoder": _teacher_encoder(config, spec, params)}

  if c.arch == "vit":
    return base.Task(init, loss, lambda path: optim.vit_layer_id(path, encoder.depth),
                     encoder.depth, batch_keys=("image",), teacher=teacher)
  return base.Task(init, loss, optim.convnextv2_layer_id, 12, batch_keys=("image",),
                   teacher=teacher)


def _teacher_encoder(config: ml_collections.ConfigDict, spec: Mapping[str, Any],
                     params: Any) -> dict:
  """The teacher's encoder parameters; a classifier head is left out (the teacher only gives
  intermediate features)."""
  if spec["arch"] != config.model.arch:
    raise ValueError(f"holds a {spec['arch']} encoder but config model.arch = "
                     f"{config.model.arch!r}: the teacher must have the student's architecture")
  if spec["arch"] == "vit":  # heads leave no trace in the shapes
    heads = encoder_spec_from_config(config)["num_heads"]
    if int(spec["num_heads"]) != heads:
      raise ValueError(f"is a ViT with {spec['num_heads']} attention heads but the student has "
                       f"{heads} (config model.num_heads / model.variant)")
  return {k: v for k, v in params.items() if k != "head"}


def _build(spec: Mapping[str, Any], dtype: Any = jnp.float32) -> gfm_model.SimMIM:
  return gfm_model.SimMIM(encoder=encoders.build(spec["encoder"], dtype),
                          distill_layer=int(spec.get("distill_layer", -2)),
                          teacher_dim=int(spec.get("teacher_dim", 0)))


ARCHS = (base.Arch(NAME, build=_build, encoder_spec=lambda spec: dict(spec["encoder"])),)
