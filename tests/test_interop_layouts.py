"""PyTorch checkpoint layouts end to end: `hub.import_state_dict` / `export_state_dict` for every
layout (official, MMEarth, timm, full MP-MAE, sparse MMEarth / FCMAE pretraining, ViT, MAE,
Scale-MAE), Flax against the plain-torch reference modules on the converted weights, the sparse
kernel-offset convention, and `torch_io` (safetensors / pickles, refused pickles, atomic writes).
Small models throughout; one real atto-size layout check."""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmearth_jax import modalities as M
from mmearth_jax.interop import convert_convnextv2 as cv
from mmearth_jax.interop import hub, torch_io
from mmearth_jax.interop import torch_convnextv2 as tc
from mmearth_jax.interop import torch_vit as tv
from mmearth_jax.models import convnextv2 as cx
from mmearth_jax.models import vit as V
from mmearth_jax.models.mp_mae import MPMAE
from _trees import assert_bit_exact

torch.set_num_threads(2)
TOL = 1e-5
DEPTHS, DIMS = (1, 1, 2, 1), (8, 16, 24, 32)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _noise_params(model, *args, seed=0, **kw):
  """Params of the model's shapes, numpy noise (no init compile); LayerNorm scales near 1 and
  everything else (GRN, biases, tokens) nonzero, so no transpose can hide."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kw))["params"]
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    x = rng.standard_normal(s.shape).astype(np.float32)
    name = path[-1].key
    if name == "kernel":
      return (x / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
    return (1.0 + 0.1 * x if name == "scale" else 0.1 * x).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _noise_torch(module: torch.nn.Module, seed=0) -> torch.nn.Module:
  """Every parameter of a torch module set to noise (GRN gammas are zero at init)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if not p.requires_grad:
        continue  # fixed tables (ViT sin-cos position embedding)
      x = torch.randn(p.shape, generator=g)
      if name.endswith("weight") and p.ndim == 1 and ".grn." not in name:
        p.copy_(1.0 + 0.1 * x)  # LayerNorm
      elif p.ndim >= 2:
        p.copy_(x / np.sqrt(np.prod(p.shape[1:])))
      else:
        p.copy_(0.1 * x)
  return module.eval()


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _np_sd(sd):
  return {k: v.detach().numpy().copy() for k, v in sd.items()}


def _images(n, size, c, seed=0):
  return np.random.default_rng(seed).standard_normal((n, size, size, c)).astype(np.float32)


def _patch_mask(n, grid, seed=0, ratio=0.5):
  rng = np.random.default_rng(seed)
  keep = int(grid * grid * (1 - ratio))
  m = np.ones((n, grid * grid), np.float32)
  for i in range(n):
    m[i, rng.permutation(grid * grid)[:keep]] = 0
  return m.reshape(n, grid, grid)


# ---------------------------------------------------------------------------------------------
# Models under test (module scope: built once).


@pytest.fixture(scope="module")
def official():
  model = cx.ConvNeXtV2(DEPTHS, DIMS, stem="official", patch_size=32, num_classes=5)
  params = _noise_params(model, jnp.zeros((1, 64, 64, 3)), seed=1)
  spec = hub.spec_from_params("convnextv2", params)
  return model, params, spec


@pytest.fixture(scope="module")
def mmearth():
  model = cx.ConvNeXtV2(DEPTHS, DIMS, stem="mmearth", patch_size=16)
  params = _noise_params(model, jnp.zeros((1, 64, 64, 12)), seed=2)
  return model, params, hub.spec_from_params("convnextv2", params)


@pytest.fixture(scope="module")
def mp_mae():
  outputs = M.output_preset("all")
  model = MPMAE(outputs, depths=DEPTHS, dims=DIMS, patch_size=16, decoder_dim=16)
  params = _noise_params(model, jnp.zeros((1, 64, 64, 12)), jnp.zeros((1, 4, 4)), seed=3)
  return model, params, hub.spec_from_params("mp_mae", params, outputs=outputs)


VIT = dict(patch_size=8, embed_dim=192, depth=2, num_heads=3)  # ViT-Ti widths: 3 heads known
MAE_DEC = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=16)


