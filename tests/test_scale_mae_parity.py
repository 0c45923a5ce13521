"""Scale-MAE: the Flax model against the plain-PyTorch reference (`interop.torch_scale_mae`) on the
same weights, mask and per-sample GSD: encoder tokens, both reconstructions and the Laplacian loss
(L2 and L1 high-frequency terms, both band_config branches), for independent / shared heads and
plain / progressive FPN at patch 16 and 8. Weight conversion: Flax -> torch -> Flax is bit-exact,
the export loads strictly into the reference, and the hub reads an exported .pth back as arch
"scale_mae". Small models (ViT width 64, decoder 32, fcn_dim 32) with noise weights."""
import jax
import numpy as np
import pytest
import torch

from mmearth_jax.interop import hub, torch_io
from mmearth_jax.interop import torch_scale_mae as ts
from mmearth_jax.interop import torch_vit as tv
from mmearth_jax.models import vit as V
from mmearth_jax.models.scale_mae import ScaleMAE
from mmearth_jax.objectives.scale_mae import scale_mae_loss_terms
from _trees import assert_bit_exact

torch.set_num_threads(2)
TOL = 1e-5
ENC = dict(embed_dim=64, depth=2, num_heads=4)
DEC = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, fcn_dim=32, fcn_layers=1)
HEADS = ":num_heads=4,decoder_num_heads=4"  # widths 64 / 32 do not tell the hub their heads
# name: (patch, input px, independent heads, progressive FPN); every option at both patches.
CASES = {"p16_independent": (16, 64, True, False), "p16_shared_progressive": (16, 64, False, True),
         "p8_independent_progressive": (8, 32, True, True), "p8_shared": (8, 32, False, False)}
GSD = np.array([0.6, 2.5], np.float32)  # per-sample grid scales, neither 1


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _noise_params(model, *args, seed=0, **kw):
  """Noise of the model's shapes (no init compile): kernels at 1/sqrt(fan_in), LayerNorm scales
  near 1, biases, tokens and norm offsets nonzero, so no transpose or placement can hide."""
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0),
                                              "masking": jax.random.key(1)}, *args, **kw))
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    x = rng.standard_normal(s.shape).astype(np.float32)
    name = path[-1].key
    if name == "kernel":
      return (x / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
    return (1.0 + 0.1 * x if name == "scale" else 0.1 * x).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes["params"])


def _nchw(x) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


class Case:
  """One configuration: Flax model + noise params, the torch reference loaded from their export,
  the same inputs and mask, and both forward passes."""

  def __init__(self, name: str, seed: int):
    p, size, independent, progressive = CASES[name]
    self.name, self.p, self.size = name, p, size
    self.model = ScaleMAE(patch_size=p, **ENC, **DEC, independent_fcn_head=independent,
                          progressive=progressive)
    n, g = 2, size // p
    self.grid, length = (g, g), g * g
    keep = self.model.keep_count(length)
    rng = np.random.default_rng(seed)
    self.x = rng.standard_normal((n, size, size, 3)).astype(np.float32)
    self.target = rng.standard_normal((n, 2 * size, 2 * size, 3)).astype(np.float32)
    perm = np.stack([rng.permutation(length) for _ in range(n)])  # ids_shuffle, as MAE's
    self.ids_keep, self.ids_restore = perm[:, :keep], np.argsort(perm, axis=1)
    self.params = _noise_params(self.model, self.x, GSD, ids_keep=self.ids_keep, seed=seed)

    self.state_dict = ts.flax_to_torch_scale_mae(self.params, img_size=size)
    self.torch = ts.ScaleMAETorch(img_size=size, patch_size=p, **ENC, **DEC,
                                  independent_fcn_head=independent, progressive=progressive)
    self.torch.load_state_dict(self.state_dict, strict=True)
    self.torch.eval()

    self.high, self.low, self.mask = self.model.apply({"params": self.params}, self.x, GSD,
                                                      ids_keep=self.ids_keep)
    with torch.no_grad():
      self.t_high, self.t_low, self.t_mask = self.torch(
          _nchw(self.x), torch.from_numpy(GSD), torch.from_numpy(self.ids_keep),
          torch.from_numpy(self.ids_restore))


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
  return Case(request.param, seed=list(CASES).index(request.param))


# ---------------------------------------------------------------------------------------------
# Parity.


@pytest.mark.parametrize("case", ["p16_independent", "p8_independent_progressive"],
                         indirect=True)  # the encoder ignores the decoder options
