"""ConvNeXt V2 (Woo et al. 2023) with FCMAE masking in dense form, and MMEarth's modified stem.

Masking follows the sparse-convolution semantics of the reference pretraining code: a masked
position is absent, so it must not influence any visible position. In dense form that means
zeroing masked positions wherever positions mix: before and after every depthwise conv, inside
GRN (whose spatial norm then sums visible positions only), and before each downsampling conv.

Which feature positions are visible at each stage: the position whose receptive-field centre
falls in a visible input patch. Centres are tracked exactly through every conv's kernel, stride
and padding (`_Geometry`), so both geometries work: 112 px / 16 px patches (7x7 feature map,
masks aligned with the downsampling grid as in FCMAE) and 56 px / 8 px patches, where MMEarth's
unpadded 3x3 stem conv leaves a 6x6 map under a 7x7 patch grid.

That is the geometry of the reference's dense ConvNeXt V2, which fine-tunes and evaluates the
pretrained weights. Its sparse pretraining encoder (MinkowskiEngine) differs, and
`masked_geometry="sparse"` reproduces it for the masked forward: the 3x3 stem conv keeps every
input site (same-size output, 112 -> 112 px), the patch stem has no padding, an input pixel
whose channels are all zero is absent like a masked one (`to_sparse` keeps non-zero sites
only), and a strided conv's output site exists where any input site of its window does (a max
pool of the visibility). The weights are the same in both geometries.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmearth_jax.ops.conv import conv2d
from mmearth_jax.ops.depthwise import depthwise_conv2d
from mmearth_jax.models.variants import CONVNEXTV2

VARIANTS = CONVNEXTV2

LN_EPS = 1e-6
# torch's nn.GELU default is the exact erf form.
gelu = lambda x: nn.gelu(x, approximate=False)  # noqa: E731
Initializer = Callable[..., jax.Array]  # (key, shape, dtype) -> array, as nn.initializers

# Weight init of the reference: trunc_normal(std=.02) for convs and linears, zero biases.
# Flax's truncated_normal cuts at +-2 std and does not rescale: sample std about 0.018.
trunc_normal_init = nn.initializers.truncated_normal(0.02)
MASKED_GEOMETRIES = ("dense", "sparse")


def timm_trunc_normal(std: float = 1.0) -> Initializer:
  """timm's `trunc_normal_(w, std=std)`: N(0, std^2) cut at the ABSOLUTE bounds -2, 2.

  Flax's `truncated_normal` takes its bounds in units of std and does not rescale, so bounds
  -2/std, 2/std give the same distribution, by the same inverse-CDF sampling: std 1 is cut at
  2 sigma (sample std 0.88), std 0.02 in effect not at all (sample std 0.02).
  """
  return nn.initializers.truncated_normal(std, lower=-2.0 / std, upper=2.0 / std)


# The encoder's kernel initialisers by `ConvNeXtV2.weight_init`, per layer kind: "conv" (full
# convs: stem, downsampling), "depthwise" (the blocks' 7x7 dwconv and MMEarth's depthwise stem
# conv), "pointwise" (the blocks' pwconv1/pwconv2). Biases are zero, norms 1/0, GRN 0 in all.
ENCODER_INITS = {
    # This package's default for every ConvNeXt V2: Flax truncated_normal(0.02) on all kernels.
    "trunc_normal_0.02": {"conv": trunc_normal_init, "depthwise": trunc_normal_init,
                          "pointwise": trunc_normal_init},
    # FCMAE's rule on its sparse encoder, which overrides the encoder's own init: timm std .02
    # on MinkowskiConvolution, timm's default std 1 on MinkowskiDepthwiseConvolution and
    # MinkowskiLinear.
    "fcmae": {"conv": timm_trunc_normal(0.02), "depthwise": timm_trunc_normal(1.0),
              "pointwise": timm_trunc_normal(1.0)},
}


class LayerNorm(nn.LayerNorm):
  """LayerNorm over channels with ConvNeXt's epsilon."""
  epsilon: float = LN_EPS