@pytest.fixture(scope="module")
def mae():
  model = V.MAE(**VIT, **MAE_DEC)
  x = _images(2, 32, 3)
  ids_keep = np.stack([np.random.default_rng(i).permutation(16)[:4] for i in range(2)])
  params = _noise_params(model, x, ids_keep=ids_keep, seed=4)
  spec = hub.spec_from_params("mae", params, img_size=32)
  return model, params, spec, x, ids_keep


# ---------------------------------------------------------------------------------------------
# Round trips Flax -> torch -> Flax.


@pytest.mark.parametrize("which,layout,conv_mlp", [
    ("official", "official", None), ("official", "timm", True), ("official", "timm", False),
    ("mmearth", "mmearth", None)])
def test_convnext_round_trips(which, layout, conv_mlp, request):
  _, params, spec = request.getfixturevalue(which)
  sd = hub.export_state_dict(spec, params, layout, conv_mlp=conv_mlp)
  if layout == "timm":
    fc1 = sd["stages.2.blocks.1.mlp.fc1.weight"]
    assert fc1.shape == ((96, 24, 1, 1) if conv_mlp else (96, 24))
    assert sd["stages.2.blocks.1.mlp.grn.weight"].shape == (96,)
    assert not any(k.startswith("stages.0.downsample") for k in sd)
    assert sd["stages.1.downsample.1.weight"].shape == (16, 8, 2, 2)
    assert sd["head.norm.weight"].shape == (32,) and sd["head.fc.weight"].shape == (5, 32)
  spec2, params2, notes = hub.import_state_dict(_np_sd(sd))
  assert notes[0].startswith(f"layout: {layout} ")
  assert spec2 == spec
  assert_bit_exact(params2, params)


def test_timm_default_mlp_kind_follows_the_width(official):
  _, params, spec = official
  assert hub.export_state_dict(spec, params, "timm")["stages.0.blocks.0.mlp.fc1.weight"].ndim == 4
  # tiny and up: Linears (real tiny shapes from eval_shape only, no compute)
  tiny = jax.eval_shape(cx.convnextv2("tiny", stem="official").init, jax.random.key(0),
                        jnp.zeros((1, 32, 32, 3)))["params"]
  tiny = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tiny)
  assert cv.flax_to_torch(tiny, "timm")["stages.0.blocks.0.mlp.fc1.weight"].shape == (384, 96)


def test_mp_mae_round_trips(mp_mae):
  _, params, spec = mp_mae
  sd = hub.export_state_dict(spec, params, "mmearth")
  assert sd["decoder_dict.lat.0.grn.gamma"].shape == (1, 1, 1, 64)
  spec2, params2, notes = hub.import_state_dict(_np_sd(sd))
  assert spec2 == spec
  assert spec2["outputs"] == {k: list(v) for k, v in M.output_preset("all").items()}
  assert_bit_exact(params2, params)
  # The encoder alone, on request.
  spec3, enc, notes = hub.import_state_dict(_np_sd(sd), "convnextv2")
  assert {k: spec3[k] for k in ("depths", "dims", "stem", "patch_size", "in_chans")} == \
      {k: spec[k] for k in ("depths", "dims", "stem", "patch_size", "in_chans")}
  assert spec3["arch"] == "convnextv2" and "outputs" not in spec3
  assert_bit_exact(enc, params["encoder"])
  assert any(n.startswith("dropped: ") and "decoder_dict.*" in n for n in notes), notes
  # An MMEarth-stem MP-MAE has no official / timm encoder layout.
  with pytest.raises(ValueError, match="use layout 'mmearth'"):
    hub.export_state_dict(spec, params, "timm")


