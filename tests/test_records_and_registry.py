import numpy as np
import pytest

from mmearth_jax import modalities as M
from mmearth_jax.data import records


def test_record_roundtrip_keeps_dtype_shape_and_values():
  rng = np.random.default_rng(0)
  arrays = {
      "s2": rng.integers(0, 20000, (7, 5, 13), dtype=np.uint16),
      "s1": rng.standard_normal((3, 3, 8)).astype(np.float32),
      "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
      "scalar": np.array(3.5),
      "odd": np.arange(3, dtype=np.uint8),
  }
  arrays["s1"][0, 0, 0] = -np.inf
  meta = {"tile_id": "abc", "S2_type": "l2a", "row": 17}
  out, meta_out = records.decode(records.encode(arrays, meta))
  assert meta_out == meta
  assert list(out) == list(arrays)
  for k, v in arrays.items():
    np.testing.assert_array_equal(out[k], v)
    assert out[k].shape == v.shape
    want = v.dtype.newbyteorder("<") if v.dtype.byteorder == ">" else v.dtype
    assert out[k].dtype == want
  assert out["big_endian"].dtype.str == "<i4"


def test_record_rejects_foreign_bytes():
  with pytest.raises(ValueError, match="bad magic"):
    records.decode(b"\x08\x01garbage")


def test_registry_band_order_and_facts():
  s2 = M.MODALITIES["sentinel2"]
  assert s2.bands.index("B8A") == 7 and s2.bands.index("B8") == 8  # B8A before B8
  assert len(s2.bands) == 13 and "B10" not in M.S2_INPUT_BANDS and len(M.S2_INPUT_BANDS) == 12
  assert M.MODALITIES["sentinel1"].num_bands == 8
  assert M.MODALITIES["era5"].num_bands == 12
  assert M.MODALITIES["eco_region"].num_classes == 846
  assert M.MODALITIES["biome"].num_classes == 14
  assert M.MODALITIES["esa_worldcover"].label_map[95] == 9
  assert M.MODALITIES["esa_worldcover"].label_map[100] == 10
  assert M.MODALITIES["dynamic_world"].label_map == {v: v - 1 for v in range(1, 10)}
  assert M.stats_key_for(s2, "l1c") == "sentinel2_l1c"
  assert len(M.ALL_OUTPUTS) == 12


def test_output_presets_are_the_paper_ablations():
  # Upstream's OUT_MODALITIES order (MMEarth-train MODALITIES.py), also its log_vars order.
  upstream = ["sentinel2", "sentinel1", "aster", "era5", "dynamic_world", "canopy_height_eth",
              "lat", "lon", "biome", "eco_region", "month", "esa_worldcover"]
  assert list(M.output_preset("all")) == list(M.ALL_OUTPUTS) == upstream
  assert list(M.output_preset("s2_only")) == ["sentinel2"]
  assert M.output_preset("rgb_only") == {"sentinel2": ("B4", "B3", "B2")}
  pixel = M.output_preset("pixel_only")
  assert set(pixel) == {"sentinel2", "sentinel1", "aster", "canopy_height_eth", "dynamic_world",
                        "esa_worldcover"}
  image = M.output_preset("image_only")
  assert set(image) == {"sentinel2", "lat", "lon", "month", "era5", "biome", "eco_region"}
  # Sentinel-2 as a target reconstructs the input bands.
  assert M.output_preset("all", M.RGB_BANDS)["sentinel2"] == M.RGB_BANDS


def test_selection_errors_name_the_bad_value():
  with pytest.raises(KeyError, match="unknown output preset 'everything'"):
    M.output_preset("everything")
  with pytest.raises(KeyError, match="no band 'B13'"):
    M.resolve_input(["B2", "B13"])
  with pytest.raises(KeyError, match="not a pretext target"):
    M.resolve_outputs(["sentinel2_scl"], M.S2_INPUT_BANDS)
