"""Dense contrastive pretraining ("Embedding Earth"): InfoNCE between corresponding feature
cells of two augmented views of a tile.

Only the Embedding Earth paper's abstract is public (no code), so this is a pixel/patch-level
contrastive objective of our design, in the spirit of PixPro, DenseCL and VADeR:

1. Views (ops/views.py): per tile and view a random square crop (area fraction in
   `crop_scale`), random flips, bilinear resampling to `view_size` px and photometric jitter,
   made on device from the step's rng, with the exact affine map view -> tile.
2. Embeddings: the encoder's map at `feature_stage` through the dense projector
   (models/dense_contrastive.py), L2-normalised.
3. Correspondence: every feature cell of view 1 has a receptive-field centre (the stem's
   geometry, `stage_geometries`); mapped view 1 -> tile -> view 2 it lands at a continuous cell
   position of view 2, whose embedding is taken there by bilinear interpolation of view 2's
   projected map (then normalised). A cell is a positive pair only if its point lies inside view
   2's image and inside the area its feature cells cover; other cells are no queries and no
   keys.
4. InfoNCE with temperature tau: each valid view-1 cell is scored against all valid sampled
   view-2 embeddings of all tiles in its group (`negatives_group` tiles, 0 = the whole batch):
   the one at its own point is the positive; other positions of the same tile and all positions
   of other tiles are negatives. Symmetric: the mean of the 1 -> 2 and 2 -> 1 losses.

Both views go through the same network in one pass and both sides get gradients (SimCLR-style
in-batch negatives). DenseCL, PixPro and VADeR take keys from a momentum (EMA) encoder, DenseCL
and VADeR with a queue of negatives; neither is used here: the trainer state carries no EMA
copy, and a batch of tiles gives hundreds of dense negatives per query already.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmearth_jax.ops import views as views_lib

_MASKED = -1e9  # the logit of a key that takes no part (exp underflows to exactly 0)

# Objective config fields that are loss arguments (the rest build the model).
LOSS_FIELDS = ("temperature", "view_size", "crop_scale", "flip_prob", "vflip_prob", "gain_std",
               "offset_std", "noise_std", "negatives_group")


def objective_kwargs(objective: Mapping[str, Any]) -> dict:
  """`dense_contrastive_loss` keyword arguments from a config's `objective` section."""
  missing = [k for k in LOSS_FIELDS if k not in objective]
  if missing:
    raise KeyError(f"config objective lacks {missing} (see configs/dense_contrastive.py)")
  out = {k: objective[k] for k in LOSS_FIELDS}
  out["crop_scale"] = tuple(float(s) for s in out["crop_scale"])
  return out


def cell_grid(centres: np.ndarray) -> np.ndarray:
  """(h*w, 2) (row, col) centres of a square map's cells, row-major like a reshape."""
  r, c = np.meshgrid(centres, centres, indexing="ij")
  return np.stack([r.ravel(), c.ravel()], -1).astype(np.float32)


