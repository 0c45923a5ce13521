"""Scale-MAE (Reed et al., ICCV 2023): a ViT MAE told the ground sample distance of its input, whose
decoder reconstructs a band-pass (high-frequency) image at twice the input resolution and a
low-frequency image at the input resolution.

Architecture, as the released code builds it (`models_mae.MaskedAutoencoderViT` with the
pretraining defaults: decoder depth 3, use_mask_token, independent FCN heads, fcn_dim 512,
fcn_layers 2):

  encoder   ViT on the kept patches; the sin-cos position grid is multiplied per sample by the
            GSD scale r (`posenc.sincos_2d(scale=r)`), recomputed for the actual grid.
  decoder   decoder_embed -> scatter the kept tokens among mask tokens -> + the decoder-width
            GSD-scaled position encoding of the INPUT grid (the code's `pos_embed_encoder`; the
            target-resolution table it also computes is never added) -> drop CLS -> 3 blocks ->
            LayerNorm -> (N, gh, gw, Dd) feature map
  FPN       fpn1: ConvT 2x2/2, LayerNorm, GELU, ConvT 2x2/2 (x4);  fpn2: ConvT 2x2/2 (x2)
            (`progressive`: fpn1 = LayerNorm, GELU, ConvT applied after fpn2, sharing it)
  heads     FCNHead per band (`fcn_high` on fpn1, `fcn_low` on fpn2; one shared `fcn` when not
            independent): 1x1 proj, `fcn_layers` HFFB blocks (GELU, grouped 3x3, GELU, 1x1, plus a
            1x1 residual), then LayerNorm, ConvT (p/4), GELU, grouped 3x3, GELU, 1x1, GELU, ConvT 2.
            With p = 16 the high head outputs 32x the grid (448 for 224 input), the low head 16x.

The reference hard-codes 3 output channels and patch 16; here the heads output `out_chans`
(default: the input's channels) and the head upsampling is p/4 x 2, so any patch size divisible
by 4 gives high = 2x input and low = 1x input resolution.

Parameter names mirror the PyTorch state dict (`fpn.fpn1.0` -> `fpn/fpn1_0`,
`fcn_high.conv_blocks.0.convs.1` -> `fcn_high/conv_blocks_0/convs_1`, Norm2d's `.ln` dropped), so
`interop` converts by renaming and transposing.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmearth_jax.models.posenc import sincos_2d
from mmearth_jax.models.vit import (LN_EPS, VIT_VARIANTS, ViT, block_class, dense, gelu,
                                    layer_norm, patch_grid, patch_mask, token_init)
from mmearth_jax.ops.conv import conv2d
from mmearth_jax.ops.masked_tokens import random_masking, scatter_tokens

Dtype = Any

POS_VARIANTS = ("code", "paper")  # posenc layout: released code's concat, or paper's interleave


def _torch_uniform(fan_in: int):
  """PyTorch's default conv init (kaiming-uniform, a = sqrt(5)): U(-1/sqrt(fan_in), +)."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Conv2d(nn.Module):
  """torch Conv2d, "same" padding and PyTorch's default init; `groups` as torch's (consecutive
  channel groups). Runs through `ops.conv.conv2d`: XLA:CPU's grouped convolution is 100x slower
  than the same sum as a batched matmul (benchmarks/ops.py)."""
  features: int
  kernel: int = 1
  groups: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k, g = self.kernel, self.groups
    fan_in = x.shape[-1] // g * k * k
    kernel = self.param("kernel", _torch_uniform(fan_in), (k, k, x.shape[-1] // g, self.features),
                        jnp.float32)
    bias = self.param("bias", _torch_uniform(fan_in), (self.features,), jnp.float32)
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), padding=k // 2, groups=g)
    return y + bias.astype(self.dtype)


def _conv(x: jnp.ndarray, features: int, kernel: int, groups: int, dtype: Dtype,
          name: str) -> jnp.ndarray:
  return Conv2d(features, kernel, groups, dtype, name=name)(x)


