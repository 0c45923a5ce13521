"""ConvNeXt V2: variants, parameter counts, FCMAE masking semantics, both stems and geometries."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _trees import noisy_params

from mmearth_jax.models import convnextv2 as cx


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _init(model, size, bands=12, mask_grid=None):
  x = jnp.zeros((1, size, size, bands))
  mask = None if mask_grid is None else jnp.zeros((1, mask_grid, mask_grid))
  return model.init(jax.random.key(0), x, mask)["params"]


@pytest.mark.parametrize("variant,stem,want", [
    ("atto", "mmearth", 3.39e6), ("tiny", "mmearth", 27.9e6)])
def test_parameter_counts_match_the_reference(variant, stem, want):
  model = cx.convnextv2(variant, stem=stem, patch_size=16)
  params = jax.eval_shape(lambda: _init(model, 112))
  n = _count(params)
  assert abs(n - want) / want < 0.005, n


def test_all_variants_build_with_exact_depths_and_dims():
  for name, (depths, dims) in cx.VARIANTS.items():
    model = cx.convnextv2(name, stem="official")
    params = jax.eval_shape(lambda: _init(model, 64, bands=3))
    for i, depth in enumerate(depths):
      blocks = [k for k in params if k.startswith(f"stage_{i}_block_")]
      assert len(blocks) == depth
      assert params[blocks[0]]["dwconv"]["kernel"].shape == (7, 7, dims[i])
      assert params[blocks[0]]["pwconv1"]["kernel"].shape == (dims[i], 4 * dims[i])
  assert cx.VARIANTS["huge"] == ((3, 3, 27, 3), (352, 704, 1408, 2816))


@pytest.mark.parametrize("size,patch,sizes", [(112, 16, [56, 28, 14, 7]), (56, 8, [54, 27, 13, 6])])
def test_feature_map_sizes_of_the_mmearth_stem(size, patch, sizes):
  geoms = cx.stage_geometries(size, "mmearth", patch)
  assert [g.size for g in geoms] == sizes
  model = cx.convnextv2("atto", stem="mmearth", patch_size=patch)
  out = jax.eval_shape(lambda: model.apply({"params": _init(model, size)},
                                           jnp.zeros((1, size, size, 12))))
  assert out.shape == (1, sizes[-1], sizes[-1], 320)


def test_mask_geometry_112_16_is_fcmae_upsampling():
  rng = np.random.default_rng(0)
  pm = jnp.asarray(rng.random((2, 7, 7)) < 0.6, jnp.float32)
  masks = cx.stage_masks(pm, cx.stage_geometries(112, "mmearth", 16), 16)
  for m, scale in zip(masks, (8, 4, 2, 1)):
    want = 1 - jnp.repeat(jnp.repeat(pm, scale, 1), scale, 2)
    np.testing.assert_array_equal(m[..., 0], want)


def test_mask_geometry_56_8_maps_the_7x7_grid_onto_6x6():
  rng = np.random.default_rng(1)
  pm = jnp.asarray(rng.random((2, 7, 7)) < 0.6, jnp.float32)
  masks = cx.stage_masks(pm, cx.stage_geometries(56, "mmearth", 8), 8)
  assert [m.shape[1] for m in masks] == [54, 27, 13, 6]
  # The final position p is centred in patch p: the 6x6 map is the grid's first 6 rows/columns.
  np.testing.assert_array_equal(masks[3][..., 0], 1 - pm[:, :6, :6])
  # Stage 1: cell c of the unpadded conv is centred on pixel c + 1.
  idx = (np.arange(54) + 1) // 8
  np.testing.assert_array_equal(masks[0][..., 0], 1 - pm[:, idx][:, :, idx])


@pytest.mark.parametrize("stem,size,patch,grid", [
    ("mmearth", 112, 16, 7), ("mmearth", 56, 8, 7), ("official", 64, 32, 2)])
def test_masked_pixels_cannot_change_visible_outputs(stem, size, patch, grid):
  model = cx.ConvNeXtV2(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), stem=stem, patch_size=patch)
  # Noise on every leaf (GRN gamma/beta and biases too), so every masking point matters.
  params = noisy_params(model, jnp.zeros((1, size, size, 4)), jnp.zeros((1, grid, grid)),
                        scale=0.2)
  rng = np.random.default_rng(2)
  pm = np.zeros((2, grid, grid), np.float32)
  pm[0, 0, 1] = pm[0, 1, 0] = pm[1, grid - 1, grid - 1] = pm[1, 0, 0] = 1
  pm = jnp.asarray(pm)
  x1 = jnp.asarray(rng.standard_normal((2, size, size, 4)), jnp.float32)
  pixel_masked = 1 - cx.upsample_patch_mask(pm, patch)[:, :size, :size]
  x2 = x1 + pixel_masked * 5.0 * jnp.asarray(rng.standard_normal(x1.shape), jnp.float32)
  apply = jax.jit(model.apply)
  y1 = apply({"params": params}, x1, pm)
  y2 = apply({"params": params}, x2, pm)
  geoms = cx.stage_geometries(size, stem, patch)
  visible = cx.stage_masks(pm, geoms, patch)[3][..., 0] > 0
  assert visible.any() and (~visible).any()
  np.testing.assert_allclose(np.asarray(y1)[visible], np.asarray(y2)[visible], rtol=1e-5, atol=1e-5)
  # Without the mask the same change does reach the visible outputs (the test can fail).
  z1 = apply({"params": params}, x1)
  z2 = apply({"params": params}, x2)
  assert np.abs(np.asarray(z1 - z2)[visible]).max() > 1e-3


# ------------------------------------------------ the reference's sparse pretraining geometry


@pytest.mark.parametrize("size,patch,maps", [(112, 16, [7, 7]), (56, 8, [6, 7])])
def test_sparse_geometry_covers_the_whole_patch_grid(size, patch, maps):
  """The dense geometry leaves a 6x6 map under the 7x7 grid at 56 px / 8 px; the reference's
  sparse pretraining encoder (same-size 3x3 stem conv, unpadded patch stem) gives 7x7."""
  grid = size // patch
  for geometry, want in zip(cx.MASKED_GEOMETRIES, maps):
    model = cx.ConvNeXtV2((1, 1, 1, 1), (8, 8, 8, 8), patch_size=patch,
                          masked_geometry=geometry)
    pm = jnp.zeros((1, grid, grid))
    out = jax.eval_shape(lambda: model.apply({"params": _init(model, size, 4, grid)},
                                             jnp.zeros((1, size, size, 4)), pm))
    assert out.shape[1:3] == (want, want), geometry


@pytest.mark.parametrize("stem,size,patch", [("mmearth", 112, 16), ("mmearth", 56, 8),
                                             ("official", 64, 32)])
def test_sparse_geometry_drops_all_zero_pixels_like_masked_ones(stem, size, patch):
  """MinkowskiEngine's to_sparse keeps only non-zero pixels: a visible patch of all-zero pixels
  is absent like a masked patch, so both inputs give the same output, bit for bit. In the dense
  geometry the stem conv's bias makes it present (the test can fail)."""
  grid = size // patch
  kw = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 24), stem=stem, patch_size=patch)
  sparse = cx.ConvNeXtV2(**kw, masked_geometry="sparse")
  params = noisy_params(sparse, jnp.zeros((1, size, size, 4)), jnp.zeros((1, grid, grid)),
                        scale=0.2)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, size, size, 4)), jnp.float32)
  pm = np.zeros((2, grid, grid), np.float32)
  pm[0, 0, 0] = pm[1, grid - 1, 0] = 1
  i, j = 1, grid - 1  # visible in both images
  zeroed = x.at[:, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch].set(0.0)
  also_masked = jnp.asarray(pm).at[:, i, j].set(1.0)
  got = sparse.apply({"params": params}, zeroed, jnp.asarray(pm))
  want = sparse.apply({"params": params}, x, also_masked)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert np.abs(np.asarray(got)).max() > 0
  dense = cx.ConvNeXtV2(**kw, masked_geometry="dense")
  got = dense.apply({"params": params}, zeroed, jnp.asarray(pm))
  want = dense.apply({"params": params}, x, also_masked)
  assert np.abs(np.asarray(got - want)).max() > 1e-3


