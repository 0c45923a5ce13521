"""ViT / MAE: sin-cos position tables, parameter counts, Flax <-> PyTorch parity and weight
conversion, masking semantics (removed patches are invisible, one compile for every mask) and a
short AdamW run. Tiny configs throughout; the real ViT-S/16 runs once at 32 x 32."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mmearth_jax.interop import torch_vit as tv
from mmearth_jax.models import vit as V
from mmearth_jax.models.posenc import sincos_2d
from mmearth_jax.ops.masked_tokens import random_masking

torch.set_num_threads(2)
TOL = 1e-5
TINY = dict(patch_size=8, embed_dim=64, depth=2, num_heads=4)
TINY_DEC = dict(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)
SIZE = 32  # 4 x 4 patches of 8 px


def _rel(a, b) -> float:
  """max|a - b| / max|b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _random_params(module, images, ids_keep=None, seed=0):
  """Params of the module's shapes filled with numpy noise (no init compile): kernels at
  1/sqrt(fan_in), LayerNorm scales around 1, and biases, tokens and norm offsets all nonzero so
  no transpose or placement can hide behind a zero or a one."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), images, ids_keep=ids_keep))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    x = rng.standard_normal(s.shape).astype(np.float32)
    if name == "kernel":
      x = x / np.sqrt(np.prod(s.shape[:-1]))
    else:
      x = 1.0 + 0.1 * x if name == "scale" else 0.1 * x
    return x.astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes["params"])


def _images(n=2, size=SIZE, c=3, seed=0):
  return np.random.default_rng(seed).standard_normal((n, size, size, c)).astype(np.float32)


def _nchw(x) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _t(a) -> torch.Tensor:
  return torch.from_numpy(np.array(a)).long()


def _mae_sincos_numpy(embed_dim, grid_h, grid_w, cls_token=False, scale=1.0):
  """MAE's get_2d_sincos_pos_embed written out literally (meshgrid(w, h); emb_h from grid[0])."""
  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
  grid = np.stack(grid, axis=0).reshape(2, 1, grid_h, grid_w) * scale
  emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
  return emb


@pytest.fixture(scope="module")
def tiny_mae():
  """Tiny MAE, random params, a fixed mask, and the torch reference holding the same weights."""
  model = V.MAE(**TINY, **TINY_DEC)
  x = _images()
  ids_keep, ids_restore, mask = random_masking(jax.random.key(1), 2, 16, model.keep_count(16))
  params = _random_params(model, x, ids_keep)
  ref = tv.TorchMAE(SIZE, 8, 3, 64, 2, 4, 4.0, 32, 2, 4).eval()
  ref.load_state_dict(tv.flax_to_torch_vit(params, img_size=SIZE))
  return model, params, ref, x, ids_keep, ids_restore, mask


# ---------------------------------------------------------------------------------------------
# Position embedding.