class ConvTranspose(nn.Module):
  """torch ConvTranspose2d with kernel == stride: each input pixel becomes a k x k output block.

  Without overlap this is one matmul to k*k*features per pixel and a depth-to-space; kernel
  (k, k, in, out) holds torch's weight (in, out, k, k) transposed (2, 3, 0, 1).
  """
  features: int
  stride: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    n, h, w, c = x.shape
    k = self.stride
    fan_in = self.features * k * k  # torch computes ConvTranspose fan-in from weight dim 1
    kernel = self.param("kernel", _torch_uniform(fan_in), (k, k, c, self.features), jnp.float32)
    bias = self.param("bias", _torch_uniform(fan_in), (self.features,), jnp.float32)
    y = jnp.einsum("nhwc,abcf->nhawbf", x.astype(self.dtype), kernel.astype(self.dtype))
    return y.reshape(n, h * k, w * k, self.features) + bias.astype(self.dtype)


def _norm2d(name: str, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


class FPNHead(nn.Module):
  """The two upsampled feature maps: (x4 for the high band, x2 for the low band)."""
  progressive: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    d = x.shape[-1]
    low = ConvTranspose(d, 2, self.dtype, name="fpn2_0")(x)
    if self.progressive:  # fpn1 continues from fpn2's output
      high = _norm2d("fpn1_0", self.dtype)(low)
      high = ConvTranspose(d, 2, self.dtype, name="fpn1_2")(gelu(high))
    else:
      high = ConvTranspose(d, 2, self.dtype, name="fpn1_0")(x)
      high = gelu(_norm2d("fpn1_1", self.dtype)(high))
      high = ConvTranspose(d, 2, self.dtype, name="fpn1_3")(high)
    return high, low


class HFFB(nn.Module):
  """GELU, grouped 3x3 (2 channels per group) to half width, GELU, 1x1 back; plus a 1x1 residual."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    d = x.shape[-1]
    y = _conv(gelu(x), d // 2, 3, d // 2, self.dtype, "convs_1")
    y = _conv(gelu(y), d, 1, 1, self.dtype, "convs_3")
    return y + _conv(x, d, 1, 1, self.dtype, "residual")


class FCNHead(nn.Module):
  """Feature map -> image: 1x1 projection, HFFB blocks, then the learned x(up1 * 2) upsampler."""
  hidden: int = 512
  num_layers: int = 2
  out_chans: int = 3
  up1: int = 4  # p / 4: the first transposed conv's stride
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = self.hidden
    x = _conv(x, h, 1, 1, self.dtype, "proj")
    for j in range(self.num_layers):
      x = HFFB(self.dtype, name=f"conv_blocks_{j}")(x)
    x = _norm2d("pred_0", self.dtype)(x)
    x = gelu(ConvTranspose(h // 2, self.up1, self.dtype, name="pred_1")(x))
    x = gelu(_conv(x, h // 4, 3, h // 4, self.dtype, "pred_3"))
    x = gelu(_conv(x, h // 2, 1, 1, self.dtype, "pred_5"))
    return ConvTranspose(self.out_chans, 2, self.dtype, name="pred_7")(x)


class ScaleMAE(nn.Module):
  """Scale-MAE. Defaults: ViT-L/16 encoder and the released pretraining decoder.

  `__call__(images, gsd)` returns (high (N, 2H, 2W, C'), low (N, H, W, C'), mask (N, L) with
  1 = removed), with H, W the input size for p = 16 (in general 2p and p times the grid). `gsd`
  (N,) is the position-grid scale r of each input (the reference's `input_res`).
  """
  patch_size: int = 16
  embed_dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_ratio: float = 4.0
  decoder_embed_dim: int = 512
  decoder_depth: int = 3
  decoder_num_heads: int = 16
  fcn_dim: int = 512
  fcn_layers: int = 2
  independent_fcn_head: bool = True
  progressive: bool = False
  out_chans: int = 0  # 0: as many as the input
  mask_ratio: float = 0.75
  pos_variant: str = "code"  # "code" (released weights) or "paper" (Eq. 1's channel order)
  absolute_scale: bool = False  # the reference's ablation: r = 1 for every sample
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  token_impl: str = "auto"
  remat: bool = False

  def keep_count(self, length: int) -> int:
    return int(length * (1 - self.mask_ratio))

  @property
  def pos_layout(self) -> str:
    if self.pos_variant not in POS_VARIANTS:
      raise ValueError(f"Scale-MAE pos_variant {self.pos_variant!r}; choose from {POS_VARIANTS}")
    return "concat" if self.pos_variant == "code" else "interleave"

  def encoder(self) -> ViT:
    return ViT(self.patch_size, self.embed_dim, self.depth, self.num_heads, self.mlp_ratio,
               self.drop_path_rate, self.dtype, self.token_impl, self.remat, self.pos_layout,
               name="encoder")

  @nn.compact
  def __call__(self, images: jnp.ndarray, gsd: jnp.ndarray, *,
               ids_keep: jnp.ndarray | None = None, train: bool = False
               ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    n, h, w, c = images.shape
    p = self.patch_size
    if p % 4:
      raise ValueError(f"Scale-MAE patch_size {p} must be divisible by 4 (head upsampling p/4 x 2)")
    gh, gw = patch_grid(h, w, p)
    length = gh * gw
    if ids_keep is None:
      ids_keep, _, _ = random_masking(self.make_rng("masking"), n, length,
                                      self.keep_count(length))
    scale = jnp.ones((n,), jnp.float32) if self.absolute_scale else jnp.asarray(gsd, jnp.float32)
    scale = jnp.broadcast_to(scale.reshape(-1), (n,))

    latent = self.encoder()(images, ids_keep=ids_keep, train=train, pos_scale=scale)

    dd = self.decoder_embed_dim
    x = dense(dd, "decoder_embed", self.dtype)(latent)
    mask_token = self.param("mask_token", token_init, (1, 1, dd), jnp.float32)
    tokens = scatter_tokens(x[:, 1:], ids_keep, length, mask_token.reshape(dd).astype(x.dtype),
                            impl=self.token_impl)
    pos = sincos_2d(dd, gh, gw, scale=scale, layout=self.pos_layout)  # (N, L, Dd), input grid
    x = tokens + pos.astype(self.dtype)  # the CLS row is dropped before the blocks, as the code
    for i in range(self.decoder_depth):
      x = block_class(self.remat)(self.decoder_num_heads, self.mlp_ratio, 0.0, self.dtype,
                                  name=f"decoder_blocks_{i}")(x, train)
    x = layer_norm("decoder_norm", self.dtype)(x).reshape(n, gh, gw, dd)

    feat_high, feat_low = FPNHead(self.progressive, self.dtype, name="fpn")(x)
    head = dict(hidden=self.fcn_dim, num_layers=self.fcn_layers, out_chans=self.out_chans or c,
                up1=p // 4, dtype=self.dtype)
    if self.independent_fcn_head:
      high = FCNHead(**head, name="fcn_high")(feat_high)
      low = FCNHead(**head, name="fcn_low")(feat_low)
    else:
      shared = FCNHead(**head, name="fcn")
      high, low = shared(feat_high), shared(feat_low)
    return high, low, patch_mask(ids_keep, length)


def make_scale_mae(variant: str, *, patch_size: int = 16, **kwargs: Any) -> ScaleMAE:
  """Scale-MAE with a ViT-S/B/L/H encoder, e.g. make_scale_mae("L") (the paper's)."""
  return ScaleMAE(patch_size=patch_size, **VIT_VARIANTS[variant], **kwargs)
