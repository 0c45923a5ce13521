"""Scale-MAE: the GSD position encoding, the model's shapes and GSD use, the Laplacian loss, and
multi-scale kNN."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmearth_jax import pretrained
from mmearth_jax.eval import datasets, evaluate
from mmearth_jax.models import posenc
from mmearth_jax.models.scale_mae import ScaleMAE
from mmearth_jax.objectives import scale_mae as obj
from mmearth_jax.ops import resize as resize_ops


def reference_posenc(embed_dim, grid, res):
  """Scale-MAE's `get_2d_sincos_pos_embed_with_resolution` (square grid, per-sample res), written
  out in torch from the paper's code description: grid coordinates times res, MAE's layout."""
  g = torch.arange(grid, dtype=torch.float32)
  mesh = torch.stack(torch.meshgrid(g, g, indexing="xy"), 0)  # 2 x h x w: (column, row)
  mesh = torch.einsum("chw,n->cnhw", mesh, torch.as_tensor(res, dtype=torch.float32))

  def one_d(dim, pos):
    omega = torch.arange(dim // 2, dtype=torch.float32) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = torch.einsum("m,d->md", pos.reshape(-1), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

  emb = torch.cat([one_d(embed_dim // 2, mesh[0]), one_d(embed_dim // 2, mesh[1])], dim=1)
  return emb.reshape(len(res), grid * grid, embed_dim).numpy()


def formula(embed_dim, grid_h, grid_w, r):
  """The encoding by the formula, float64: token (i, j) -> [sin(r j w), cos(r j w), sin(r i w),
  cos(r i w)] with w_k = 10000^(-k / (D/4))."""
  q = embed_dim // 4
  w = 10000.0 ** (-np.arange(q) / q)
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  x = r * cols.reshape(-1, 1) * w
  y = r * rows.reshape(-1, 1) * w
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)


@pytest.mark.parametrize("gsd", [0.3, 1.0, 2.5, 7.25])
def test_posenc_equals_the_reference_formula(gsd):
  ours = np.asarray(posenc.sincos_2d(64, 6, 6, scale=jnp.array([gsd])))[0]
  np.testing.assert_allclose(ours, formula(64, 6, 6, gsd), atol=2e-5)
  np.testing.assert_allclose(ours, reference_posenc(64, 6, [gsd])[0], atol=2e-5)
  # A Python number is folded in at trace time (float64) and gives the same table.
  np.testing.assert_allclose(np.asarray(posenc.sincos_2d(64, 6, 6, scale=gsd)), ours, atol=2e-5)


def test_posenc_per_sample_and_any_grid():
  gsds = np.array([0.5, 1.0, 3.0], np.float32)
  ours = np.asarray(posenc.sincos_2d(32, 5, 5, scale=jnp.asarray(gsds)))
  np.testing.assert_allclose(ours, reference_posenc(32, 5, gsds), atol=2e-5)
  # Non-square grids (any input size) follow the same formula.
  rect = np.asarray(posenc.sincos_2d(32, 3, 7, scale=jnp.asarray(gsds)))
  for k, r in enumerate(gsds):
    np.testing.assert_allclose(rect[k], formula(32, 3, 7, r), atol=2e-5)


def test_changing_gsd_scales_the_grid_exactly():
  """Doubling the GSD gives, at token (i, j), the encoding of token (2i, 2j) at the old GSD: the
  encoding measures ground distance, not pixels."""
  fine = np.asarray(posenc.sincos_2d(64, 8, 8, scale=jnp.array([1.5])))[0].reshape(8, 8, 64)
  coarse = np.asarray(posenc.sincos_2d(64, 4, 4, scale=jnp.array([3.0])))[0].reshape(4, 4, 64)
  np.testing.assert_allclose(coarse, fine[::2, ::2], atol=3e-5)
  # ...and a different GSD is a different encoding (beyond the origin token).
  other = np.asarray(posenc.sincos_2d(64, 4, 4, scale=jnp.array([2.0])))[0].reshape(4, 4, 64)
  assert np.abs(other - coarse)[1:, 1:].min(axis=-1).max() > 0
  assert np.abs(other - coarse).reshape(16, 64)[1:].max(axis=-1).min() > 1e-2
  # Scale 1 is MAE's fixed table.
  np.testing.assert_allclose(np.asarray(posenc.sincos_2d(64, 4, 4, scale=jnp.array([1.0])))[0],
                             np.asarray(posenc.sincos_2d(64, 4, 4)), atol=1e-6)


def test_paper_variant_is_a_channel_permutation():
  code = np.asarray(posenc.sincos_2d(32, 4, 4, scale=2.0))
  paper = np.asarray(posenc.sincos_2d(32, 4, 4, scale=2.0, layout="interleave"))
  np.testing.assert_array_equal(paper, code[:, posenc.interleave_order(32)])
  # Eq. 1 as printed: within the column half, channel 2k is sin and 2k + 1 is cos.
  w = 10000.0 ** (-np.arange(8) / 8)
  col = 2.0 * (np.arange(16) % 4)
  np.testing.assert_allclose(paper[:, 0:16:2], np.sin(col[:, None] * w), atol=1e-6)
  np.testing.assert_allclose(paper[:, 1:16:2], np.cos(col[:, None] * w), atol=1e-6)


def small_model(**kw):
  base = dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
              decoder_depth=1, decoder_num_heads=4, fcn_dim=32, fcn_layers=1)
  return ScaleMAE(**{**base, **kw})


@pytest.mark.parametrize("patch,size", [(8, 32), (16, 64)])
def test_heads_output_twice_and_once_the_input_resolution(patch, size):
  model = small_model(patch_size=patch)
  x = jnp.ones((2, size, size, 5))
  # Jitted: the values of an eager call, without compiling each operation on its own.
  v = jax.jit(model.init)({"params": jax.random.key(0), "masking": jax.random.key(1)}, x,
                          jnp.ones(2))
  high, low, mask = jax.jit(model.apply)(v, x, jnp.array([1.0, 2.0]),
                                         rngs={"masking": jax.random.key(2)})
  assert high.shape == (2, 2 * size, 2 * size, 5) and low.shape == (2, size, size, 5)
  length = (size // patch) ** 2
  assert mask.shape == (2, length)
  np.testing.assert_array_equal(np.asarray(mask.sum(1)), length - int(length * 0.25))


def test_patch_not_divisible_by_4_is_a_clear_error():
  model = small_model(patch_size=6)
  with pytest.raises(ValueError, match="divisible by 4"):
    model.init({"params": jax.random.key(0), "masking": jax.random.key(1)},
               jnp.ones((1, 24, 24, 3)), jnp.ones(1))


def test_the_model_uses_each_samples_gsd():
  model = small_model()
  x = jnp.tile(jax.random.normal(jax.random.key(3), (1, 32, 32, 3)), (3, 1, 1, 1))
  v = jax.jit(model.init)({"params": jax.random.key(0), "masking": jax.random.key(1)}, x,
                          jnp.ones(3))
  ids = jnp.tile(jnp.arange(4)[None], (3, 1))  # the same kept patches for every sample
  high, low, _ = jax.jit(model.apply)(v, x, jnp.array([1.0, 1.0, 4.0]), ids_keep=ids)
  np.testing.assert_allclose(np.asarray(high[0]), np.asarray(high[1]), atol=1e-6)
  assert float(jnp.abs(high[2] - high[0]).max()) > 1e-3
  # absolute_scale (the reference's ablation) ignores the GSD.
  flat = small_model(absolute_scale=True)
  h2, _, _ = jax.jit(flat.apply)(v, x, jnp.array([1.0, 1.0, 4.0]), ids_keep=ids)
  np.testing.assert_allclose(np.asarray(h2[2]), np.asarray(h2[0]), atol=1e-6)


def test_laplacian_targets():
  rng = np.random.default_rng(0)
  target = jnp.asarray(rng.standard_normal((2, 64, 64, 3)), jnp.float32)
  high, low = obj.laplacian_targets(target, (64, 64), (32, 32), band_config=(4, 32))
  blur = resize_ops.resize(resize_ops.resize(np.asarray(target), (4, 4), "area"), (64, 64),
                           "bilinear")
  np.testing.assert_allclose(np.asarray(high) + blur, np.asarray(target), atol=1e-5)
  np.testing.assert_allclose(np.asarray(low),
                             np.asarray(target).reshape(2, 32, 2, 32, 2, 3).mean((2, 4)),
                             atol=1e-5)
  # A smooth (constant) image has no high band.
  flat, _ = obj.laplacian_targets(jnp.ones((1, 64, 64, 3)), (64, 64), (32, 32), (4, 32))
  np.testing.assert_allclose(np.asarray(flat), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="target_size"):
    obj.laplacian_targets(target, (128, 128), (32, 32))


def test_loss_counts_only_masked_patches():
  rng = np.random.default_rng(1)
  target = jnp.asarray(rng.standard_normal((1, 64, 64, 3)), jnp.float32)
  mask = jnp.asarray([[1, 0, 0, 1]], jnp.float32)  # 2x2 grid: patches 0 and 3 removed
  t_high, t_low = obj.laplacian_targets(target, (64, 64), (32, 32), (4, 32))
  kw = dict(band_config=(4, 32))
  total, terms = obj.scale_mae_loss_terms(t_high, t_low, target, mask, (2, 2), **kw)
  assert float(total) < 1e-9
  # Errors in kept patches (top-right quadrant) cost nothing; in removed ones they do.
  bumped = t_low.at[:, :16, 16:].add(1.0)
  assert float(obj.scale_mae_loss_terms(t_high, bumped, target, mask, (2, 2), **kw)[0]) < 1e-9
  bumped = t_low.at[:, :16, :16].add(1.0)
  _, terms = obj.scale_mae_loss_terms(t_high, bumped, target, mask, (2, 2), **kw)
  # The code's normalisation: channel SUM over masked pixels / masked pixel count = 3 * 1 / 2.
  np.testing.assert_allclose(float(terms["low"]), 3.0 / 2, rtol=1e-5)
  high_err = t_high.at[:, :32, :32].add(-2.0)
  l2 = obj.scale_mae_loss_terms(high_err, t_low, target, mask, (2, 2), **kw)[1]["high"]
  l1 = obj.scale_mae_loss_terms(high_err, t_low, target, mask, (2, 2), high_loss="l1",
                                l1_weight=0.5, **kw)[1]["high"]
  np.testing.assert_allclose([float(l2), float(l1)], [3 * 4.0 / 2, 3 * 2.0 * 0.5 / 2], rtol=1e-5)
  with pytest.raises(ValueError, match="high_loss"):
    obj.scale_mae_loss_terms(t_high, t_low, target, mask, (2, 2), high_loss="huber")


def _spec():
  return {"arch": "scale_mae", "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2,
          "mlp_ratio": 4.0, "in_chans": 3, "img_size": 32, "bands": ["B4", "B3", "B2"],
          "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2, "fcn_dim": 16,
          "fcn_layers": 1, "independent_fcn_head": True, "progressive": False, "out_chans": 3,
          "pos_layout": "concat"}


def test_multiscale_knn_reports_each_scale_and_the_mean():
  spec = _spec()
  model = pretrained.build(spec)
  params = jax.jit(model.init)({"params": jax.random.key(0), "masking": jax.random.key(1)},
                      jnp.ones((1, 32, 32, 3)), jnp.ones(1))["params"]
  rng = np.random.default_rng(0)
  labels = (np.arange(40) // 2) % 4  # both halves of the even/odd split hold every class
  # Each class is a coarse 4x4 pattern (it survives downscaling) plus a little noise.
  patterns = resize_ops.resize(rng.standard_normal((4, 4, 4, 3)).astype(np.float32), (64, 64),
                               "nearest")
  images = patterns[labels] + 0.05 * rng.standard_normal((40, 64, 64, 3)).astype(np.float32)
  data = lambda idx: datasets.EvalData(images=images[idx], labels=labels[idx], num_classes=4,
                                       multilabel=False, class_names=None, name="toy",
                                       mapping=None)
  train, test = data(np.arange(0, 40, 2)), data(np.arange(1, 40, 2))
  result = evaluate.evaluate(spec, params, train, test, evaluators=("knn",), ks=(5,),
                             scales=(0.125, 0.25, 0.5, 1.0), gsd=1.0)
  for pct in ("12.5", "25", "50", "100"):
    assert 0.0 <= result[f"knn_top1_k5@{pct}%"] <= 1.0
  per = [result[f"knn_top1_k5@{p}%"] for p in ("12.5", "25", "50", "100")]
  np.testing.assert_allclose(result["knn_top1_k5@mean"], np.mean(per), rtol=1e-6)
  # Every scale keeps the class patterns, so kNN is right at every scale.
  assert min(per) == 1.0


def test_multiscale_features_use_the_matching_gsd():
  """At fraction f the encoder sees the area-resized images and GSD gsd / f."""
  spec = _spec()
  enc_spec = pretrained.encoder_spec(spec)
  enc = pretrained.build(enc_spec)
  params = jax.jit(enc.init)(jax.random.key(0), jnp.ones((1, 32, 32, 3)))["params"]
  images = np.random.default_rng(2).standard_normal((4, 64, 64, 3)).astype(np.float32)
  small = resize_ops.resize(images, (16, 16), "area")
  want = pretrained.features_fn(enc_spec, gsd=2.0 * 4)(params, small)
  other = pretrained.features_fn(enc_spec, gsd=2.0)(params, small)
  assert evaluate.scaled_size(64, 0.25, 8) == 16
  assert float(jnp.abs(want - other).max()) > 1e-4  # the GSD matters to the features
  from mmearth_jax.eval import features
  data = datasets.EvalData(images=images, labels=np.zeros(4, int), num_classes=2,
                           multilabel=False, class_names=None, name="toy", mapping=None)
  resized = evaluate._resized(data, 16)
  got = features.extract(pretrained.features_fn(enc_spec, gsd=2.0 * 64 / 16), params,
                         resized.images)
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)
  assert evaluate.scaled_size(224, 0.125, 16) == 32  # 28 px rounds to whole patches
