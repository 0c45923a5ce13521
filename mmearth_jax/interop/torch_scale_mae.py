"""Plain-PyTorch Scale-MAE in the released checkpoint layout, and Flax <-> PyTorch conversion.

`ScaleMAETorch` is a reference for numerical parity with `mmearth_jax.models.scale_mae.ScaleMAE`
and for weight interchange, written from the released code's semantics (`models_mae.
MaskedAutoencoderViT` with timm blocks, `lib/fpn.py`), without timm:

  encoder   patch embed + the GSD-scaled sin-cos table (MAE's layout, the grid multiplied per
            sample by `input_res`, float32 as `get_2d_sincos_pos_embed_with_resolution`), gather
            the kept tokens, prepend cls_token + pos[:, :1] (zero), blocks, norm
  decoder   decoder_embed, mask tokens appended and un-shuffled with ids_restore, + the
            decoder-width GSD-scaled table of the INPUT grid (`pos_embed_encoder`, zero CLS
            row), CLS dropped, blocks, decoder_norm, (N, Dd, gh, gw)
  FPN       fpn1 = ConvT 2/2, Norm2d, GELU, ConvT 2/2 and fpn2 = ConvT 2/2; `progressive`
            (the code's share_weights): fpn1 = Norm2d, GELU, ConvT applied to fpn2's output
  heads     FCNHead (proj 1x1, HFFB blocks, then Norm2d, ConvT, GELU, grouped 3x3, GELU, 1x1,
            GELU, ConvT 2/2): `fcn_high` on fpn1, `fcn_low` on fpn2, or one shared `fcn`
  loss      `forward_loss`: the Laplacian (band_config) targets, the patch mask nearest-upsampled
            to each prediction, L2 low + L2 (or weighted L1) high, each over the masked pixels

The masks come from outside (`ids_keep`, `ids_restore`) so both frameworks run the same one.
Two generalisations, both equal to the release at patch 16 with 3 bands: the first head ConvT
has kernel = stride = p / 4 (the release hard-codes 4) and the heads output `out_chans` (3).

State-dict keys and their order are exactly the release's: `cls_token`, `pos_embed`,
`mask_token`, `mask_token_decoder`, `decoder_pos_embed`, `patch_embed.proj`, `blocks.<i>.*`,
`norm`, `decoder_embed`, `fpn.fpn1.<j>[.ln]`, `fpn.fpn2.0`, `fcn_high.*` / `fcn_low.*` (or
`fcn.*`), `decoder_blocks.<i>.*`, `decoder_norm`.

Conversion (only transposes, so Flax -> torch -> Flax is bit-exact): Dense (in, out) -> Linear
(out, in); Conv (kh, kw, in/groups, out) -> (out, in/groups, kh, kw); ConvTranspose (k, k, in, out)
-> (in, out, k, k); LayerNorm scale -> weight (Norm2d's inside `.ln`). The Flax model holds no
position table and no `mask_token_decoder` (the release uses it only for multi-scale decoding),
so `flax_to_torch_scale_mae` fills them as the release's `initialize_weights` leaves them:
`pos_embed` with MAE's fixed sin-cos table for `img_size`, `decoder_pos_embed` with zeros (the
release never fills it: its decoder computes GSD-scaled tables on the fly) and
`mask_token_decoder` with zeros (its initial value; it gets no gradient in single-scale
pretraining). Released checkpoints hold exactly these; `torch_to_flax_scale_mae` drops them.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmearth_jax.interop import torch_vit as tv
from mmearth_jax.interop.trees import flatten as _flatten, unflatten as _unflatten
from mmearth_jax.interop.trees import to_numpy as _to_numpy, to_torch as _to_torch

LN_EPS = 1e-6
# Tensors of the release that the Flax model does not hold (it recomputes or never uses them).
FILLED = ("pos_embed", "decoder_pos_embed", "mask_token_decoder")


def sincos_2d_resolution_torch(embed_dim: int, grid_h: int, grid_w: int, res: torch.Tensor,
                               cls_token: bool = True) -> torch.Tensor:
  """(N, L [+1], D) sin-cos tables with the grid scaled per sample by `res` (N,), computed as the
  release's `get_2d_sincos_pos_embed_with_resolution` does: float32 throughout, meshgrid "xy"
  (first half embeds the column, second the row), each half [sin | cos] over D/4 frequencies."""
  if embed_dim % 4:
    raise ValueError(f"embed_dim={embed_dim} must be divisible by 4")
  res = res.to(torch.float32).reshape(-1)
  grid = torch.stack(torch.meshgrid(torch.arange(grid_w, dtype=torch.float32),
                                    torch.arange(grid_h, dtype=torch.float32), indexing="xy"))
  grid = torch.einsum("chw,n->cnhw", grid, res)  # (2, N, gh, gw)
  quarter = embed_dim // 4
  omega = torch.arange(quarter, dtype=torch.float32)
  omega /= quarter
  omega = 1.0 / 10000 ** omega
  halves = []
  for coord in (grid[0], grid[1]):
    angle = torch.einsum("m,d->md", coord.reshape(-1), omega)
    halves.append(torch.cat([angle.sin(), angle.cos()], dim=1))
  n = res.shape[0]
  table = torch.cat(halves, dim=1).reshape(n, grid_h * grid_w, embed_dim)
  if cls_token:
    table = torch.cat([torch.zeros(n, 1, embed_dim), table], dim=1)
  return table


# ---------------------------------------------------------------------------------------------
# Modules.


class Norm2d(nn.Module):
  """LayerNorm over the channels of an NCHW map (the release's wrapper, hence `.ln` in keys)."""

  def __init__(self, dim: int):
    super().__init__()
    self.ln = nn.LayerNorm(dim, eps=LN_EPS)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FPNHead(nn.Module):
  """(fpn1(x): 4x the grid, fpn2(x): 2x); `progressive` runs fpn1 on fpn2's output."""

  def __init__(self, dim: int, progressive: bool = False):
    super().__init__()
    self.progressive = progressive
    if progressive:
      self.fpn1 = nn.Sequential(Norm2d(dim), nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, 2))
    else:
      self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), Norm2d(dim), nn.GELU(),
                                nn.ConvTranspose2d(dim, dim, 2, 2))
    self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2))

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    low = self.fpn2(x)
    return (self.fpn1(low) if self.progressive else self.fpn1(x)), low