def test_vit_and_mae_round_trips(mae):
  _, params, spec, *_ = mae
  assert spec["num_heads"] == 3 and spec["img_size"] == [32, 32]
  assert spec["bands"] == ["B4", "B3", "B2"]
  full = hub.export_state_dict(spec, params, "mae")
  assert "decoder_pred.weight" in full and full["pos_embed"].shape == (1, 17, 192)
  spec2, params2, notes = hub.import_state_dict(_np_sd(full))
  assert spec2 == spec and any(n.startswith("assumed: decoder_num_heads 16") for n in notes)
  assert_bit_exact(params2, params)
  enc_sd = hub.export_state_dict(spec, params, "timm")
  assert not any(k.startswith("decoder") for k in enc_sd)
  vspec, vparams, _ = hub.import_state_dict(_np_sd(enc_sd))
  assert vspec == {k: v for k, v in spec.items() if not k.startswith("decoder")} | {"arch": "vit"}
  assert_bit_exact(vparams, params["encoder"])
  # The encoder of an MAE file, on request; its decoder is reported.
  _, vp2, notes = hub.import_state_dict(_np_sd(full), "vit")
  assert_bit_exact(vp2, params["encoder"])
  assert any(n.startswith("dropped: ") and "decoder_blocks.*" in n for n in notes), notes


# ---------------------------------------------------------------------------------------------
# Flax against the plain-torch reference modules.


@pytest.mark.parametrize("which,layout,conv_mlp", [
    ("official", "official", None), ("mmearth", "mmearth", None),
    ("official", "timm", True), ("official", "timm", False)])
def test_convnext_parity_with_reference(which, layout, conv_mlp, request):
  model, params, spec = request.getfixturevalue(which)
  c = spec["in_chans"]
  sd = hub.export_state_dict(spec, params, layout, conv_mlp=conv_mlp)
  if layout == "official":
    ref = tc.ConvNeXtV2Official(c, DEPTHS, DIMS, num_classes=spec["num_classes"])
  elif layout == "mmearth":
    ref = tc.ConvNeXtV2MMEarth(c, DEPTHS, DIMS, spec["patch_size"])
  else:
    ref = tc.ConvNeXtV2Timm(c, DEPTHS, DIMS, num_classes=spec["num_classes"], conv_mlp=conv_mlp)
  ref.load_state_dict(sd, strict=True)
  ref.eval()
  x = _images(2, 64, c)
  with torch.no_grad():
    got = ref.forward_map(_nchw(x)).numpy().transpose(0, 2, 3, 1)
    feats = ref.forward_features(_nchw(x)).numpy()
    out = ref(_nchw(x)).numpy()
  assert _rel(got, model.apply({"params": params}, x)) <= TOL
  want = model.apply({"params": params}, x, method="features")
  assert _rel(feats, want) <= TOL
  if spec["num_classes"]:
    assert _rel(out, model.apply({"params": params}, x, method="classify")) <= TOL


def _sparse_kernel(w: np.ndarray) -> np.ndarray:
  """Dense (out, in, k, k) -> MinkowskiEngine (k*k, in, out), offset index w*k + h (written out
  from the documented layout, independently of the library's remap)."""
  o, i, k, _ = w.shape
  out = np.zeros((k * k, i, o), w.dtype)
  for h in range(k):
    for col in range(k):
      out[col * k + h] = w[:, :, h, col].T
  return out


def _sparse_depthwise(w: np.ndarray) -> np.ndarray:
  """Dense depthwise (C, 1, k, k) -> (k*k, C)."""
  c, _, k, _ = w.shape
  out = np.zeros((k * k, c), w.dtype)
  for h in range(k):
    for col in range(k):
      out[col * k + h] = w[:, 0, h, col]
  return out


def _sparsify_encoder(sd: dict, dense_stem: tuple = ()) -> dict:
  """A dense `encoder.*` state dict as a MinkowskiEngine pretraining file holds it; modules in
  `dense_stem` (FCMAE's stem) stay dense. The final norm / head do not exist in the sparse
  encoder."""
  out = {}
  for key, v in sd.items():
    if not key.startswith("encoder.") or key.startswith(dense_stem):
      out[key] = v
      continue
    if key.startswith(("encoder.norm.", "encoder.head.")):
      continue
    mod, leaf = key.rsplit(".", 1)
    depthwise = mod.endswith(".dwconv") or mod == "encoder.stem.0"
    if leaf == "weight" and v.ndim == 4:
      out[f"{mod}.kernel"] = _sparse_depthwise(v) if depthwise else _sparse_kernel(v)
    elif leaf == "bias" and (f"{mod}.weight" in sd and sd[f"{mod}.weight"].ndim == 4):
      out[key] = v.reshape(1, -1)  # Minkowski conv biases are (1, C)
    elif mod.endswith((".pwconv1", ".pwconv2")):
      out[f"{mod}.linear.{leaf}"] = v
    elif mod.endswith(".grn"):
      out[key] = v.reshape(1, -1)
    else:  # LayerNorms
      assert v.ndim == 1, key
      out[f"{mod}.ln.{leaf}"] = v
  return out