class GRN(nn.Module):
  """Global Response Normalisation: gamma * (x * Nx) + beta + x, Nx = Gx / mean_c(Gx).

  Gx is the L2 norm over the spatial axes; masked positions must already be zero so that it
  sums visible positions only.
  """

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    gamma = self.param("gamma", nn.initializers.zeros, (c,))
    beta = self.param("beta", nn.initializers.zeros, (c,))
    xf = x.astype(jnp.float32)
    # A channel that is zero over the whole image (e.g. every position masked) has norm 0, where
    # sqrt's gradient is infinite: give it torch.norm's zero subgradient instead of NaN.
    ss = jnp.sum(jnp.square(xf), axis=(1, 2), keepdims=True)
    gx = jnp.where(ss > 0, jnp.sqrt(jnp.where(ss > 0, ss, 1.0)), 0.0)
    nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + 1e-6)
    return (gamma * (xf * nx) + beta + xf).astype(x.dtype)


class DepthwiseConv(nn.Module):
  """Depthwise k x k convolution, stride 1, zero padding; kernel stored (k, k, C)."""
  kernel_size: int = 7
  padding: int = 3
  impl: str = "auto"
  kernel_init: Initializer = trunc_normal_init

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, c))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    return depthwise_conv2d(x, kernel.astype(x.dtype), bias.astype(x.dtype), padding=self.padding,
                            impl=self.impl)


class Conv(nn.Module):
  """A 2-D convolution with `nn.Conv`'s parameters (kernel (kh, kw, Cin/groups, Cout), bias),
  run by `ops.conv.conv2d` (matrix products on the CPU, where XLA's convolution is slow)."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  groups: int = 1
  dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer = trunc_normal_init

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init,
                        (k, k, x.shape[-1] // self.groups, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), stride=self.stride,
               padding=self.padding, groups=self.groups)
    return y + bias.astype(self.dtype)


def drop_path(x: jnp.ndarray, rate: float, rng: jax.Array | None) -> jnp.ndarray:
  """Stochastic depth: drop the residual branch per sample, rescale the kept ones."""
  if rate == 0.0 or rng is None:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0)


class Block(nn.Module):
  """dwconv 7x7 -> LayerNorm -> Linear(4d) -> GELU -> GRN -> Linear(d) -> drop-path -> residual."""
  dim: int
  drop_path: float = 0.0
  dwconv_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  dwconv_init: Initializer = trunc_normal_init
  pwconv_init: Initializer = trunc_normal_init

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None,
               train: bool = False) -> jnp.ndarray:
    """`mask`: (N, H, W, 1), 1 = visible; None = no masking."""
    keep = (lambda y: y * mask) if mask is not None else (lambda y: y)
    shortcut = x
    y = DepthwiseConv(7, 3, self.dwconv_impl, self.dwconv_init, name="dwconv")(keep(x))
    y = keep(y)
    y = LayerNorm(dtype=self.dtype, name="norm")(y)
    # Pointwise layers as one 2-D matmul: XLA:CPU runs a 4-D Dense 2-3x slower.
    n, h, w, _ = y.shape
    y = nn.Dense(4 * self.dim, dtype=self.dtype, kernel_init=self.pwconv_init,
                 name="pwconv1")(y.reshape(n * h * w, self.dim))
    y = gelu(y).reshape(n, h, w, 4 * self.dim)
    y = keep(GRN(name="grn")(keep(y)))
    y = nn.Dense(self.dim, dtype=self.dtype, kernel_init=self.pwconv_init,
                 name="pwconv2")(y.reshape(n * h * w, 4 * self.dim)).reshape(n, h, w, self.dim)
    rng = self.make_rng("drop_path") if train and self.drop_path > 0 else None
    return shortcut + drop_path(y, self.drop_path, rng)


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Receptive-field centres of a feature map, in input pixels: centre(q) = a + b * q."""
  a: float
  b: float
  size: int

  def conv(self, k: int, s: int, p: int) -> "_Geometry":
    size = (self.size + 2 * p - k) // s + 1
    return _Geometry(self.a + self.b * (-p + (k - 1) / 2), self.b * s, size)

  def patch_index(self, patch: int, grid: int) -> np.ndarray:
    centres = self.a + self.b * np.arange(self.size)
    return np.clip(np.floor(centres / patch).astype(int), 0, grid - 1)