class HFFB(nn.Module):

  def __init__(self, hidden: int):
    super().__init__()
    self.convs = nn.Sequential(nn.GELU(), nn.Conv2d(hidden, hidden // 2, 3, padding=1,
                                                    groups=hidden // 2),
                               nn.GELU(), nn.Conv2d(hidden // 2, hidden, 1))
    self.residual = nn.Conv2d(hidden, hidden, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.convs(x) + self.residual(x)


class FCNHead(nn.Module):

  def __init__(self, dim: int, hidden: int, num_layers: int, out_chans: int = 3, up1: int = 4):
    super().__init__()
    self.proj = nn.Conv2d(dim, hidden, 1)
    self.conv_blocks = nn.Sequential(*[HFFB(hidden) for _ in range(num_layers)])
    self.pred = nn.Sequential(
        Norm2d(hidden), nn.ConvTranspose2d(hidden, hidden // 2, up1, up1), nn.GELU(),
        nn.Conv2d(hidden // 2, hidden // 4, 3, padding=1, groups=hidden // 4), nn.GELU(),
        nn.Conv2d(hidden // 4, hidden // 2, 1), nn.GELU(),
        nn.ConvTranspose2d(hidden // 2, out_chans, 2, 2))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.pred(self.conv_blocks(self.proj(x)))


class ScaleMAETorch(nn.Module):
  """Scale-MAE pretraining model; defaults are the released ViT-L/16 pretraining config."""

  def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
               embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
               mlp_ratio: float = 4.0, decoder_embed_dim: int = 512, decoder_depth: int = 3,
               decoder_num_heads: int = 16, fcn_dim: int = 512, fcn_layers: int = 2,
               independent_fcn_head: bool = True, progressive: bool = False,
               out_chans: int = 3, band_config: tuple[int, int] = (7, 56),
               use_l1_loss: bool = False, l1_loss_weight: float = 1.0,
               absolute_scale: bool = False):
    super().__init__()
    if patch_size % 4:
      raise ValueError(f"patch_size {patch_size} must be divisible by 4")
    self.patch_size = patch_size
    self.decoder_embed_dim = decoder_embed_dim
    self.independent_fcn_head = independent_fcn_head
    self.band_config = tuple(band_config)
    self.use_l1_loss = use_l1_loss
    self.l1_loss_weight = l1_loss_weight
    self.absolute_scale = absolute_scale
    grid = img_size // patch_size
    # Registration order = the release's, so state_dict() lists keys in its order.
    self.patch_embed = tv.PatchEmbed(patch_size, in_chans, embed_dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(tv.sincos_2d_torch(embed_dim, grid, grid, True)[None],
                                  requires_grad=False)  # stored, never read by forward
    self.blocks = nn.ModuleList([tv.Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.mask_token_decoder = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))  # unused here
    # The release leaves it at zeros (its decoder computes GSD-scaled tables instead).
    self.decoder_pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, decoder_embed_dim),
                                          requires_grad=False)
    self.fpn = FPNHead(decoder_embed_dim, progressive)
    head = (decoder_embed_dim, fcn_dim, fcn_layers, out_chans, patch_size // 4)
    if independent_fcn_head:
      self.fcn_high = FCNHead(*head)
      self.fcn_low = FCNHead(*head)
    else:
      self.fcn = FCNHead(*head)
    self.decoder_blocks = nn.ModuleList([tv.Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                         for _ in range(decoder_depth)])
    self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=LN_EPS)
    nn.init.normal_(self.cls_token, std=0.02)
    nn.init.normal_(self.mask_token, std=0.02)

  def _res(self, input_res: torch.Tensor, n: int) -> torch.Tensor:
    res = torch.as_tensor(input_res, dtype=torch.float32).reshape(-1).expand(n)
    return torch.ones_like(res) if self.absolute_scale else res

  def forward_encoder(self, imgs: torch.Tensor, input_res: torch.Tensor,
                      ids_keep: torch.Tensor | None = None) -> torch.Tensor:
    """imgs (N, C, H, W) -> tokens (N, 1 + K, D), CLS first; K = L without `ids_keep`."""
    n, _, h, w = imgs.shape
    gh, gw = h // self.patch_size, w // self.patch_size
    pos = sincos_2d_resolution_torch(self.cls_token.shape[-1], gh, gw, self._res(input_res, n))
    x = self.patch_embed(imgs) + pos[:, 1:]
    if ids_keep is not None:
      x = tv.gather_rows(x, ids_keep)
    x = torch.cat([self.cls_token + pos[:, :1], x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x)

  def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                      input_res: torch.Tensor, grid: tuple[int, int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """latent (N, 1 + K, D) -> (high (N, C', 2p * gh, ...), low (N, C', p * gh, ...))."""
    x = self.decoder_embed(latent)
    n, length = ids_restore.shape
    mask_tokens = self.mask_token.repeat(n, length + 1 - x.shape[1], 1)
    shuffled = torch.cat([x[:, 1:], mask_tokens], dim=1)  # kept first, then mask tokens
    x = torch.cat([x[:, :1], tv.gather_rows(shuffled, ids_restore)], dim=1)
    x = x + sincos_2d_resolution_torch(self.decoder_embed_dim, *grid, self._res(input_res, n))
    x = x[:, 1:]  # the release drops CLS before the decoder blocks
    for blk in self.decoder_blocks:
      x = blk(x)
    x = self.decoder_norm(x)
    x = x.reshape(n, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
    feat_high, feat_low = self.fpn(x)
    if self.independent_fcn_head:
      return self.fcn_high(feat_high), self.fcn_low(feat_low)
    return self.fcn(feat_high), self.fcn(feat_low)

  def forward_loss(self, targets: torch.Tensor, pred: tuple[torch.Tensor, torch.Tensor],
                   mask: torch.Tensor, grid: tuple[int, int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """targets (N, C, 2H, 2W) -> (total, high, low) losses over the masked (mask == 1) pixels."""
    d1, d2 = self.band_config
    pred_high, pred_low = pred
    if d2 != 224:
      target_low = F.interpolate(targets, pred_low.shape[-2:], mode="area")
    else:
      target_low = F.interpolate(F.interpolate(targets, (d2, d2), mode="area"),
                                 pred_low.shape[-2:], mode="area")
    target_high = targets - F.interpolate(F.interpolate(targets, (d1, d1), mode="area"),
                                          pred_high.shape[-2:], mode="bilinear")
    n, length = mask.shape
    if grid is None:
      side = int(length ** 0.5)
      grid = (side, side)
    m = mask.reshape(n, 1, *grid)
    mask_low = F.interpolate(m, pred_low.shape[-2:])  # "nearest", torch's default
    mask_high = F.interpolate(m, pred_high.shape[-2:])
    loss_low = (mask_low * (target_low - pred_low) ** 2).sum() / (mask_low.sum() + 1e-9)
    if self.use_l1_loss:
      err = torch.abs(target_high - pred_high) * self.l1_loss_weight
    else:
      err = (target_high - pred_high) ** 2
    loss_high = (mask_high * err).sum() / (mask_high.sum() + 1e-9)
    return loss_high + loss_low, loss_high, loss_low

  def forward(self, imgs: torch.Tensor, input_res: torch.Tensor, ids_keep: torch.Tensor,
              ids_restore: torch.Tensor, targets: torch.Tensor | None = None):
    """imgs (N, C, H, W), input_res (N,) GSD scales, the mask as (ids_keep (N, K), ids_restore
    (N, L)) -> (high, low, mask (N, L), 1 = removed); with `targets` (N, C, 2H, 2W) the total
    loss comes first: (loss, high, low, mask)."""
    n, _, h, w = imgs.shape
    grid = (h // self.patch_size, w // self.patch_size)
    latent = self.forward_encoder(imgs, input_res, ids_keep)
    high, low = self.forward_decoder(latent, ids_restore, input_res, grid)
    length = ids_restore.shape[1]
    mask = torch.ones(n, length, dtype=imgs.dtype, device=imgs.device)
    mask[:, :ids_keep.shape[1]] = 0
    mask = torch.gather(mask, 1, ids_restore.long())  # un-shuffle: 1 where removed
    if targets is None:
      return high, low, mask
    return self.forward_loss(targets, (high, low), mask, grid)[0], high, low, mask


# ---------------------------------------------------------------------------------------------
# Conversion.

_INDEXED = re.compile(r"(blocks|decoder_blocks|conv_blocks|convs|fpn1|fpn2|pred)_(\d+)$")
_HEADS = ("fcn_high", "fcn_low", "fcn")


def _is_conv_transpose(mods: tuple[str, ...]) -> bool:
  """Every conv of the FPN is transposed; in a head, pred_1 and pred_7."""
  return mods[0] == "fpn" or (mods[0] in _HEADS and mods[-1] in ("pred_1", "pred_7"))


def _torch_path(mods: tuple[str, ...]) -> str:
  return ".".join(m.group(1) + "." + m.group(2) if (m := _INDEXED.fullmatch(x)) else x
                  for x in mods)


def structure(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """What the keys of a release-layout state dict say: depth, decoder_depth, fcn_layers,
  independent_fcn_head, progressive (widths come from shapes, see `hub`)."""
  keys = list(state_dict)

  def count(pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0

  independent = any(k.startswith(("fcn_high.", "fcn_low.")) for k in keys)
  head = "fcn_high" if independent else "fcn"
  return {"depth": count(r"blocks\.(\d+)\."), "decoder_depth": count(r"decoder_blocks\.(\d+)\."),
          "fcn_layers": count(re.escape(head) + r"\.conv_blocks\.(\d+)\."),
          "independent_fcn_head": independent,
          "progressive": "fpn.fpn1.0.ln.weight" in state_dict}


def expected_keys(depth: int, decoder_depth: int, fcn_layers: int, independent_fcn_head: bool,
                  progressive: bool) -> list[str]:
  """The release's state-dict keys, in its order (read off a `ScaleMAETorch` on the meta device:
  key names do not depend on widths)."""
  with torch.device("meta"):
    m = ScaleMAETorch(img_size=4, patch_size=4, in_chans=1, embed_dim=4, depth=depth,
                      num_heads=1, decoder_embed_dim=4, decoder_depth=decoder_depth,
                      decoder_num_heads=1, fcn_dim=4, fcn_layers=fcn_layers,
                      independent_fcn_head=independent_fcn_head, progressive=progressive)
  return list(m.state_dict())


def flax_to_torch_scale_mae(params: Mapping, *, img_size: int | tuple[int, int] = 224
                            ) -> dict[str, torch.Tensor]:
  """Flax `ScaleMAE` params -> a state dict that the release's `MaskedAutoencoderViT` (and
  `ScaleMAETorch`) loads with strict=True, keys in its order.

  Filled (the Flax model holds none of them), as the release's init leaves them: `pos_embed`,
  MAE's fixed sin-cos table (1, L + 1, D) for `img_size` (int or (H, W)); `decoder_pos_embed`
  and `mask_token_decoder` zeros.
  A `{"params": ...}` wrapper is accepted.
  """
  if set(params) == {"params"}:
    params = params["params"]
  if "encoder" not in params or "fpn" not in params:
    raise ValueError("flax_to_torch_scale_mae: not ScaleMAE params (no encoder / fpn)")
  # The encoder (and its pos_embed for img_size) exactly as the ViT conversion writes it.
  sd = {k: _to_numpy(v) for k, v in tv.flax_to_torch_vit(params["encoder"],
                                                          img_size=img_size).items()}
  rest = _flatten({k: v for k, v in params.items() if k != "encoder"})
  norms = {path[:-1] for path in rest if path[-1] == "scale"}
  for path, leaf in rest.items():
    a = _to_numpy(leaf)
    mods, name = path[:-1], path[-1]
    if not mods:  # mask_token
      sd[name] = a
      continue
    key = _torch_path(mods)
    if mods in norms:
      if mods[0] == "fpn" or mods[0] in _HEADS:
        key += ".ln"  # Norm2d wraps its LayerNorm
      sd[f"{key}.{'weight' if name == 'scale' else name}"] = a
    elif name == "kernel":
      if a.ndim == 2:
        sd[f"{key}.weight"] = a.T
      elif _is_conv_transpose(mods):
        sd[f"{key}.weight"] = a.transpose(2, 3, 0, 1)  # (k, k, in, out) -> (in, out, k, k)
      else:
        sd[f"{key}.weight"] = a.transpose(3, 2, 0, 1)  # (kh, kw, in/g, out) -> (out, in/g, ...)
    else:
      sd[f"{key}.{name}"] = a

  dd = sd["mask_token"].shape[-1]
  h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
  p = sd["patch_embed.proj.weight"].shape[-1]
  sd["decoder_pos_embed"] = np.zeros((1, (h // p) * (w // p) + 1, dd), sd["mask_token"].dtype)
  sd["mask_token_decoder"] = np.zeros((1, 1, dd), sd["mask_token"].dtype)

  want = expected_keys(**structure(sd))
  tv.check_keys(sd, want, "flax_to_torch_scale_mae")
  return {k: _to_torch(sd[k]) for k in want}


def torch_to_flax_scale_mae(state_dict: Mapping[str, Any], *, notes: list[str] | None = None
                            ) -> dict:
  """A release-layout Scale-MAE state dict -> Flax `ScaleMAE` params (exact inverse of
  `flax_to_torch_scale_mae`).

  `pos_embed`, `decoder_pos_embed` (fixed tables; the model recomputes GSD-scaled ones) and
  `mask_token_decoder` (used only by the release's multi-scale decoding) are dropped (and may be
  absent), as is an unused `pos_emb_projection` (the release's project_pos_emb path never runs
  it); each drop is appended to `notes` when given. Other missing or unexpected keys raise one
  ValueError naming them. A `{"model": ...}` wrapper is accepted.
  """
  if "model" in state_dict and isinstance(state_dict["model"], Mapping):
    state_dict = state_dict["model"]
  sd = dict(state_dict)
  extra = [k for k in sd if k.startswith("pos_emb_projection.")]
  for k in extra:
    del sd[k]
  want = expected_keys(**structure(sd))
  tv.check_keys([k for k in sd] + [k for k in FILLED if k not in sd], want,
                "torch_to_flax_scale_mae")
  if notes is not None:
    why = {"pos_embed": "pos_embed (a fixed sin-cos table; Scale-MAE recomputes a GSD-scaled one "
                        "every forward)",
           "decoder_pos_embed": "decoder_pos_embed (fixed, never read by the forward)",
           "mask_token_decoder": "mask_token_decoder (used only by the release's multi-scale "
                                 "decoding)"}
    present = [why[k] for k in FILLED if k in sd]
    if present:
      notes.append("dropped: " + ", ".join(present))
    if extra:
      notes.append(f"dropped: {', '.join(extra)} (project_pos_emb: the release never applies it)")

  enc = {k: v for k, v in sd.items() if k in ("cls_token", "pos_embed") or
         k.startswith(("patch_embed.", "blocks.", "norm."))}
  enc.setdefault("pos_embed", np.zeros((1, 1, 1), np.float32))  # dropped unchecked anyway
  flat = {("encoder",) + k: v for k, v in
          _flatten(tv.torch_to_flax_vit(enc, check_pos_embed=False)).items()}
  for key in want:
    if key in enc or key in FILLED:  # the encoder is converted above; FILLED are dropped
      continue
    a = _to_numpy(sd[key])
    if key == "mask_token":
      flat[(key,)] = a
      continue
    path, name = key.rsplit(".", 1)
    mods = _flax_mods(path[:-len(".ln")] if path.endswith(".ln") else path)
    if name == "weight":
      if a.ndim == 1:  # only LayerNorms have 1-D weights
        flat[(*mods, "scale")] = a
      elif a.ndim == 2:
        flat[(*mods, "kernel")] = a.T
      elif _is_conv_transpose(mods):
        flat[(*mods, "kernel")] = a.transpose(2, 3, 0, 1)
      else:
        flat[(*mods, "kernel")] = a.transpose(2, 3, 1, 0)
    else:
      flat[(*mods, name)] = a
  return _unflatten({k: jnp.asarray(v) for k, v in flat.items()})


def _flax_mods(path: str) -> tuple[str, ...]:
  """torch module path -> Flax module names: fpn.fpn1.3 -> (fpn, fpn1_3), decoder_blocks.0.attn.qkv
  -> (decoder_blocks_0, attn, qkv), fcn_high.conv_blocks.0.convs.1 -> (fcn_high, conv_blocks_0,
  convs_1)."""
  parts = path.split(".")
  out: list[str] = []
  for part in parts:
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)
