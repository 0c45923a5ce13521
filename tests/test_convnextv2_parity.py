"""Flax <-> PyTorch parity of ConvNeXt V2 (both stems, masked and not) and MP-MAE, and the
weight conversion: layouts, bit-exact round trips, errors that name the offending keys."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmearth_jax import modalities as M
from mmearth_jax.interop import convert_convnextv2 as cv
from mmearth_jax.interop import torch_convnextv2 as tc
from mmearth_jax.models import convnextv2 as cx
from mmearth_jax.models.mp_mae import MPMAE
from _trees import assert_bit_exact, noisy_params

torch.set_num_threads(2)
TOL = 1e-5


def _rel(a, b) -> float:
  """max|a - b| / max|b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = np.abs(b).max()
  return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a).max())


def _count(tree) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def _torch_count(model: torch.nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())  # shared parameters counted once


def _patch_mask(rng, n, grid, ratio=0.6):
  keep = int(grid * grid * (1 - ratio))
  m = np.ones((n, grid * grid), np.float32)
  for i in range(n):
    m[i, rng.permutation(grid * grid)[:keep]] = 0
  return m.reshape(n, grid, grid)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _torch_encoder(stem, variant, bands, patch, num_classes=0):
  depths, dims = cx.VARIANTS[variant]
  if stem == "official":
    return tc.ConvNeXtV2Official(bands, depths, dims, num_classes=num_classes, patch_size=patch)
  return tc.ConvNeXtV2MMEarth(bands, depths, dims, patch, num_classes=num_classes)


ENCODER_CASES = [
    # (variant, stem, image size, mask patch, bands, classes); tiny only at small sizes, for time
    ("atto", "official", 64, 32, 3, 10),
    ("atto", "mmearth", 112, 16, 12, 0),
    ("atto", "mmearth", 56, 8, 12, 0),
    ("tiny", "official", 64, 32, 3, 0),
    ("tiny", "mmearth", 56, 8, 12, 5),
]


@pytest.mark.parametrize("variant,stem,size,patch,bands,classes", ENCODER_CASES)
def test_encoder_parity(variant, stem, size, patch, bands, classes, record_property):
  grid = size // patch
  model = cx.convnextv2(variant, stem=stem, patch_size=patch, num_classes=classes)
  params = noisy_params(model, jnp.zeros((1, size, size, bands)), jnp.zeros((1, grid, grid)))
  tmodel = _torch_encoder(stem, variant, bands, patch, classes).eval()
  tmodel.load_state_dict(cv.flax_to_torch(params, stem), strict=True)
  assert _torch_count(tmodel) == _count(params)

  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, size, size, bands)).astype(np.float32)
  pm = _patch_mask(rng, 2, grid)
  # Eager JAX throughout: compiling each model once costs far more than running it here.
  apply = model.apply
  errs = {}
  with torch.no_grad():
    for name, mask in (("plain", None), ("masked", pm)):
      want = apply({"params": params}, x, mask)
      got = tmodel.forward_map(_nchw(x), None if mask is None else torch.from_numpy(mask))
      errs[name] = _rel(got.numpy().transpose(0, 2, 3, 1), want)
    feats = model.apply({"params": params}, x, method="features")
    errs["features"] = _rel(tmodel.forward_features(_nchw(x)).numpy(), feats)
    if classes:
      logits = model.apply({"params": params}, x, method="classify")
      errs["logits"] = _rel(tmodel(_nchw(x)).numpy(), logits)
  record_property("max_rel_err", errs)
  print(variant, stem, size, patch, errs)
  assert max(errs.values()) <= TOL, errs


@pytest.mark.parametrize("stem,size,patch", [("official", 64, 32), ("official", 96, 16),
                                             ("mmearth", 112, 16), ("mmearth", 56, 8)])
