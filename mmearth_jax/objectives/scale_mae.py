"""Scale-MAE's Laplacian reconstruction loss (the released code's `forward_loss`).

With band_config (d1, d2) and the target image T (N, H_t, W_t, C) at twice the input resolution:

  high target  T - bilinear_up(area_down(T, d1 x d1), high size)     a band-pass of T
  low target   area_down(T, low size)                               T at the input resolution
               (when d2 == 224 the code first area-resizes T to 224, then to the low size)

Both losses cover only the masked patches: the (N, L) patch mask is nearest-upsampled to each
prediction's size, and each loss is sum over pixels and channels of mask * error, divided by the
number of masked PIXELS (+1e-9), as the code does (the channel sum is not averaged). The low loss
is L2; the high loss is L2 (the code's default) or l1_weight * L1 (the paper). Total = high + low.
The code's `norm_pix_loss` flag is never read by this loss, so there is none here.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mmearth_jax.ops import resize as resize_ops

HIGH_LOSSES = ("l2", "l1")


def laplacian_targets(target: jnp.ndarray, high_hw: tuple[int, int], low_hw: tuple[int, int],
                      band_config: tuple[int, int] = (7, 56)) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(high-frequency target at high_hw, low-frequency target at low_hw) of `target` (N,H,W,C)."""
  d1, d2 = (int(v) for v in band_config)
  t = target.astype(jnp.float32)
  if tuple(t.shape[1:3]) != tuple(high_hw):
    raise ValueError(f"the target is {t.shape[1]}x{t.shape[2]} but the high-frequency head "
                     f"predicts {high_hw[0]}x{high_hw[1]}: data.scale.target_size must be twice "
                     "the input size (for a patch size divisible by 4)")
  blur = resize_ops.resize(resize_ops.resize(t, (d1, d1), "area"), high_hw, "bilinear")
  low = t if d2 != 224 else resize_ops.resize(t, (d2, d2), "area")
  low = resize_ops.resize(low, low_hw, "area")
  return t - blur, low


def _upsample_mask(mask: jnp.ndarray, grid: tuple[int, int], hw: tuple[int, int]) -> jnp.ndarray:
  """(N, L) patch mask -> (N, h, w, 1) by torch's nearest rule."""
  m = mask.astype(jnp.float32).reshape(mask.shape[0], grid[0], grid[1], 1)
  return resize_ops.resize(m, hw, "nearest")


def scale_mae_loss_terms(high: jnp.ndarray, low: jnp.ndarray, target: jnp.ndarray,
                         mask: jnp.ndarray, grid: tuple[int, int], *,
                         band_config: tuple[int, int] = (7, 56), high_loss: str = "l2",
                         l1_weight: float = 1.0) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """(total, {"high", "low"}) from the two predictions (N, h, w, C), the target image and the
  (N, gh * gw) mask (1 = removed), all in float32."""
  if high_loss not in HIGH_LOSSES:
    raise ValueError(f"config objective.high_loss = {high_loss!r}; choose from {HIGH_LOSSES}")
  high = high.astype(jnp.float32)
  low = low.astype(jnp.float32)
  t_high, t_low = laplacian_targets(target, high.shape[1:3], low.shape[1:3], band_config)
  m_low = _upsample_mask(mask, grid, low.shape[1:3])
  m_high = _upsample_mask(mask, grid, high.shape[1:3])
  loss_low = jnp.sum(m_low * jnp.square(t_low - low)) / (jnp.sum(m_low) + 1e-9)
  if high_loss == "l1":
    err_high = jnp.abs(t_high - high) * l1_weight
  else:
    err_high = jnp.square(t_high - high)
  loss_high = jnp.sum(m_high * err_high) / (jnp.sum(m_high) + 1e-9)
  return loss_high + loss_low, {"high": loss_high, "low": loss_low}


def scale_mae_loss(model: Any, params: Any, batch: dict, rng: jax.Array, *,
                   band_config: tuple[int, int] = (7, 56), high_loss: str = "l2",
                   l1_weight: float = 1.0, train: bool = True
                   ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """One batch {"image" (N,H,W,C), "target" (N,2H,2W,C), "gsd" (N,)} through a ScaleMAE."""
  mask_rng, drop_rng = jax.random.split(rng)
  images = batch["image"]
  high, low, mask = model.apply({"params": params}, images, batch["gsd"], train=train,
                                rngs={"masking": mask_rng, "dropout": drop_rng})
  p = model.patch_size
  grid = (images.shape[1] // p, images.shape[2] // p)
  return scale_mae_loss_terms(high, low, batch["target"], mask, grid, band_config=band_config,
                              high_loss=high_loss, l1_weight=l1_weight)