def stage_geometries(image_size: int, stem: str, patch_size: int) -> list[_Geometry]:
  """Geometry after the stem (stage 1 input) and after each downsampling (stages 2..4)."""
  g = _Geometry(0.5, 1.0, image_size)  # pixel q spans [q, q + 1)
  if stem == "official":
    g = g.conv(4, 4, 0)
  else:
    k = patch_size // 8
    g = g.conv(3, 1, 0).conv(k, k, k // 2)
  out = [g]
  for _ in range(3):
    g = g.conv(2, 2, 0)
    out.append(g)
  return out


def stage_masks(patch_mask: jnp.ndarray, geometries: Sequence[_Geometry], patch_size: int,
                col_geometries: Sequence[_Geometry] | None = None):
  """Per-stage visibility (N, h, w, 1), 1 = visible, from a patch mask (N, gh, gw), 1 = masked.

  `geometries` are the rows'; `col_geometries` the columns' (default: the same, square input).
  """
  gh, gw = patch_mask.shape[1:]
  out = []
  for g, gc in zip(geometries, col_geometries or geometries):
    ih, iw = g.patch_index(patch_size, gh), gc.patch_index(patch_size, gw)
    visible = 1.0 - patch_mask[:, ih][:, :, iw]
    out.append(visible[..., None])
  return out


def _pad(x: jnp.ndarray, p: int) -> jnp.ndarray:
  """Zero-pad the two spatial axes of (N, H, W, C) by p on each side."""
  return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x


def _max_pool(x: jnp.ndarray, k: int) -> jnp.ndarray:
  """k x k, stride k: the output sites of a strided sparse conv over the present sites `x`."""
  if k == 1:
    return x
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, k, k, 1), "VALID")


def upsample_patch_mask(patch_mask: jnp.ndarray, patch_size: int) -> jnp.ndarray:
  """(N, gh, gw) patch mask -> (N, gh*p, gw*p, 1) pixel visibility (1 = visible)."""
  m = jnp.repeat(jnp.repeat(patch_mask, patch_size, axis=1), patch_size, axis=2)
  return (1.0 - m)[..., None]


def remat_block(block: type[nn.Module]) -> type[nn.Module]:
  """`block` with its activations recomputed in the backward pass; `train` (arg 3) static."""
  return nn.remat(block, static_argnums=(3,))


