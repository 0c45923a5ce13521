"""GFM's student (Mendieta et al., ICCV 2023): a SimMIM model whose encoder also feeds a
feature-distillation projector; and the pooled intermediate features its frozen teacher gives.

    images (N, H, W, C), patch mask (N, H/m, W/m) (1 = masked, m = SimMIM's mask patch, 32)
      -> encoder with SimMIM masking: the learned `mask_token` replaces the patch embeddings
         (ConvNeXt V2: the stem output; ViT: the patch embedding) at masked positions, and the
         network runs densely on every position
      -> final feature map (N, H/s, W/s, C_last) -> `decoder`: a 1x1 conv (a Dense over channels)
         to s*s*C channels, then pixel shuffle by s  ->  reconstruction (N, H, W, C)
      -> next-to-last stage output, average pooled -> `projector` (Dense to the teacher's width)

s is the encoder's total stride: 32 for ConvNeXt V2 with the official 4x4 stem, the patch size
for a ViT. The decoder reads ConvNeXt V2's last stage as it is (its `norm` belongs to the pooled
features) and a ViT's patch tokens after the final norm, CLS dropped (SimMIM's ViT).
"Next-to-last stage" (`distill_layer`, default -2, a Python index):
  ConvNeXt V2  the output of stage index distill_layer of the 4 (-2: stage 3, stride 16)
  ViT          the output of block index distill_layer (-2: block depth - 2), before the final
               norm, averaged over the patch tokens (the CLS token is left out)
GFM's Swin-B pools the output of `layers[:-1]`, which in Swin ends with the patch merging into
the last stage (stride 32, the last width). Here the pooled map is the next-to-last stage's own
output, before ConvNeXt V2's downsampling into stage 4 (methods.md's reading); student and
teacher pool the same layer either way.

Parameter tree: `encoder` (the plain encoder's parameters, so exports and evaluation read
`params["encoder"]` as for MP-MAE), `mask_token` (C0,), `decoder/{kernel, bias}` (C_last,
s*s*C), `projector/{kernel, bias}`.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mmearth_jax.models.convnextv2 import ConvNeXtV2
from mmearth_jax.models.vit import ViT, patch_grid

# SimMIM's init of the mask token and (as ConvNeXt V2's) of the linear layers.
_init = nn.initializers.truncated_normal(0.02)


def encoder_stride(encoder: nn.Module) -> int:
  """Input pixels per position of the encoder's final feature map."""
  if isinstance(encoder, ConvNeXtV2):
    if encoder.stem != "official":
      raise ValueError("GFM's SimMIM decoder needs ConvNeXt V2's official 4x4 stem (stride 32)")
    return 32
  if isinstance(encoder, ViT):
    return encoder.patch_size
  raise TypeError(f"GFM encoders are ConvNeXtV2 or ViT, got {type(encoder).__name__}")


def token_width(encoder: nn.Module) -> int:
  """Width of the positions the mask token replaces (ConvNeXt's stem, ViT's patch embedding)."""
  return encoder.dims[0] if isinstance(encoder, ConvNeXtV2) else encoder.embed_dim


def distill_width(encoder: nn.Module, layer: int) -> int:
  """Width of the pooled features of stage / block `layer`."""
  if isinstance(encoder, ConvNeXtV2):
    return encoder.dims[_stage_index(layer, len(encoder.dims))]
  return encoder.embed_dim


def _stage_index(layer: int, n: int) -> int:
  if not -n <= int(layer) < n:
    raise ValueError(f"config objective.distill_layer = {layer}: a ConvNeXt V2 has stages "
                     f"{-n}..{n - 1} (-2 = the next-to-last)")
  return int(layer) % n


def encode(encoder: nn.Module, images: jnp.ndarray, *, layer: int = -2, train: bool = False,
           patch_mask: jnp.ndarray | None = None, mask_token: jnp.ndarray | None = None
           ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(final feature map (N, h, w, C_last), pooled output of stage / block `layer` (N, C)) of a
  bound encoder; with `mask_token` and `patch_mask` (N, mh, mw), SimMIM masking.

  Call it inside a module (on a bound submodule) or through
  `encoder.apply(variables, images, method=lambda m, x: encode(m, x, ...))` (the teacher).
  """
  if isinstance(encoder, ConvNeXtV2):
    stages = encoder(images, patch_mask, train=train, return_stages=True, mask_token=mask_token)
    mid = stages[_stage_index(layer, len(stages))]
    return stages[-1], jnp.mean(mid.astype(jnp.float32), axis=(1, 2))
  if isinstance(encoder, ViT):
    tokens, (mid,) = encoder(images, train=train, patch_mask=patch_mask, mask_token=mask_token,
                             return_blocks=(layer,))
    gh, gw = patch_grid(images.shape[1], images.shape[2], encoder.patch_size)
    final = tokens[:, 1:].reshape(tokens.shape[0], gh, gw, tokens.shape[-1])
    return final, jnp.mean(mid[:, 1:].astype(jnp.float32), axis=1)
  raise TypeError(f"GFM encoders are ConvNeXtV2 or ViT, got {type(encoder).__name__}")


def pixel_shuffle(x: jnp.ndarray, factor: int) -> jnp.ndarray:
  """torch's PixelShuffle in channels-last form: (N, h, w, C*r*r) -> (N, h*r, w*r, C), input
  channel c*r*r + i*r + j going to output pixel (h*r + i, w*r + j) of channel c."""
  n, h, w, crr = x.shape
  r = factor
  c = crr // (r * r)
  if c * r * r != crr:
    raise ValueError(f"pixel shuffle by {r}: {crr} channels are not a multiple of {r * r}")
  x = x.reshape(n, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(n, h * r, w * r, c)


class SimMIM(nn.Module):
  """GFM's student: the SimMIM model plus the projector of the distillation branch.

  `teacher_dim` is the width of the teacher's pooled features (0 = the student's own at
  `distill_layer`, the case of a teacher of the same architecture).
  """
  encoder: nn.Module
  distill_layer: int = -2
  teacher_dim: int = 0

  @nn.compact
  def __call__(self, images: jnp.ndarray, patch_mask: jnp.ndarray, *, train: bool = False
               ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """images (N, H, W, C), patch_mask (N, mh, mw) (1 = masked) -> (reconstruction (N, H, W, C),
    projected pooled features (N, teacher_dim))."""
    enc = self.encoder
    mask_token = self.param("mask_token", _init, (token_width(enc),), jnp.float32)
    final, pooled = encode(enc, images, layer=self.distill_layer, train=train,
                           patch_mask=patch_mask, mask_token=mask_token)
    s = encoder_stride(enc)
    n, h, w, c = images.shape
    if final.shape[1] * s != h or final.shape[2] * s != w:
      raise ValueError(f"input {h}x{w} is not a multiple of the encoder's stride {s}: the "
                       "decoder could not reconstruct it (choose a crop size divisible by it)")
    dtype = enc.dtype
    y = nn.Dense(s * s * c, kernel_init=_init, dtype=dtype, name="decoder")(final)
    reconstruction = pixel_shuffle(y, s)
    projected = nn.Dense(self.teacher_dim or distill_width(enc, self.distill_layer),
                         kernel_init=_init, dtype=dtype, name="projector")(pooled.astype(dtype))
    return reconstruction, projected
