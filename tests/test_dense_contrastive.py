"""Dense contrastive pretraining: view sampling and its affine maps, cell correspondences, the
InfoNCE against a plain-torch reference, exclusion of cells outside the overlap, learning on a
fixed batch, both stems, the configs, and a few trainer steps on the built-in sample.

Models are tiny (one narrow block per stage) and images 32-64 px; parameters are drawn in numpy
and every network call is jitted (eager Flax runs op by op). About 90 s on 2 CPU cores shared
with other jobs, mostly XLA compiles; the trainer test alone is about 25 s.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from mmearth_jax import cli, config_lib, methods, metrics, pretrained, train
from mmearth_jax.interop import compare
from mmearth_jax.models.convnextv2 import ConvNeXtV2
from mmearth_jax.models.dense_contrastive import DenseContrastive, init_params
from mmearth_jax.objectives import dense_contrastive as dc
from mmearth_jax.ops import views as V

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "dense_contrastive.py")
torch.set_num_threads(2)

TINY = dict(variant="atto", depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), projector_hidden_dim=32,
            projector_dim=16)


def _centre_value(coef: np.ndarray, pts: np.ndarray) -> np.ndarray:
  """The linear image c0 + c1 * row + c2 * col at continuous points (..., 2) -> (..., C)."""
  return coef[0] + pts[..., :1] * coef[1] + pts[..., 1:] * coef[2]


# ---------------------------------------------------------------------------------- views


def test_view_pixels_equal_the_source_at_their_mapped_points():
  """Bilinear interpolation reproduces a linear image exactly, so every view pixel whose mapped
  point lies between the source's outer pixel centres must equal the image's formula there:
  the returned affine maps and the resampling agree, flips included."""
  h, w, c, size = 40, 36, 3, 24
  rng = np.random.default_rng(0)
  coef = rng.normal(size=(3, c)).astype(np.float32)
  rr, cc = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
  image = _centre_value(coef, np.stack([rr, cc], -1))[None].repeat(6, 0)
  for hflip, vflip in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
    views, affine = V.sample_views(jax.random.key(int(hflip * 2 + vflip)), jnp.asarray(image),
                                   size=size, scale=(0.2, 0.9), hflip_prob=hflip,
                                   vflip_prob=vflip)
    assert views.shape == (2, 6, size, size, c) and affine.shape == (2, 6, 2, 3)
    a = np.asarray(affine)
    assert np.all(np.sign(a[..., 1, 1]) == (-1 if hflip else 1))
    assert np.all(np.sign(a[..., 0, 0]) == (-1 if vflip else 1))
    vr, vc = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    pts = np.stack([vr, vc], -1).reshape(-1, 2)
    for v in range(2):
      src = np.asarray(V.map_points(affine[v], jnp.asarray(pts)))  # (B, P, 2)
      expect = _centre_value(coef, src)
      inner = ((src[..., 0] >= 0.5) & (src[..., 0] <= h - 0.5) &
               (src[..., 1] >= 0.5) & (src[..., 1] <= w - 0.5))
      assert inner.mean() > 0.9
      got = np.asarray(views[v]).reshape(6, -1, c)
      np.testing.assert_allclose(got[inner], expect[inner], atol=2e-4)


def test_integer_crop_and_flips_copy_pixels():
  """A box of side = view size at an integer offset is a plain slice of the tile (a known shift);
  flips reverse it, and pixel (i, j)'s centre maps to the tile's (top + i, left + j) centre."""
  img = jax.random.normal(jax.random.key(0), (2, 20, 20, 4))
  size, top, left = 12, 3.0, 5.0
  ones = jnp.ones((2,))
  for hflip, vflip in ((False, False), (True, False), (False, True)):
    a = V.crop_affine(top * ones, left * ones, size * ones, size, jnp.full((2,), hflip),
                      jnp.full((2,), vflip))
    view = np.asarray(V.resample(img, a, size))
    ref = np.asarray(img)[:, 3:15, 5:17]
    ref = ref[:, :, ::-1] if hflip else ref
    ref = ref[:, ::-1] if vflip else ref
    np.testing.assert_allclose(view, ref, atol=1e-6)
  a = V.crop_affine(top * ones, left * ones, size * ones, size, ones < 0, ones < 0)
  np.testing.assert_allclose(np.asarray(V.map_points(a, jnp.array([[0.5, 0.5], [2.5, 7.5]])))[0],
                             [[3.5, 5.5], [5.5, 12.5]])
  # Jitter off and a full, unflipped box: the view is the tile.
  views, _ = V.sample_views(jax.random.key(1), img, size=20, scale=(1.0, 1.0), hflip_prob=0.0)
  np.testing.assert_allclose(np.asarray(views[0]), np.asarray(img), atol=1e-6)


def test_inverse_and_composition_of_maps():
  a = V.random_crop_affine(jax.random.key(3), 5, 30, 30, 16, hflip_prob=0.5, vflip_prob=0.5)
  ident = V.compose_affine(V.invert_affine(a), a)
  np.testing.assert_allclose(np.asarray(ident), np.broadcast_to(np.eye(2, 3), (5, 2, 3)),
                             atol=1e-5)


# --------------------------------------------------------------------------- correspondences


def _shifted_pair(hflip2: bool = False):
  """Two 32 px views (scale 1) of a 48 px tile: view 1 at (0, 0), view 2 at (4, 8)."""
  one = jnp.ones((1,))
  a1 = V.crop_affine(0 * one, 0 * one, 32 * one, 32, one < 0, one < 0)
  a2 = V.crop_affine(4 * one, 8 * one, 32 * one, 32, jnp.full((1,), hflip2), one < 0)
  return a1, a2


def test_known_shift_gives_the_expected_correspondence():
  """Official stem, stage 1: cells every 4 px with centres 2, 6, ... . View 2 sits 4 px lower
  and 8 px to the right, so view-1 cell (r, c) is view-2 cell (r - 1, c - 2); rows r = 0 and
  columns c < 2 are outside view 2's cells (more than half a cell beyond its first centre)."""
  model = DenseContrastive(stem="official", feature_stage=1, **TINY)
  centres, stride, size = model.cell_centres(32)
  np.testing.assert_allclose(centres, 2 + 4 * np.arange(8))
  assert (stride, size) == (4.0, 8)
  a1, a2 = _shifted_pair()
  pos, valid = dc.correspondences(a1, a2, centres, stride, 32)
  r, c = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
  np.testing.assert_allclose(np.asarray(pos)[0], np.stack([r - 1, c - 2], -1).reshape(-1, 2),
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(valid)[0], ((r >= 1) & (c >= 2)).ravel())
  # View 2 mirrored: tile column x is view-2 column 8 + 32 - x, so cell c -> 7 - (c - 2).
  a1, a2 = _shifted_pair(hflip2=True)
  pos, valid = dc.correspondences(a1, a2, centres, stride, 32)
  np.testing.assert_allclose(np.asarray(pos)[0], np.stack([r - 1, 9 - c], -1).reshape(-1, 2),
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(valid)[0], ((r >= 1) & (c >= 2)).ravel())
  # The reverse direction: view-2 cell (r, c) is view-1 cell (r + 1, c + 2), valid where inside.
  a1, a2 = _shifted_pair()
  pos, valid = dc.correspondences(a2, a1, centres, stride, 32)
  np.testing.assert_array_equal(np.asarray(valid)[0], ((r <= 6) & (c <= 5)).ravel())