class ConvNeXtV2(nn.Module):
  """ConvNeXt V2 encoder.

  stem: "official" (4x4/4 conv + LayerNorm) or "mmearth" (unpadded 3x3 conv + LayerNorm + GELU,
  then a depthwise conv with kernel = stride = patch_size/8 + LayerNorm).
  `__call__` returns the final feature map (N, h, w, C); with `patch_mask` (N, gh, gw), 1 =
  masked, it runs the FCMAE masked encoder and zeroes the masked positions of the output.
  `features` returns LayerNorm(global average pool), the reference's `forward_features`;
  `num_classes > 0` adds the classification head (`head`) applied to it.
  `weight_init` names the kernel initialisers (`ENCODER_INITS`); the head keeps trunc_normal.
  `masked_geometry` is the FCMAE masked forward's: "dense" (the fine-tuning model's) or "sparse"
  (the reference's pretraining encoder; module docstring). The unmasked forward is dense.
  """
  depths: Sequence[int] = (2, 2, 6, 2)
  dims: Sequence[int] = (40, 80, 160, 320)
  stem: str = "mmearth"
  patch_size: int = 16
  drop_path_rate: float = 0.0
  num_classes: int = 0
  dwconv_impl: str = "auto"
  dtype: jnp.dtype = jnp.float32
  remat: bool = False  # recompute each block's activations in the backward pass (saves memory)
  weight_init: str = "trunc_normal_0.02"
  masked_geometry: str = "dense"  # of the masked forward: "dense" or "sparse" (module docstring)

  def setup(self):
    if self.weight_init not in ENCODER_INITS:
      raise ValueError(f"unknown weight_init {self.weight_init!r}; choose from "
                       f"{list(ENCODER_INITS)}")
    inits = ENCODER_INITS[self.weight_init]
    d0 = self.dims[0]
    if self.stem == "official":
      self.stem_conv = Conv(d0, 4, 4, dtype=self.dtype, kernel_init=inits["conv"])
    elif self.stem == "mmearth":
      if self.patch_size % 8:
        raise ValueError(f"stem 'mmearth' needs patch_size divisible by 8, got {self.patch_size}")
      self.initial_conv = Conv(d0, 3, dtype=self.dtype, kernel_init=inits["conv"])
      self.initial_norm = LayerNorm(dtype=self.dtype)
      k = self.patch_size // 8  # padded by k // 2 in the dense geometry (`_stem`)
      self.stem_conv = Conv(d0, k, k, groups=d0, dtype=self.dtype,
                            kernel_init=inits["depthwise"])
    else:
      raise ValueError(f"unknown stem {self.stem!r}; choose 'official' or 'mmearth'")
    if self.masked_geometry not in MASKED_GEOMETRIES:
      raise ValueError(f"unknown masked_geometry {self.masked_geometry!r}; choose from "
                       f"{MASKED_GEOMETRIES}")
    self.stem_norm = LayerNorm(dtype=self.dtype)
    self.downsample_norms = [LayerNorm(dtype=self.dtype, name=f"downsample_{i}_norm")
                             for i in range(1, 4)]
    self.downsample_convs = [Conv(self.dims[i], 2, 2, dtype=self.dtype, kernel_init=inits["conv"],
                                  name=f"downsample_{i}_conv") for i in range(1, 4)]
    rates = np.linspace(0, self.drop_path_rate, sum(self.depths)).tolist()
    block = remat_block(Block) if self.remat else Block
    blocks, n = [], 0
    for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      blocks.append([block(dim, rates[n + j], self.dwconv_impl, self.dtype, inits["depthwise"],
                           inits["pointwise"], name=f"stage_{i}_block_{j}")
                     for j in range(depth)])
      n += depth
    self.blocks = blocks
    self.norm = LayerNorm(dtype=self.dtype)
    if self.num_classes:
      self.head = nn.Dense(self.num_classes, kernel_init=trunc_normal_init, dtype=self.dtype)

  def _stem(self, x, stem_visible=None, sparse=False):
    """Dense geometry: unpadded 3x3 conv, patch stem padded by k // 2. Sparse: the 3x3 conv
    padded to keep the size, patch stem unpadded. `stem_visible` zeroes the absent sites."""
    if self.stem == "official":
      return self.stem_norm(self.stem_conv(x))
    x = gelu(self.initial_norm(self.initial_conv(_pad(x, 1) if sparse else x)))
    if stem_visible is not None:
      x = x * stem_visible
    k = self.patch_size // 8
    return self.stem_norm(self.stem_conv(x if sparse else _pad(x, k // 2)))

  def __call__(self, x: jnp.ndarray, patch_mask: jnp.ndarray | None = None, *,
               train: bool = False, return_stages: bool = False,
               mask_token: jnp.ndarray | None = None) -> jnp.ndarray | list[jnp.ndarray]:
    """`return_stages`: the output of each of the 4 stages (strides 4/8/16/32 with the official
    stem) instead of the last one, for dense heads (U-Net) and intermediate-feature distillation.

    `mask_token` (C0,) switches `patch_mask` to SimMIM masking: the stem output at masked
    positions is replaced by the token and the network runs densely (no FCMAE sparsity).
    """
    x = x.astype(self.dtype)
    if mask_token is not None:
      if patch_mask is None:
        raise ValueError("mask_token needs a patch_mask")
      mask_patch = x.shape[1] // patch_mask.shape[1]  # SimMIM's mask patch (32), not the stem's
      rows = stage_geometries(x.shape[1], self.stem, self.patch_size)
      cols = stage_geometries(x.shape[2], self.stem, self.patch_size)
      visible = stage_masks(patch_mask, rows[:1], mask_patch, cols[:1])[0].astype(self.dtype)
      x = self._stem(x)
      x = x * visible + mask_token.astype(self.dtype) * (1 - visible)
      return self._stages(x, [None] * 4, train, return_stages)
    if patch_mask is not None and self.masked_geometry == "sparse":
      return self._sparse_masked(x, patch_mask, train, return_stages)
    masks = [None] * 4
    stem_visible = None
    if patch_mask is not None:
      rows = stage_geometries(x.shape[1], self.stem, self.patch_size)
      cols = stage_geometries(x.shape[2], self.stem, self.patch_size)
      masks = [m.astype(self.dtype) for m in stage_masks(patch_mask, rows, self.patch_size, cols)]
      x = x * upsample_patch_mask(patch_mask, self.patch_size)[:, :x.shape[1], :x.shape[2]].astype(self.dtype)
      if self.stem == "mmearth":
        g0 = [_Geometry(0.5, 1.0, n).conv(3, 1, 0) for n in x.shape[1:3]]
        stem_visible = stage_masks(patch_mask, g0[:1], self.patch_size, g0[1:])[0].astype(self.dtype)
    x = self._stem(x, stem_visible=stem_visible)
    return self._stages(x, masks, train, return_stages)

  def _sparse_masked(self, x, patch_mask, train, return_stages):
    """The masked forward in the reference's sparse pretraining geometry (module docstring)."""
    x = x * upsample_patch_mask(patch_mask, self.patch_size)[:, :x.shape[1], :x.shape[2]].astype(self.dtype)
    # to_sparse: a site is present where any channel is non-zero, so masked pixels (zeroed above)
    # and all-zero visible pixels are both absent.
    site = jnp.any(x != 0, axis=-1, keepdims=True).astype(self.dtype)
    stem_k = 4 if self.stem == "official" else self.patch_size // 8
    visible = site if self.stem == "mmearth" else None
    x = self._stem(x, stem_visible=visible, sparse=True)
    masks = [_max_pool(site, stem_k)]
    for _ in range(3):
      masks.append(_max_pool(masks[-1], 2))
    return self._stages(x, masks, train, return_stages)

  def _stages(self, x, masks, train, return_stages):
    outs = []
    for i in range(4):
      if i > 0:
        x = self.downsample_norms[i - 1](x)
        if masks[i - 1] is not None:
          x = x * masks[i - 1]  # LayerNorm's bias made masked positions non-zero
        x = self.downsample_convs[i - 1](x)
      for blk in self.blocks[i]:
        x = blk(x, masks[i], train)
      outs.append(x if masks[i] is None else x * masks[i])
    x = outs[-1]
    if self.is_initializing():  # create the pooled-feature norm and head parameters too
      pooled = self.norm(jnp.mean(x, axis=(1, 2)))
      if self.num_classes:
        self.head(pooled)
    return outs if return_stages else x

  def features(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """LayerNorm of the global average pool (the reference's forward_features)."""
    return self.norm(jnp.mean(self(x, train=train), axis=(1, 2)))

  def classify(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    return self.head(self.features(x, train=train))


def convnextv2(variant: str, **kw) -> ConvNeXtV2:
  """A named variant (atto ... huge); keyword arguments override the defaults."""
  if variant not in VARIANTS:
    raise KeyError(f"unknown ConvNeXt V2 variant {variant!r}; choose from {list(VARIANTS)}")
  depths, dims = VARIANTS[variant]
  return ConvNeXtV2(depths=depths, dims=dims, **kw)