def test_visibility_geometry_matches_flax(stem, size, patch):
  flax_geoms = cx.stage_geometries(size, stem, patch)
  torch_geoms = tc.stage_centres(size, stem, patch)
  grid = -(-size // patch)
  for g, c in zip(flax_geoms, torch_geoms):
    np.testing.assert_array_equal(g.patch_index(patch, grid), c.patch_index(patch, grid).numpy())


@pytest.mark.parametrize("size,patch", [(112, 16), (56, 8)])
def test_sparse_geometry_is_torchs_same_padded_stem(size, patch):
  """With nothing masked and no all-zero pixel, the sparse geometry is the reference's sparse
  stem as plain convolutions: the 3x3 conv padded by 1 (a submanifold sparse conv keeps every
  site) and the patch stem unpadded, here set on the torch twin's own layers."""
  grid = size // patch
  depths, dims = (1, 1, 2, 1), (8, 16, 24, 32)
  model = cx.ConvNeXtV2(depths, dims, patch_size=patch, masked_geometry="sparse")
  params = noisy_params(model, jnp.zeros((1, size, size, 12)), jnp.zeros((1, grid, grid)))
  tmodel = tc.ConvNeXtV2MMEarth(12, depths, dims, patch).eval()
  tmodel.load_state_dict(cv.flax_to_torch(params, "mmearth"), strict=True)
  tmodel.initial_conv[0].padding = (1, 1)
  tmodel.stem[0].padding = (0, 0)
  x = np.random.default_rng(5).standard_normal((2, size, size, 12)).astype(np.float32)
  want = model.apply({"params": params}, x, jnp.zeros((2, grid, grid)))
  with torch.no_grad():
    got = tmodel.forward_map(_nchw(x)).numpy().transpose(0, 2, 3, 1)
  assert got.shape[1:3] == (grid, grid)
  assert _rel(got, want) <= TOL


# ---------------------------------------------------------------------------------------------
# MP-MAE: the torch per-modality loop against the Flax shared-once decoder.


@pytest.fixture(scope="module")
def mp_mae_pair():
  outputs = M.output_preset("all")
  assert len(outputs) == 12
  model = MPMAE(outputs, "atto", patch_size=8)
  params = noisy_params(model, jnp.zeros((1, 56, 56, 12)), jnp.zeros((1, 7, 7)), seed=3)
  tmodel = tc.MPMAETorch(outputs, in_chans=12, variant="atto", patch_size=8).eval()
  sd = cv.mp_mae_flax_to_torch(params, outputs)
  tmodel.load_state_dict(sd, strict=True)
  return outputs, model, params, tmodel


def test_mp_mae_layout_and_counts(mp_mae_pair):
  outputs, _, params, tmodel = mp_mae_pair
  sd = tmodel.state_dict()
  # The shared block is repeated under every modality, as in the reference's checkpoints.
  blocks = {n: tmodel.decoder_dict[n][0] for n in outputs}
  assert len({id(b) for b in blocks.values()}) == 1
  assert all(f"decoder_dict.{n}.0.grn.gamma" in sd for n in outputs)
  assert sd["mask_token"].shape == (1, 512, 1, 1) and sd["loss_fn.log_vars"].shape == (12,)
  assert sd["pred_dict.sentinel2.weight"].shape == (8 * 8 * 12, 512, 1, 1)
  assert sd["pred_dict.eco_region.weight"].shape == (846, 512)
  assert sd["encoder.initial_conv.0.weight"].shape == (40, 12, 3, 3)
  # Upstream's dense FCMAE key set (it loads its files strictly): the encoder keeps ConvNeXtV2's
  # default 1000-class classifier, unused in pretraining, which the export writes as zeros.
  assert {k.split(".")[0] for k in sd} == {"mask_token", "loss_fn", "encoder", "proj",
                                           "decoder_dict", "pred_dict", "layer_norm_tmp"}
  assert {k.split(".")[1] for k in sd if k.startswith("encoder.")} == {
      "initial_conv", "stem", "downsample_layers", "stages", "norm", "head"}
  exported = cv.mp_mae_flax_to_torch(params, outputs)
  assert exported["encoder.head.weight"].shape == (1000, 320)
  assert not exported["encoder.head.weight"].any() and not exported["encoder.head.bias"].any()
  assert _torch_count(tmodel) == _count(params) + 1000 * 321
  # Each modality's log-variance sits in upstream's slot for it (its OUT_MODALITIES order).
  named = dict(params, log_vars=jnp.arange(12.0))
  log_vars = cv.mp_mae_flax_to_torch(named, outputs)["loss_fn.log_vars"].tolist()
  assert [list(outputs)[int(i)] for i in log_vars] == [
      "sentinel2", "sentinel1", "aster", "era5", "dynamic_world", "canopy_height_eth", "lat",
      "lon", "biome", "eco_region", "month", "esa_worldcover"]


def test_mp_mae_predictions_and_gradients(mp_mae_pair):
  outputs, model, params, tmodel = mp_mae_pair
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 56, 56, 12)).astype(np.float32)
  pm = _patch_mask(rng, 2, 7)
  shapes = jax.eval_shape(model.apply, {"params": params}, x, pm)
  # A fixed random linear read-out of every prediction: a scalar that reaches every head.
  weights = {n: rng.standard_normal(s.shape).astype(np.float32) for n, s in shapes.items()}

  def loss_flax(p):
    out = model.apply({"params": p}, x, pm)
    return sum(jnp.mean(out[n] * weights[n]) for n in outputs), out

  # One compiled forward + backward (eager dispatch of the backward is slower); at XLA's lowest
  # backend optimisation level compiling takes ~2/3 of the time, and this runs only once.
  step = jax.jit(jax.value_and_grad(loss_flax, has_aux=True)).lower(params).compile(
      {"xla_backend_optimization_level": 0})
  (lf, preds), grads = step(params)

  tmodel.zero_grad()
  tpreds = tmodel(_nchw(x), torch.from_numpy(pm))
  lt = sum(torch.mean(tpreds[n] * torch.from_numpy(weights[n])) for n in outputs)
  lt.backward()

  errs = {n: _rel(tpreds[n].detach().numpy(), preds[n]) for n in outputs}
  assert set(tpreds) == set(outputs) and all(tpreds[n].shape == preds[n].shape for n in outputs)
  print("mp_mae predictions", errs)
  assert max(errs.values()) <= TOL, errs
  assert abs(lt.item() - float(lf)) <= TOL * abs(float(lf)) + 1e-6

  # Gradients: map torch's (aliased) parameter grads into the Flax layout and compare all.
  keep = tmodel.state_dict(keep_vars=True)
  # log_vars is not in this loss: torch leaves its grad None, JAX gives zeros.
  tgrads = cv.mp_mae_torch_to_flax(
      {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in keep.items()}, outputs)
  assert jax.tree.structure(tgrads) == jax.tree.structure(grads)
  gerr = {jax.tree_util.keystr(p): _rel(g, f) for (p, g), f in zip(
      jax.tree_util.tree_flatten_with_path(tgrads)[0], jax.tree.leaves(grads))}
  dec = {k: v for k, v in gerr.items() if "decoder" in k}
  print("mp_mae decoder grads", dec, "worst grad", max(gerr.values()))
  assert len(dec) == 10 and max(dec.values()) <= TOL, dec
  assert max(gerr.values()) <= 5e-5, sorted(gerr.items(), key=lambda kv: -kv[1])[:5]