def test_cells_outside_the_overlap_are_no_pairs():
  """Features of view-1 cells without a partner, and of view-2 cells no partner's point touches,
  do not change the 1 -> 2 loss; disjoint views give no pairs and a zero loss with finite,
  zero gradients."""
  centres, stride = 2 + 4 * np.arange(8.0), 4.0
  a1, a2 = _shifted_pair()
  pos, valid = dc.correspondences(a1, a2, centres, stride, 32)
  z1 = jax.random.normal(jax.random.key(0), (1, 8, 8, 6))
  z2 = jax.random.normal(jax.random.key(1), (1, 8, 8, 6))

  @jax.jit
  def loss12(z1, z2):
    q = dc.l2_normalize(z1.reshape(1, 64, 6))
    k = dc.l2_normalize(dc.sample_cells(z2, pos))
    return dc.info_nce(q, k, valid, 0.2)

  base, _, count = loss12(z1, z2)
  assert int(count) == 7 * 6
  invalid1 = ~np.asarray(valid)[0].reshape(8, 8)
  z1b = jnp.where(jnp.asarray(invalid1)[None, :, :, None], 100.0, z1)
  # View-2 cells (r, c) with r = 7 or c >= 6 are no partner's point (view-1 cells map to
  # r - 1 <= 6 and c - 2 <= 5).
  far2 = np.zeros((8, 8), bool)
  far2[7, :] = True
  far2[:, 6:] = True
  z2b = jnp.where(jnp.asarray(far2)[None, :, :, None], -50.0, z2)
  np.testing.assert_allclose(float(loss12(z1b, z2b)[0]), float(base), rtol=1e-6)
  # Changing a valid view-1 cell does change it (the test can fail).
  z1c = z1.at[0, 4, 4].set(3.0)
  assert abs(float(loss12(z1c, z2)[0]) - float(base)) > 1e-4
  # Disjoint views: view 2 entirely right of view 1.
  one = jnp.ones((1,))
  far = V.crop_affine(0 * one, 40 * one, 32 * one, 32, one < 0, one < 0)
  (loss, aux), g = jax.jit(jax.value_and_grad(
      lambda z: dc.dense_infonce(z, z2, a1, far, centres, stride, 32, 0.2), has_aux=True))(z1)
  assert float(loss) == 0.0 and float(aux["pairs/valid"]) == 0.0
  assert bool(jnp.all(g == 0))