def test_encoder_tokens_match_torch(case):
  enc = V.ViT(patch_size=case.p, **ENC)
  ep = case.params["encoder"]
  with torch.no_grad():
    want_kept = case.torch.forward_encoder(_nchw(case.x), torch.from_numpy(GSD),
                                           torch.from_numpy(case.ids_keep)).numpy()
    want_all = case.torch.forward_encoder(_nchw(case.x), torch.from_numpy(GSD)).numpy()
  got_kept = enc.apply({"params": ep}, case.x, ids_keep=case.ids_keep, pos_scale=GSD)
  got_all = enc.apply({"params": ep}, case.x, pos_scale=GSD)
  assert got_kept.shape == want_kept.shape == (2, 1 + case.ids_keep.shape[1], 64)
  assert float(np.abs(np.asarray(got_kept) - want_kept).max()) <= TOL  # CLS and kept tokens
  assert float(np.abs(np.asarray(got_all) - want_all).max()) <= TOL
  # The GSD scale matters: at r = 1 the tokens differ.
  plain = enc.apply({"params": ep}, case.x, pos_scale=np.ones(2, np.float32))
  assert float(np.abs(np.asarray(plain) - want_all).max()) > 1e-2


def test_reconstructions_match_torch(case):
  s = case.size
  assert case.high.shape == (2, 2 * s, 2 * s, 3) and case.low.shape == (2, s, s, 3)
  assert _rel(case.high, _nhwc(case.t_high)) <= TOL
  assert _rel(case.low, _nhwc(case.t_low)) <= TOL
  np.testing.assert_array_equal(np.asarray(case.mask), case.t_mask.numpy())


@pytest.mark.parametrize("high_loss,l1_weight,band_config",
                         [("l2", 1.0, (7, 56)), ("l1", 0.7, (7, 56)), ("l1", 0.7, (14, 224))],
                         ids=["l2", "l1", "l1-d2_224"])
def test_loss_matches_torch_forward_loss(case, high_loss, l1_weight, band_config):
  total, terms = scale_mae_loss_terms(case.high, case.low, case.target, case.mask, case.grid,
                                      band_config=band_config, high_loss=high_loss,
                                      l1_weight=l1_weight)
  ref = case.torch
  ref.band_config, ref.use_l1_loss, ref.l1_loss_weight = band_config, high_loss == "l1", l1_weight
  with torch.no_grad():
    want = ref.forward_loss(_nchw(case.target), (case.t_high, case.t_low), case.t_mask)
    # The full forward with targets gives the same total.
    again = ref(_nchw(case.x), torch.from_numpy(GSD), torch.from_numpy(case.ids_keep),
                torch.from_numpy(case.ids_restore), _nchw(case.target))[0]
  assert float(again) == float(want[0])
  for got, ref_value in ((total, want[0]), (terms["high"], want[1]), (terms["low"], want[2])):
    assert abs(float(got) - float(ref_value)) <= TOL * abs(float(ref_value)), (got, ref_value)


# ---------------------------------------------------------------------------------------------
# Conversion and the hub.


def test_conversion_round_trip_is_bit_exact(case):
  sd = case.state_dict
  assert list(sd) == list(case.torch.state_dict())  # the release's key order
  assert_bit_exact(ts.torch_to_flax_scale_mae(sd), case.params)
  assert_bit_exact(ts.torch_to_flax_scale_mae({"model": sd}), case.params)
  # Filled on export as the release's initialize_weights leaves them: the fixed MAE table for
  # img_size in pos_embed, zeros in decoder_pos_embed (never filled upstream) and
  # mask_token_decoder.
  g = case.size // case.p
  np.testing.assert_array_equal(sd["pos_embed"][0], tv.sincos_2d_torch(64, g, g, True))
  assert sd["decoder_pos_embed"].shape == (1, g * g + 1, 32)
  assert not sd["decoder_pos_embed"].any()
  assert sd["mask_token_decoder"].shape == (1, 1, 32) and not sd["mask_token_decoder"].any()
  head = "fcn_high" if "fcn_high" in case.params else "fcn"
  k = case.params[head]["pred_1"]["kernel"]  # ConvT (k, k, in, out) -> torch (in, out, k, k)
  np.testing.assert_array_equal(sd[f"{head}.pred.1.weight"].numpy(),
                                np.asarray(k).transpose(2, 3, 0, 1))


@pytest.mark.parametrize("case", ["p16_independent", "p8_independent_progressive", "p8_shared"],
                         indirect=True)
