"""The contract between a method module and the rest of the library.

A method module (`mmearth_jax/methods/<name>.py`) defines

    NAME                              the config's `method` value
    ARCHS                             the `Arch`s of the models it trains (spec "arch" values)
    spec_from_config(config) -> dict  the spec (see `mmearth_jax.pretrained`) of the model a
                                      training config builds
    make_data(config)                 (this host's batch iterator, `DataInfo`)
    task(config, info) -> Task        model, parameter init and loss for the trainer

An `Arch` says how to build a spec's model, where its encoder is, how it embeds images (encoders),
and which PyTorch layouts it exports to and how (the export functions import torch when called). Plain encoders (ConvNeXt V2, ViT) are archs of `methods.encoders`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from mmearth_jax import bands as B
from mmearth_jax import modalities as M
from mmearth_jax.config_lib import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What a method's data pipeline tells the trainer and the model."""
  num_records: int  # examples per epoch (all hosts)
  bands: tuple[str, ...] | None  # the encoder's input bands, None when unknown
  outputs: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  # For the model card: the training crop (px), the pixels' ground sample distance (m), where the
  # data came from, and the statistics its images were z-scored with ({stats key: {"mean",
  # "std"}}: the shards' `band_stats`, or {"images": ...} for an image folder / TFDS); None
  # where unknown.
  input_size: int | None = None
  gsd_m: float | None = None
  source: str = ""
  band_stats: Mapping[str, Any] | None = None


@dataclasses.dataclass
class Task:
  """What the training loop needs from a method."""
  init: Callable[[jax.Array, Mapping[str, Any]], Any]  # (rng, batch) -> params
  # (params, batch, rng) -> (loss, aux); (params, batch, rng, teacher) with a teacher
  loss: Callable[..., tuple[jax.Array, dict]]
  layer_id: Callable[[tuple[str, ...]], int] | None  # parameter path -> layer (lr decay)
  num_layers: int
  batch_keys: tuple[str, ...] = ("image", "targets", "valid")  # what the step reads
  # A frozen teacher: (encoder spec, encoder params) of the model at config.teacher.checkpoint
  # -> the host arrays it contributes, nested like the part of `params` they mirror (e.g.
  # {"encoder": ...}); raises ValueError when that model cannot be the teacher. The trainer
  # loads it once and keeps it in state["teacher"] beside (not in) the params.
  teacher: Callable[[Mapping[str, Any], Any], Any] | None = None


@dataclasses.dataclass(frozen=True)
class Arch:
  """A model kind a spec names ("arch")."""
  name: str
  build: Callable[[Mapping[str, Any], Any], Any]  # (spec, dtype) -> flax module
  # spec -> the spec of the encoder inside; None when the model is itself an encoder
  encoder_spec: Callable[[Mapping[str, Any]], dict] | None = None
  encoder_key: str = "encoder"  # params[encoder_key] are the encoder's parameters
  export_layouts: tuple[str, ...] = ()  # PyTorch layouts `to-torch` writes it in
  # (spec, params, layout, conv_mlp) -> a PyTorch state dict in that layout (imports torch)
  export: Callable[..., dict] | None = None
  # Encoders only: (module, params, images, gsd) -> (N, D) features, and the size unit an
  # input must be a multiple of.
  features: Callable[..., jax.Array] | None = None
  size_unit: Callable[[Mapping[str, Any]], int] | None = None
  # Encoders only: spec -> the grid facts of the model card (`mmearth_jax.cards`): patch_size,
  # input_size (None when the spec does not fix it), min_input_size, input_multiple,
  # output_stride, output_origin_px, feature_dim.
  geometry: Callable[[Mapping[str, Any]], dict] | None = None
  # Encoders only: (module, params, images, gsd) -> (N, h, w, D) feature map, cell (i, j)
  # centred as `geometry` says (what `embed --scene` writes).
  dense: Callable[..., jax.Array] | None = None


def dtype(config: ml_collections.ConfigDict) -> Any:
  """The compute dtype of `config.model.dtype`."""
  if config.model.dtype not in DTYPES:
    raise ConfigError(f"config model.dtype = {config.model.dtype!r}; choose from {list(DTYPES)}")
  return DTYPES[config.model.dtype]


def example_images(batch: Mapping[str, Any]) -> jax.Array:
  """One all-zero image shaped like the batch's, for parameter init."""
  return jnp.zeros((1, *batch["image"].shape[1:]), jnp.float32)


def shards_data(config: ml_collections.ConfigDict) -> tuple[Iterator, DataInfo]:
  """The MMEarth shards through the standard pipeline (crops, z-scoring, targets)."""
  from mmearth_jax.data import convert, pipeline  # grain: only where data is read
  data_cfg = ml_collections.ConfigDict(config.data.to_dict())
  data_cfg.num_epochs = 0  # the loop decides when to stop; the pipeline repeats
  manifest = convert.load_manifest(config.data.path)
  bands, outputs, crop = pipeline.resolve_config(config.data, manifest)
  info = DataInfo(manifest["num_records"], tuple(bands), dict(outputs), input_size=int(crop),
                  **source_facts(config.data))
  return iter(pipeline.make_dataset(data_cfg)), info


def source_facts(data: Mapping[str, Any]) -> dict:
  """DataInfo's gsd_m, source and band_stats for a data section: the MMEarth shards at
  `data.path` (their manifest's statistics, 10 m pixels) or an image folder / TFDS dataset
  (`data.images`, z-scored with data.mean / data.std; GSD unknown)."""
  if data.get("images"):
    return {"gsd_m": None, "source": str(data["images"]),
            "band_stats": {"images": {"mean": list(data["mean"]), "std": list(data["std"])}}}
  from mmearth_jax.data import convert  # only where data is read
  manifest = convert.load_manifest(data["path"])
  return {"gsd_m": B.MMEARTH_GSD_M, "source": os.path.abspath(data["path"]),
          "band_stats": dict(manifest["band_stats"])}


def image_bands(data: Mapping[str, Any]) -> tuple[list[str] | None, int]:
  """(bands, channels) of the images a data section feeds: an image folder / TFDS dataset
  (RGB when it has 3 channels, else unnamed) or the MMEarth shards' `input` bands."""
  if data.get("images"):
    return (list(B.RGB) if len(data["mean"]) == 3 else None), len(data["mean"])
  bands = list(M.resolve_input(data["input"]))
  return bands, len(bands)