def test_sparse_kernel_index_convention():
  """One output of a sparse conv summed straight from the (k*k, in, out) kernel, offset index
  n = w*k + h, equals F.conv2d with the remapped dense weight at that position."""
  rng = np.random.default_rng(7)
  for k, stride, pad, (oy, ox) in ((3, 1, 1, (2, 5)), (2, 2, 0, (1, 3)), (7, 1, 3, (4, 5))):
    depthwise = k == 7
    cin, cout = (5, 5) if depthwise else (4, 6)
    x = rng.standard_normal((1, cin, 9, 9)).astype(np.float32)
    kernel = (rng.standard_normal((k * k, cout)) if depthwise else
              rng.standard_normal((k * k, cin, cout))).astype(np.float32)
    dense = cv.sparse_to_dense({"encoder.m.kernel": kernel})["encoder.m.weight"]
    y = F.conv2d(torch.from_numpy(x), torch.from_numpy(dense), stride=stride, padding=pad,
                 groups=cin if depthwise else 1).numpy()
    # (oy, ox): an output position whose whole window lies inside the input
    direct = np.zeros(cout)
    for n in range(k * k):
      h, w = n % k, n // k  # the documented convention: h runs fastest
      iy, ix = oy * stride - pad + h, ox * stride - pad + w
      if depthwise:
        direct += kernel[n] * x[0, :, iy, ix]
      else:
        direct += x[0, :, iy, ix] @ kernel[n]
    np.testing.assert_allclose(y[0, :, oy, ox], direct, rtol=1e-5, atol=1e-5)
    # and the test-local inverse is what the library reads back
    if not depthwise:
      np.testing.assert_array_equal(_sparse_kernel(dense), kernel)


def test_sparse_mmearth_pretraining_import_and_parity():
  outputs = M.output_preset("all")
  ref = _noise_torch(tc.MPMAETorch(outputs, in_chans=12, patch_size=16, decoder_dim=16,
                                   depths=DEPTHS, dims=DIMS), seed=5)
  sparse = _sparsify_encoder(_np_sd(ref.state_dict()))
  assert sparse["encoder.initial_conv.0.kernel"].shape == (9, 12, 8)
  assert sparse["encoder.stem.0.kernel"].shape == (4, 8)
  assert sparse["encoder.stages.2.1.dwconv.kernel"].shape == (49, 24)
  assert sparse["encoder.stages.2.1.grn.gamma"].shape == (1, 96)
  assert "encoder.stages.0.0.pwconv1.linear.weight" in sparse
  assert "encoder.downsample_layers.0.0.ln.weight" in sparse
  assert hub.detect_layout(sparse) == "sparse_mmearth"
  spec, params, notes = hub.import_state_dict(sparse)
  assert spec["arch"] == "mp_mae" and spec["patch_size"] == 16 and spec["stem"] == "mmearth"
  assert spec["depths"] == list(DEPTHS) and spec["dims"] == list(DIMS)
  assert spec["outputs"] == {k: list(v) for k, v in outputs.items()} and spec["decoder_dim"] == 16
  assert any(n.startswith("filled: encoder.norm") for n in notes), notes
  model = MPMAE(outputs, depths=DEPTHS, dims=DIMS, patch_size=16, decoder_dim=16)
  x, pm = _images(2, 64, 12, seed=3), _patch_mask(2, 4, seed=3)
  ours = model.apply({"params": params}, x, pm)
  with torch.no_grad():
    theirs = ref(_nchw(x), torch.from_numpy(pm))
  errs = {n: _rel(ours[n], theirs[n].numpy()) for n in outputs}
  assert max(errs.values()) <= TOL, errs
  # The encoder alone on request; the heads are reported, not silently dropped.
  spec_e, enc, notes = hub.import_state_dict(sparse, "convnextv2")
  assert spec_e["arch"] == "convnextv2" and spec_e["patch_size"] == 16
  assert_bit_exact(enc, params["encoder"])
  assert any("pred_dict.*" in n and n.startswith("dropped:") for n in notes), notes