@pytest.mark.parametrize("dim,gh,gw", [(64, 4, 4), (32, 3, 5), (768, 14, 14)])
def test_sincos_matches_mae_formula(dim, gh, gw):
  for cls in (False, True):
    ref = _mae_sincos_numpy(dim, gh, gw, cls_token=cls)
    np.testing.assert_allclose(sincos_2d(dim, gh, gw, cls_token=cls), ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(tv.sincos_2d_torch(dim, gh, gw, cls).numpy(), ref, atol=1e-6,
                               rtol=0)
  # First half: the column coordinate (MAE's grid[0]); token 1 is row 0, column 1.
  emb = np.asarray(sincos_2d(dim, gh, gw))
  assert emb[1, 0] == pytest.approx(np.sin(1.0)) and emb[1, dim // 2] == 0.0


def test_sincos_scale_per_sample():
  scales = np.array([0.5, 1.0, 2.5], np.float32)
  out = sincos_2d(32, 3, 5, scale=jnp.asarray(scales), cls_token=True)
  assert out.shape == (3, 16, 32)
  for i, s in enumerate(scales):
    np.testing.assert_allclose(out[i], _mae_sincos_numpy(32, 3, 5, True, s), atol=2e-6, rtol=0)
  np.testing.assert_allclose(sincos_2d(32, 3, 5, scale=2.5),
                             _mae_sincos_numpy(32, 3, 5, False, 2.5), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Parameter counts.


@pytest.mark.parametrize("variant", ["S", "B"])
def test_param_counts_match_torch_layout(variant):
  model = V.make_vit(variant, patch_size=16)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  n_flax = _count(shapes["params"])
  cfg = V.VIT_VARIANTS[variant]
  with torch.device("meta"):
    ref = tv.TorchViT(224, 16, 3, cfg["embed_dim"], cfg["depth"], cfg["num_heads"])
  sd = ref.state_dict()
  n_pos = sd["pos_embed"].numel()
  # Flax holds the trainable tensors (CLS included); torch adds the fixed (1, 197, D) table.
  assert n_flax == sum(p.numel() for p in ref.parameters() if p.requires_grad)
  assert n_flax + n_pos == sum(t.numel() for t in sd.values())
  if variant == "B":
    # timm vit_base_patch16_224 is 86,567,656 with its 1000-class head (769,000).
    assert n_flax + n_pos == 85_798_656
    assert n_flax == 85_647_360


# ---------------------------------------------------------------------------------------------
# Parity with the PyTorch reference.


def test_encoder_parity_tiny(tiny_mae):
  model, params, ref, x, ids_keep, _, _ = tiny_mae
  enc = V.ViT(**TINY)
  with torch.no_grad():
    for ids in (None, ids_keep):
      ours = enc.apply({"params": params["encoder"]}, x, ids_keep=ids)
      theirs = ref.forward_encoder(_nchw(x), None if ids is None else _t(ids)).numpy()
      assert ours.shape == theirs.shape == (2, 1 + (16 if ids is None else 4), 64)
      assert _rel(ours, theirs) <= TOL


def test_encoder_parity_vit_s16():
  model = V.make_vit("S", patch_size=16)
  x = _images(n=2, size=32)
  ids_keep, _, _ = random_masking(jax.random.key(3), 2, 4, 2)
  params = _random_params(model, x, seed=3)
  ref = tv.TorchViT(32, 16, 3, 384, 12, 6).eval()
  ref.load_state_dict(tv.flax_to_torch_vit(params, img_size=32))
  with torch.no_grad():
    theirs = ref.forward_encoder(_nchw(x), _t(ids_keep)).numpy()
  ours = model.apply({"params": params}, x, ids_keep=ids_keep)
  assert ours.shape == (2, 3, 384)
  assert _rel(ours, theirs) <= TOL


def test_mae_parity_pred_mask_loss(tiny_mae):
  model, params, ref, x, ids_keep, ids_restore, mask = tiny_mae
  pred, ours_mask = model.apply({"params": params}, x, ids_keep=ids_keep)
  np.testing.assert_array_equal(ours_mask, mask)
  assert pred.shape == (2, 16, 8 * 8 * 3) and float(ours_mask.sum()) == 2 * 12
  for norm_pix in (False, True):
    with torch.no_grad():
      loss_t, pred_t, mask_t = ref(_nchw(x), _t(ids_keep), _t(ids_restore), norm_pix)
    np.testing.assert_array_equal(mask_t.numpy(), mask)
    assert _rel(pred, pred_t.numpy()) <= TOL
    loss = V.mae_loss(x, pred, ours_mask, norm_pix)
    assert abs(float(loss) - float(loss_t)) <= TOL * abs(float(loss_t))


def test_mae_loss_is_mse_on_removed_patches():
  x = _images(n=1, size=16)
  target = V.patchify(jnp.asarray(x), 8)  # (1, 4, 192)
  np.testing.assert_array_equal(V.unpatchify(target, 8, 2, 2), x)
  np.testing.assert_array_equal(target[0, 1], x[0, :8, 8:16].reshape(-1))  # (row, col, chan)
  pred = target.at[0, 2].add(1.0).at[0, 3].add(3.0)
  mask = jnp.array([[0.0, 0.0, 1.0, 0.0]])
  assert float(V.mae_loss(x, pred, mask)) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Conversion.


def test_round_trips_are_bit_exact(tiny_mae):
  model, params, ref, *_ = tiny_mae
  sd = tv.flax_to_torch_vit(params, img_size=SIZE)
  assert list(sd) == list(ref.state_dict())  # exactly the layout's keys
  for k, v in ref.state_dict().items():
    assert sd[k].shape == v.shape, k
  back = tv.torch_to_flax_vit(sd)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  again = tv.flax_to_torch_vit(back, img_size=SIZE)
  assert all(torch.equal(again[k], sd[k]) for k in sd)
  # The encoder alone, and an MAE checkpoint's encoder loaded into the ViT layout.
  enc_sd = tv.flax_to_torch_vit(params["encoder"], img_size=SIZE)
  assert set(enc_sd) == set(tv.TorchViT(SIZE, 8, 3, 64, 2, 4).state_dict())
  jax.tree.map(np.testing.assert_array_equal, tv.torch_to_flax_vit(enc_sd), params["encoder"])
  # The converter's table is the torch module's own.
  torch.testing.assert_close(sd["decoder_pos_embed"], ref.decoder_pos_embed.data, rtol=0, atol=0)


def test_conversion_errors_name_the_keys(tiny_mae):
  _, params, *_ = tiny_mae
  sd = tv.flax_to_torch_vit(params["encoder"], img_size=SIZE)
  bad = dict(sd, extra=torch.zeros(1))
  del bad["blocks.1.mlp.fc2.bias"]
  problems = r"(?s)missing: blocks\.1\.mlp\.fc2\.bias.*unexpected: extra"
  with pytest.raises(ValueError, match=problems):
    tv.torch_to_flax_vit(bad)
  learned = dict(sd, pos_embed=sd["pos_embed"] + 0.01)
  with pytest.raises(ValueError, match="sin-cos"):
    tv.torch_to_flax_vit(learned)
  tv.torch_to_flax_vit(learned, check_pos_embed=False)
  head = dict(sd, **{"head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)})
  tv.torch_to_flax_vit({"model": head})  # timm head and checkpoint wrapper tolerated


# ---------------------------------------------------------------------------------------------
# Masking semantics and compilation.


def test_removed_patches_do_not_reach_the_encoder(tiny_mae):
  _, params, _, x, ids_keep, _, mask = tiny_mae
  enc = V.ViT(**TINY)
  removed = np.asarray(mask).reshape(2, 4, 4).repeat(8, 1).repeat(8, 2)[..., None] > 0
  noisy = np.where(removed, x + 5.0 * _images(seed=9), x)
  base = enc.apply({"params": params["encoder"]}, x, ids_keep=ids_keep)
  np.testing.assert_array_equal(enc.apply({"params": params["encoder"]}, noisy, ids_keep=ids_keep),
                                base)
  kept_changed = np.where(removed, x, x + 1.0)
  assert not np.allclose(enc.apply({"params": params["encoder"]}, kept_changed, ids_keep=ids_keep),
                         base)


def test_jit_compiles_once_for_new_masks(tiny_mae):
  model, params, _, x, *_ = tiny_mae
  traces = []

  @jax.jit
  def step(params, images, key):
    traces.append(None)  # runs only while tracing
    pred, mask = model.apply({"params": params}, images, rngs={"masking": key})
    return V.mae_loss(images, pred, mask), mask

  masks = [step(params, x, jax.random.key(s))[1] for s in range(3)]
  assert len(traces) == 1
  assert not np.array_equal(masks[0], masks[1])
  assert all(float(m.sum()) == 2 * 12 for m in masks)


def test_patch_sizes_and_non_square_inputs():
  for p, (h, w) in [(8, (32, 48)), (16, (32, 48)), (8, (24, 24))]:
    enc = V.ViT(patch_size=p, embed_dim=32, depth=1, num_heads=2)
    x = _images(n=1, size=48)[:, :h, :w]
    params = _random_params(enc, x)
    assert jax.jit(enc.apply)({"params": params}, x).shape == (1, 1 + (h // p) * (w // p), 32)
  with pytest.raises(ValueError, match="multiple of the patch"):
    enc.apply({"params": params}, _images(n=1, size=20))
  # An unscaled per-sample position grid is the default one.
  enc = V.ViT(**TINY)
  x = _images(n=2)
  params = _random_params(enc, x)
  np.testing.assert_allclose(enc.apply({"params": params}, x, pos_scale=jnp.ones(2)),
                             enc.apply({"params": params}, x), atol=1e-5)


def test_bf16_compute_and_drop_path(tiny_mae):
  _, params, _, x, ids_keep, _, _ = tiny_mae
  enc32 = V.ViT(**TINY)
  ref = enc32.apply({"params": params["encoder"]}, x, ids_keep=ids_keep)
  out = V.ViT(**TINY, dtype=jnp.bfloat16).apply({"params": params["encoder"]}, x, ids_keep=ids_keep)
  assert out.dtype == jnp.bfloat16 and _rel(out, ref) < 0.05
  enc_params = {"params": params["encoder"]}
  drop = V.ViT(**TINY, drop_path_rate=0.5)
  np.testing.assert_array_equal(drop.apply(enc_params, x), enc32.apply(enc_params, x))  # eval
  a, b = (drop.apply(enc_params, x, train=True, rngs={"dropout": jax.random.key(s)})
          for s in (0, 1))
  assert not np.allclose(a, b)


def test_adamw_reduces_mae_loss():
  # One block each side keeps the compile short; smooth images give the decoder something to learn.
  model = V.MAE(**dict(TINY, depth=1), **dict(TINY_DEC, decoder_depth=1))
  rng = np.random.default_rng(5)
  yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
  freq = rng.uniform(0.5, 2.0, (4, 1, 1, 3))
  phase = rng.uniform(0.0, 2 * np.pi, (4, 1, 1, 3))
  x = jnp.asarray(np.sin(2 * np.pi * freq * (xx + yy)[None, ..., None] + phase), jnp.float32)
  ids_keep, _, _ = random_masking(jax.random.key(7), 4, 16, model.keep_count(16))
  params = jax.jit(lambda k: model.init(k, x, ids_keep=ids_keep))(jax.random.key(0))["params"]
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(params))
  opt = optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.05)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    def loss_fn(p):
      pred, mask = model.apply({"params": p}, x, ids_keep=ids_keep)
      return V.mae_loss(x, pred, mask)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(20):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.75 * losses[0], losses
