"""Plain-PyTorch ViT and MAE in the timm / MAE checkpoint layout, and Flax <-> PyTorch conversion.

`TorchViT` / `TorchMAE` are reference modules for weight interchange and numerical parity with
`mmearth_jax.models.vit` (no timm needed). State-dict keys are exactly the published layout:
`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.<i>.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}`, `norm`; the MAE adds `mask_token`, `decoder_embed`, `decoder_pos_embed`,
`decoder_blocks.<i>.*`, `decoder_norm`, `decoder_pred`. As in MAE, the position embeddings are
fixed sin-cos tables held in parameters with requires_grad=False.

Masks are supplied from outside (`ids_keep`, `ids_restore`) so both frameworks can run the very
same mask; the decoder un-shuffles the way MAE's code does (concat mask tokens, gather with
ids_restore), an independent check of our scatter.

Conversion (every tensor only transposed, so Flax -> torch -> Flax is bit-exact): conv HWIO ->
OIHW, Dense (in, out) -> Linear (out, in), LayerNorm scale -> weight, tokens (1, 1, D) as they
are. Flax keeps no position-embedding parameter (it recomputes the sin-cos table for each input),
so `flax_to_torch_vit` writes the table for a given image size and `torch_to_flax_vit` checks that
the incoming one IS the sin-cos table (a learned one, as in timm's supervised ViTs, cannot be
represented) and drops it.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
import torch
from torch import nn
from mmearth_jax.interop.trees import flatten as _flatten, unflatten as _unflatten
from mmearth_jax.interop.trees import to_numpy as _to_numpy, to_torch as _to_torch

LN_EPS = 1e-6


def sincos_2d_torch(embed_dim: int, grid_h: int, grid_w: int, cls_token: bool = False
                    ) -> torch.Tensor:
  """MAE's 2-D sin-cos table (L [+1], D), float32: first half embeds the column (MAE's grid[0]
  of meshgrid(w, h)), second half the row; each half [sin, cos] over D/4 frequencies."""
  if embed_dim % 4:
    raise ValueError(f"embed_dim={embed_dim} must be divisible by 4")
  quarter = embed_dim // 4
  omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
  rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                              torch.arange(grid_w, dtype=torch.float64), indexing="ij")
  halves = []
  for coord in (cols.reshape(-1), rows.reshape(-1)):
    angle = coord[:, None] * omega[None, :]
    halves += [angle.sin(), angle.cos()]
  table = torch.cat(halves, dim=1)
  if cls_token:
    table = torch.cat([torch.zeros(1, embed_dim, dtype=table.dtype), table], dim=0)
  return table.float()


# ---------------------------------------------------------------------------------------------
# Modules.


class Attention(nn.Module):

  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, t, d = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, T, head_dim)
    attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.act(self.fc1(x)))


def _drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
  if rate == 0.0 or not training:
    return x
  keep = 1.0 - rate
  alive = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
  return x * alive / keep


class Block(nn.Module):

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.drop_path = drop_path

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + _drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
    return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchEmbed(nn.Module):

  def __init__(self, patch_size: int, in_chans: int, dim: int):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.proj(x).flatten(2).transpose(1, 2)  # (N, L, D), row-major patches


def gather_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
  """x (N, L, D) -> the rows `ids` (N, K) of each sample, (N, K, D)."""
  return torch.gather(x, 1, ids.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class TorchViT(nn.Module):
  """ViT encoder (MAE / timm layout, no head) for a fixed `img_size` (int or (H, W))."""

  def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16,
               in_chans: int = 3, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
               mlp_ratio: float = 4.0, drop_path_rate: float = 0.0):
    super().__init__()
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    self.patch_size = patch_size
    self.grid = (h // patch_size, w // patch_size)
    self.num_patches = self.grid[0] * self.grid[1]
    self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(sincos_2d_torch(embed_dim, *self.grid, cls_token=True)[None],
                                  requires_grad=False)
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear, as timm
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, r) for r in rates])
    self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
    nn.init.normal_(self.cls_token, std=0.02)

  def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """imgs (N, C, H, W) -> tokens (N, 1 + K, D); only the `ids_keep` patches when given."""
    x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
    if ids_keep is not None:
      x = gather_rows(x, ids_keep)
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x)

  def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
    return self.forward_encoder(imgs, ids_keep)


class TorchMAE(TorchViT):
  """MAE: the encoder keys at top level (as MAE's checkpoints) plus the decoder."""

  def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16,
               in_chans: int = 3, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
               mlp_ratio: float = 4.0, decoder_embed_dim: int = 512, decoder_depth: int = 8,
               decoder_num_heads: int = 16, drop_path_rate: float = 0.0):
    super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
                     drop_path_rate)
    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_pos_embed = nn.Parameter(
        sincos_2d_torch(decoder_embed_dim, *self.grid, cls_token=True)[None], requires_grad=False)
    self.decoder_blocks = nn.ModuleList(
        [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)])
    self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=LN_EPS)
    self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
    nn.init.normal_(self.mask_token, std=0.02)

  def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), per patch ordered (row, column, channel)."""
    p = self.patch_size
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, (h // p) * (w // p), p * p * c)

  def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    x = self.decoder_embed(latent)
    n, length = ids_restore.shape
    mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
    shuffled = torch.cat([x[:, 1:], mask_tokens], dim=1)  # kept first, then mask tokens
    x = torch.cat([x[:, :1], gather_rows(shuffled, ids_restore)], dim=1)
    x = x + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]

  def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                   norm_pix_loss: bool = False) -> torch.Tensor:
    target = self.patchify(imgs)
    if norm_pix_loss:
      mean = target.mean(dim=-1, keepdim=True)
      var = target.var(dim=-1, keepdim=True)  # unbiased, torch's default
      target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()

  def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor, ids_restore: torch.Tensor,
              norm_pix_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """imgs (N, C, H, W), the mask as (ids_keep (N, K), ids_restore (N, L)) ->
    (loss, pred (N, L, p*p*C), mask (N, L), 1 = removed)."""
    latent = self.forward_encoder(imgs, ids_keep)
    pred = self.forward_decoder(latent, ids_restore)
    n, length = ids_restore.shape
    mask = torch.ones(n, length, dtype=imgs.dtype, device=imgs.device)
    mask[:, :ids_keep.shape[1]] = 0
    mask = torch.gather(mask, 1, ids_restore.long())  # un-shuffle: 1 where removed
    return self.forward_loss(imgs, pred, mask, norm_pix_loss), pred, mask


# ---------------------------------------------------------------------------------------------
# Conversion.

_TOKENS = ("cls_token", "mask_token")
_POS = ("pos_embed", "decoder_pos_embed")


def _torch_module(name: str) -> str:
  """Flax module name -> torch module path: blocks_3 -> blocks.3, patch_embed -> .proj."""
  m = re.fullmatch(r"(decoder_blocks|blocks)_(\d+)", name)
  if m:
    return f"{m.group(1)}.{m.group(2)}"
  return "patch_embed.proj" if name == "patch_embed" else name


def _flax_module(path: str) -> list[str]:
  path = re.sub(r"^(decoder_blocks|blocks)\.(\d+)", r"\1_\2", path)
  path = re.sub(r"^patch_embed\.proj", "patch_embed", path)
  return path.split(".")


def _expected_keys(depth: int, decoder_depth: int | None) -> list[str]:
  """The layout's keys in torch's state_dict order: the module's own tensors, then submodules."""
  block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]

  def wb(mod: str) -> list[str]:
    return [f"{mod}.weight", f"{mod}.bias"]

  def blocks(name: str, n: int) -> list[str]:
    return [k for i in range(n) for m in block for k in wb(f"{name}.{i}.{m}")]

  keys = ["cls_token", "pos_embed"]
  if decoder_depth is not None:
    keys += ["mask_token", "decoder_pos_embed"]
  keys += [*wb("patch_embed.proj"), *blocks("blocks", depth), *wb("norm")]
  if decoder_depth is not None:
    keys += [*wb("decoder_embed"), *blocks("decoder_blocks", decoder_depth), *wb("decoder_norm"),
             *wb("decoder_pred")]
  return keys