@pytest.mark.parametrize("size,patch", [(112, 16), (56, 8)])
def test_sparse_geometry_keeps_masked_pixels_out(size, patch):
  """A masked site is absent: masked pixels' values never reach a visible output."""
  grid = size // patch
  model = cx.ConvNeXtV2((1, 1, 2, 1), (8, 16, 16, 24), patch_size=patch, masked_geometry="sparse")
  params = noisy_params(model, jnp.zeros((1, size, size, 4)), jnp.zeros((1, grid, grid)),
                        scale=0.2)
  rng = np.random.default_rng(4)
  pm = jnp.asarray(rng.random((2, grid, grid)) < 0.5, jnp.float32)
  x1 = jnp.asarray(rng.standard_normal((2, size, size, 4)), jnp.float32)
  masked_px = 1 - cx.upsample_patch_mask(pm, patch)
  x2 = x1 + masked_px * 5.0 * jnp.asarray(rng.standard_normal(x1.shape), jnp.float32)
  y1, y2 = (np.asarray(model.apply({"params": params}, x, pm)) for x in (x1, x2))
  visible = np.asarray(pm) == 0  # the 7x7 output is the patch grid itself
  assert visible.any() and (~visible).any()
  np.testing.assert_allclose(y1[visible], y2[visible], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(y1[~visible], 0.0)


def test_grn_norm_only_counts_visible_positions():
  """Masking inside GRN matters: a model that skips it would leak through the global norm."""
  grn = cx.GRN()
  x = jnp.zeros((1, 4, 4, 3)).at[0, 0, 0].set(1.0).at[0, 3, 3].set(jnp.array([2.0, 0.0, 1.0]))
  params = {"gamma": jnp.ones(3), "beta": jnp.zeros(3)}
  y = grn.apply({"params": params}, x)
  gx = np.sqrt(np.array([1 + 4, 1, 1 + 1]))
  nx = gx / (gx.mean() + 1e-6)
  np.testing.assert_allclose(y[0, 0, 0], np.ones(3) * nx + 1, rtol=1e-6)


def test_grn_gradient_is_finite_for_a_fully_masked_channel():
  """A channel that is zero everywhere (a stage whose every position is masked, e.g. MP-MAE at a
  32 px crop) has norm 0: the gradient must be torch.norm's 0 there, not NaN, and match torch's
  elsewhere."""
  torch = pytest.importorskip("torch")
  from mmearth_jax.interop import torch_convnextv2 as tcx
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
  x[0, :, :, 1] = 0.0  # one channel of one image fully masked
  x[1] = 0.0  # every channel of the other image
  gamma = rng.standard_normal(4).astype(np.float32)
  beta = rng.standard_normal(4).astype(np.float32)
  w = rng.standard_normal(x.shape).astype(np.float32)  # a loss that weighs every output

  def loss(xj, g):
    y = cx.GRN().apply({"params": {"gamma": g, "beta": jnp.asarray(beta)}}, xj)
    return jnp.sum(y * w)

  gx, gg = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(gamma))
  assert np.isfinite(np.asarray(gx)).all() and np.isfinite(np.asarray(gg)).all()

  xt = torch.tensor(x, requires_grad=True)
  gt = torch.tensor(gamma.reshape(1, 1, 1, 4), requires_grad=True)
  yt = tcx.grn(xt, gt, torch.tensor(beta.reshape(1, 1, 1, 4)))
  (yt * torch.tensor(w)).sum().backward()
  np.testing.assert_allclose(np.asarray(gx), xt.grad.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gg), gt.grad.numpy().reshape(4), rtol=1e-5, atol=1e-6)