def test_hub_pth_round_trip(case, tmp_path):
  spec = hub.spec_from_params("scale_mae", case.params, img_size=case.size, num_heads=4,
                              decoder_num_heads=4)
  _, _, independent, progressive = CASES[case.name]
  assert spec == {"arch": "scale_mae", "patch_size": case.p, "embed_dim": 64, "depth": 2,
                  "num_heads": 4, "mlp_ratio": 4.0, "in_chans": 3, "img_size": case.size,
                  "bands": ["B4", "B3", "B2"], "decoder_embed_dim": 32, "decoder_depth": 1,
                  "decoder_num_heads": 4, "fcn_dim": 32, "fcn_layers": 1,
                  "independent_fcn_head": independent, "progressive": progressive,
                  "out_chans": 3, "pos_layout": "concat"}
  sd = hub.export_state_dict(spec, case.params, "scale_mae")
  path = str(tmp_path / "scale_mae.pth")
  torch_io.save_state_dict(sd, path)
  raw = torch.load(path, weights_only=True)
  assert list(raw) == ["model"] and list(raw["model"]) == list(sd)
  loaded = torch_io.load_state_dict(path)
  assert hub.detect_layout(loaded) == "scale_mae"
  spec2, params2, notes = hub.import_state_dict(loaded, HEADS)
  assert spec2 == spec
  assert_bit_exact(params2, case.params)
  dropped = " ".join(n for n in notes if n.startswith("dropped:"))
  assert "pos_embed" in dropped and "mask_token_decoder" in dropped
  _, params3, _ = hub.import_state_dict(loaded, "scale_mae" + HEADS)  # forced: the same
  assert_bit_exact(params3, case.params)
  # Its encoder alone, from the same file or the timm export.
  spec_v, enc, _ = hub.import_state_dict(loaded, "vit" + HEADS)
  assert spec_v["arch"] == "vit"
  assert_bit_exact(enc, case.params["encoder"])
  assert_bit_exact(hub.import_state_dict(hub.export_state_dict(spec, case.params, "timm"),
                                          "vit" + HEADS)[1], case.params["encoder"])


def test_hub_errors_and_fallbacks():
  case = Case("p8_shared", seed=7)
  spec = hub.spec_from_params("scale_mae", case.params, img_size=32, num_heads=4,
                              decoder_num_heads=4)
  sd = {k: v.numpy() for k, v in hub.export_state_dict(spec, case.params, "scale_mae").items()}
  # An unused pos_emb_projection and absent fixed tables are fine.
  lean = {k: v for k, v in sd.items() if k not in ts.FILLED}
  lean["pos_emb_projection.weight"] = np.zeros((32, 32), np.float32)
  lean["pos_emb_projection.bias"] = np.zeros(32, np.float32)
  spec2, params2, notes = hub.import_state_dict(lean, "scale_mae" + HEADS + ",img_size=32")
  assert spec2 == spec
  assert_bit_exact(params2, case.params)
  assert any("pos_emb_projection.weight" in n for n in notes if n.startswith("dropped:"))
  # An incomplete decoder: forced, one error naming the keys; auto, the encoder with a note.
  broken = {k: v for k, v in sd.items() if not k.startswith("fcn.pred.")}
  with pytest.raises(ValueError, match="missing: fcn.pred.7.weight"):
    hub.import_state_dict(broken, "scale_mae" + HEADS)
  spec3, enc, notes = hub.import_state_dict(broken, HEADS)
  assert spec3["arch"] == "vit" and any("incomplete" in n for n in notes)
  assert_bit_exact(enc, case.params["encoder"])
  # A mis-shaped tensor is named.
  bad = dict(sd, **{"fcn.proj.bias": np.zeros(5, np.float32)})
  with pytest.raises(ValueError, match="mis-shaped: fcn/proj/bias"):
    hub.import_state_dict(bad, "scale_mae" + HEADS)
  # The paper's interleaved sin-cos layout does not fit the released code.
  with pytest.raises(ValueError, match="interleaved"):
    hub.export_state_dict(dict(spec, pos_layout="interleave"), case.params, "scale_mae")
  with pytest.raises(ValueError, match="model 'vit'"):
    hub.import_state_dict(sd, "mae")
  mae_like = {k: v for k, v in tv.TorchViT(32, 8, 3, 64, 1, 4).state_dict().items()}
  with pytest.raises(ValueError, match="without Scale-MAE's decoder"):
    hub.import_state_dict(mae_like, "scale_mae" + HEADS)
  # The Flax model built from the spec runs the imported weights.
  from mmearth_jax import pretrained
  high, _, _ = pretrained.build(spec2).apply({"params": params2}, case.x, GSD,
                                             ids_keep=case.ids_keep)
  assert _rel(high, case.high) == 0.0
