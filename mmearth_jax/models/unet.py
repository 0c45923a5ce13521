"""A U-Net segmenter on the ConvNeXt V2 stages: MMEarth's segmentation fine-tuning model.

encoder: `ConvNeXtV2` under the parameter name `encoder`, the same tree a pretrained encoder has
(`pretrained.encoder_params(spec, params)` drops in as `params["encoder"]`).
decoder: from the deepest stage, for each shallower stage: bilinear resize to that skip's size,
concatenate the skip, then two (3x3 conv -> LayerNorm -> GELU) blocks; a 1x1 classifier on the
shallowest level; the logits are resized (bilinear) to the input size.

Skip sizes are not powers of two in general (MMEarth's unpadded 3x3 stem conv turns 64 px into
62 / 31 / 15 / 7 px stages), so every upsampling resizes to the skip's actual size rather than
by a factor of two. LayerNorm instead of BatchNorm keeps the model stateless (no batch
statistics to carry), which is what the encoder's blocks use too.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from mmearth_jax.models.convnextv2 import VARIANTS, Conv, ConvNeXtV2, LayerNorm, gelu
from mmearth_jax.ops import resize as resize_ops


def bilinear(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """(N, h, w, C) -> (N, H, W, C), torch's bilinear `interpolate` (align_corners=False)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return resize_ops.resize(x, size, "bilinear", xp=jnp)


class ConvBlock(nn.Module):
  """Two 3x3 conv (zero padding) -> LayerNorm -> GELU layers."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i in range(2):
      x = Conv(self.features, 3, padding=1, dtype=self.dtype, name=f"conv{i}")(x)
      x = gelu(LayerNorm(dtype=self.dtype, name=f"norm{i}")(x))
    return x


class UNetSegmenter(nn.Module):
  """ConvNeXt V2 encoder + U-Net decoder -> per-pixel logits (N, H, W, num_classes).

  `decoder_dims`: the width of each decoder level, deepest first (one per skip, i.e. 3 for the
  4 ConvNeXt stages); empty = the encoder's widths of the skips (dims[2], dims[1], dims[0]).
  """
  num_classes: int
  depths: Sequence[int] = (2, 2, 6, 2)
  dims: Sequence[int] = (40, 80, 160, 320)
  stem: str = "mmearth"
  patch_size: int = 16
  decoder_dims: Sequence[int] = ()
  drop_path_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  def widths(self) -> tuple[int, ...]:
    n_skips = len(self.dims) - 1
    widths = tuple(self.decoder_dims) or tuple(self.dims[:-1])[::-1]
    if len(widths) != n_skips:
      raise ValueError(f"decoder_dims {tuple(self.decoder_dims)} must give one width per skip "
                       f"connection ({n_skips} for {len(self.dims)} encoder stages)")
    return widths

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    size = x.shape[1:3]
    encoder = ConvNeXtV2(depths=tuple(self.depths), dims=tuple(self.dims), stem=self.stem,
                         patch_size=self.patch_size, drop_path_rate=self.drop_path_rate,
                         dtype=self.dtype, name="encoder")
    stages = encoder(x, train=train, return_stages=True)
    return self.decode(stages, size)

  def decode(self, stages: Sequence[jnp.ndarray], size: tuple[int, int]) -> jnp.ndarray:
    y = stages[-1]
    for level, (skip, width) in enumerate(zip(stages[-2::-1], self.widths())):
      y = bilinear(y, skip.shape[1:3])
      y = jnp.concatenate([y.astype(self.dtype), skip.astype(self.dtype)], axis=-1)
      y = ConvBlock(width, self.dtype, name=f"decoder_{level}")(y)
    logits = Conv(self.num_classes, 1, dtype=self.dtype, name="classifier")(y)
    return bilinear(logits.astype(jnp.float32), tuple(size))


def from_encoder_spec(spec: Mapping[str, Any], num_classes: int, *,
                      decoder_dims: Sequence[int] = (), drop_path_rate: float = 0.0,
                      dtype: jnp.dtype = jnp.float32) -> UNetSegmenter:
  """The segmenter for a ConvNeXt V2 encoder spec (`pretrained.encoder_spec`)."""
  if spec.get("arch") != "convnextv2":
    raise ValueError(f"the U-Net decoder needs a ConvNeXt V2 encoder (its 4 stages); got arch "
                     f"{spec.get('arch')!r}")
  return UNetSegmenter(num_classes=int(num_classes), depths=tuple(spec["depths"]),
                       dims=tuple(spec["dims"]), stem=spec["stem"],
                       patch_size=int(spec["patch_size"]), decoder_dims=tuple(decoder_dims),
                       drop_path_rate=drop_path_rate, dtype=dtype)


def encoder_spec_for(variant: str = "atto", *, depths: Sequence[int] = (),
                     dims: Sequence[int] = (), stem: str = "mmearth", patch_size: int = 8,
                     bands: Sequence[str] = ()) -> dict:
  """A ConvNeXt V2 encoder spec (as `pretrained` writes them) for a randomly initialised model."""
  if variant not in VARIANTS:
    raise KeyError(f"unknown ConvNeXt V2 variant {variant!r}; choose from {list(VARIANTS)}")
  d, w = VARIANTS[variant]
  return {"arch": "convnextv2", "depths": list(depths or d), "dims": list(dims or w),
          "stem": stem, "patch_size": int(patch_size), "in_chans": len(bands),
          "num_classes": 0, "bands": list(bands)}