def _depth(keys, pattern: str) -> int:
  found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
  return max(found) + 1 if found else 0


def check_keys(have: Iterable[str], want: Iterable[str], what: str) -> None:
  """Raises one ValueError listing the missing and unexpected state-dict keys, if any."""
  have, want = set(have), set(want)
  problems = [f"missing: {k}" for k in sorted(want - have)]
  problems += [f"unexpected: {k}" for k in sorted(have - want)]
  if problems:
    raise ValueError(f"{what}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))


def flax_to_torch_vit(params: Mapping, *, img_size: int | tuple[int, int] = 224
                      ) -> dict[str, torch.Tensor]:
  """Flax `ViT` or `MAE` params -> a `TorchViT` / `TorchMAE` state dict.

  The fixed position tables (`pos_embed`, `decoder_pos_embed`, shape (1, L + 1, D)) are written
  for `img_size` (int or (H, W)), since Flax stores none. A `{"params": ...}` wrapper is accepted.
  """
  if set(params) == {"params"}:
    params = params["params"]
  is_mae = "encoder" in params
  flat = _flatten(params)
  sd: dict[str, np.ndarray] = {}
  for path, leaf in flat.items():
    a = _to_numpy(leaf)
    mods = path[1:-1] if is_mae and path[0] == "encoder" else path[:-1]
    leaf_name = path[-1]
    if not mods and leaf_name in _TOKENS:
      sd[leaf_name] = a
      continue
    key = ".".join(_torch_module(m) for m in mods)
    if leaf_name == "kernel":
      # Conv HWIO -> OIHW; Dense (in, out) -> Linear (out, in).
      sd[f"{key}.weight"] = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
    elif leaf_name == "scale":
      sd[f"{key}.weight"] = a
    else:
      sd[f"{key}.{leaf_name}"] = a

  h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
  p = sd["patch_embed.proj.weight"].shape[-1] if "patch_embed.proj.weight" in sd else 1
  grid = (h // p, w // p)
  if "cls_token" in sd:
    sd["pos_embed"] = sincos_2d_torch(sd["cls_token"].shape[-1], *grid, True)[None].numpy()
  if "mask_token" in sd:
    sd["decoder_pos_embed"] = sincos_2d_torch(sd["mask_token"].shape[-1], *grid, True)[None].numpy()

  keys = list(sd)
  want = _expected_keys(_depth(keys, r"blocks\.(\d+)\."),
                        _depth(keys, r"decoder_blocks\.(\d+)\.") if is_mae else None)
  check_keys(keys, want, "flax_to_torch_vit")
  return {k: _to_torch(sd[k]) for k in want}  # in the layout's order


def torch_to_flax_vit(state_dict: Mapping[str, Any], *, check_pos_embed: bool = True,
                      grid: tuple[int, int] | None = None) -> dict:
  """A `TorchViT` / `TorchMAE` (timm / MAE layout) state dict -> Flax `ViT` / `MAE` params.

  An MAE state dict (one with `decoder_embed.weight`) gives the MAE tree with the encoder under
  `encoder`. The position tables are dropped after checking (with `check_pos_embed`) that they are
  the fixed sin-cos tables of the (grid_h, grid_w) `grid` (default: a square grid from their
  length). A checkpoint's `{"model": ...}` wrapper and a timm classifier `head` are accepted
  (the head is dropped).
  """
  if "model" in state_dict and isinstance(state_dict["model"], Mapping):
    state_dict = state_dict["model"]
  sd = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
  keys = list(sd)
  is_mae = "decoder_embed.weight" in sd
  want = _expected_keys(_depth(keys, r"blocks\.(\d+)\."),
                        _depth(keys, r"decoder_blocks\.(\d+)\.") if is_mae else None)
  check_keys(keys, want, "torch_to_flax_vit")

  if check_pos_embed:
    for name in _POS:
      if name in sd:
        _check_sincos(name, _to_numpy(sd[name]), grid)

  flat: dict[tuple, np.ndarray] = {}
  for key in want:
    if key in _POS:
      continue
    a = _to_numpy(sd[key])
    decoder = key.startswith(("decoder_", "mask_token"))
    prefix = ("encoder",) if is_mae and not decoder else ()
    if key in _TOKENS:
      flat[prefix + (key,)] = a
      continue
    mods, leaf_name = _flax_module(key.rsplit(".", 1)[0]), key.rsplit(".", 1)[1]
    if leaf_name == "weight":
      if a.ndim == 4:
        flat[prefix + (*mods, "kernel")] = a.transpose(2, 3, 1, 0)
      elif a.ndim == 2:
        flat[prefix + (*mods, "kernel")] = a.T
      else:
        flat[prefix + (*mods, "scale")] = a  # LayerNorm
    else:
      flat[prefix + (*mods, leaf_name)] = a
  return _unflatten({k: jnp.asarray(v) for k, v in flat.items()})


def _check_sincos(name: str, table: np.ndarray, grid: tuple[int, int] | None):
  _, length, dim = table.shape
  if grid is None:
    side = math.isqrt(length - 1)
    if side * side != length - 1:
      raise ValueError(f"{name} has {length - 1} patch positions, not a square grid: pass grid=")
    grid = (side, side)
  ref = sincos_2d_torch(dim, *grid, cls_token=True).numpy()
  if ref.shape != table.shape[1:] or not np.allclose(table[0].astype(np.float32), ref,
                                                      atol=1e-5, rtol=0):
    raise ValueError(f"{name} is not the fixed 2-D sin-cos table for grid {grid} (a learned "
                     "position embedding cannot be loaded into this model); pass "
                     "check_pos_embed=False to drop it anyway")