# ---------------------------------------------------------------------------------------------
# Conversion: round trips and errors.


@pytest.mark.parametrize("stem,size,patch,classes", [("official", 64, 32, 7),
                                                      ("mmearth", 112, 16, 0)])
def test_round_trips_are_bit_exact(stem, size, patch, classes):
  model = cx.convnextv2("atto", stem=stem, patch_size=patch, num_classes=classes)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 5)))["params"]
  params = jax.tree.map(lambda s: np.random.default_rng(s.size).standard_normal(s.shape)
                        .astype(np.float32), params)
  sd = cv.flax_to_torch({"params": params}, stem)
  # The layouts' key names and shapes.
  assert sd["stages.0.1.dwconv.weight"].shape == (40, 1, 7, 7)
  assert sd["stages.3.1.grn.gamma"].shape == (1, 1, 1, 1280)
  assert sd["stages.2.5.pwconv1.weight"].shape == (640, 160)
  assert sd["norm.weight"].shape == (320,) and ("head.weight" in sd) == bool(classes)
  if stem == "official":
    assert sd["downsample_layers.0.0.weight"].shape == (40, 5, 4, 4)
    assert sd["downsample_layers.0.1.weight"].shape == (40,)
    assert sd["downsample_layers.3.0.weight"].shape == (160,)
    assert sd["downsample_layers.3.1.weight"].shape == (320, 160, 2, 2)
  else:
    assert sd["initial_conv.0.weight"].shape == (40, 5, 3, 3)
    assert sd["initial_conv.1.weight"].shape == sd["stem.1.weight"].shape == (40,)
    assert sd["stem.0.weight"].shape == (40, 1, 2, 2)
    assert sd["downsample_layers.2.1.weight"].shape == (320, 160, 2, 2)
    assert not any(k.startswith("downsample_layers.3") for k in sd)
  assert_bit_exact(cv.torch_to_flax(sd, stem), params)
  assert_bit_exact(cv.torch_to_flax({"model": sd}, stem), params)  # checkpoint wrapper
  # torch -> flax -> torch from a torch-initialised model.
  tmodel = _torch_encoder(stem, "atto", 5, patch, classes)
  sd0 = tmodel.state_dict()
  sd1 = cv.flax_to_torch(cv.torch_to_flax(sd0, stem), stem)
  assert sd1.keys() == sd0.keys()
  assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)