def correspondences(affine_from: jnp.ndarray, affine_to: jnp.ndarray, centres: np.ndarray,
                    stride: float, view_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Where each cell of the "from" views lies in the "to" views' feature maps.

  affine_*: (B, 2, 3) view -> tile maps; centres: (size,) cell centres along an axis (pixels);
  stride: the centres' spacing. Returns (positions (B, size*size, 2) in continuous cell indices
  of the "to" map (row, col), valid (B, size*size)): the point is inside the "to" view and within
  half a cell of its outermost cell centres (the area its cells cover).
  """
  size = len(centres)
  to_from = views_lib.compose_affine(views_lib.invert_affine(affine_to), affine_from)
  p = views_lib.map_points(to_from, jnp.asarray(cell_grid(centres)))  # to-view pixels
  q = (p - float(centres[0])) / stride
  inside_view = jnp.all((p >= 0) & (p <= view_size), -1)
  inside_cells = jnp.all((q >= -0.5) & (q <= size - 0.5), -1)
  return q, inside_view & inside_cells


def sample_cells(features: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
  """Bilinear interpolation of `features` (B, h, w, D) at continuous cell positions (B, P, 2)
  (row, col; cell i at i, clamped to the map), by 4 gathers -> (B, P, D)."""
  b, h, w, d = features.shape
  flat = features.reshape(b, h * w, d)
  r = jnp.clip(positions[..., 0], 0.0, h - 1.0)
  c = jnp.clip(positions[..., 1], 0.0, w - 1.0)
  r0 = jnp.floor(r)
  c0 = jnp.floor(c)
  fr, fc = r - r0, c - c0
  r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)
  r1, c1 = jnp.minimum(r0 + 1, h - 1), jnp.minimum(c0 + 1, w - 1)

  def take(ri, ci):
    return jnp.take_along_axis(flat, (ri * w + ci)[..., None], axis=1)

  return ((1 - fr)[..., None] * ((1 - fc)[..., None] * take(r0, c0) + fc[..., None] * take(r0, c1))
          + fr[..., None] * ((1 - fc)[..., None] * take(r1, c0) + fc[..., None] * take(r1, c1)))


def l2_normalize(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), eps * eps))


def info_nce(queries: jnp.ndarray, keys: jnp.ndarray, valid: jnp.ndarray, temperature: float,
             group: int = 0) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """InfoNCE of L2-normalised queries (B, P, D) against keys (B, P, D) where keys[b, p] is the
  positive of queries[b, p]; only pairs with valid[b, p] are queries or keys.

  Every valid query is scored against every valid key of the tiles of its group of `group`
  consecutive tiles (0: the whole batch). Returns (mean loss over valid queries, positive
  accuracy (argmax is the positive), number of valid queries).
  """
  b, p, d = queries.shape
  g = group or b
  if b % g:
    raise ValueError(f"config objective.negatives_group = {group} must divide the batch of {b}")
  q = queries.reshape(b // g, g * p, d).astype(jnp.float32)
  k = keys.reshape(b // g, g * p, d).astype(jnp.float32)
  v = valid.reshape(b // g, g * p)
  logits = jnp.einsum("gid,gjd->gij", q, k) / temperature
  # Invalid keys take no part. A finite stand-in for -inf: a group without any valid key must
  # still give finite gradients (0 * NaN from an all -inf logsumexp would poison the step).
  logits = jnp.where(v[:, None, :], logits, _MASKED)
  pos = jnp.einsum("gid,gid->gi", q, k) / temperature
  lse = jax.nn.logsumexp(logits, axis=-1)
  per_query = jnp.where(v, lse - pos, 0.0)
  count = jnp.sum(v)
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  # Correct when the positive beats every other valid key (ties count as wrong).
  others = jnp.where(jnp.eye(g * p, dtype=bool)[None], _MASKED, logits)
  hit = v & (pos > jnp.max(others, axis=-1))
  return jnp.sum(per_query) / denom, jnp.sum(hit) / denom, count


def dense_infonce(z1: jnp.ndarray, z2: jnp.ndarray, affine1: jnp.ndarray, affine2: jnp.ndarray,
                  centres: np.ndarray, stride: float, view_size: int, temperature: float,
                  group: int = 0) -> tuple[jnp.ndarray, dict]:
  """The symmetric dense InfoNCE of projected maps z1, z2 (B, h, w, D) of two views with
  view -> tile maps affine1, affine2 (B, 2, 3). Returns (loss, aux metrics)."""
  b, h, w, d = z1.shape
  n1 = l2_normalize(z1.reshape(b, h * w, d))
  n2 = l2_normalize(z2.reshape(b, h * w, d))
  pos12, valid12 = correspondences(affine1, affine2, centres, stride, view_size)
  pos21, valid21 = correspondences(affine2, affine1, centres, stride, view_size)
  k12 = l2_normalize(sample_cells(z2, pos12))  # view 2 at view 1's cells
  k21 = l2_normalize(sample_cells(z1, pos21))
  loss12, acc12, cnt12 = info_nce(n1, k12, valid12, temperature, group)
  loss21, acc21, cnt21 = info_nce(n2, k21, valid21, temperature, group)
  loss = 0.5 * (loss12 + loss21)
  pairs = 0.5 * (cnt12 + cnt21).astype(jnp.float32)
  aux = {"loss/infonce": loss, "accuracy/positive": 0.5 * (acc12 + acc21),
         "pairs/valid": pairs, "pairs/valid_fraction": pairs / (b * h * w)}
  return loss, aux


def make_views(rng: jax.Array, images: jnp.ndarray, *, view_size: int,
               crop_scale: Sequence[float], flip_prob: float, vflip_prob: float,
               gain_std: float, offset_std: float, noise_std: float
               ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Two views of every tile: (views (2, B, s, s, C), affine (2, B, 2, 3))."""
  if view_size <= 0:
    raise ValueError(f"config objective.view_size = {view_size} must be > 0")
  if not (len(crop_scale) == 2 and 0 < crop_scale[0] <= crop_scale[1] <= 1):
    raise ValueError(f"config objective.crop_scale = {tuple(crop_scale)} must be (min, max) "
                     "area fractions with 0 < min <= max <= 1")
  return views_lib.sample_views(rng, images, num_views=2, size=view_size, scale=crop_scale,
                                hflip_prob=flip_prob, vflip_prob=vflip_prob, gain_std=gain_std,
                                offset_std=offset_std, noise_std=noise_std)


def dense_contrastive_loss(model, params, batch: Mapping[str, Any], rng: jax.Array, *,
                           temperature: float = 0.2, view_size: int = 56,
                           crop_scale: Sequence[float] = (0.3, 1.0), flip_prob: float = 0.5,
                           vflip_prob: float = 0.5, gain_std: float = 0.1,
                           offset_std: float = 0.1, noise_std: float = 0.02,
                           negatives_group: int = 0, train: bool = True
                           ) -> tuple[jnp.ndarray, dict]:
  """(loss, aux) of one batch: views from `rng`, one encoder pass over both views, the
  symmetric dense InfoNCE. `model` is a `DenseContrastive`; batch["image"] (B, H, W, C)."""
  if temperature <= 0:
    raise ValueError(f"config objective.temperature = {temperature} must be > 0")
  images = batch["image"]
  b = images.shape[0]
  k_views, k_dp = jax.random.split(rng)
  views, affine = make_views(k_views, images, view_size=view_size, crop_scale=crop_scale,
                             flip_prob=flip_prob, vflip_prob=vflip_prob, gain_std=gain_std,
                             offset_std=offset_std, noise_std=noise_std)
  x = views.reshape(2 * b, *views.shape[2:])  # one pass over both views
  z = model.apply({"params": params}, x, train=train, rngs={"drop_path": k_dp})
  centres, stride, size = model.cell_centres(view_size)
  if size < 1:
    raise ValueError(f"config objective.view_size = {view_size} leaves no feature cells at "
                     f"stage {model.feature_stage}")
  return dense_infonce(z[:b], z[b:], affine[0], affine[1], centres, stride, view_size,
                       temperature, negatives_group)