# ------------------------------------------------------------------------------ InfoNCE parity


def _torch_dense_infonce(z1, z2, pos12, valid12, pos21, valid21, tau, group):
  """Plain torch: grid_sample for the partner embeddings, cross_entropy over valid queries with
  invalid keys masked out, per group of tiles; the mean of both directions."""

  def sample(z, pos):  # z (B, h, w, D), pos (B, P, 2) cell units (row, col)
    b, h, w, _ = z.shape
    r = pos[..., 0].clamp(0, h - 1)
    c = pos[..., 1].clamp(0, w - 1)
    grid = torch.stack([2 * c / (w - 1) - 1, 2 * r / (h - 1) - 1], -1)[:, :, None]  # (x, y)
    out = F.grid_sample(z.permute(0, 3, 1, 2), grid, mode="bilinear", align_corners=True)
    return out[..., 0].permute(0, 2, 1)  # (B, P, D)

  def one_way(za, zb, pos, valid):
    b, h, w, d = za.shape
    q = F.normalize(za.reshape(b, h * w, d), dim=-1)
    k = F.normalize(sample(zb, pos), dim=-1)
    g = group or b
    losses, hits, count = [], 0, 0
    for s in range(0, b, g):
      qg, kg = q[s:s + g].reshape(-1, d), k[s:s + g].reshape(-1, d)
      vg = valid[s:s + g].reshape(-1)
      logits = qg @ kg.T / tau
      logits = logits.masked_fill(~vg[None, :], float("-inf"))
      target = torch.arange(len(qg))
      ce = F.cross_entropy(logits[vg], target[vg], reduction="none")
      losses.append(ce)
      hits += int((logits[vg].argmax(-1) == target[vg]).sum())
      count += int(vg.sum())
    return torch.cat(losses).sum() / count, hits / count

  l12, a12 = one_way(z1, z2, pos12, valid12)
  l21, a21 = one_way(z2, z1, pos21, valid21)
  return 0.5 * (l12 + l21), 0.5 * (a12 + a21)


