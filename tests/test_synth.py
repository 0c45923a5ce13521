"""The built-in sample: upstream layout, determinism, statistics, learnable content, quirks."""
import json
import os

import h5py
import numpy as np
import pytest

from mmearth_jax import modalities as M
from mmearth_jax.data import synth


def _load(folder):
  stem = [f[:-3] for f in os.listdir(folder) if f.endswith(".h5")][0]
  js = {k: json.load(open(os.path.join(folder, f"{stem}_{k}.json")))
        for k in ("band_stats", "splits", "tile_info")}
  return os.path.join(folder, f"{stem}.h5"), js


def test_upstream_layout(sample64):
  h5_path, js = _load(sample64)
  with h5py.File(h5_path) as f:
    n = f["metadata"].shape[0]
    assert n == 48
    assert f["metadata"].dtype == M.METADATA_DTYPE
    for name, m in M.MODALITIES.items():
      d = f[name]
      assert d.dtype == np.dtype(m.dtype), name
      want = (n, m.num_bands, 64, 64) if m.level == M.PIXEL else (n, m.num_bands)
      assert d.shape == want, name
      assert d.chunks == (1,) + want[1:], name  # one sample per chunk, as upstream
      assert d.compression == "gzip", name
    tile_ids = [t.decode() for t in f["metadata"]["tile_id"]]
    s2_types = [t.decode() for t in f["metadata"]["S2_type"]]
  assert js["splits"] == {"train": list(range(n)), "val": [], "test": []}
  assert set(js["tile_info"]) == set(tile_ids)
  for tid, s2_type in zip(tile_ids, s2_types):
    info = js["tile_info"][tid]
    assert info["S2_type"] == s2_type
    assert {"S2_DATE", "CRS", "lat", "lon", "biome", "eco_region", "NO_DATA", "BANDS", "era5"} <= set(info)
  assert set(js["band_stats"]) == set(M.BAND_STATS_KEYS)
  assert os.path.exists(os.path.join(sample64, "LICENSE-data"))


def test_deterministic_for_a_seed(tmp_path):
  a, b, c = (str(tmp_path / x) for x in "abc")
  synth.write_sample(a, n=3, size=64, seed=5)
  synth.write_sample(b, n=3, size=64, seed=5)
  synth.write_sample(c, n=3, size=64, seed=6)
  with h5py.File(_load(a)[0]) as fa, h5py.File(_load(b)[0]) as fb, h5py.File(_load(c)[0]) as fc:
    for name in M.MODALITIES:
      np.testing.assert_array_equal(fa[name][:], fb[name][:])
    assert not np.array_equal(fa["sentinel2"][:], fc["sentinel2"][:])


def test_band_stats_are_computed_from_valid_data(sample64):
  h5_path, js = _load(sample64)
  with h5py.File(h5_path) as f:
    s2 = f["sentinel2"][:].astype(np.float64)
    types = np.array([t.decode() for t in f["metadata"]["S2_type"]])
    canopy = f["canopy_height_eth"][:].view(np.uint8).astype(np.float64)
    s1 = f["sentinel1"][:].astype(np.float64)
  for s2_type in ("l1c", "l2a"):
    b4 = s2[types == s2_type, M.S2_BANDS.index("B4")]
    valid = b4[b4 != 0]  # 0 = no data
    st = js["band_stats"][f"sentinel2_{s2_type}"]
    assert st["mean"][3] == pytest.approx(valid.mean(), rel=1e-9)
    assert st["std"][3] == pytest.approx(valid.std(), rel=1e-6)
    assert st["min"][3] == valid.min() and st["max"][3] == valid.max()
  h = canopy[:, 0]
  assert js["band_stats"]["canopy_height_eth"]["mean"][0] == pytest.approx(h[h != 255].mean(), rel=1e-9)
  assert (h == 255).any()  # no-data really was excluded
  vv = s1[:, 0]
  assert js["band_stats"]["sentinel1"]["mean"][0] == pytest.approx(vv[np.isfinite(vv)].mean(), rel=1e-9)