def test_sparse_fcmae_import_and_parity():
  ref = _noise_torch(tc.ConvNeXtV2Official(3, DEPTHS, DIMS), seed=6)
  enc = {f"encoder.{k}": v for k, v in _np_sd(ref.state_dict()).items()}
  sd = _sparsify_encoder(enc, dense_stem=("encoder.downsample_layers.0.",))
  assert sd["encoder.downsample_layers.0.0.weight"].shape == (8, 3, 4, 4)  # dense stem
  assert sd["encoder.downsample_layers.0.1.weight"].shape == (8,)
  assert sd["encoder.downsample_layers.2.1.kernel"].shape == (4, 16, 24)
  assert sd["encoder.downsample_layers.2.1.bias"].shape == (1, 24)
  dec = _noise_torch(tc.Block(16), seed=9)
  rng = np.random.default_rng(0)
  sd.update({"proj.weight": rng.standard_normal((16, 32, 1, 1)), "proj.bias": np.zeros(16),
             "mask_token": np.zeros((1, 16, 1, 1)),
             "pred.weight": np.zeros((32 * 32 * 3, 16, 1, 1)),
             "pred.bias": np.zeros(32 * 32 * 3)})
  sd.update({f"decoder.0.{k}": v for k, v in _np_sd(dec.state_dict()).items()})
  assert hub.detect_layout(sd) == "sparse_fcmae"
  spec, params, notes = hub.import_state_dict(sd)
  assert spec == {"arch": "convnextv2", "depths": list(DEPTHS), "dims": list(DIMS),
                  "stem": "official", "patch_size": 32, "in_chans": 3, "num_classes": 0,
                  "bands": ["B4", "B3", "B2"]}
  dropped = next(n for n in notes if n.startswith("dropped:"))
  for k in ("proj.weight", "proj.bias", "mask_token", "decoder.*", "pred.weight", "pred.bias"):
    assert k in dropped, dropped
  model = cx.ConvNeXtV2(DEPTHS, DIMS, stem="official", patch_size=32)
  x = _images(2, 64, 3, seed=4)
  with torch.no_grad():
    ref.norm.weight.fill_(1.0)
    ref.norm.bias.zero_()  # the sparse encoder has no final norm: imported as the identity
    got = ref.forward_map(_nchw(x)).numpy().transpose(0, 2, 3, 1)
    feats = ref.forward_features(_nchw(x)).numpy()
  assert _rel(got, model.apply({"params": params}, x)) <= TOL
  assert _rel(feats, model.apply({"params": params}, x, method="features")) <= TOL


def test_vit_mae_parity_through_the_hub(mae):
  model, params, spec, x, ids_keep = mae
  ref = tv.TorchMAE(32, 8, 3, 192, 2, 3, 4.0, 32, 1, 16).eval()
  ref.load_state_dict(hub.export_state_dict(spec, params, "mae"), strict=True)
  ids_restore = np.argsort(np.concatenate(
      [ids_keep, np.stack([np.setdiff1d(np.arange(16), r) for r in ids_keep])], 1), 1)
  pred, _ = model.apply({"params": params}, x, ids_keep=ids_keep)
  with torch.no_grad():
    _, pred_t, _ = ref(_nchw(x), torch.from_numpy(ids_keep), torch.from_numpy(ids_restore))
  assert _rel(pred, pred_t.numpy()) <= TOL
  enc = tv.TorchViT(32, 8, 3, 192, 2, 3).eval()
  enc.load_state_dict(hub.export_state_dict(spec, params, "timm"), strict=True)
  with torch.no_grad():
    tokens = enc(_nchw(x)).numpy()
  assert _rel(V.ViT(**VIT).apply({"params": params["encoder"]}, x), tokens) <= TOL