@pytest.mark.parametrize("group", [0, 2])
def test_infonce_matches_torch_cross_entropy(group):
  """Same features and correspondences (random views with flips): the loss, its gradients and
  the positive accuracy agree with the torch reference."""
  b, s, d, view = 4, 6, 8, 48
  centres, stride = 5 + 8 * np.arange(s, dtype=np.float64), 8.0  # MMEarth stem, patch 8, 48 px
  k0, k1, k2 = jax.random.split(jax.random.key(7), 3)
  z1 = jax.random.normal(k0, (b, s, s, d))
  z2 = z1 + 0.7 * jax.random.normal(k1, (b, s, s, d))  # related, so accuracy is non-trivial
  a = jnp.stack([V.random_crop_affine(k, b, 64, 64, view, scale=(0.3, 1.0), hflip_prob=0.5,
                                      vflip_prob=0.5) for k in jax.random.split(k2)])
  fn = lambda z1, z2: dc.dense_infonce(z1, z2, a[0], a[1], centres, stride, view, 0.2, group)
  (loss, aux), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(z1, z2)
  pos12, valid12 = dc.correspondences(a[0], a[1], centres, stride, view)
  pos21, valid21 = dc.correspondences(a[1], a[0], centres, stride, view)
  assert 0 < int(valid12.sum()) < b * s * s  # some cells pair up, some fall outside
  t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)
  tz1, tz2 = t(z1).requires_grad_(), t(z2).requires_grad_()
  ref, ref_acc = _torch_dense_infonce(tz1, tz2, t(pos12), torch.tensor(np.asarray(valid12)),
                                      t(pos21), torch.tensor(np.asarray(valid21)), 0.2, group)
  ref.backward()
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
  np.testing.assert_allclose(float(aux["accuracy/positive"]), ref_acc, atol=1e-6)
  assert 0.0 < ref_acc < 1.0
  np.testing.assert_allclose(np.asarray(grads[0]), tz1.grad.numpy(), atol=2e-6)
  np.testing.assert_allclose(np.asarray(grads[1]), tz2.grad.numpy(), atol=2e-6)
  np.testing.assert_allclose(float(aux["pairs/valid"]),
                             0.5 * (int(valid12.sum()) + int(valid21.sum())))


# ------------------------------------------------------------------------- model and learning


def _images(n=4, size=32, c=5, seed=0):
  """Spatially smooth random tiles (blocks of 4 px), so nearby cells are alike as in real data."""
  x = jax.random.normal(jax.random.key(seed), (n, size // 4, size // 4, c))
  return jnp.repeat(jnp.repeat(x, 4, 1), 4, 2)


def _params(model, images, seed=0):
  """Random parameters of the model's shapes, drawn in numpy (compiling Flax's init with its
  truncated-normal draws costs ~10 s on 2 busy cores): kernels N(0, 0.02^2) as the reference's
  init, LayerNorm scales 1, biases and GRN gamma / beta 0."""
  shapes = jax.eval_shape(lambda r, x: init_params(model, r, x), jax.random.key(0), images[:1])
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "scale":
      return jnp.ones(s.shape, s.dtype)
    if name in ("bias", "gamma", "beta"):
      return jnp.zeros(s.shape, s.dtype)
    return jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


NO_AUG = dict(crop_scale=(1.0, 1.0), flip_prob=0.0, vflip_prob=0.0, gain_std=0.0,
              offset_std=0.0, noise_std=0.0)


def test_identical_views_match_every_cell():
  """Without augmentation the two views are the tile, every cell pairs with itself and its
  partner embedding is exactly its own: perfect positive accuracy, and the loss equals the
  InfoNCE of the embeddings against themselves."""
  model = DenseContrastive(stem="mmearth", patch_size=8, feature_stage=3, **TINY)
  images = jax.random.normal(jax.random.key(0), (3, 32, 32, 5))
  centres, stride, size = model.cell_centres(32)

  @jax.jit
  def run(params, images):
    views, affine = dc.make_views(jax.random.key(2), images, view_size=32, **NO_AUG)
    z = model.apply({"params": params}, views[1])
    return views, z, dc.dense_infonce(z, z, affine[0], affine[1], centres, stride, 32, 0.2)

  views, z, (loss, aux) = run(_params(model, images), images)
  np.testing.assert_allclose(np.asarray(views), np.asarray(images)[None].repeat(2, 0), atol=1e-6)
  assert z.shape[1:3] == (size, size) == (7, 7)
  assert float(aux["pairs/valid"]) == 3 * size * size
  assert float(aux["accuracy/positive"]) == 1.0
  n = dc.l2_normalize(z.reshape(1, -1, z.shape[-1]))
  logits = np.asarray(n[0] @ n[0].T, np.float64) / 0.2
  ref = np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits))
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_loss_falls_with_a_few_steps_on_a_fixed_batch():
  """Augmented views (crops, flips, jitter), one fixed batch and view draw: 20 Adam steps cut the
  loss well below its start (chance level: log of the number of pairs) and raise the positive
  accuracy."""
  model = DenseContrastive(stem="mmearth", patch_size=8, feature_stage=3, **TINY)
  images = _images()
  params = _params(model, images)
  kw = dict(temperature=0.2, view_size=32, crop_scale=(0.4, 1.0), flip_prob=0.5, vflip_prob=0.5,
            gain_std=0.1, offset_std=0.1, noise_std=0.02)
  fn = jax.jit(jax.value_and_grad(
      lambda p: dc.dense_contrastive_loss(model, p, {"image": images}, jax.random.key(5), **kw),
      has_aux=True))
  tx = optax.adam(2e-2)
  opt = tx.init(params)
  (first, aux0), g0 = fn(params)
  # Gradients reach MMEarth's stem (the 3x3 conv first) and the projector.
  for part in (g0["encoder"]["initial_conv"], g0["encoder"]["stem_conv"], g0["projector"]):
    assert 0 < float(optax.tree.norm(part)) < np.inf
  for _ in range(20):
    (loss, aux), g = fn(params)
    updates, opt = tx.update(g, opt)
    params = optax.apply_updates(params, updates)
  (last, aux1), _ = fn(params)
  assert float(aux0["pairs/valid"]) > 0
  assert float(first) > 0.9 * np.log(float(aux0["pairs/valid"]))  # starts near chance
  assert float(last) < 0.75 * float(first), (float(first), float(last))
  assert float(aux1["accuracy/positive"]) > float(aux0["accuracy/positive"]) + 0.2


