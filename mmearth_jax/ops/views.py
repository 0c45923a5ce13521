"""On-device geometric views of image tiles with exact pixel correspondences.

Dense contrastive objectives (PixPro, DenseCL, VADeR and our reading of "Embedding Earth") need
two augmented views of one tile AND the geometric relation between them, so that a feature cell
of one view can be matched with the point it shows in the other. Here each view is an
axis-aligned square crop of the source tile (random area fraction and position), optionally
flipped horizontally and/or vertically, resampled bilinearly to `size` x `size`, then lightly
jittered photometrically (per-band gain and offset, Gaussian noise).

Coordinates are continuous pixel coordinates (row, col): pixel q covers [q, q + 1), so its
centre is q + 0.5 (the convention of `models.convnextv2.stage_geometries`). Each view comes with
an affine map A (2 x 3) from its coordinates to the source tile's: source = A @ (row, col, 1).
Views are axis-aligned, so A's linear part is diagonal (negative entries are flips); the maps of
two views give the correspondence view 1 -> source -> view 2 (`map_points`, `invert_affine`).

Resampling is separable: out = Wy @ image @ Wx^T per sample, with Wy (size, H) and Wx
(size, W) holding two bilinear taps per row, so a view costs two small batched matmuls (cheap
on the CPU and MXU-friendly on accelerators) and no gather. Bilinear taps use half-pixel
centres and clamp at the border; no antialiasing (views are at most mildly downscaled).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def bilinear_weights(src: jnp.ndarray, size_in: int) -> jnp.ndarray:
  """(..., n) continuous source coordinates -> (..., n, size_in) bilinear interpolation weights.

  The value at coordinate u interpolates pixels floor(u - 0.5) and the next one (pixel centres at
  q + 0.5); indices are clamped to [0, size_in - 1], so points beyond the outer centres take the
  border pixel.
  """
  t = src - 0.5
  i0 = jnp.floor(t)
  w1 = t - i0
  i0 = i0.astype(jnp.int32)
  lo = jnp.clip(i0, 0, size_in - 1)
  hi = jnp.clip(i0 + 1, 0, size_in - 1)
  return (jax.nn.one_hot(lo, size_in, dtype=src.dtype) * (1.0 - w1)[..., None] +
          jax.nn.one_hot(hi, size_in, dtype=src.dtype) * w1[..., None])


def resample(images: jnp.ndarray, affine: jnp.ndarray, size: int) -> jnp.ndarray:
  """Views (B, size, size, C) of `images` (B, H, W, C) through axis-aligned maps `affine`
  (B, 2, 3) from view to source coordinates, sampled bilinearly at the view's pixel centres."""
  b, h, w, _ = images.shape
  centres = jnp.arange(size, dtype=jnp.float32) + 0.5
  # Axis-aligned: source row depends on the view row only (A[0, 1] = 0), column likewise.
  rows = affine[:, 0, 2:3] + affine[:, 0, 0:1] * centres  # (B, size)
  cols = affine[:, 1, 2:3] + affine[:, 1, 1:2] * centres
  wy = bilinear_weights(rows, h).astype(images.dtype)  # (B, size, H)
  wx = bilinear_weights(cols, w).astype(images.dtype)  # (B, size, W)
  x = jnp.einsum("bih,bhwc->biwc", wy, images)
  return jnp.einsum("bjw,biwc->bijc", wx, x)


def crop_affine(top: jnp.ndarray, left: jnp.ndarray, side: jnp.ndarray, size: int,
                hflip: jnp.ndarray, vflip: jnp.ndarray) -> jnp.ndarray:
  """(B, 2, 3) map from a size x size view to the source box [top, top + side) x
  [left, left + side), mirrored horizontally where `hflip`, vertically where `vflip`."""
  k = side / size
  row_scale = jnp.where(vflip, -k, k)
  col_scale = jnp.where(hflip, -k, k)
  row_off = jnp.where(vflip, top + side, top)  # a flipped view's row 0 shows the box's bottom
  col_off = jnp.where(hflip, left + side, left)
  zero = jnp.zeros_like(k)
  return jnp.stack([jnp.stack([row_scale, zero, row_off], -1),
                    jnp.stack([zero, col_scale, col_off], -1)], -2)


