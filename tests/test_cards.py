"""Model cards: written by the trainer, read with every checkpoint, kept by model folders, printed
by `info`, carried through `to-torch` / `from-torch`, and applied by `cards.normalise`.

One tiny training run (the reduced MP-MAE of test_train, 4 steps) is shared by the module.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import CONFIG, tiny

from mmearth_jax import bands as B
from mmearth_jax import cards, cli, config_lib, pretrained, train
from mmearth_jax import modalities as M
from mmearth_jax.data import convert, pipeline

pytestmark = pytest.mark.usefixtures("jax_compilation_cache")

OVERRIDES = ("train.num_steps=4",)


@pytest.fixture(scope="module")
def run_dir(shards64, tmp_path_factory, jax_compilation_cache):
  workdir = str(tmp_path_factory.mktemp("card_run"))
  overrides = tiny(shards64, *OVERRIDES)
  cfg = config_lib.load(f"{CONFIG}:demo", overrides)
  train.train(cfg, workdir, log=lambda m: None,
              provenance={"config": "mp_mae:demo", "overrides": overrides})
  return workdir


def expected_normalisation(shards: str, bands) -> dict:
  stats = convert.load_manifest(shards)["band_stats"]
  idx = M.get("sentinel2").band_indices(bands)
  return {level: ([stats[key]["mean"][i] for i in idx], [stats[key]["std"][i] for i in idx])
          for level, key in (("L1C", "sentinel2_l1c"), ("L2A", "sentinel2_l2a"))}


def test_training_writes_the_card_with_the_manifest_statistics(run_dir, shards64):
  card = cards.read(os.path.join(run_dir, "card.json"))
  assert card["bands"] == [{"name": b, "wavelength_nm": B.S2_WAVELENGTH_NM[b]}
                           for b in B.S2_INPUT_BANDS]
  assert card["bands"][7] == {"name": "B8A", "wavelength_nm": 865}  # stored order: B8A, B8
  for level, (mean, std) in expected_normalisation(shards64, B.S2_INPUT_BANDS).items():
    np.testing.assert_allclose(card["normalisation"][level]["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(card["normalisation"][level]["std"], std, rtol=1e-12)
    assert "reflectance x 10000" in card["normalisation"][level]["units"]
  assert card["method"] == "mp_mae" and card["arch"] == "mp_mae"
  assert card["encoder_arch"] == "convnextv2" and card["in_chans"] == 12
  assert (card["gsd_m"], card["patch_size"], card["input_size"]) == (10.0, 8, 56)
  assert (card["min_input_size"], card["output_stride"], card["feature_dim"]) == (10, 8, 16)
  prov = card["provenance"]
  assert prov["kind"] == "trained" and prov["config"] == "mp_mae:demo"
  assert prov["workdir"] == os.path.abspath(run_dir) and prov["data"] == os.path.abspath(shards64)
  assert "train.num_steps=4" in prov["overrides"] and prov["step"] is None
  assert card["assumed"] == [] and card["unknown"] == []

  # Each checkpoint's load gives the card with its step.
  latest = pretrained.load(run_dir)
  step = pretrained.load(os.path.join(run_dir, "checkpoints", "4"))
  for model in (latest, step):
    assert model.card["provenance"]["step"] == 4
    assert model.card["normalisation"] == card["normalisation"]
  assert pretrained.read_card(run_dir) == latest.card


def test_min_input_size_and_output_stride_are_the_encoders(run_dir):
  model = pretrained.load(run_dir)
  card, enc = model.card, pretrained.encoder_spec(model.spec)
  net, params = pretrained.build(enc), pretrained.encoder_params(model.spec, model.params)

  def shape(n):  # the final feature map's, traced (no compile)
    x = jax.ShapeDtypeStruct((1, n, n, 12), jnp.float32)
    return jax.eval_shape(lambda p, x: net.apply({"params": p}, x), params, x).shape[1:3]

  small = card["min_input_size"]
  assert shape(small) == (1, 1) and 0 in shape(small - 1)
  assert shape(card["input_size"]) == ((card["input_size"] - 2) // card["output_stride"],) * 2


def test_normalise_is_the_pipelines_z_score_and_names_what_is_missing(run_dir, shards64):
  card = pretrained.read_card(run_dir)
  rng = np.random.default_rng(0)
  raw = rng.integers(1, 6000, (2, 8, 8, 13)).astype(np.uint16)  # stored band order, no no-data
  s2 = M.get("sentinel2")
  idx = np.array(s2.band_indices(B.S2_INPUT_BANDS))
  transform = pipeline.Transform(convert.load_manifest(shards64)["band_stats"],
                                 B.S2_INPUT_BANDS, {}, 8)
  for level, (mean, std) in expected_normalisation(shards64, B.S2_INPUT_BANDS).items():
    got = cards.normalise(card, raw[..., idx], level)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, (raw[..., idx] - np.array(mean)) / np.array(std), rtol=1e-5,
                               atol=1e-5)
    want, _ = transform.zscore(s2, raw, idx, level.lower())  # what training fed the model
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  bare = cards.from_spec(pretrained.load(run_dir).spec)
  with pytest.raises(ValueError, match=r"no L2A normalisation statistics \(it has: none"):
    cards.normalise(bare, raw[..., idx])
  with pytest.raises(ValueError, match="no L1C normalisation .*it has: L2A"):
    cards.normalise({**card, "normalisation": {"L2A": card["normalisation"]["L2A"]}},
                    raw[..., idx], "L1C")
  with pytest.raises(ValueError, match=r"the images have 13 bands .* for 12 \(B1, B2"):
    cards.normalise(card, raw)


def test_info_prints_the_card(run_dir, capsys):
  assert cli.main(["info", run_dir]) == 0
  text = capsys.readouterr().out
  for want in ("method            mp_mae", "B8A      865", "L1C mean", "L2A std",
               "output_stride     8", "min_input_size    10", "reflectance x 10000",
               "step            4"):
    assert want in text, (want, text)
  assert cli.main(["info", run_dir, "--json"]) == 0
  assert json.loads(capsys.readouterr().out) == pretrained.read_card(run_dir)


def test_model_folders_keep_the_card_and_old_folders_get_the_specs(run_dir, tmp_path):
  model = pretrained.load(run_dir)
  path = pretrained.save(str(tmp_path / "m"), model.spec, model.params, source="test",
                         card=model.card)
  back = pretrained.load(path)
  assert back.card == model.card and pretrained.read_card(path) == model.card
  with open(os.path.join(path, "model.json")) as f:
    meta = json.load(f)
  assert meta["format"] == pretrained.FORMAT
  del meta["card"]  # a folder written before model cards
  with open(os.path.join(path, "model.json"), "w") as f:
    json.dump(meta, f)
  old = pretrained.load(path).card
  assert old["normalisation"] == {} and old["bands"] == model.card["bands"]
  assert old["feature_dim"] == 16 and any(u.startswith("normalisation") for u in old["unknown"])


def test_to_torch_and_from_torch_carry_the_card(run_dir, shards64, tmp_path, capsys):
  from safetensors import safe_open
  trained = pretrained.read_card(run_dir)
  for name in ("mp_mae.pth", "mp_mae.safetensors"):
    assert cli.main(["to-torch", "--checkpoint", run_dir, "--layout", "mmearth",
                     "--out", str(tmp_path / name)]) == 0
    beside = cards.read(str(tmp_path / (name + ".card.json")))
    assert beside["normalisation"] == trained["normalisation"]
    assert beside["provenance"]["kind"] == "exported"
    assert beside["provenance"]["from"]["step"] == 4
  with safe_open(str(tmp_path / "mp_mae.safetensors"), framework="np") as f:
    assert json.loads(f.metadata()[cards.METADATA_KEY]) == beside
  capsys.readouterr()
  assert cli.main(["info", str(tmp_path / "mp_mae.safetensors"), "--json"]) == 0  # its card
  assert json.loads(capsys.readouterr().out) == beside

  # The weights alone: every assumed value is printed and kept in the card.
  alone = tmp_path / "alone"
  alone.mkdir()
  shutil.copy(tmp_path / "mp_mae.pth", alone / "mp_mae.pth")
  assert cli.main(["from-torch", "--checkpoint", str(alone / "mp_mae.pth"),
                   "--out", str(tmp_path / "imported")]) == 0
  out = capsys.readouterr().out
  card = pretrained.load(str(tmp_path / "imported")).card
  assert card["assumed"] and all(f"assumed: {a}" in out for a in card["assumed"])
  assert any(a.startswith("bands B1,B2,B3") for a in card["assumed"])
  assert any(a.startswith("gsd_m 10") for a in card["assumed"])
  assert "unknown: normalisation" in out and card["normalisation"] == {}
  assert card["method"] == "mp_mae" and card["provenance"]["kind"] == "imported"

  # With the pretraining data's statistics; or with the card to-torch wrote beside the file.
  assert cli.main(["from-torch", "--checkpoint", str(alone / "mp_mae.pth"), "--band-stats",
                   shards64, "--out", str(tmp_path / "with_stats")]) == 0
  assert pretrained.load(str(tmp_path / "with_stats")).card["normalisation"] == \
      trained["normalisation"]
  capsys.readouterr()
  os.remove(tmp_path / "mp_mae.safetensors.card.json")  # the .safetensors: its metadata's card
  for name in ("mp_mae.pth", "mp_mae.safetensors"):
    assert cli.main(["from-torch", "--checkpoint", str(tmp_path / name),
                     "--out", str(tmp_path / f"back_{name}")]) == 0
    assert "assumed:" not in capsys.readouterr().out
    back = pretrained.load(str(tmp_path / f"back_{name}")).card
    assert back["assumed"] == [] and back["normalisation"] == trained["normalisation"]
    assert (back["gsd_m"], back["input_size"]) == (10.0, 56)