@pytest.mark.parametrize("stem", ["mmearth", "official"])
def test_encoder_params_are_a_convnextv2s(stem):
  """The `encoder` subtree is exactly a ConvNeXtV2's (what evaluation, export and init_from read)."""
  model = DenseContrastive(stem=stem, patch_size=16, **TINY)
  x = jnp.zeros((1, 64, 64, 5))
  shapes = lambda t: jax.tree.map(lambda a: a.shape, t)
  enc = jax.eval_shape(ConvNeXtV2(TINY["depths"], TINY["dims"], stem, 16).init,
                       jax.random.key(0), x)["params"]
  ours = jax.eval_shape(lambda r: init_params(model, r, x), jax.random.key(0))
  assert shapes(enc) == shapes(ours["encoder"]) and set(ours) == {"encoder", "projector"}


def test_finite_loss_and_gradients_through_the_official_stem():
  """The official 4x4/4 stem, stage-2 cells (stride 8: 4x4 cells of a 32 px view), drop-path
  on: finite loss, gradients in the stem, the stage's blocks and the projector."""
  model = DenseContrastive(stem="official", drop_path_rate=0.1, feature_stage=2, **TINY)
  images = _images(seed=1)
  params = _params(model, images)
  (loss, aux), g = jax.jit(jax.value_and_grad(
      lambda p: dc.dense_contrastive_loss(model, p, {"image": images}, jax.random.key(3),
                                          view_size=32), has_aux=True))(params)
  assert np.isfinite(float(loss)) and float(aux["pairs/valid"]) > 0
  for part in (g["encoder"]["stem_conv"], g["encoder"]["stage_1_block_0"], g["projector"]):
    assert 0 < float(optax.tree.norm(part)) < np.inf


# -------------------------------------------------------------------------- configs, trainer