def random_crop_affine(rng: jax.Array, batch: int, height: int, width: int, size: int, *,
                       scale: Sequence[float] = (0.3, 1.0), hflip_prob: float = 0.5,
                       vflip_prob: float = 0.0) -> jnp.ndarray:
  """Random square boxes covering a fraction in `scale` of the tile's (square) area, anywhere
  inside it, and random flips: their (B, 2, 3) view -> source maps."""
  lo, hi = float(scale[0]), float(scale[1])
  if not 0.0 < lo <= hi <= 1.0:
    raise ValueError(f"crop scale {tuple(scale)} must satisfy 0 < min <= max <= 1")
  k_area, k_top, k_left, k_h, k_v = jax.random.split(rng, 5)
  extent = float(min(height, width))
  area = jax.random.uniform(k_area, (batch,), minval=lo, maxval=hi)
  side = extent * jnp.sqrt(area)
  top = jax.random.uniform(k_top, (batch,)) * (height - side)
  left = jax.random.uniform(k_left, (batch,)) * (width - side)
  hflip = jax.random.bernoulli(k_h, hflip_prob, (batch,))
  vflip = jax.random.bernoulli(k_v, vflip_prob, (batch,))
  return crop_affine(top, left, side, size, hflip, vflip)


def photometric_jitter(rng: jax.Array, views: jnp.ndarray, *, gain_std: float = 0.0,
                       offset_std: float = 0.0, noise_std: float = 0.0) -> jnp.ndarray:
  """Per-sample, per-band gain 1 + N(0, gain_std^2) and offset N(0, offset_std^2), then
  per-pixel Gaussian noise N(0, noise_std^2). Inputs are z-scored, so the stds are in units
  of each band's standard deviation."""
  b, _, _, c = views.shape
  k_g, k_o, k_n = jax.random.split(rng, 3)
  if gain_std:
    views = views * (1.0 + gain_std * jax.random.normal(k_g, (b, 1, 1, c), views.dtype))
  if offset_std:
    views = views + offset_std * jax.random.normal(k_o, (b, 1, 1, c), views.dtype)
  if noise_std:
    views = views + noise_std * jax.random.normal(k_n, views.shape, views.dtype)
  return views


def sample_views(rng: jax.Array, images: jnp.ndarray, *, num_views: int = 2, size: int,
                 scale: Sequence[float] = (0.3, 1.0), hflip_prob: float = 0.5,
                 vflip_prob: float = 0.0, gain_std: float = 0.0, offset_std: float = 0.0,
                 noise_std: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`num_views` independent views of every tile.

  Returns (views (V, B, size, size, C), affine (V, B, 2, 3)): affine[v, b] maps view v of tile b
  to the tile's coordinates (see the module docstring).
  """
  b, h, w, _ = images.shape
  images = images.astype(jnp.float32)
  views, maps = [], []
  for k in jax.random.split(rng, num_views):
    k_geo, k_photo = jax.random.split(k)
    a = random_crop_affine(k_geo, b, h, w, size, scale=scale, hflip_prob=hflip_prob,
                           vflip_prob=vflip_prob)
    v = resample(images, a, size)
    views.append(photometric_jitter(k_photo, v, gain_std=gain_std, offset_std=offset_std,
                                    noise_std=noise_std))
    maps.append(a)
  return jnp.stack(views), jnp.stack(maps)


def invert_affine(affine: jnp.ndarray) -> jnp.ndarray:
  """The inverse of (..., 2, 3) affine maps (any invertible linear part)."""
  m, t = affine[..., :2], affine[..., 2]
  det = m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
  inv = jnp.stack([jnp.stack([m[..., 1, 1], -m[..., 0, 1]], -1),
                   jnp.stack([-m[..., 1, 0], m[..., 0, 0]], -1)], -2) / det[..., None, None]
  return jnp.concatenate([inv, -jnp.einsum("...ij,...j->...i", inv, t)[..., None]], -1)


def compose_affine(outer: jnp.ndarray, inner: jnp.ndarray) -> jnp.ndarray:
  """(..., 2, 3) map x -> outer(inner(x))."""
  m = jnp.einsum("...ij,...jk->...ik", outer[..., :2], inner[..., :2])
  t = jnp.einsum("...ij,...j->...i", outer[..., :2], inner[..., 2]) + outer[..., 2]
  return jnp.concatenate([m, t[..., None]], -1)


def map_points(affine: jnp.ndarray, points: jnp.ndarray) -> jnp.ndarray:
  """Apply (B, 2, 3) maps to points (B, P, 2) or (P, 2) (row, col) -> (B, P, 2)."""
  if points.ndim == 2:
    points = jnp.broadcast_to(points, (affine.shape[0], *points.shape))
  return jnp.einsum("bij,bpj->bpi", affine[..., :2], points) + affine[:, None, :, 2]
