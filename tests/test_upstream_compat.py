"""data.upstream_compat: the reference loader's data quirks, each shown on crafted tiles of a real
MMEarth-layout variant (HDF5 + tile_info + band_stats + splits), converted and read back."""
import json
import os

import h5py
import jax.numpy as jnp
import numpy as np
import pytest

from mmearth_jax import config_lib
from mmearth_jax import modalities as M
from mmearth_jax.data import convert, pipeline, source, synth
from mmearth_jax.objectives import mp_mae

STEM = "data_synth_64"
FLIP = {"l1c": "l2a", "l2a": "l1c"}


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
  """(variant folder, shards folder): 4 synthetic tiles with the quirks written into rows 0-2."""
  src = str(tmp_path_factory.mktemp("crafted"))
  synth.write_sample(src, n=4, size=64, seed=0)
  with h5py.File(os.path.join(src, f"{STEM}.h5"), "r+") as f:
    esa = f["esa_worldcover"][0]
    esa[0, 0, :6] = [10, 20, 100, 0, 42, 5]
    f["esa_worldcover"][0] = esa
    canopy = f["canopy_height_eth"][0]
    canopy[:, 0, :3] = np.array([200, 255, 17], np.uint8).view(np.int8)
    f["canopy_height_eth"][0] = canopy
    f["biome"][0] = np.zeros(M.NUM_BIOMES, np.uint8)
    f["eco_region"][0] = np.full(M.NUM_ECOREGIONS, 65535, np.uint16)
    eco = np.zeros(M.NUM_ECOREGIONS, np.uint16)
    eco[[7, 3]] = [1, 65535]  # a one-hot with a no-data entry
    f["eco_region"][2] = eco
    meta = f["metadata"][1]
    meta["S2_type"] = FLIP[meta["S2_type"].decode()].encode()  # tile_info keeps the true type
    f["metadata"][1] = meta
  out = str(tmp_path_factory.mktemp("crafted_shards"))
  convert.convert(src, out, shards=1, log=lambda *a: None)
  return src, out


def _examples(shards, compat):
  """The 4 tiles as {row: example}, uncropped (crop = tile size)."""
  c = config_lib.data_config()
  c.path, c.crop, c.global_batch_size, c.num_epochs = shards, 64, 4, 1
  c.upstream_compat = compat
  it = iter(pipeline.make_dataset(c, process_index=0, process_count=1))
  (b,) = list(it)
  return {int(r): {"image": b["image"][i], "s2_type": int(b["s2_type"][i]),
                   "targets": {k: v[i] for k, v in b["targets"].items()},
                   "valid": {k: v[i] for k, v in b["valid"].items()}}
          for i, r in enumerate(b["row"])}, b


@pytest.fixture(scope="module")
def ours(crafted):
  return _examples(crafted[1], False)


@pytest.fixture(scope="module")
def upstream(crafted):
  return _examples(crafted[1], True)


def _stats(src):
  with open(os.path.join(src, f"{STEM}_band_stats.json")) as f:
    return json.load(f)


def test_the_switch_is_off_by_default():
  assert config_lib.data_config().upstream_compat is False


def test_esa_tree_cover_is_never_a_target_upstream(ours, upstream):
  (o, _), (u, _) = ours, upstream
  np.testing.assert_array_equal(o[0]["targets"]["esa_worldcover"][0, :4], [0, 1, 10, -1])
  np.testing.assert_array_equal(u[0]["targets"]["esa_worldcover"][0, :4], [-1, 1, 10, -1])
  assert not u[0]["valid"]["esa_worldcover"][0, 0]
  # Class 0 (tree cover) never appears upstream; these tiles have it.
  assert all((u[r]["targets"]["esa_worldcover"] != 0).all() for r in range(4))
  assert any((o[r]["targets"]["esa_worldcover"] == 0).any() for r in range(4))


def test_esa_values_outside_the_code_list_upstream(ours, upstream):
  (o, _), (u, _) = ours, upstream
  # 42 is above the last class (10): missing in both; 5 is kept upstream as class 5 (bare).
  np.testing.assert_array_equal(o[0]["targets"]["esa_worldcover"][0, 4:6], [-1, -1])
  np.testing.assert_array_equal(u[0]["targets"]["esa_worldcover"][0, 4:6], [-1, 5])
  assert u[0]["valid"]["esa_worldcover"][0, 5]


