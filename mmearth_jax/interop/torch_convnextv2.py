"""Plain-PyTorch ConvNeXt V2 and MP-MAE modules in the checkpoint layouts users load.

These are reference implementations for weight interchange and numerical parity with our Flax
models (`mmearth_jax.models.convnextv2`, `mmearth_jax.models.mp_mae`), written from the published
architecture and layout facts. The state-dict keys follow the layouts exactly:

- `ConvNeXtV2Official`: the ConvNeXt V2 release (`downsample_layers.0` is the 4x4/4 stem).
- `ConvNeXtV2MMEarth`: MMEarth's dense model with the modified stem (`initial_conv`, `stem`).
- `ConvNeXtV2Timm`: timm's `convnextv2_*` names (`stem`, `stages.i.{downsample, blocks}`,
  `head.{norm, fc}`), pointwise layers as 1x1 convs (atto..nano) or Linears (tiny and up).
- `MPMAETorch`: the MP-MAE pretraining model (`encoder.`, `proj`, `mask_token`,
  `decoder_dict.<modality>.0.*`, `pred_dict.<modality>`, `layer_norm_tmp`, `loss_fn.log_vars`).

Masking (optional patch mask (N, gh, gw), 1 = masked) has the same dense semantics as the Flax
model, i.e. the sparse-convolution semantics of FCMAE: masked positions are zeroed wherever
positions mix, so they cannot influence visible ones. A feature position is visible when its
receptive-field centre lies in a visible patch (tracked exactly through each conv's kernel,
stride and padding, as the Flax `_Geometry`).

Only torch and the numpy-only modality registry are imported: no JAX needed to use these.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmearth_jax import modalities as M
from mmearth_jax.models.variants import CONVNEXTV2

VARIANTS = CONVNEXTV2
# Upstream's FCMAE builds its dense encoder with ConvNeXtV2's default 1000-class head, which
# pretraining never calls; a strict load of an MP-MAE state dict expects it all the same.
PRETRAIN_ENCODER_CLASSES = 1000

LN_EPS = 1e-6


class LayerNorm(nn.LayerNorm):
  """LayerNorm over channels (eps 1e-6); `channels_first` takes (N, C, H, W).

  Subclassing nn.LayerNorm keeps the state-dict names `weight` / `bias` of the layouts.
  """

  def __init__(self, dim: int, eps: float = LN_EPS, channels_first: bool = False):
    super().__init__(dim, eps=eps)
    self.channels_first = channels_first

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if not self.channels_first:
      return super().forward(x)
    return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GRN(nn.Module):
  """Global Response Normalisation on channels-last input (N, H, W, C)."""

  def __init__(self, dim: int):
    super().__init__()
    # Zero-initialised, so a fresh GRN is the identity; stored (1, 1, 1, C) as the layout.
    self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
    self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return grn(x, self.gamma, self.beta, channel_dim=-1)


def grn(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, channel_dim: int = -1
        ) -> torch.Tensor:
  """gamma * (x * Nx) + beta + x with Nx = Gx / mean_c(Gx), Gx the L2 norm over space; x is
  (N, H, W, C) (channel_dim -1) or (N, C, H, W) (channel_dim 1); gamma/beta broadcast."""
  space = (1, 2) if channel_dim == -1 else (2, 3)
  # vector_norm, as the official code's torch.norm: its gradient at a zero norm is 0, not NaN.
  gx = torch.linalg.vector_norm(x, dim=space, keepdim=True)
  nx = gx / (gx.mean(dim=channel_dim, keepdim=True) + 1e-6)
  return gamma * (x * nx) + beta + x


def _drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
  if rate == 0.0 or not training:
    return x
  keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype,
                     device=x.device).bernoulli_(1.0 - rate)
  return x * keep / (1.0 - rate)


class Block(nn.Module):
  """dwconv 7x7 -> LayerNorm -> Linear(4d) -> GELU -> GRN -> Linear(d) -> drop-path -> residual.

  Input/output (N, C, H, W); norm, pointwise layers and GRN run channels-last, as the official
  block. `visible` (N, 1, H, W), 1 = visible, applies the FCMAE masking points.
  """

  def __init__(self, dim: int, drop_path: float = 0.0):
    super().__init__()
    self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
    self.norm = LayerNorm(dim)
    self.pwconv1 = nn.Linear(dim, 4 * dim)
    self.act = nn.GELU()
    self.grn = GRN(4 * dim)
    self.pwconv2 = nn.Linear(4 * dim, dim)
    self.drop_path = drop_path

  def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    shortcut = x
    if visible is not None:
      x = x * visible  # a masked position must not reach the 7x7 neighbourhood of a visible one
    y = self.dwconv(x)
    if visible is not None:
      y = y * visible  # the conv bias made masked positions non-zero
    y = y.permute(0, 2, 3, 1)
    y = self.act(self.pwconv1(self.norm(y)))
    if visible is not None:
      vis_last = visible.permute(0, 2, 3, 1)
      # GRN's spatial norm must sum visible positions only; zero again after its beta.
      y = self.grn(y * vis_last) * vis_last
    else:
      y = self.grn(y)
    y = self.pwconv2(y).permute(0, 3, 1, 2)
    return shortcut + _drop_path(y, self.drop_path, self.training)


# ---------------------------------------------------------------------------------------------
# Mask geometry: receptive-field centres, the same rule as the Flax model's `_Geometry`.


@dataclasses.dataclass(frozen=True)
class Centres:
  """Receptive-field centres of one axis of a feature map, in input pixels: a + b * q."""
  a: float
  b: float
  size: int

  @classmethod
  def pixels(cls, size: int) -> "Centres":
    return cls(0.5, 1.0, size)  # pixel q spans [q, q + 1)

  def conv(self, k: int, s: int, p: int) -> "Centres":
    size = (self.size + 2 * p - k) // s + 1
    return Centres(self.a + self.b * (-p + (k - 1) / 2), self.b * s, size)

  def patch_index(self, patch: int, grid: int) -> torch.Tensor:
    """The patch (0..grid-1) each position's centre falls in."""
    idx = [min(max(math.floor((self.a + self.b * q) / patch), 0), grid - 1)
           for q in range(self.size)]
    return torch.tensor(idx, dtype=torch.long)