@pytest.mark.parametrize("pos", ["absent", "scaled"])
def test_scale_mae_import_and_parity(pos):
  ref = _noise_torch(tv.TorchViT(32, 8, 3, 192, 2, 3), seed=8)
  sd = _np_sd(ref.state_dict())
  rng = np.random.default_rng(1)
  if pos == "absent":
    del sd["pos_embed"]
  else:  # a GSD-rescaled table, not the plain sin-cos one
    sd["pos_embed"] = tv.sincos_2d_torch(192, 4, 4, True)[None].numpy() * 0.5
  extra = {"mask_token": (1, 1, 64), "mask_token_decoder": (1, 1, 64),
           "decoder_embed.weight": (64, 192), "decoder_embed.bias": (64,),
           "decoder_pos_embed": (1, 17, 64), "decoder_blocks.0.norm1.weight": (64,),
           "decoder_blocks.0.attn.qkv.weight": (192, 64), "decoder_norm.weight": (64,),
           "fpn.fpn1.0.weight": (64, 64, 2, 2), "fcn_high.conv_blocks.0.weight": (8, 64, 3, 3),
           "fcn_low.conv_blocks.0.weight": (8, 64, 3, 3)}
  sd.update({k: rng.standard_normal(s).astype(np.float32) for k, s in extra.items()})
  assert hub.detect_layout(sd) == "scale_mae"
  spec, params, notes = hub.import_state_dict(sd)
  assert spec == {"arch": "vit", "patch_size": 8, "embed_dim": 192, "depth": 2, "num_heads": 3,
                  "mlp_ratio": 4.0, "in_chans": 3,
                  "img_size": [224, 224] if pos == "absent" else [32, 32],
                  "bands": ["B4", "B3", "B2"]}
  dropped = " ".join(n for n in notes if n.startswith("dropped:"))
  for k in ("fpn.fpn1.0.weight", "fcn_high.conv_blocks.0.weight", "fcn_low.conv_blocks.0.weight",
            "mask_token", "decoder_embed.weight", "mask_token_decoder"):
    assert k in dropped, dropped
  x = _images(2, 32, 3, seed=2)
  with torch.no_grad():
    want = ref(_nchw(x)).numpy()
  assert _rel(V.ViT(**VIT).apply({"params": params}, x), want) <= TOL
  with pytest.raises(ValueError, match="model 'vit'"):
    hub.import_state_dict(sd, "mae")


def test_timm_vit_head_and_learned_pos_embed(mae):
  _, params, spec, *_ = mae
  sd = _np_sd(hub.export_state_dict(spec, params, "timm"))
  sd.update({"head.weight": np.zeros((10, 192), np.float32), "head.bias": np.zeros(10, np.float32),
             "fc_norm.weight": np.ones(192, np.float32), "fc_norm.bias": np.zeros(192, np.float32)})
  _, p2, notes = hub.import_state_dict(sd)
  assert_bit_exact(p2, params["encoder"])
  assert any("head.weight" in n for n in notes) and any("fc_norm" in n for n in notes)
  learned = dict(sd, pos_embed=sd["pos_embed"] + 0.01)
  with pytest.raises(ValueError, match="vit:drop_pos_embed=1"):
    hub.import_state_dict(learned)
  _, p3, _ = hub.import_state_dict(learned, "vit:drop_pos_embed=1")
  assert_bit_exact(p3, params["encoder"])


# ---------------------------------------------------------------------------------------------
# Inference and errors.


def test_detect_layout_names(official, mmearth, mp_mae):
  assert hub.detect_layout(_np_sd(hub.export_state_dict(official[2], official[1], "official"))) \
      == "official"
  assert hub.detect_layout(_np_sd(hub.export_state_dict(official[2], official[1], "timm"))) \
      == "timm"
  assert hub.detect_layout(_np_sd(hub.export_state_dict(mmearth[2], mmearth[1], "mmearth"))) \
      == "mmearth"
  assert hub.detect_layout(_np_sd(hub.export_state_dict(mp_mae[2], mp_mae[1], "mmearth"))) \
      == "mp_mae"
  with pytest.raises(ValueError) as e:
    hub.import_state_dict({"foo.weight": np.zeros(3), "bar": np.zeros(1)})
  msg = str(e.value)
  assert "foo.weight" in msg and "timm ConvNeXt V2" in msg and "sparse_fcmae" in msg