def test_every_variant_loads_and_builds():
  for model in ("atto", "tiny"):
    for data, view, patch, crop in (("", 112, 16, 128), ("64", 56, 8, 64), ("100k", 112, 16, 128)):
      cfg = config_lib.load(f"{CONFIG}:{model}{data}")
      assert cfg.method == "dense_contrastive" and cfg.model.variant == model
      assert (cfg.objective.view_size, cfg.model.patch_size, cfg.data.crop) == (view, patch, crop)
      m = methods.get("dense_contrastive").model_from_config(cfg)
      _, _, cells = m.cell_centres(view)
      assert cells in (6, 7)
      assert cfg.data.global_batch_size % cfg.objective.negatives_group == 0
  demo = config_lib.load(f"{CONFIG}:demo")
  spec = pretrained.spec_from_config(demo)
  assert spec["arch"] == "dense_contrastive" and spec["encoder"]["arch"] == "convnextv2"
  built = pretrained.build(spec)
  direct = methods.get("dense_contrastive").model_from_config(demo)
  x = jnp.zeros((1, 56, 56, 12))
  shapes = lambda m: jax.tree.map(lambda a: a.shape,
                                  jax.eval_shape(lambda r: init_params(m, r, x), jax.random.key(0)))
  assert shapes(built) == shapes(direct)
  assert (built.stem, built.patch_size, built.feature_stage) == ("mmearth", 8, 4)
  assert demo.data.global_batch_size <= 16 and demo.eval.dataset == "mmearth:data/demo/shards"
  assert set(dc.objective_kwargs(demo.objective)) == set(dc.LOSS_FIELDS)
  with pytest.raises(config_lib.ConfigError, match="unknown variant"):
    config_lib.load(f"{CONFIG}:pico")
  bad = config_lib.load(f"{CONFIG}:demo", ["objective.feature_stage=5"])
  with pytest.raises(ValueError, match="objective.feature_stage"):
    methods.get("dense_contrastive").model_from_config(bad)
  with pytest.raises(ValueError, match="objective.negatives_group"):
    dc.info_nce(jnp.zeros((3, 2, 4)), jnp.zeros((3, 2, 4)), jnp.ones((3, 2), bool), 0.2, 2)
  with pytest.raises(ValueError, match="objective.crop_scale"):
    dc.make_views(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), view_size=8, crop_scale=(0.5, 2.0),
                  flip_prob=0, vflip_prob=0, gain_std=0, offset_std=0, noise_std=0)


def test_trains_through_the_trainer_on_the_sample(shards64, tmp_path):
  overrides = [f"data.path={shards64}", "model.depths=(1, 1, 1, 1)", "model.dims=(8, 16, 16, 16)",
               "objective.projector_hidden_dim=32", "objective.projector_dim=16",
               "objective.view_size=48", "objective.feature_stage=3", "data.global_batch_size=8", "data.read_threads=2",
               "train.num_steps=3", "train.log_every=1", "checkpoint.every_steps=3",
               "optimizer.warmup_steps=1", "eval.every_steps=0", "mesh.num_devices=1"]
  cfg = config_lib.load(f"{CONFIG}:demo", overrides)
  train.train(cfg, str(tmp_path), log=lambda m: None)
  rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert sorted(rows) == [1, 2, 3]
  for r in rows.values():
    assert np.isfinite(r["loss"]) and r["pairs/valid"] > 0 and 0 <= r["accuracy/positive"] <= 1
  # The run loads as a pretrained model whose encoder is a plain ConvNeXt V2, and exports to
  # PyTorch in MMEarth's layout with the same embedding.
  model = pretrained.load(str(tmp_path))
  assert model.spec["arch"] == "dense_contrastive"
  assert pretrained.encoder_spec(model.spec)["arch"] == "convnextv2"
  out = tmp_path / "encoder.pth"
  assert cli.main(["to-torch", "--checkpoint", str(tmp_path), "--layout", "mmearth",
                   "--out", str(out)]) == 0
  images = np.random.default_rng(0).standard_normal((2, 56, 56, 12)).astype(np.float32)
  enc = pretrained.encoder_spec(model.spec)
  ours = pretrained.features_fn(enc)(pretrained.encoder_params(model.spec, model.params), images)
  np.testing.assert_allclose(compare.torch_features(enc, str(out), "mmearth", images),
                             np.asarray(ours), atol=2e-5, rtol=1e-4)