def test_canopy_height_is_signed_int8_with_no_missing_upstream(crafted, ours, upstream):
  (o, _), (u, _) = ours, upstream
  st = _stats(crafted[0])["canopy_height_eth"]
  mean, std = np.array(st["mean"]), np.array(st["std"])
  z = lambda v: (np.asarray(v, np.float64)[:, None] - mean) / std  # (pixel, band)
  t, v = o[0]["targets"]["canopy_height_eth"][0, :3], o[0]["valid"]["canopy_height_eth"][0, :3]
  np.testing.assert_array_equal(v, [[True, True], [False, False], [True, True]])
  np.testing.assert_allclose(t[[0, 2]], z([200, 17]), atol=1e-5)
  t, v = u[0]["targets"]["canopy_height_eth"][0, :3], u[0]["valid"]["canopy_height_eth"][0, :3]
  assert v.all()
  np.testing.assert_allclose(t, z([-56, -1, 17]), atol=1e-5)
  for r in range(4):  # nothing is ever missing upstream
    assert u[r]["valid"]["canopy_height_eth"].all()


def test_empty_or_nodata_one_hot_trains_as_class_0_upstream(ours, upstream):
  (o, ob), (u, ub) = ours, upstream
  assert o[0]["targets"]["biome"] == -1 and not o[0]["valid"]["biome"]
  assert u[0]["targets"]["biome"] == 0 and u[0]["valid"]["biome"]
  assert o[0]["targets"]["eco_region"] == -1 and u[0]["targets"]["eco_region"] == 0
  assert o[2]["targets"]["eco_region"] == -1 and u[2]["targets"]["eco_region"] == 7
  for r in (1, 3):  # a clean one-hot is the same class either way
    assert o[r]["targets"]["biome"] == u[r]["targets"]["biome"] >= 0
  # The loss counts the empty vector upstream (as class 0) and ignores it here.
  logits = np.random.default_rng(0).standard_normal((4, M.NUM_BIOMES)).astype(np.float32)
  ce = -(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))
  for b, rows in ((ob, [1, 2, 3]), (ub, [0, 1, 2, 3])):
    i = [list(b["row"]).index(r) for r in rows]
    labels = b["targets"]["biome"][i]
    assert (labels >= 0).all()
    got = mp_mae.modality_losses({"biome": jnp.asarray(logits)}, b, jnp.ones((4, 1, 1)), 1)
    np.testing.assert_allclose(got["biome"], ce[i, labels].mean(), rtol=1e-5)


def test_sentinel2_statistics_follow_tile_info_upstream(crafted, ours, upstream):
  src = crafted[0]
  (o, _), (u, _) = ours, upstream
  stats = _stats(src)
  with open(os.path.join(src, f"{STEM}_tile_info.json")) as f:
    info = json.load(f)
  with h5py.File(os.path.join(src, f"{STEM}.h5"), "r") as f:
    meta = f["metadata"][1]
    s2 = f["sentinel2"][1].transpose(1, 2, 0).astype(np.float64)
  from_meta, from_info = meta["S2_type"].decode(), info[meta["tile_id"].decode()]["S2_type"]
  assert from_meta != from_info
  idx = M.MODALITIES["sentinel2"].band_indices(M.S2_INPUT_BANDS)

  def z(s2_type):
    st = stats[f"sentinel2_{s2_type}"]
    x = s2[..., idx]
    return np.where(x == 0, 0, (x - np.array(st["mean"])[idx]) / np.array(st["std"])[idx])

  np.testing.assert_allclose(o[1]["image"], z(from_meta), atol=1e-4)
  np.testing.assert_allclose(u[1]["image"], z(from_info), atol=1e-4)
  assert o[1]["s2_type"] == M.S2_TYPES.index(from_meta)
  assert u[1]["s2_type"] == M.S2_TYPES.index(from_info)
  for r in (0, 2, 3):  # where the two agree, so do the modes
    np.testing.assert_array_equal(o[r]["image"], u[r]["image"])


def test_tile_info_s2_type_rules_and_shards_without_it(crafted):
  src = crafted[0]
  manifest = convert.load_manifest(crafted[1])
  bands = M.S2_INPUT_BANDS
  tr = pipeline.Transform(manifest["band_stats"], bands, M.resolve_outputs("all", bands), 64,
                          upstream_compat=True)
  with h5py.File(os.path.join(src, f"{STEM}.h5"), "r") as f:
    (tile,) = source.read_rows(f, list(manifest["modalities"]), [0])  # meta as before the switch
  meta = tile.pop("meta")
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="re-convert"):
    tr.apply(tile, meta, rng)
  # Upstream tests tile_info's S2_type == "l2a" only; the HDF5 metadata's is never read.
  for info, want in (("l2a", "l2a"), ("L2A", "l1c"), ("l1c", "l1c")):
    ex = tr.apply(tile, {**meta, "S2_type": "?", source.TILE_INFO_S2_TYPE: info}, rng)
    assert ex["s2_type"] == M.S2_TYPES.index(want)
  with pytest.raises(ValueError, match="no S2_type"):
    tr.apply(tile, {**meta, source.TILE_INFO_S2_TYPE: None}, rng)
