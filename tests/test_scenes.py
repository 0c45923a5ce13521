"""Scenes in, maps out: `embed --scene`, `--pool`, `segment-scene` and the bad input around them,
on small multi-band UTM GeoTIFFs written here the way Sentinel-2 exports are laid out."""
import json
import os
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import Affine  # noqa: E402

from mmearth_jax import cards, cli, pretrained, scenes, testing  # noqa: E402
from mmearth_jax.methods import encoders  # noqa: E402

BANDS = ["B2", "B3", "B4", "B8"]
MEAN = [900.0, 1200.0, 1500.0, 2200.0]
STD = [500.0, 600.0, 700.0, 900.0]


def _model(arch: str = "convnextv2") -> pretrained.Pretrained:
  if arch == "convnextv2":
    spec = encoders.convnextv2_spec("atto", depths=(1, 1, 1, 1), dims=(8, 16, 16, 16),
                                    bands=BANDS, patch_size=16)
  else:
    spec = encoders.vit_spec({"variant": "S", "patch_size": 8, "embed_dim": 32, "depth": 1,
                              "num_heads": 2}, img_size=32, bands=BANDS, in_chans=len(BANDS))
  net = pretrained.build(spec)
  params = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, len(BANDS))))["params"]
  card = cards.from_spec(spec, {"kind": "trained", "source": "test"})
  card["normalisation"] = {"L2A": {"mean": MEAN, "std": STD, "units": "reflectance x 10000",
                                   "stats_key": "sentinel2_l2a"}}
  return pretrained.Pretrained(spec, jax.tree.map(np.asarray, params), "test", card)


@pytest.fixture(scope="module")
def model():
  return _model()


def _normalised(raw_chw: np.ndarray) -> np.ndarray:
  x = np.moveaxis(raw_chw.astype(np.float32), 0, -1)
  return (x - np.float32(MEAN)) / np.float32(STD)


def _dense(model, x_hwc: np.ndarray) -> np.ndarray:
  fn = pretrained.dense_fn(model.spec)
  return np.asarray(jax.jit(fn)(pretrained.encoder_params(model.spec, model.params),
                                x_hwc[None]))[0]


def _read(path):
  with rasterio.open(path) as src:
    return src.read(), src.profile, src.tags(), src.tags(ns="IMAGE_STRUCTURE")


def _opts(**kw):
  return scenes.Options(progress=False, **kw)


def test_a_scene_that_fits_one_tile_is_the_direct_forward_georeferenced(model, tmp_path):
  scene = tmp_path / "s2.tif"
  raw = testing.write_s2_scene(str(scene), BANDS, height=80, width=96)
  out = tmp_path / "emb.tif"
  written = scenes.embed_scene(model, str(scene), str(out), _opts())
  grid, profile, tags, structure = _read(out)
  want = _dense(model, _normalised(raw))  # (5, 6, 16)
  assert grid.shape == (16, 5, 6) == written.shape and written.tiles == 1
  np.testing.assert_allclose(np.moveaxis(grid, 0, -1), want, rtol=1e-5, atol=1e-5)
  assert profile["crs"] == rasterio.crs.CRS.from_epsg(32633)
  # Cell (0, 0) covers input pixels [0, 16): the transform is the scene's scaled by 16.
  assert profile["transform"] == Affine(160.0, 0, 399_960.0, 0, -160.0, 5_300_040.0)
  assert profile["nodata"] == scenes.EMBEDDING_NODATA
  assert structure.get("LAYOUT") == "COG"
  assert json.loads(tags["mmearth_jax_card"])["feature_dim"] == 16
  assert not list(tmp_path.glob("*partial*"))