def test_damaged_state_dict_names_every_problem(official):
  _, params, spec = official
  sd = _np_sd(hub.export_state_dict(spec, params, "official"))
  del sd["stages.2.1.grn.beta"]
  sd["stages.1.0.pwconv2.weight"] = np.zeros((16, 63), np.float32)
  sd["stages.0.0.extra"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as e:
    hub.import_state_dict(sd)
  msg = str(e.value)
  assert "3 problem(s)" in msg
  for part in ("missing: stages.2.1.grn.beta", "mis-shaped: stages.1.0.pwconv2.weight",
               "unexpected: stages.0.0.extra"):
    assert part in msg, msg


def test_clear_errors(mmearth, mp_mae):
  _, params, spec = mmearth
  with pytest.raises(ValueError, match="layout 'mmearth'"):
    hub.export_state_dict(spec, params, "timm")
  with pytest.raises(ValueError, match="layout 'mmearth'"):
    cv.flax_to_torch(params, "timm")
  with pytest.raises(ValueError, match="does not fit"):
    hub.export_state_dict(spec, params, "mae")
  # Heads that do not match the MMEarth modalities.
  _, mparams, mspec = mp_mae
  sd = _np_sd(hub.export_state_dict(mspec, mparams, "mmearth"))
  sd["pred_dict.era5.weight"] = np.zeros((7, 16), np.float32)
  sd["pred_dict.era5.bias"] = np.zeros(7, np.float32)
  with pytest.raises(ValueError, match=r"pred_dict\.era5: width 7"):
    hub.import_state_dict(sd)
  # A ViT width without a standard head count: the message says how to give it.
  vit = V.ViT(patch_size=8, embed_dim=64, depth=1, num_heads=4)
  vparams = _noise_params(vit, _images(1, 16, 3))
  vsd = _np_sd(tv.flax_to_torch_vit(vparams, img_size=16))
  with pytest.raises(ValueError, match="vit:num_heads=N"):
    hub.import_state_dict(vsd)
  vspec, vp, _ = hub.import_state_dict(vsd, "vit:num_heads=4")
  assert vspec["num_heads"] == 4 and vspec["img_size"] == [16, 16]
  assert_bit_exact(vp, vparams)
  with pytest.raises(ValueError, match="unknown model"):
    hub.import_state_dict(vsd, "resnet")
  with pytest.raises(ValueError, match="does not fit"):
    hub.import_state_dict(vsd, "convnextv2")


def test_real_atto_timm_layout():
  """timm's convnextv2_atto names and shapes, and the reference module holds the same tensors."""
  shapes = jax.eval_shape(cx.convnextv2("atto", stem="official", num_classes=1000).init,
                          jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  spec = hub.spec_from_params("convnextv2", params)
  sd = hub.export_state_dict(spec, params, "timm")
  assert sd["stem.0.weight"].shape == (40, 3, 4, 4)
  assert sd["stages.3.downsample.1.weight"].shape == (320, 160, 2, 2)
  assert sd["stages.2.blocks.5.mlp.fc1.weight"].shape == (640, 160, 1, 1)
  assert sd["stages.2.blocks.5.mlp.grn.bias"].shape == (640,)
  assert sd["head.fc.weight"].shape == (1000, 320)
  ref = tc.ConvNeXtV2Timm(3, *cx.VARIANTS["atto"], num_classes=1000)
  assert list(sd) == list(ref.state_dict())  # timm's order too
  ref.load_state_dict(sd, strict=True)
  assert sum(v.numel() for v in sd.values()) == sum(p.numel() for p in ref.parameters())


# ---------------------------------------------------------------------------------------------
# torch_io.


class Arbitrary:
  """Stands for any object a pickle might smuggle in."""

  def __init__(self):
    self.x = 1


def test_torch_io_round_trips(tmp_path, mp_mae):
  _, params, spec = mp_mae
  sd = hub.export_state_dict(spec, params, "mmearth")
  for name in ("m.safetensors", "m.pth"):
    path = str(tmp_path / name)
    torch_io.save_state_dict(sd, path)
    back = torch_io.load_state_dict(path)
    assert list(back) == list(sd)  # order kept (it carries the MP-MAE outputs order)
    assert all(np.array_equal(back[k], sd[k].numpy()) for k in sd)
    assert hub.import_state_dict(back)[0] == spec
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]
  raw = torch.load(str(tmp_path / "m.pth"), weights_only=True)
  assert set(raw) == {"model"}
  # The reference module's own state dict shares one decoder block's storage across modalities;
  # safetensors refuses shared storage unless each key gets its own copy.
  shared = tc.MPMAETorch({"lat": ["lat"], "lon": ["lon"]}, in_chans=3, patch_size=16,
                         decoder_dim=8, depths=DEPTHS, dims=DIMS).state_dict()
  assert shared["decoder_dict.lat.0.grn.gamma"].data_ptr() == \
      shared["decoder_dict.lon.0.grn.gamma"].data_ptr()
  torch_io.save_state_dict(shared, str(tmp_path / "shared.safetensors"))
  back = torch_io.load_state_dict(str(tmp_path / "shared.safetensors"))
  assert list(back) == list(shared)
  # numpy input and bfloat16
  bf = {"a": torch.arange(4, dtype=torch.bfloat16), "b": np.arange(3, dtype=np.float32)}
  torch_io.save_state_dict(bf, str(tmp_path / "bf.safetensors"))
  back = torch_io.load_state_dict(str(tmp_path / "bf.safetensors"))
  assert back["a"].dtype.name == "bfloat16" and np.array_equal(back["a"].astype(np.float32),
                                                                np.arange(4))


def test_torch_io_checkpoints_and_refusals(tmp_path):
  w = {"encoder.w": torch.ones(2, 3)}
  ckpt = str(tmp_path / "checkpoint-99.pth")
  opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
  torch.save({"model": w, "optimizer": opt.state_dict(), "epoch": 99,
              "scaler": {"scale": 65536.0, "growth_tracker": 3},
              "args": argparse.Namespace(lr=1.5e-4, modalities={"sentinel2": "all"},
                                         patch_size=16, use_orig_stem=False)}, ckpt)
  got = torch_io.load_state_dict(ckpt)
  assert list(got) == ["encoder.w"] and got["encoder.w"].shape == (2, 3)
  for wrapper in ("state_dict", "model_state"):
    torch.save({wrapper: w, "step": 3}, str(tmp_path / "w.pt"))
    assert list(torch_io.load_state_dict(str(tmp_path / "w.pt"))) == ["encoder.w"]
  bad = str(tmp_path / "bad.pth")
  torch.save({"model": w, "extra": Arbitrary()}, bad)
  with pytest.raises(torch_io.StateDictError, match=r"refusing to load .*bad\.pth.*Arbitrary"):
    torch_io.load_state_dict(bad)
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    torch_io.load_state_dict(str(tmp_path / "nope.pth"))
  (tmp_path / "junk.safetensors").write_bytes(b"not a file")
  with pytest.raises(torch_io.StateDictError, match="junk.safetensors"):
    torch_io.load_state_dict(str(tmp_path / "junk.safetensors"))
  (tmp_path / "junk.pth").write_bytes(b"not a file")
  with pytest.raises(torch_io.StateDictError, match="junk.pth"):
    torch_io.load_state_dict(str(tmp_path / "junk.pth"))
  with pytest.raises(torch_io.StateDictError, match="unknown state-dict format"):
    torch_io.save_state_dict(w, str(tmp_path / "w.npz"))
  # A failed write leaves neither the target nor a partial file.
  with pytest.raises(Exception):
    torch_io.save_state_dict({"x": np.array([object()])}, str(tmp_path / "x.safetensors"))
  assert not (tmp_path / "x.safetensors").exists()
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]