def test_mp_mae_round_trip(mp_mae_pair):
  outputs, _, params, tmodel = mp_mae_pair
  assert_bit_exact(cv.mp_mae_torch_to_flax(tmodel.state_dict(), outputs), params)


@pytest.fixture(scope="module")
def official_sd():
  return _torch_encoder("official", "atto", 3, 32).state_dict()


def test_torch_errors_name_every_offending_key(official_sd):
  sd = dict(official_sd)
  del sd["stages.1.0.grn.gamma"]
  sd["stages.2.1.pwconv1.weight"] = torch.zeros(640, 161)
  sd["stages.0.0.dwconv.weight"] = torch.zeros(40, 7, 7)
  sd["decoder.extra"] = torch.zeros(3)
  with pytest.raises(ValueError) as e:
    cv.torch_to_flax(sd, "official")
  msg = str(e.value)
  for key in ("missing: stages.1.0.grn.gamma", "stages.2.1.pwconv1.weight",
              "stages.0.0.dwconv.weight", "unexpected: decoder.extra"):
    assert key in msg, msg
  assert "4 problem(s)" in msg
  with pytest.raises(ValueError, match="initial_conv.0.weight"):
    cv.torch_to_flax(official_sd, "mmearth")  # wrong layout
  with pytest.raises(ValueError, match="unknown layout"):
    cv.torch_to_flax(official_sd, "keras")  # "timm" is a layout since the timm import


def test_flax_errors_name_every_offending_key(official_sd):
  params = jax.tree.map(np.asarray, cv.torch_to_flax(official_sd, "official"))
  params["stage_0_block_1"]["grn"].pop("beta")
  params["downsample_2_conv"]["kernel"] = np.zeros((2, 2, 80, 99), np.float32)
  params["stage_3_block_0"]["dwconv"]["kernel"] = np.zeros((7, 7, 1, 320), np.float32)
  with pytest.raises(ValueError) as e:
    cv.flax_to_torch(params, "official")
  msg = str(e.value)
  for key in ("missing: stage_0_block_1/grn/beta", "downsample_2_conv/kernel",
              "stage_3_block_0/dwconv/kernel"):
    assert key in msg, msg


def test_mp_mae_aliases_must_agree(mp_mae_pair):
  outputs, _, _, tmodel = mp_mae_pair
  sd = {k: v.clone() for k, v in tmodel.state_dict().items()}
  sd["decoder_dict.lat.0.grn.gamma"] += 1
  with pytest.raises(ValueError, match="decoder_dict.lat.0.grn.gamma"):
    cv.mp_mae_torch_to_flax(sd, outputs)