def stage_centres(size: int, stem: str, patch_size: int) -> list[Centres]:
  """Centres of one axis after the stem (stage 1) and after each downsampling (stages 2..4)."""
  c = Centres.pixels(size)
  if stem == "official":
    c = c.conv(4, 4, 0)
  elif stem == "mmearth":
    k = patch_size // 8
    c = c.conv(3, 1, 0).conv(k, k, k // 2)
  else:
    raise ValueError(f"unknown stem {stem!r}; choose 'official' or 'mmearth'")
  out = [c]
  for _ in range(3):
    c = c.conv(2, 2, 0)
    out.append(c)
  return out


def visibility(mask: torch.Tensor, rows: Centres, cols: Centres, patch: int) -> torch.Tensor:
  """(N, 1, h, w) float visibility (1 = visible) of a feature map from a patch mask (N, gh, gw)."""
  gh, gw = mask.shape[1:]
  ih = rows.patch_index(patch, gh).to(mask.device)
  iw = cols.patch_index(patch, gw).to(mask.device)
  return (1.0 - mask.float()[:, ih][:, :, iw])[:, None]


def pixel_visibility(mask: torch.Tensor, patch: int, h: int, w: int) -> torch.Tensor:
  """(N, 1, h, w) pixel visibility: the patch mask repeated patch x patch, cut to the image."""
  m = mask.float().repeat_interleave(patch, 1).repeat_interleave(patch, 2)
  return (1.0 - m[:, :h, :w])[:, None]


# ---------------------------------------------------------------------------------------------
# Encoders.


class _ConvNeXtV2Base(nn.Module):
  """Stages, final norm and head shared by both stems; subclasses build the stem and
  `downsample_layers` and say which of those are the three stage transitions."""
  stem_kind = ""

  def _build_common(self, depths: Sequence[int], dims: Sequence[int], num_classes: int,
                    drop_path_rate: float):
    if len(depths) != 4 or len(dims) != 4:
      raise ValueError(f"need 4 stages, got depths={list(depths)} dims={list(dims)}")
    self.depths, self.dims = tuple(depths), tuple(dims)
    rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
    self.stages = nn.ModuleList()
    n = 0
    for depth, dim in zip(depths, dims):
      self.stages.append(nn.Sequential(*[Block(dim, rates[n + j]) for j in range(depth)]))
      n += depth
    self.norm = nn.LayerNorm(dims[-1], eps=LN_EPS)  # on the pooled features
    self.num_classes = num_classes
    if num_classes:
      self.head = nn.Linear(dims[-1], num_classes)

  def _transition(self, i: int) -> nn.Sequential:
    """The (LayerNorm, 2x2/2 conv) that leads into stage i (1..3)."""
    raise NotImplementedError

  def _stem_forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    raise NotImplementedError

  def stage_visibility(self, mask: torch.Tensor, height: int, width: int) -> list[torch.Tensor]:
    """Per-stage (N, 1, h, w) visibility, stages 1..4, for an input of height x width."""
    rows = stage_centres(height, self.stem_kind, self.patch_size)
    cols = stage_centres(width, self.stem_kind, self.patch_size)
    return [visibility(mask, r, c, self.patch_size) for r, c in zip(rows, cols)]

  def forward_map(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The final feature map (N, C, h, w); with a patch mask its masked positions are zero."""
    vis = [None] * 4
    if mask is not None:
      vis = self.stage_visibility(mask, x.shape[2], x.shape[3])
      x = x * pixel_visibility(mask, self.patch_size, x.shape[2], x.shape[3]).to(x.dtype)
    x = self._stem_forward(x, mask)
    for i in range(4):
      if i > 0:
        norm, conv = self._transition(i)
        x = norm(x)
        if vis[i - 1] is not None:
          x = x * vis[i - 1]  # LayerNorm's bias made masked positions non-zero
        x = conv(x)
      for blk in self.stages[i]:
        x = blk(x, vis[i])
    if vis[3] is not None:
      x = x * vis[3]
    return x

  def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm(global average pool), the reference's `forward_features`."""
    return self.norm(self.forward_map(x, mask).mean(dim=(-2, -1)))

  def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Class logits with a head, else the pooled features."""
    f = self.forward_features(x, mask)
    return self.head(f) if self.num_classes else f


class ConvNeXtV2Official(_ConvNeXtV2Base):
  """ConvNeXt V2 with the original 4x4/4 stem, official state-dict layout.

  `patch_size` is only the mask patch in input pixels (FCMAE used 32).
  """
  stem_kind = "official"

  def __init__(self, in_chans: int, depths: Sequence[int], dims: Sequence[int],
               num_classes: int = 0, patch_size: int = 32, drop_path_rate: float = 0.0):
    super().__init__()
    self.in_chans, self.patch_size = in_chans, patch_size
    self.downsample_layers = nn.ModuleList([nn.Sequential(
        nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
        LayerNorm(dims[0], channels_first=True))])
    for i in range(3):
      self.downsample_layers.append(nn.Sequential(
          LayerNorm(dims[i], channels_first=True),
          nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
    self._build_common(depths, dims, num_classes, drop_path_rate)

  def _transition(self, i: int) -> nn.Sequential:
    return self.downsample_layers[i]

  def _stem_forward(self, x, mask):
    # The 4x4/4 stem only sees pixels of its own patch: the masked input is enough.
    return self.downsample_layers[0](x)


class ConvNeXtV2MMEarth(_ConvNeXtV2Base):
  """ConvNeXt V2 with MMEarth's stem: unpadded 3x3 conv + LayerNorm + GELU, then a depthwise
  conv with kernel = stride = patch_size/8 (padding (patch_size/8)//2) + LayerNorm."""
  stem_kind = "mmearth"

  def __init__(self, in_chans: int, depths: Sequence[int], dims: Sequence[int], patch_size: int,
               num_classes: int = 0, drop_path_rate: float = 0.0):
    super().__init__()
    if patch_size % 8:
      raise ValueError(f"the MMEarth stem needs patch_size divisible by 8, got {patch_size}")
    self.in_chans, self.patch_size = in_chans, patch_size
    d0, k = dims[0], patch_size // 8
    self.initial_conv = nn.Sequential(
        nn.Conv2d(in_chans, d0, kernel_size=3, stride=1, padding=0),
        LayerNorm(d0, channels_first=True),
        nn.GELU())
    self.stem = nn.Sequential(
        nn.Conv2d(d0, d0, kernel_size=k, stride=k, padding=k // 2, groups=d0),
        LayerNorm(d0, channels_first=True))
    self.downsample_layers = nn.ModuleList([nn.Sequential(
        LayerNorm(dims[i], channels_first=True),
        nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)) for i in range(3)])
    self._build_common(depths, dims, num_classes, drop_path_rate)

  def _transition(self, i: int) -> nn.Sequential:
    return self.downsample_layers[i - 1]

  def _stem_forward(self, x, mask):
    h, w = x.shape[2:]
    x = self.initial_conv(x)
    if mask is not None:
      # LayerNorm and GELU made masked positions non-zero; the stem conv must not see them.
      rows = Centres.pixels(h).conv(3, 1, 0)
      cols = Centres.pixels(w).conv(3, 1, 0)
      x = x * visibility(mask, rows, cols, self.patch_size).to(x.dtype)
    return self.stem(x)


# ---------------------------------------------------------------------------------------------
# timm's names.


class _TimmGRN(nn.Module):
  """GRN holding timm's `weight` / `bias` (C,) (= gamma / beta)."""

  def __init__(self, dim: int, channels_first: bool):
    super().__init__()
    self.weight = nn.Parameter(torch.zeros(dim))
    self.bias = nn.Parameter(torch.zeros(dim))
    self.channels_first = channels_first

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    shape = (1, -1, 1, 1) if self.channels_first else (1, 1, 1, -1)
    return grn(x, self.weight.view(shape), self.bias.view(shape),
               channel_dim=1 if self.channels_first else -1)


class _TimmMlp(nn.Module):
  """fc1 -> GELU -> GRN -> fc2; 1x1 convs on (N, C, H, W) or Linears on (N, H, W, C)."""

  def __init__(self, dim: int, conv: bool):
    super().__init__()
    # Registered in timm's order (fc1, act, grn, fc2), so state_dict() lists keys as timm does.
    layer = (lambda i, o: nn.Conv2d(i, o, kernel_size=1)) if conv else nn.Linear
    self.fc1 = layer(dim, 4 * dim)
    self.act = nn.GELU()
    self.grn = _TimmGRN(4 * dim, channels_first=conv)
    self.fc2 = layer(4 * dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.grn(self.act(self.fc1(x))))


class _TimmBlock(nn.Module):
  """The ConvNeXt V2 block (as `Block`) under timm's names; `conv_mlp` keeps it channels-first."""

  def __init__(self, dim: int, conv_mlp: bool, drop_path: float = 0.0):
    super().__init__()
    self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
    self.norm = LayerNorm(dim, channels_first=conv_mlp)
    self.mlp = _TimmMlp(dim, conv_mlp)
    self.conv_mlp = conv_mlp
    self.drop_path = drop_path

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.conv_dw(x)
    if self.conv_mlp:
      y = self.mlp(self.norm(y))
    else:
      y = self.mlp(self.norm(y.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    return x + _drop_path(y, self.drop_path, self.training)


class _TimmStage(nn.Module):

  def __init__(self, in_dim: int, dim: int, depth: int, conv_mlp: bool, rates: Sequence[float],
               downsample: bool):
    super().__init__()
    if downsample:
      self.downsample = nn.Sequential(LayerNorm(in_dim, channels_first=True),
                                      nn.Conv2d(in_dim, dim, kernel_size=2, stride=2))
    else:
      self.downsample = nn.Identity()  # no parameters: timm's stage 0
    self.blocks = nn.Sequential(*[_TimmBlock(dim, conv_mlp, r) for r in rates[:depth]])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.blocks(self.downsample(x))


class _TimmHead(nn.Module):
  """Global average pool -> `norm` -> `fc` (absent without classes)."""

  def __init__(self, dim: int, num_classes: int):
    super().__init__()
    self.norm = nn.LayerNorm(dim, eps=LN_EPS)
    self.fc = nn.Linear(dim, num_classes) if num_classes else nn.Identity()


class ConvNeXtV2Timm(nn.Module):
  """ConvNeXt V2 with timm's state-dict names (official 4x4 stem; no masking).

  `conv_mlp`: pointwise layers as 1x1 convs, as timm's atto/femto/pico/nano; None picks timm's
  choice for the width (dims[0] <= 80).
  """

  def __init__(self, in_chans: int, depths: Sequence[int], dims: Sequence[int],
               num_classes: int = 0, conv_mlp: bool | None = None, drop_path_rate: float = 0.0):
    super().__init__()
    if len(depths) != 4 or len(dims) != 4:
      raise ValueError(f"need 4 stages, got depths={list(depths)} dims={list(dims)}")
    self.conv_mlp = bool(dims[0] <= 80) if conv_mlp is None else bool(conv_mlp)
    self.depths, self.dims, self.in_chans = tuple(depths), tuple(dims), in_chans
    self.num_classes = num_classes
    self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
                              LayerNorm(dims[0], channels_first=True))
    rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
    self.stages = nn.ModuleList()
    n = 0
    for i, (depth, dim) in enumerate(zip(depths, dims)):
      self.stages.append(_TimmStage(dims[max(i - 1, 0)], dim, depth, self.conv_mlp,
                                    rates[n:n + depth], downsample=i > 0))
      n += depth
    self.head = _TimmHead(dims[-1], num_classes)

  def forward_map(self, x: torch.Tensor) -> torch.Tensor:
    """The final feature map (N, C, h, w)."""
    x = self.stem(x)
    for stage in self.stages:
      x = stage(x)
    return x

  def forward_features(self, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm(global average pool): timm's `forward_head(x, pre_logits=True)`."""
    return self.head.norm(self.forward_map(x).mean(dim=(-2, -1)))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """Class logits with a head, else the pooled features."""
    return self.head.fc(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# MP-MAE.


def head_width(name: str, bands: Sequence[str], patch_size: int) -> int:
  """Output width of a modality's head: p*p*C for pixel modalities, C for image ones."""
  m = M.get(name)
  c = m.num_classes if m.task in (M.SEGMENTATION, M.CLASSIFICATION) else len(bands)
  return patch_size * patch_size * c if m.level == M.PIXEL else c


class _LossWeights(nn.Module):
  """Holds `log_vars` (uncertainty weighting) under the reference's `loss_fn.` prefix."""

  def __init__(self, n: int):
    super().__init__()
    self.log_vars = nn.Parameter(torch.zeros(n))


class MPMAETorch(nn.Module):
  """MP-MAE as the reference computes it: the shared decoder block run once per output modality.

  `outputs`: {modality: bands}, in the order of `loss_fn.log_vars` (as the Flax `MPMAE`).
  `decoder_dict.<modality>` all hold the SAME block module, so the state dict repeats its
  weights under every modality (as the reference's checkpoints) while `parameters()` counts it
  once, and backward accumulates its gradient over the modalities.
  """

  def __init__(self, outputs: Mapping[str, Sequence[str]], in_chans: int = 12,
               variant: str = "atto", stem: str = "mmearth", patch_size: int = 16,
               decoder_dim: int = 512, drop_path_rate: float = 0.0,
               depths: Sequence[int] | None = None, dims: Sequence[int] | None = None):
    super().__init__()
    # `depths` / `dims` override the variant's (small test models), as the Flax MPMAE.
    depths, dims = depths or VARIANTS[variant][0], dims or VARIANTS[variant][1]
    self.outputs = {k: tuple(v) for k, v in outputs.items()}
    self.patch_size = patch_size
    # Upstream's FCMAE builds the encoder with its default classifier (never used here), so
    # this module has upstream's full key set and loads its files strictly.
    classes = PRETRAIN_ENCODER_CLASSES
    if stem == "mmearth":
      self.encoder = ConvNeXtV2MMEarth(in_chans, depths, dims, patch_size, num_classes=classes,
                                       drop_path_rate=drop_path_rate)
    elif stem == "official":
      self.encoder = ConvNeXtV2Official(in_chans, depths, dims, patch_size=patch_size,
                                        num_classes=classes, drop_path_rate=drop_path_rate)
    else:
      raise ValueError(f"unknown stem {stem!r}; choose 'official' or 'mmearth'")
    self.proj = nn.Conv2d(dims[-1], decoder_dim, kernel_size=1)
    self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
    shared = Block(decoder_dim)
    self.decoder_dict = nn.ModuleDict({n: nn.Sequential(shared) for n in self.outputs})
    self.pred_dict = nn.ModuleDict()
    for n, bands in self.outputs.items():
      width = head_width(n, bands, patch_size)
      if M.get(n).level == M.PIXEL:
        self.pred_dict[n] = nn.Conv2d(decoder_dim, width, kernel_size=1)
      else:
        self.pred_dict[n] = nn.Linear(decoder_dim, width)
    if any(M.get(n).level != M.PIXEL for n in self.outputs):
      # Shared by the image-level heads; absent without them (as the reference and Flax).
      self.layer_norm_tmp = LayerNorm(decoder_dim, channels_first=True)
    self.loss_fn = _LossWeights(len(self.outputs))

  def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """images (N, C, H, W); mask (N, g, g), 1 = masked. Pixel predictions are tokens
    (N, g*g, p*p*C) (row-in-patch, column-in-patch, channel); image predictions (N, C)."""
    x = self.proj(self.encoder.forward_map(images, mask))
    g = mask.shape[1]
    fh, fw = x.shape[2:]
    # MMEarth64 (56 px / 8 px): the 6x6 map covers patches 0..5; the unseen last row and
    # column get the mask token, as masked patches (the same choice as the Flax model).
    x = F.pad(x, (0, g - fw, 0, g - fh))
    unseen = torch.ones(g, g, dtype=x.dtype, device=x.device)
    unseen[:fh, :fw] = 0
    m = torch.maximum(mask.to(x.dtype), unseen)[:, None]
    x = x * (1 - m) + self.mask_token * m
    preds = {}
    for name in self.outputs:
      y = self.decoder_dict[name](x)  # the same block on the same input, once per modality
      if M.get(name).level == M.PIXEL:
        y = self.pred_dict[name](y)  # (N, p*p*C, g, g)
        preds[name] = y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2)
      else:
        preds[name] = self.pred_dict[name](self.layer_norm_tmp(y).mean(dim=(-2, -1)))
    return preds