def test_tiles_are_stitched_from_the_tile_each_cell_is_most_central_in(model, tmp_path):
  scene = tmp_path / "s2.tif"
  raw = testing.write_s2_scene(str(scene), BANDS, height=150, width=200, seed=1)
  out = tmp_path / "emb.tif"
  written = scenes.embed_scene(model, str(scene), str(out), _opts(tile=64, overlap=32))
  grid = np.moveaxis(_read(out)[0], 0, -1)
  x = _normalised(raw)
  # Rows: tiles start at 0, 32, 64, 80 (the last flush with the scene, on the 16 px grid).
  rows = scenes.axis(150, 64, 32, scenes.grid_of(model.card, lambda n: n // 16), "height")
  assert rows.starts == (0, 32, 64, 80) and rows.owned == ((0, 3), (3, 5), (5, 7), (7, 9))
  assert grid.shape[:2] == (9, 12) and written.tiles == 4 * 5
  # Each cell is its owning tile's output: here the tile at (32, 64) owns rows 3-4, cols 5-6.
  tile = _dense(model, x[32:96, 64:128])
  np.testing.assert_allclose(grid[3:5, 5:7], tile[1:3, 1:3], rtol=1e-5, atol=1e-5)
  # The scene's corners come from the corner tiles, edges included.
  np.testing.assert_allclose(grid[:3, :3], _dense(model, x[:64, :64])[:3, :3], atol=1e-5)
  np.testing.assert_allclose(grid[-2:, -3:], _dense(model, x[80:144, 128:192])[-2:, -3:],
                             atol=1e-5)
  assert (grid != scenes.EMBEDDING_NODATA).all()


def test_nodata_and_cloud_masked_pixels_become_nodata_cells_not_nans(model, tmp_path):
  scene = tmp_path / "s2.tif"
  # uint16 with nodata 0: a hole over cells (1, 1) and (1, 2) exactly, and one pixel elsewhere.
  raw = testing.write_s2_scene(str(scene), BANDS + ["CLD"], height=64, width=80,
                               holes=[(16, 16, 16, 32), (50, 70, 1, 1)])
  with rasterio.open(scene, "r+") as dst:  # a cloud mask band: 1 over cell (3, 4)
    cloud = np.zeros((64, 80), np.uint16)
    cloud[48:64, 64:80] = 1
    dst.write(cloud, 5)
  out = tmp_path / "emb.tif"
  written = scenes.embed_scene(model, str(scene), str(out), _opts(mask_band=5))
  grid = _read(out)[0]
  nodata = (grid == scenes.EMBEDDING_NODATA).all(0)
  want = np.zeros((4, 5), bool)
  want[1, 1:3] = want[3, 4] = True
  np.testing.assert_array_equal(nodata, want)
  assert written.nodata_cells == 3 and np.isfinite(grid).all()
  # Masked pixels enter as 0 (the mean): the valid cells are the forward of that input.
  x = _normalised(raw[:4])
  x[16:32, 16:48] = 0
  x[50, 70] = 0
  x[48:, 64:] = 0
  np.testing.assert_allclose(np.moveaxis(grid, 0, -1)[~want], _dense(model, x)[~want],
                             rtol=1e-5, atol=1e-5)


def test_float_scene_with_nans_and_reflectance_units(model, tmp_path):
  scene = tmp_path / "s2_float.tif"
  raw = testing.write_s2_scene(str(scene), BANDS, height=48, width=48, dtype="float32",
                               nodata=None, holes=[(0, 0, 16, 16)])
  grid = np.moveaxis(_read_after(model, scene, tmp_path / "emb.tif", _opts()), 0, -1)
  assert np.isfinite(grid).all() and (grid[0, 0] == scenes.EMBEDDING_NODATA).all()
  assert (grid[1:, 1:] != scenes.EMBEDDING_NODATA).all()
  # Reflectance in 0..1 against statistics of reflectance x 10000: refused, then --scale.
  testing.write_s2_scene(str(scene), BANDS, height=48, width=48, dtype="float32", nodata=None)
  with rasterio.open(scene, "r+") as dst:
    dst.write((dst.read() / 10000).astype("float32"))
  with pytest.raises(scenes.SceneError, match="--scale 10000"):
    scenes.embed_scene(model, str(scene), str(tmp_path / "e2.tif"), _opts())
  a = _read_after(model, scene, tmp_path / "e3.tif", _opts(scale=10000))
  assert (a != scenes.EMBEDDING_NODATA).all()
  del raw


def _read_after(model, scene, out, opts):
  scenes.embed_scene(model, str(scene), str(out), opts)
  return _read(out)[0]


def test_bands_are_matched_by_description_by_list_or_refused_naming_both(model, tmp_path):
  ordered = tmp_path / "ordered.tif"
  raw = testing.write_s2_scene(str(ordered), BANDS, height=32, width=32)
  want = _read_after(model, ordered, tmp_path / "a.tif", _opts())
  # The file's own order, aliases and an extra band: matched by the descriptions.
  shuffled = tmp_path / "shuffled.tif"
  order = [3, 0, 2, 1]
  testing.write_s2_scene(str(shuffled), ["B8", "B2", "B4", "B3", "B11"], height=32, width=32,
                         descriptions=["nir", "B02", "B04", "B03", "B11"])
  with rasterio.open(shuffled, "r+") as dst:
    for i, j in enumerate(order):
      dst.write(raw[j], i + 1)
  np.testing.assert_allclose(_read_after(model, shuffled, tmp_path / "b.tif", _opts()), want,
                             atol=1e-6)
  # No descriptions: named by --bands, in file order.
  bare = tmp_path / "bare.tif"
  testing.write_s2_scene(str(bare), ["B8", "B2", "B4", "B3", "B11"], height=32, width=32,
                         descriptions=[None] * 5)
  with rasterio.open(bare, "r+") as dst:
    for i, j in enumerate(order):
      dst.write(raw[j], i + 1)
  got = _read_after(model, bare, tmp_path / "c.tif", _opts(bands=["B8", "B2", "B4", "B3", "B11"]))
  np.testing.assert_allclose(got, want, atol=1e-6)
  with pytest.raises(scenes.SceneError, match="no descriptions.*--bands"):
    scenes.embed_scene(model, str(bare), str(tmp_path / "d.tif"), _opts())
  # Bands that cannot be matched: both sets named.
  other = tmp_path / "other.tif"
  testing.write_s2_scene(str(other), ["B2", "B3", "B4", "B5"], height=32, width=32)
  with pytest.raises(scenes.SceneError) as e:
    scenes.embed_scene(model, str(other), str(tmp_path / "e.tif"), _opts())
  assert "B2, B3, B4, B8" in str(e.value) and "B2, B3, B4, B5" in str(e.value)
  assert "missing B8" in str(e.value) and not (tmp_path / "e.tif").exists()


def _peak_host_memory(model, scene, out, opts) -> int:
  tracemalloc.start()
  try:
    written = scenes.embed_scene(model, str(scene), str(out), opts)
    return tracemalloc.get_traced_memory()[1], written
  finally:
    tracemalloc.stop()


def test_a_scene_larger_than_the_window_streams_in_bounded_memory(model, tmp_path):
  """Peak host memory (numpy and Python, traced) is the same for a scene 16x the area, and
below the big scene's own size: it is bounded by the tile and the batch, not the scene."""
  small, big = tmp_path / "small.tif", tmp_path / "big.tif"
  testing.write_s2_scene(str(small), BANDS, height=256, width=256, seed=3)
  testing.write_s2_scene(str(big), BANDS, height=1024, width=1024, seed=3)
  opts = _opts(tile=128, batch_size=2)
  scenes.embed_scene(model, str(small), str(tmp_path / "warm.tif"), opts)  # compile
  peak_small, _ = _peak_host_memory(model, small, tmp_path / "a.tif", opts)
  peak_big, written = _peak_host_memory(model, big, tmp_path / "b.tif", opts)
  assert written.shape == (16, 64, 64) and written.tiles == 11 * 11  # 0, 96, ..., 864, 896
  big_bytes = 1024 * 1024 * len(BANDS) * 4  # the big scene as float32: 16 MB
  assert peak_big < 1.3 * peak_small and peak_big < big_bytes, (peak_small, peak_big)


def test_pool_writes_one_vector_per_tile_to_geoparquet(model, tmp_path):
  pq = pytest.importorskip("pyarrow.parquet")
  scene = tmp_path / "s2.tif"
  raw = testing.write_s2_scene(str(scene), BANDS, height=96, width=128,
                               holes=[(64, 96, 32, 32)])  # the last tile is all nodata
  out = tmp_path / "tiles.parquet"
  written = scenes.embed_scene(model, str(scene), str(out), _opts(tile=32), pool=True)
  table = pq.read_table(out)
  assert written.shape == (3 * 4 - 1, 16) and table.num_rows == 11
  geo = json.loads(table.schema.metadata[b"geo"])
  assert geo["primary_column"] == "geometry"
  assert geo["columns"]["geometry"]["crs"]["id"] == {"authority": "EPSG", "code": 32633}
  rows = table.to_pylist()
  first = rows[0]
  assert (first["row"], first["col"], first["height"]) == (0, 0, 32)
  assert (first["x"], first["y"]) == (399_960.0 + 160, 5_300_040.0 - 160)
  import struct
  assert struct.unpack("<BIdd", first["geometry"])[2:] == (first["x"], first["y"])
  fn = pretrained.features_fn(model.spec)
  tile = _normalised(raw[:, 32:64, 64:96])[None]
  want = np.asarray(jax.jit(fn)(model.params, tile))[0]
  got = next(r for r in rows if (r["row"], r["col"]) == (32, 64))
  np.testing.assert_allclose(got["embedding"], want, rtol=1e-5, atol=1e-5)


def test_vit_patch_tokens_on_the_patch_grid(tmp_path):
  vit = _model("vit")
  scene = tmp_path / "s2.tif"
  raw = testing.write_s2_scene(str(scene), BANDS, height=36, width=45)
  grid = _read_after(vit, scene, tmp_path / "emb.tif", _opts(tile=48))
  want = _dense(vit, _normalised(raw)[:32, :40])  # trimmed to whole 8 px patches
  assert grid.shape == (32, 4, 5)
  np.testing.assert_allclose(np.moveaxis(grid, 0, -1), want, rtol=1e-5, atol=1e-5)


def test_bad_scenes_and_stacks_are_refused_naming_the_file(model, tmp_path):
  text = tmp_path / "notes.tif"
  text.write_text("not a raster")
  with pytest.raises(scenes.SceneError, match=f"{text}: not a raster"):
    scenes.embed_scene(model, str(text), str(tmp_path / "a.tif"), _opts())
  with pytest.raises(scenes.SceneError, match="no such file"):
    scenes.embed_scene(model, str(tmp_path / "missing.tif"), str(tmp_path / "a.tif"), _opts())
  small = tmp_path / "small.tif"
  testing.write_s2_scene(str(small), BANDS, height=12, width=40)
  with pytest.raises(scenes.SceneError, match="height is 12 px.*at least 16 px"):
    scenes.embed_scene(model, str(small), str(tmp_path / "a.tif"), _opts())
  no_stats = pretrained.Pretrained(model.spec, model.params, "bare", None)
  ok = tmp_path / "ok.tif"
  testing.write_s2_scene(str(ok), BANDS, height=32, width=32)
  with pytest.raises(scenes.SceneError, match="no normalisation statistics.*--normalised"):
    scenes.embed_scene(no_stats, str(ok), str(tmp_path / "a.tif"), _opts())
  with pytest.raises(scenes.SceneError, match="no L1C statistics"):
    scenes.embed_scene(model, str(ok), str(tmp_path / "a.tif"), _opts(level="L1C"))
  with pytest.raises(scenes.SceneError, match="--tile 40: must be a multiple"):
    big = tmp_path / "big.tif"
    testing.write_s2_scene(str(big), BANDS, height=64, width=64)
    scenes.embed_scene(model, str(big), str(tmp_path / "a.tif"), _opts(tile=40))
  assert not (tmp_path / "a.tif").exists()
  # Stacks.
  np.savez(tmp_path / "x.npz", x=np.zeros((2, 32, 32, 4)))
  with pytest.raises(scenes.SceneError, match="x.npz: a .npz archive"):
    scenes.load_image_stack(str(tmp_path / "x.npz"))
  np.save(tmp_path / "empty.npy", np.zeros((0, 32, 32, 4), np.float32))
  with pytest.raises(scenes.SceneError, match="empty.npy: the stack is empty"):
    scenes.load_image_stack(str(tmp_path / "empty.npy"))
  card = model.card
  with pytest.raises(scenes.SceneError, match="8x8 px; the encoder needs sides of at least 16"):
    scenes.prepare_images(np.ones((1, 8, 8, 4), np.uint16), card, "s.npy")
  raw = np.full((2, 32, 32, 4), 1000, np.uint16)
  x, note = scenes.prepare_images(raw, card, "s.npy")
  np.testing.assert_allclose(x[0, 0, 0], (1000 - np.float32(MEAN)) / np.float32(STD))
  assert "L2A statistics" in note
  nan = np.full((1, 32, 32, 4), 1000.0)
  nan[:, :4] = np.nan  # 4 rows of 32 pixels
  x, note = scenes.prepare_images(nan.astype(np.float32), card, "s.npy")
  assert np.isfinite(x).all() and (x[0, :4] == 0).all() and "128 non-finite" in note
  with pytest.raises(scenes.SceneError, match=r"images \[0\] have no finite pixel"):
    scenes.prepare_images(np.full((1, 32, 32, 4), np.nan, np.float32), card, "s.npy")
  with pytest.raises(scenes.SceneError, match="--scale 10000"):
    scenes.prepare_images(np.full((1, 32, 32, 4), 0.1, np.float32), card, "s.npy")


def test_embed_and_segment_scene_from_the_command_line(shards64, tmp_path, capsys):
  model = _model()
  folder = str(tmp_path / "encoder")
  pretrained.save(folder, model.spec, model.params, source="test", card=model.card)
  scene = tmp_path / "s2.tif"
  raw = testing.write_s2_scene(str(scene), BANDS, height=64, width=64)
  out = tmp_path / "emb.tif"
  assert cli.main(["embed", "--checkpoint", folder, "--scene", str(scene), "--out", str(out),
                   "--no-progress"]) == 0
  said = capsys.readouterr().out
  assert "a 4x4 grid of 16 bands" in said and "the file's band descriptions" in said
  np.testing.assert_allclose(np.moveaxis(_read(out)[0], 0, -1), _dense(model, _normalised(raw)),
                             rtol=1e-5, atol=1e-5)
  assert cli.main(["embed", "--checkpoint", folder, "--images", str(tmp_path / "x.npz"),
                   "--out", str(tmp_path / "e.npy")]) == 2
  assert "x.npz: a .npz archive" in capsys.readouterr().err
  # A segmenter fine-tuned on the sample's 12 bands, saved, then run over a 12-band scene.
  seg_dir = str(tmp_path / "segmenter")
  assert cli.main(["segment", "--config", "segment:demo", f"--config.dataset=mmearth:{shards64}",
                   "--config.steps=2", "--config.max_steps=2", f"--config.out={seg_dir}",
                   "--config.depths=(1,1,1,1)", "--config.dims=(8,16,16,16)"]) == 0
  capsys.readouterr()
  seg = pretrained.load(seg_dir)
  assert seg.spec["arch"] == "unet_segmenter" and seg.card["output_stride"] == 1
  assert "L2A" in seg.card["normalisation"] or "L1C" in seg.card["normalisation"]
  bands12 = cards.band_names(seg.card)
  scene12 = tmp_path / "s2_12.tif"
  raw12 = testing.write_s2_scene(str(scene12), bands12, height=48, width=64)
  classes = tmp_path / "classes.tif"
  assert cli.main(["segment-scene", "--model", seg_dir, "--scene", str(scene12), "--out",
                   str(classes), "--no-progress"]) == 0
  got, profile, tags, _ = _read(classes)
  assert got.shape == (1, 48, 64) and profile["dtype"] == "uint8"
  assert profile["transform"] == Affine(10.0, 0, 399_960.0, 0, -10.0, 5_300_040.0)
  from mmearth_jax.eval import segmentation as S
  level = "L2A" if "L2A" in seg.card["normalisation"] else "L1C"
  x = cards.normalise(seg.card, np.moveaxis(raw12, 0, -1).astype(np.float32), level)
  want = S.predict(pretrained.build(seg.spec), seg.params, x[None])[0]
  np.testing.assert_array_equal(got[0], want)
  assert json.loads(tags["class_names"]) == seg.spec["class_names"]
  assert cli.main(["segment-scene", "--model", folder, "--scene", str(scene), "--out",
                   str(tmp_path / "c2.tif")]) == 2
  assert "not a fine-tuned segmenter" in capsys.readouterr().err
  assert os.path.exists(seg_dir)
