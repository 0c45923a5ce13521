"""MP-MAE: heads from the registry, losses on a hand-checkable batch, ablations, training."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmearth_jax import modalities as M
from mmearth_jax.data import pipeline
from mmearth_jax.models.mp_mae import MPMAE, random_patch_mask
from mmearth_jax.objectives import mp_mae as L


def test_patchify_orders_row_column_channel():
  x = jnp.arange(1 * 4 * 4 * 2).reshape(1, 4, 4, 2)  # value = (r * 4 + c) * 2 + ch
  t = L.patchify(x, 2)
  assert t.shape == (1, 4, 8)
  # Patch 1 is rows 0-1, columns 2-3: (r0,c2,ch0), (r0,c2,ch1), (r0,c3,ch0), ..., (r1,c3,ch1).
  np.testing.assert_array_equal(t[0, 1], [4, 5, 6, 7, 12, 13, 14, 15])


def test_pixel_loss_by_hand():
  # One 4x4 single-band image, 2x2 patches: [[p0, p1], [p2, p3]]; p0 and p2 masked.
  img = np.zeros((1, 4, 4, 1), np.float32)
  img[0, :2, :2, 0] = [[1, 2], [3, 4]]  # p0
  img[0, :2, 2:, 0] = 9  # p1, visible: never counted
  img[0, 2:, :2, 0] = [[2, 2], [2, 6]]  # p2
  mask = jnp.array([[1.0, 0.0, 1.0, 0.0]])
  pred = jnp.zeros((1, 4, 4))
  valid = jnp.ones_like(img, bool)
  plain = L.pixel_regression_loss(pred, img, valid, mask, 2)
  assert float(plain) == pytest.approx(((1 + 4 + 9 + 16) / 4 + (4 + 4 + 4 + 36) / 4) / 2)
  # norm_pix: per-patch mean and UNBIASED variance (n - 1), eps 1e-6 under the root.
  normed = L.pixel_regression_loss(pred, img, valid, mask, 2, norm_pix=True)
  p0 = np.array([1, 2, 3, 4.0]); p2 = np.array([2, 2, 2, 6.0])
  want = np.mean([np.mean(((p - p.mean()) / np.sqrt(p.var(ddof=1) + 1e-6)) ** 2) for p in (p0, p2)])
  assert float(normed) == pytest.approx(want, rel=1e-6)
  # A masked patch with exactly zero loss is left out of the denominator.
  perfect = jnp.asarray(L.patchify(jnp.asarray(img), 2)).at[0, 0].set(0.0)
  assert float(L.pixel_regression_loss(perfect, img, valid, mask, 2)) == pytest.approx(
      (1 + 4 + 9 + 16) / 4)
  # Missing values are 0, as the reference; valid_pixels averages the measured entries only.
  valid2 = valid.at[0, 0, 0, 0].set(False)
  img2 = img.copy(); img2[0, 0, 0, 0] = 0
  ref = L.pixel_regression_loss(pred, img2, valid2, mask, 2)
  assert float(ref) == pytest.approx(((0 + 4 + 9 + 16) / 4 + 12) / 2)
  only = L.pixel_regression_loss(pred, img2, valid2, mask, 2, valid_pixels=True)
  assert float(only) == pytest.approx(((4 + 9 + 16) / 3 + 12) / 2)


def test_segmentation_loss_by_hand():
  labels = np.full((1, 4, 4), -1, np.int32)
  labels[0, 0, 0], labels[0, 1, 1] = 2, 0  # in masked patch 0
  labels[0, 0, 2] = 1  # in visible patch 1: ignored
  mask = jnp.array([[1.0, 0.0, 1.0, 0.0]])
  rng = np.random.default_rng(0)
  pred = rng.standard_normal((1, 4, 2 * 2 * 3)).astype(np.float32)
  got = L.segmentation_loss(jnp.asarray(pred), jnp.asarray(labels), mask, 2)
  logits = pred.reshape(1, 4, 4, 3)  # (N, L, p*p, K): pixel (r, c) of a patch is index r*2 + c
  def ce(z, k):
    return -(z[k] - np.log(np.exp(z).sum()))
  want = (ce(logits[0, 0, 0], 2) + ce(logits[0, 0, 3], 0)) / 2
  assert float(got) == pytest.approx(want, rel=1e-6)


def test_image_losses_and_uncertainty_weighting_by_hand():
  pred = jnp.array([[1.0, 2.0], [0.0, 0.0]])
  tgt = jnp.array([[0.0, 0.0], [3.0, 0.0]])
  valid = jnp.array([[True, True], [False, True]])
  assert float(L.image_regression_loss(pred, tgt, valid)) == pytest.approx((1 + 4 + 0) / 3)
  logits = jnp.array([[0.0, math.log(3.0)], [5.0, 0.0]])
  got = L.classification_loss(logits, jnp.array([1, -1]))
  assert float(got) == pytest.approx(-math.log(3 / 4))
  losses = {"a": jnp.array(2.0), "b": jnp.array(0.0), "c": jnp.array(1.0)}
  s = jnp.array([0.5, 0.3, -0.2])
  want = math.exp(-0.5) * 2 + 0.5 + math.exp(0.2) * 1 - 0.2  # "b" is exactly 0: left out
  assert float(L.aggregate(losses, s)) == pytest.approx(want, rel=1e-6)
  assert float(L.aggregate(losses, s, "unweighted")) == pytest.approx(3.0)
  with pytest.raises(ValueError, match="unknown loss aggregation"):
    L.aggregate(losses, s, "mean")


def test_random_patch_mask_keeps_19_of_49():
  m = random_patch_mask(jax.random.key(0), 5, 7, 0.6)
  assert m.shape == (5, 7, 7)
  np.testing.assert_array_equal(m.reshape(5, -1).sum(1), 30)


@pytest.mark.parametrize("preset", ["all", "s2_only", "rgb_only", "pixel_only", "image_only"])
def test_heads_follow_the_registry_for_each_ablation(preset):
  outputs = M.output_preset(preset)
  model = MPMAE(outputs, patch_size=8)
  x = jnp.zeros((2, 56, 56, 12))
  pm = jnp.zeros((2, 7, 7))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, pm))
  preds = jax.eval_shape(model.apply, variables, x, pm)
  assert set(preds) == set(outputs)
  assert variables["params"]["log_vars"].shape == (len(outputs),)
  for name, bands in outputs.items():
    m = M.get(name)
    width = m.num_classes if m.task != M.REGRESSION else len(bands)
    want = (2, 49, 64 * width) if m.level == M.PIXEL else (2, width)
    assert preds[name].shape == want, name
  # One decoder block, shared: its parameters exist once whatever the number of outputs.
  assert sum(1 for k in variables["params"] if k.startswith("decoder")) == 1


def test_losses_fall_when_training_on_the_built_in_sample(shards64):
  """A few hundred AdamW steps on 48 tiles: every modality's loss and the total fall.

  A reduced ConvNeXt V2 (same code as atto, fewer and narrower blocks) keeps this under a minute.
  """
  cfg = pipeline.default_config()
  cfg.path = shards64
  cfg.global_batch_size = 8
  it = iter(pipeline.make_dataset(cfg, process_index=0, process_count=1))
  batches = [next(it) for _ in range(6)]
  it.close()
  batches = [jax.tree.map(jnp.asarray, b) for b in batches]
  model = MPMAE(M.output_preset("all"), depths=(1, 1, 2, 1), dims=(24, 48, 96, 192),
                decoder_dim=128, patch_size=8)
  # Jitted: the same values as an eager init, without compiling each of its operations alone.
  params = jax.jit(model.init)(jax.random.key(0), batches[0]["image"],
                               jnp.zeros((8, 7, 7)))["params"]
  tx = optax.adamw(2e-3, b1=0.9, b2=0.95, weight_decay=0.05)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch, key):
    (total, losses), grads = jax.value_and_grad(
        lambda p: L.mp_mae_loss(model, p, batch, key), has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, total, losses

  eval_loss = jax.jit(lambda p, b, k: L.mp_mae_loss(model, p, b, k, train=False))

  def evaluate(params):
    out = [eval_loss(params, b, jax.random.key(100 + i)) for i, b in enumerate(batches)]
    return (np.mean([float(t) for t, _ in out]),
            {k: np.mean([float(l[k]) for _, l in out]) for k in out[0][1]})

  total0, per0 = evaluate(params)
  key = jax.random.key(1)
  for i in range(300):
    key, sub = jax.random.split(key)
    params, opt, total, _ = step(params, opt, batches[i % len(batches)], sub)
  total1, per1 = evaluate(params)
  assert np.isfinite(total1)
  assert total1 < total0 - 1.0, (total0, total1)
  print({k: (round(per0[k], 3), round(per1[k], 3)) for k in per0})
  for k in per0:
    assert per1[k] < 0.9 * per0[k], (k, per0[k], per1[k])
