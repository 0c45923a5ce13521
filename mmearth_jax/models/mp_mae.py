"""MP-MAE (MMEarth): a ConvNeXt V2 FCMAE with one decoder head per pretext modality.

encoder (masked ConvNeXt V2) -> 1x1 projection to the decoder width -> learned mask token at the
masked patches -> ONE ConvNeXt V2 block shared by all output modalities -> a head per modality:
  pixel modalities: 1x1 conv to patch^2 x channels, read as tokens (N, L, p*p*C) whose last axis
    is ordered (row-in-patch, column-in-patch, channel), as the reference;
  image modalities: a LayerNorm shared by all image heads, global average pool, Dense.

The reference runs the shared block once per output modality on the same input; running it once
and feeding every head is the same forward and gradient with a twelfth of the arithmetic.
Head widths come from the modality registry: regression predicts the selected bands,
segmentation and classification predict class logits.

`weight_init` "fcmae" (the default) is the reference's FCMAE init, which MMEarth pretrains from:
by layer type of its sparse encoder and dense decoder, timm trunc_normal std 1 on the depthwise
convs, the encoder's pointwise linears, the projection, the decoder's depthwise conv and the
pixel heads; std .02 on the full encoder convs, the decoder's pointwise linears and the image
heads; mask token N(0, .02). "trunc_normal_0.02" is the earlier init of this package.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmearth_jax import modalities as M
from mmearth_jax.models.convnextv2 import (VARIANTS, Block, ConvNeXtV2, LayerNorm, remat_block,
                                           timm_trunc_normal, trunc_normal_init)

# The initialisers of the layers after the encoder (its own: `convnextv2.ENCODER_INITS`) by
# `MPMAE.weight_init`: "conv" for the reference's nn.Conv2d (proj, the decoder's dwconv, the
# pixel heads), "linear" for its nn.Linear (the decoder's pwconv1/pwconv2, the image heads).
DECODER_INITS = {
    "trunc_normal_0.02": {"conv": trunc_normal_init, "linear": trunc_normal_init,
                          "mask_token": nn.initializers.zeros},
    # FCMAE._init_weights: nn.Conv2d timm's default std 1, nn.Linear std .02, mask token N(0, .02).
    "fcmae": {"conv": timm_trunc_normal(1.0), "linear": timm_trunc_normal(0.02),
              "mask_token": nn.initializers.normal(0.02)},
}
WEIGHT_INITS = tuple(DECODER_INITS)


def head_channels(name: str, bands: Sequence[str]) -> int:
  m = M.get(name)
  return m.num_classes if m.task in (M.SEGMENTATION, M.CLASSIFICATION) else len(bands)


def random_patch_mask(key: jax.Array, batch: int, grid: int, mask_ratio: float) -> jnp.ndarray:
  """(N, grid, grid) float mask, 1 = masked; every sample keeps int(L * (1 - ratio)) patches."""
  length = grid * grid
  keep = int(length * (1 - mask_ratio))
  noise = jax.random.uniform(key, (batch, length))
  ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  return (ranks >= keep).astype(jnp.float32).reshape(batch, grid, grid)


class MPMAE(nn.Module):
  """The MP-MAE model. `outputs`: {modality: bands} (see `modalities.resolve_outputs`)."""
  outputs: Mapping[str, Sequence[str]]
  variant: str = "atto"
  depths: Sequence[int] | None = None  # override the variant's (small test models)
  dims: Sequence[int] | None = None
  stem: str = "mmearth"
  patch_size: int = 16
  decoder_dim: int = 512
  drop_path_rate: float = 0.0
  dwconv_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  weight_init: str = "fcmae"  # or "trunc_normal_0.02" (see the module docstring)
  # "sparse": the reference's MinkowskiEngine pretraining geometry; "dense": its fine-tuning one
  # (`convnextv2` module docstring). At 56 px / 8 px only "sparse" covers the whole 7x7 grid.
  masked_geometry: str = "dense"

  def setup(self):
    if self.weight_init not in DECODER_INITS:
      raise ValueError(f"unknown weight_init {self.weight_init!r}; choose from {WEIGHT_INITS}")
    inits = DECODER_INITS[self.weight_init]
    depths, dims = VARIANTS[self.variant]
    depths, dims = self.depths or depths, self.dims or dims
    self.encoder = ConvNeXtV2(depths, dims, self.stem, self.patch_size, self.drop_path_rate,
                              dwconv_impl=self.dwconv_impl, dtype=self.dtype, remat=self.remat,
                              weight_init=self.weight_init, masked_geometry=self.masked_geometry)
    # proj is the reference's 1x1 nn.Conv2d.
    self.proj = nn.Dense(self.decoder_dim, kernel_init=inits["conv"], dtype=self.dtype)
    self.mask_token = self.param("mask_token", inits["mask_token"], (self.decoder_dim,))
    block = remat_block(Block) if self.remat else Block
    self.decoder = block(self.decoder_dim, 0.0, self.dwconv_impl, self.dtype, inits["conv"],
                         inits["linear"])
    names = list(self.outputs)
    self.image_norm = LayerNorm(dtype=self.dtype)  # the reference's layer_norm_tmp
    p2 = self.patch_size ** 2
    # Pixel heads are the reference's 1x1 nn.Conv2d, image heads its nn.Linear.
    self.heads = {n: nn.Dense((p2 if M.get(n).level == M.PIXEL else 1) *
                              head_channels(n, self.outputs[n]),
                              kernel_init=inits["conv" if M.get(n).level == M.PIXEL else "linear"],
                              dtype=self.dtype, name=f"head_{n}") for n in names}
    # One learnable log-variance per output modality (uncertainty weighting), start at 0.
    self.log_vars = self.param("log_vars", nn.initializers.zeros, (len(names),))

  def __call__(self, images: jnp.ndarray, patch_mask: jnp.ndarray, *, train: bool = False):
    """images (N, H, W, C); patch_mask (N, g, g), 1 = masked. Returns {modality: prediction}.

    Pixel predictions are tokens (N, g*g, p*p*C); image predictions (N, C).
    """
    feats = self.encoder(images, patch_mask, train=train)
    x = self.proj(feats)
    g = patch_mask.shape[1]
    # MMEarth64 (56 px / 8 px) in the dense geometry: the encoder's 6x6 map covers patches 0..5
    # of the 7x7 grid; the last row and column were never seen and get the mask token like masked
    # patches. The sparse geometry's map is the whole grid.
    fh, fw = x.shape[1:3]
    x = jnp.pad(x, ((0, 0), (0, g - fh), (0, g - fw), (0, 0)))
    unseen = jnp.pad(jnp.zeros((1, fh, fw), x.dtype), ((0, 0), (0, g - fh), (0, g - fw)),
                     constant_values=1)
    m = jnp.maximum(patch_mask.astype(x.dtype), unseen)[..., None]
    x = x * (1 - m) + self.mask_token.astype(x.dtype) * m
    x = self.decoder(x, None, train)  # once, shared by every head
    preds = {}
    pooled = None
    for name, head in self.heads.items():
      if M.get(name).level == M.PIXEL:
        y = head(x)
        preds[name] = y.reshape(y.shape[0], g * g, y.shape[-1]).astype(jnp.float32)
      else:
        if pooled is None:
          pooled = jnp.mean(self.image_norm(x), axis=(1, 2))
        preds[name] = head(pooled).astype(jnp.float32)
    return preds