def test_content_is_learnable_and_consistent(sample64):
  h5_path, js = _load(sample64)
  with h5py.File(h5_path) as f:
    dw = f["dynamic_world"][:, 0].astype(int)  # 1..9, 0 = no data
    esa = f["esa_worldcover"][:, 0]
    s2 = f["sentinel2"][:].astype(float)
    s1 = f["sentinel1"][:]
    canopy = f["canopy_height_eth"][:].view(np.uint8)
    biome = f["biome"][:]
    lat = f["lat"][:]
    tile_ids = [t.decode() for t in f["metadata"]["tile_id"]]
  valid = dw > 0
  # Spatially coherent land cover: neighbours share a class far more often than chance (1/9).
  same = (dw[:, :, 1:] == dw[:, :, :-1])[valid[:, :, 1:] & valid[:, :, :-1]]
  assert same.mean() > 0.9
  # The land cover drives the other modalities.
  water, trees, built = dw == 1, dw == 2, dw == 7
  nir = s2[:, M.S2_BANDS.index("B8")]
  assert nir[trees].mean() > 3 * nir[water].mean()
  assert s1[:, 0][water & np.isfinite(s1[:, 0])].mean() < s1[:, 0][built & np.isfinite(s1[:, 0])].mean() - 10
  assert canopy[:, 0][trees].mean() > 10 > canopy[:, 0][water].mean()
  esa_of_dw = np.array([0, 80, 10, 30, 90, 40, 20, 50, 60, 70])[dw]
  agree = (esa == esa_of_dw) | (esa == 95) | (esa == 100)
  assert agree[valid].mean() > 0.99
  # Image-level targets match tile_info and the pixels' location.
  for i, tid in enumerate(tile_ids):
    info = js["tile_info"][tid]
    assert biome[i].argmax() == info["biome"]
    assert lat[i, 0] == pytest.approx(np.sin(np.radians(info["lat"])), abs=1e-6)


def test_upstream_quirks_are_present(sample64):
  h5_path, _ = _load(sample64)
  with h5py.File(h5_path) as f:
    types = np.array([t.decode() for t in f["metadata"]["S2_type"]])
    s2 = f["sentinel2"][:]
    scl = f["sentinel2_scl"][:]
    prob = f["sentinel2_cloudprod"][:]
    s1 = f["sentinel1"][:]
    era5 = f["era5"][:]
    dw = f["dynamic_world"][:]
  l1c, l2a = types == "l1c", types == "l2a"
  assert l1c.any() and l2a.any()
  b10 = s2[:, M.S2_BANDS.index("B10")]
  assert (b10[l2a] == 0).all() and (b10[l1c] > 0).any()
  assert (scl[l1c] == 255).all() and (prob[l1c] == 65535).all()
  assert (scl[l2a] != 255).all()
  nodata = (s2 == 0).all(axis=1)  # all bands missing: a no-data patch
  assert nodata.any()
  assert (dw[:, 0][nodata] == 0).all()
  hh_missing = np.isneginf(s1[:, M.S1_BANDS.index("asc_HH")]).all(axis=(1, 2))
  assert hh_missing.mean() > 0.7 and not hh_missing.all()
  assert np.isnan(era5).any() and not np.isnan(era5).all()


def test_sizes(tmp_path):
  synth.write_sample(str(tmp_path / "a"), n=1, size=128)
  with h5py.File(_load(str(tmp_path / "a"))[0]) as f:
    assert f["sentinel2"].shape == (1, 13, 128, 128)
  with pytest.raises(ValueError, match="--size"):
    synth.write_sample(str(tmp_path / "b"), n=1, size=100)


def _per_tile_class_means(folder, modality, band, cls):
  """Mean of one band over a class's cloud-free pixels, per L2A tile (L1C adds a TOA offset)."""
  h5_path, js = _load(folder)
  with h5py.File(h5_path) as f:
    clear = f["sentinel2_cloudmask"][:, 0] == 0
    dw = np.where(clear, f["dynamic_world"][:, 0].astype(int), 0)
    x = f[modality][:, band].astype(float)
    l2a = [js["tile_info"][t.decode()]["S2_type"] == "l2a" for t in f["metadata"]["tile_id"]]
  return np.array([x[i][dw[i] == cls].mean() for i in range(len(dw))
                   if l2a[i] and (dw[i] == cls).sum() > 20])


def test_scene_variation_varies_class_spectra_between_tiles_not_the_other_modalities(tmp_path):
  """--scene-variation: a class's Sentinel-2 spectrum changes from tile to tile (what makes a few
  labelled tiles insufficient), its Sentinel-1 backscatter does not; the default sample has
  nearly fixed class spectra."""
  plain, varied = str(tmp_path / "plain"), str(tmp_path / "varied")
  synth.write_sample(plain, n=60, size=64, seed=3)
  synth.write_sample(varied, n=60, size=64, seed=3, scene_variation=True)
  b4, vv, trees = M.S2_BANDS.index("B4"), 0, 2  # red; ascending VV; Dynamic World "trees" + 1

  def spread(folder, modality, band):
    m = _per_tile_class_means(folder, modality, band, trees)
    m = m[np.isfinite(m)]
    return m.std() / abs(m.mean())

  assert spread(varied, "sentinel2", b4) > 5 * spread(plain, "sentinel2", b4)
  assert spread(varied, "sentinel1", vv) < 1.5 * spread(plain, "sentinel1", vv)
