"""MP-MAE losses per modality kind and their aggregation, with the reference code's details.

- pixel regression (sentinel2, sentinel1, aster, canopy_height_eth): squared error on masked
  patches; per patch the mean over its entries; the sum over masked patches divided by the number
  of masked patches whose loss is non-zero. Missing target values are 0 (the mean after
  z-scoring), as the reference sets NaN/inf to 0 before the loss; `valid_pixels=True` instead
  averages each patch over its measured entries only.
- norm_pix (Sentinel-2 only): per-patch mean and UNBIASED variance, eps 1e-6 under the root.
- segmentation (esa_worldcover, dynamic_world): cross-entropy over masked pixels, label -1 ignored.
- image regression (lat, lon, month, era5): MSE over the measured values.
- classification (biome, eco_region): cross-entropy on the one-hot's argmax, -1 ignored; with
  `data.upstream_compat` the pipeline emits the argmax of every vector, none ignored, as upstream.
- aggregation: "uncertainty" = sum_i exp(-s_i) L_i + s_i over terms whose loss is not exactly 0,
  or "unweighted" = sum_i L_i.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from mmearth_jax import modalities as M
from mmearth_jax.models.mp_mae import random_patch_mask


def patchify(x: jnp.ndarray, p: int) -> jnp.ndarray:
  """(N, H, W, ...) -> (N, L, p*p*...) ordered (row-in-patch, column-in-patch, channel)."""
  n, h, w = x.shape[:3]
  rest = x.shape[3:]
  x = x.reshape(n, h // p, p, w // p, p, *rest)
  x = jnp.moveaxis(x, 3, 2)  # (N, gh, gw, p, p, ...)
  return x.reshape(n, (h // p) * (w // p), -1)


def pixel_regression_loss(pred: jnp.ndarray, target: jnp.ndarray, valid: jnp.ndarray,
                          patch_mask: jnp.ndarray, p: int, *, norm_pix: bool = False,
                          valid_pixels: bool = False) -> jnp.ndarray:
  """pred (N, L, p*p*C) tokens; target, valid (N, H, W, C); patch_mask (N, L), 1 = masked."""
  t = patchify(jnp.where(jnp.isfinite(target), target, 0.0).astype(jnp.float32), p)
  if norm_pix:
    mean = t.mean(-1, keepdims=True)
    var = t.var(-1, keepdims=True, ddof=1)
    t = (t - mean) / jnp.sqrt(var + 1e-6)
  err = jnp.square(pred - t)
  if valid_pixels:
    v = patchify(valid, p).astype(jnp.float32)
    per_patch = jnp.sum(err * v, -1) / jnp.maximum(jnp.sum(v, -1), 1.0)
  else:
    per_patch = err.mean(-1)
  counted = patch_mask * (per_patch != 0)
  return jnp.sum(per_patch * patch_mask) / jnp.maximum(jnp.sum(counted), 1.0)


def segmentation_loss(pred: jnp.ndarray, labels: jnp.ndarray, patch_mask: jnp.ndarray,
                      p: int) -> jnp.ndarray:
  """pred (N, L, p*p*K); labels (N, H, W) int, -1 = missing; mean over masked labelled pixels."""
  n, length, _ = pred.shape
  logits = pred.reshape(n, length, p * p, -1)
  lab = patchify(labels[..., None], p)  # (N, L, p*p)
  use = (lab >= 0) & (patch_mask[..., None] > 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(lab, 0))
  return jnp.sum(ce * use) / jnp.maximum(jnp.sum(use), 1)


def image_regression_loss(pred: jnp.ndarray, target: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  v = valid.astype(jnp.float32)
  return jnp.sum(jnp.square(pred - target) * v) / jnp.maximum(jnp.sum(v), 1.0)


def classification_loss(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  use = labels >= 0
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  return jnp.sum(ce * use) / jnp.maximum(jnp.sum(use), 1)


def modality_losses(preds: Mapping[str, jnp.ndarray], batch: Mapping, patch_mask: jnp.ndarray,
                    patch_size: int, *, norm_pix: bool = True,
                    valid_pixels: bool = False) -> dict[str, jnp.ndarray]:
  """The loss of every predicted modality. patch_mask (N, g, g), 1 = masked."""
  mask = patch_mask.reshape(patch_mask.shape[0], -1).astype(jnp.float32)
  g = patch_mask.shape[1]
  side = g * patch_size
  out = {}
  for name, pred in preds.items():
    m = M.get(name)
    t, v = batch["targets"][name], batch["valid"][name]
    if m.level == M.PIXEL:
      # MMEarth64: the crop (56) equals the patch grid; any remainder would be cut off here.
      t, v = t[:, :side, :side], v[:, :side, :side]
      if m.task == M.REGRESSION:
        out[name] = pixel_regression_loss(pred, t, v, mask, patch_size,
                                          norm_pix=norm_pix and name == "sentinel2",
                                          valid_pixels=valid_pixels)
      else:
        out[name] = segmentation_loss(pred, t, mask, patch_size)
    elif m.task == M.REGRESSION:
      out[name] = image_regression_loss(pred, t, v)
    else:
      out[name] = classification_loss(pred, t)
  return out


def aggregate(losses: Mapping[str, jnp.ndarray], log_vars: jnp.ndarray,
              method: str = "uncertainty") -> jnp.ndarray:
  """Total loss; `log_vars` in the order of `losses`."""
  values = jnp.stack(list(losses.values()))
  if method == "unweighted":
    return jnp.sum(values)
  if method != "uncertainty":
    raise ValueError(f"unknown loss aggregation {method!r}; choose 'uncertainty' or 'unweighted'")
  terms = jnp.exp(-log_vars) * values + log_vars
  return jnp.sum(jnp.where(values != 0, terms, 0.0))


def mp_mae_loss(model, params, batch: Mapping, key: jax.Array, *, mask_ratio: float = 0.6,
                norm_pix: bool = True, aggregation: str = "uncertainty", train: bool = True,
                valid_pixels: bool = False):
  """(total, {modality: loss}) of one batch; draws the patch mask from `key`."""
  images = batch["image"]
  grid = images.shape[1] // model.patch_size
  mask_key, dp_key = jax.random.split(key)
  patch_mask = random_patch_mask(mask_key, images.shape[0], grid, mask_ratio)
  preds = model.apply({"params": params}, images, patch_mask, train=train,
                      rngs={"drop_path": dp_key})
  losses = modality_losses(preds, batch, patch_mask, model.patch_size, norm_pix=norm_pix,
                           valid_pixels=valid_pixels)
  return aggregate(losses, params["log_vars"], aggregation), losses
