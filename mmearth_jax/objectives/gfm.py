"""GFM's objective: SimMIM reconstruction on the student plus feature distillation from a frozen
teacher (the released code's `models/teacher.py`).

  mask          per sample exactly ceil(L * mask_ratio) of the L = (H/m) x (W/m) mask cells,
                drawn uniformly (SimMIM's MaskGenerator; m = mask_patch, 32; ratio 0.6)
  recon         L1 on masked pixels, normalised as SimMIM's code:
                sum(|x - x_rec| * mask) / (sum(mask) + 1e-5) / C, mask counted in pixels
  distill       -cosine(projector(student pooled), stop_gradient(teacher pooled)).mean() * alpha,
                cosine as torch's CosineSimilarity(dim=1, eps=1e-8)
  total         recon + distill

The teacher sees the UNMASKED image; the student's pooled features come from its masked pass.
GFM's code resizes the teacher's input to 224 (bilinear, align_corners=True) because its Swin
teacher was trained there: `teacher_size` > 0 does that; 0 feeds the student's input as it is.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from mmearth_jax.models.convnextv2 import ConvNeXtV2
from mmearth_jax.models.gfm import encode
from mmearth_jax.ops import resize as R


def mask_count(cells: int, ratio: float) -> int:
  """Masked cells per sample: ceil(cells * ratio), as SimMIM's MaskGenerator."""
  if not 0 < ratio < 1:
    raise ValueError(f"config objective.mask_ratio = {ratio} must be in (0, 1)")
  # The float product can land a hair above an integer (0.6 * 10 = 6.000000000000001).
  return min(cells, int(math.ceil(round(cells * ratio, 9))))


def simmim_mask(rng: jax.Array, batch: int, grid_h: int, grid_w: int, ratio: float
                ) -> jnp.ndarray:
  """(batch, grid_h, grid_w) float32, 1 = masked: each sample masks exactly
  `mask_count(grid_h * grid_w, ratio)` cells, a uniform random subset."""
  cells = grid_h * grid_w
  k = mask_count(cells, ratio)
  noise = jax.random.uniform(rng, (batch, cells))
  rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)  # a uniform random permutation
  return (rank < k).astype(jnp.float32).reshape(batch, grid_h, grid_w)


def mask_grid(image_hw: tuple[int, int], mask_patch: int, encoder: Any) -> tuple[int, int]:
  """The mask grid of an image; checks that cells tile it and align with the encoder's
  positions (ConvNeXt's 4 px stem, a ViT's patches)."""
  h, w = image_hw
  if mask_patch <= 0 or h % mask_patch or w % mask_patch:
    raise ValueError(f"config objective.mask_patch = {mask_patch} does not tile the {h}x{w} "
                     "input (data.resized_crop.size)")
  unit = 4 if isinstance(encoder, ConvNeXtV2) else encoder.patch_size
  if mask_patch % unit:
    raise ValueError(f"config objective.mask_patch = {mask_patch} must be a multiple of the "
                     f"encoder's {unit} px positions")
  return h // mask_patch, w // mask_patch


def reconstruction_loss(images: jnp.ndarray, reconstruction: jnp.ndarray,
                        patch_mask: jnp.ndarray) -> jnp.ndarray:
  """SimMIM's L1 on masked pixels: images, reconstruction (N, H, W, C); patch_mask (N, mh, mw)
  with 1 = masked, repeated over each cell's pixels."""
  n, h, w, c = images.shape
  mh, mw = patch_mask.shape[1:]
  m = jnp.repeat(jnp.repeat(patch_mask.astype(jnp.float32), h // mh, axis=1), w // mw, axis=2)
  err = jnp.abs(images.astype(jnp.float32) - reconstruction.astype(jnp.float32))
  return jnp.sum(err * m[..., None]) / (jnp.sum(m) + 1e-5) / c


def cosine_similarity(a: jnp.ndarray, b: jnp.ndarray, eps: float = 1e-8) -> jnp.ndarray:
  """torch's cosine_similarity along the last axis: a.b / (max(|a|, eps) * max(|b|, eps))."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  na = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
  nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
  return jnp.sum(a * b, axis=-1) / (na * nb)


def distillation_loss(student: jnp.ndarray, teacher: jnp.ndarray, alpha: float = 1.0
                      ) -> jnp.ndarray:
  """-mean cosine(student (N, D), teacher (N, D)) * alpha; no gradient reaches the teacher."""
  return -jnp.mean(cosine_similarity(student, jax.lax.stop_gradient(teacher))) * alpha


def resize_align_corners(images: jnp.ndarray, size: int) -> jnp.ndarray:
  """(N, H, W, C) -> (N, size, size, C), torch's bilinear interpolate with align_corners=True
  (how GFM's code feeds its 224 px teacher), at full float32 matmul precision."""
  return R.resize(images, int(size), "bilinear", align_corners=True, xp=jnp, precision="highest")


def teacher_features(model: Any, teacher: Mapping[str, Any], images: jnp.ndarray, *,
                     teacher_size: int = 0) -> jnp.ndarray:
  """The frozen teacher's pooled features (N, D) of the unmasked images. `teacher` mirrors the
  student's parameters ({"encoder": ...}); the teacher runs the student's encoder architecture
  in inference mode (no drop path)."""
  if teacher_size:
    images = resize_align_corners(images, int(teacher_size))
  layer = model.distill_layer
  _, pooled = model.encoder.apply({"params": teacher["encoder"]}, images,
                                  method=lambda m, x: encode(m, x, layer=layer, train=False))
  return jax.lax.stop_gradient(pooled)


def gfm_loss(model: Any, params: Any, teacher: Mapping[str, Any], batch: Mapping[str, Any],
             rng: jax.Array, *, mask_patch: int = 32, mask_ratio: float = 0.6,
             alpha: float = 1.0, teacher_size: int = 0, train: bool = True
             ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """(total, {"recon", "distill", "cosine"}) of one batch {"image": (N, H, W, C)} through a
  `models.gfm.SimMIM` student and its frozen teacher."""
  mask_rng, drop_rng = jax.random.split(rng)
  images = batch["image"]
  gh, gw = mask_grid(images.shape[1:3], mask_patch, model.encoder)
  patch_mask = simmim_mask(mask_rng, images.shape[0], gh, gw, mask_ratio)
  reconstruction, projected = model.apply(
      {"params": params}, images, patch_mask, train=train,
      rngs={"drop_path": drop_rng, "dropout": drop_rng})
  target = teacher_features(model, teacher, images, teacher_size=teacher_size)
  if projected.shape != target.shape:
    raise ValueError(f"the student's projector gives {projected.shape[-1]} features but the "
                     f"teacher's pooled features have {target.shape[-1]}")
  recon = reconstruction_loss(images, reconstruction, patch_mask)
  cos = jnp.mean(cosine_similarity(projected, target))
  distill = distillation_loss(projected, target, alpha)
  return recon + distill, {"recon": recon, "distill": distill, "cosine": cos}