def test_drop_path_and_classification_head():
  # Two blocks per stage (drop path's rate rises over the blocks), narrow: the same code as atto.
  model = cx.ConvNeXtV2(depths=(2, 2, 2, 2), dims=(8, 16, 24, 32), stem="official",
                        drop_path_rate=0.5, num_classes=10)
  x = jnp.ones((4, 32, 32, 3))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  assert params["head"]["kernel"].shape == (32, 10) and params["norm"]["scale"].shape == (32,)
  logits = jax.jit(lambda p: model.apply({"params": p}, x, method=model.classify))(params)
  assert logits.shape == (4, 10)
  train = jax.jit(lambda p, k: model.apply({"params": p}, x, train=True, rngs={"drop_path": k}))
  a, b = train(params, jax.random.key(1)), train(params, jax.random.key(2))
  infer = jax.jit(lambda p: model.apply({"params": p}, x))
  assert not np.allclose(a, b) and np.isfinite(np.asarray(a)).all()
  np.testing.assert_allclose(infer(params), infer(params), rtol=0)  # no drop path at inference
  feats = jax.jit(lambda p: model.apply({"params": p}, x, method=model.features))(params)
  assert feats.shape == (4, 32)


def test_masked_path_works_for_non_square_inputs():
  model = cx.ConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), stem="mmearth", patch_size=16)
  x = jnp.ones((1, 112, 64, 3))
  pm = jnp.zeros((1, 7, 4)).at[0, 2, 1].set(1)
  params = jax.jit(model.init)(jax.random.key(0), x, pm)
  y = jax.jit(model.apply)(params, x, pm)
  assert y.shape == (1, 7, 4, 32)
  assert float(jnp.abs(y[0, 2, 1]).max()) == 0.0 and float(jnp.abs(y[0, 2, 2]).max()) > 0


@pytest.mark.parametrize("stem,patch", [("official", 16), ("mmearth", 8)])
def test_stage_outputs_are_the_pyramid_the_encoder_computes(stem, patch):
  model = cx.ConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), stem=stem, patch_size=patch)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  params = {"params": noisy_params(model, x)}
  stages = model.apply(params, x, return_stages=True)
  rows = cx.stage_geometries(64, stem, patch)
  assert [s.shape for s in stages] == [(2, g.size, g.size, d) for g, d in zip(rows, model.dims)]
  np.testing.assert_array_equal(stages[-1], model.apply(params, x))


def test_simmim_mask_token_replaces_exactly_the_masked_patches():
  """SimMIM masking (GFM's student): a masked 32 px patch's pixels cannot reach the output except
  through the token; a visible patch's pixels do; no mask changes nothing."""
  model = cx.ConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), stem="official")
  x = jax.random.normal(jax.random.key(0), (1, 64, 64, 3))
  params = {"params": noisy_params(model, x)}
  token = jax.random.normal(jax.random.key(2), (8,))
  mask = jnp.array([[[1.0, 0.0], [0.0, 0.0]]])  # top-left 32 px patch masked
  run = lambda im, m=mask: model.apply(params, im, m, mask_token=token, return_stages=True)[0]
  out = run(x)
  np.testing.assert_allclose(run(x.at[:, :32, :32].add(5.0)), out, atol=1e-6)
  assert float(jnp.abs(run(x.at[:, 32:, 32:].add(5.0)) - out).max()) > 1e-2
  np.testing.assert_allclose(run(x, jnp.zeros((1, 2, 2))), model.apply(params, x,
                                                                       return_stages=True)[0],
                             atol=1e-6)
  with pytest.raises(ValueError, match="patch_mask"):
    model.apply(params, x, mask_token=token)
