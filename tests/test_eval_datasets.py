"""Downstream datasets: GEO-Bench (written in the real format), TFDS (mocked), MMEarth shards."""
import ast
import json
import os
import pickle
import shutil
import types

import h5py
import numpy as np
import pytest

from mmearth_jax import bands, testing
from mmearth_jax import modalities as M
from mmearth_jax.data import convert, synth
from mmearth_jax.eval import datasets as D
from mmearth_jax.eval import geobench_format as G
from mmearth_jax.ops import resize as R

S2_12 = M.S2_INPUT_BANDS


@pytest.fixture(autouse=True)
def _fresh_tfds_stats():
  D.clear_cache()
  yield
  D.clear_cache()


@pytest.fixture(scope="module")
def gb(tmp_path_factory):
  """Small GEO-Bench tasks in the published layout."""
  root = str(tmp_path_factory.mktemp("geobench"))
  write = testing.write_geobench_sample
  return {
      "eurosat": write(root, name="m-eurosat", n=40, size=16, seed=0),
      "plain": write(root, name="m-plain", n=20, size=8, seed=1, num_classes=4),
      "so2sat": write(root, name="m-so2sat", n=20, size=8, seed=2, num_classes=17,
                      bands=bands.GEOBENCH_S1_NAMES + bands.GEOBENCH_SO2SAT_S2_NAMES),
      "ben": write(root, name="m-bigearthnet", n=20, size=12, seed=3, num_classes=43,
                   multilabel=True, bands=bands.GEOBENCH_BIGEARTHNET_NAMES),
      "rgb": write(root, name="m-rgb", n=10, size=8, seed=4, num_classes=2,
                   bands=("Red", "Green", "Blue")),
  }


def _raw(folder, sample, band):
  with h5py.File(os.path.join(folder, f"{sample}.hdf5")) as f:
    return np.asarray(f[band], np.float64)


def _label(folder, sample):
  with h5py.File(os.path.join(folder, f"{sample}.hdf5")) as f:
    return G.sample_label(f.filename, f, G.read_attrs(f))


def _partition(folder, name="default"):
  return json.load(open(os.path.join(folder, f"{name}_partition.json")))


def _zscored(folder, sample, band, scale=1.0):
  st = json.load(open(os.path.join(folder, "band_stats.json")))[band]
  return (_raw(folder, sample, band) - st["mean"] * scale) / (st["std"] * scale)


# ---------------------------------------------------------------------------------------------
# GEO-Bench

def test_geobench_files_are_in_the_published_layout(gb):
  folder = gb["eurosat"]
  names = set(os.listdir(folder))
  assert {"band_stats.json", "task_specs.pkl", "default_partition.json",
          "0.01x_train_partition.json", "1.00x_train_partition.json"} <= names
  with h5py.File(os.path.join(folder, "id_0000.hdf5")) as f:
    assert set(f.keys()) == set(bands.GEOBENCH_S2_NAMES)
    raw = f.attrs["pickle"]
    assert isinstance(raw, str) and raw[:2] in ("b'", 'b"')  # str(pickle.dumps(...))
    assert f["02 - Blue"].dtype == np.int16 and f["02 - Blue"].shape == (16, 16)
    attrs = G.read_attrs(f)
  assert attrs["bands_order"] == list(bands.GEOBENCH_S2_NAMES)
  assert G.stub_class(attrs["04 - Red"]["band_info"]) == "Sentinel2"
  assert attrs["04 - Red"]["band_info"].name == "04 - Red"
  assert isinstance(attrs["label"], int)
  specs = G.read_task_specs(folder)
  assert specs["num_classes"] == 10 and specs["multilabel"] is False
  assert len(specs["class_names"]) == 10
  stats = json.load(open(os.path.join(folder, "band_stats.json")))
  assert {"mean", "std", "median", "percentile_99"} <= set(stats["04 - Red"]) and "label" in stats


def test_geobench_splits_partitions_and_labels(gb):
  folder = gb["eurosat"]
  part = _partition(folder)
  for split, key in [("train", "train"), ("valid", "valid"), ("val", "valid"), ("test", "test")]:
    d = D.load("geobench:" + folder, split, S2_12)
    assert d.images.shape == (len(part[key]), 16, 16, 12) and d.images.dtype == np.float32
    assert d.labels.dtype == np.int64 and not d.multilabel and d.num_classes == 10
    assert d.labels.tolist() == [_label(folder, s) for s in part[key]]
    assert d.name == f"m-eurosat/{split}" and np.isfinite(d.images).all()
  few = D.load("geobench:" + folder, "train", S2_12, partition="0.01x_train")
  assert len(few.labels) == 1 == len(_partition(folder, "0.01x_train")["train"])
  half = D.load("geobench:" + folder, "train", S2_12, partition="0.50x_train")
  assert len(half.labels) == len(_partition(folder, "0.50x_train")["train"]) == 12
  test_few = D.load("geobench:" + folder, "test", S2_12, partition="0.01x_train")
  assert test_few.labels.tolist() == [_label(folder, s) for s in part["test"]]
  # data_dir + relative path, max_examples, resize
  d = D.load("geobench:m-eurosat", "train", S2_12, data_dir=os.path.dirname(folder),
             max_examples=5, image_size=24)
  assert d.images.shape == (5, 24, 24, 12)


def test_geobench_labels_are_learnable_from_pixels(gb):
  folder = gb["eurosat"]
  tr = D.load("geobench:" + folder, "train", S2_12)
  te = D.load("geobench:" + folder, "test", S2_12)
  # Nearest class centroid on the mean spectrum: the writer's classes differ in spectrum.
  ftr, fte = tr.images.mean((1, 2)), te.images.mean((1, 2))
  cents = {c: ftr[tr.labels == c].mean(0) for c in np.unique(tr.labels)}
  pred = [min(cents, key=lambda c: np.linalg.norm(x - cents[c])) for x in fte]
  assert np.mean(np.array(pred) == te.labels) >= 0.75


def test_geobench_bands_land_where_the_encoder_expects_them(gb):
  folder = gb["eurosat"]
  sample = _partition(folder)["train"][0]
  # m-eurosat's published names are shifted (geo-bench #28): the channel stored as "12 - SWIR"
  # holds B8A, "08A - ..." holds B9, "10 - ..." B11, "11 - SWIR" B12.
  source = {"B1": "01 - Coastal aerosol", "B2": "02 - Blue", "B3": "03 - Green",
            "B4": "04 - Red", "B5": "05 - Vegetation Red Edge", "B6": "06 - Vegetation Red Edge",
            "B7": "07 - Vegetation Red Edge", "B8A": "12 - SWIR", "B8": "08 - NIR",
            "B9": "08A - Vegetation Red Edge", "B11": "10 - SWIR - Cirrus", "B12": "11 - SWIR"}
  d = D.load("geobench:" + folder, "train", S2_12, max_examples=1)
  assert d.mapping.dropped == ("B10",) and not d.mapping.filled
  for k, band in enumerate(S2_12):
    np.testing.assert_allclose(d.images[0, ..., k], _zscored(folder, sample, source[band]),
                               rtol=1e-5, atol=1e-5, err_msg=band)
  # As stored (what MMEarth-train read): B8A is the channel named "08A".
  raw = D.load("geobench:" + folder, "train", ["B8A", "B4", "B3"], max_examples=1,
               fix_band_names=False)
  np.testing.assert_allclose(raw.images[0, ..., 0],
                             _zscored(folder, sample, "08A - Vegetation Red Edge"), atol=1e-5)
  # A task without quirks, read by an RGB encoder: B4, B3, B2 in that order.
  plain = gb["plain"]
  sample = _partition(plain)["train"][0]
  d = D.load("geobench:" + plain, "train", ["B4", "B3", "B2"], max_examples=1)
  for k, band in enumerate(["04 - Red", "03 - Green", "02 - Blue"]):
    np.testing.assert_allclose(d.images[0, ..., k], _zscored(plain, sample, band), atol=1e-5)
  # Plain RGB band names (RGB tasks) map to B4, B3, B2 too.
  rgb = gb["rgb"]
  d = D.load("geobench:" + rgb, "train", ["B4", "B3", "B2"], max_examples=1)
  np.testing.assert_allclose(d.images[0, ..., 0],
                             _zscored(rgb, _partition(rgb)["train"][0], "Red"), atol=1e-5)


def test_geobench_missing_bands_and_stat_units(gb):
  folder = gb["so2sat"]  # 8 Sentinel-1 + 10 Sentinel-2 bands (no B1, B9, B10)
  sample = _partition(folder)["train"][0]
  d = D.load("geobench:" + folder, "train", S2_12)
  m = d.mapping
  assert m.filled == {"B1": "B2", "B9": "B8A"}  # MMEarth-train's choice (BAND_NAMES_v1_full)
  assert set(m.dropped) == {f"#{i}" for i in range(8)}  # the Sentinel-1 bands
  ix = {b: i for i, b in enumerate(S2_12)}
  np.testing.assert_array_equal(d.images[..., ix["B1"]], d.images[..., ix["B2"]])
  np.testing.assert_array_equal(d.images[..., ix["B9"]], d.images[..., ix["B8A"]])
  # m-so2sat stores reflectance but band_stats in reflectance x 1e4: stats are scaled down.
  assert _raw(folder, sample, "02 - Blue").max() < 1.0
  np.testing.assert_allclose(d.images[0, ..., ix["B2"]], _zscored(folder, sample, "02 - Blue",
                                                                   1e-4), rtol=1e-4, atol=1e-4)
  assert abs(d.images.mean()) < 0.5 and 0.5 < d.images.std() < 1.5
  z = D.load("geobench:" + folder, "train", S2_12, fill="zero")
  assert not z.images[..., ix["B1"]].any() and not z.images[..., ix["B9"]].any()
  np.testing.assert_array_equal(z.images[..., ix["B2"]], d.images[..., ix["B2"]])


def test_geobench_multilabel(gb):
  folder = gb["ben"]
  part = _partition(folder)
  d = D.load("geobench:" + folder, "train", S2_12, image_size=6)
  assert d.multilabel and d.num_classes == 43 and d.labels.dtype == np.float32
  assert d.labels.shape == (len(part["train"]), 43) and d.images.shape[1:] == (6, 6, 12)
  want = np.stack([_label(folder, s) for s in part["train"]])
  np.testing.assert_array_equal(d.labels, want)
  assert set(np.unique(d.labels)) <= {0.0, 1.0} and (d.labels.sum(1) >= 1).all()
  assert d.mapping.dropped == () and not d.mapping.filled  # B10 is not an input band


def test_geobench_errors(gb, tmp_path):
  folder = gb["plain"]
  with pytest.raises(D.EvalDataError, match="task folder not found"):
    D.load("geobench:" + str(tmp_path / "nope"), "train", S2_12)
  with pytest.raises(D.EvalDataError, match="0.33x_train_partition.json.*partition file missing"):
    D.load("geobench:" + folder, "train", S2_12, partition="0.33x_train")
  with pytest.raises(D.EvalDataError, match="no split 'holdout'"):
    D.load("geobench:" + folder, "holdout", S2_12)
  with pytest.raises(D.EvalDataError, match="unknown prefix 'geobnch'"):
    D.load("geobnch:" + folder, "train", S2_12)
  with pytest.raises(D.EvalDataError, match="expected geobench:"):
    D.load(folder, "train", S2_12)
  with pytest.raises(D.EvalDataError, match=r"m-rgb.*has only 3 of the encoder's 12 bands "
                     r"\(missing \['B1', 'B5'.*fewer than half"):
    D.load("geobench:" + gb["rgb"], "train", S2_12)
  with pytest.raises(D.EvalDataError, match="not Sentinel-2 band names"):
    D.load("geobench:" + folder, "train", ["red"])
  # A broken copy: a listed sample deleted, a band missing from band_stats.
  broken = str(tmp_path / "m-plain")
  shutil.copytree(folder, broken)
  victim = _partition(broken)["test"][-1]
  os.remove(os.path.join(broken, f"{victim}.hdf5"))
  with pytest.raises(D.EvalDataError, match=f"{victim}.hdf5: sample '{victim}' is listed"):
    D.load("geobench:" + broken, "test", S2_12)
  stats_path = os.path.join(broken, "band_stats.json")
  stats = json.load(open(stats_path))
  del stats["04 - Red"]
  json.dump(stats, open(stats_path, "w"))
  with pytest.raises(D.EvalDataError, match="band_stats.json: no mean/std for band '04 - Red'"):
    D.load("geobench:" + broken, "train", S2_12)
  os.remove(stats_path)
  with pytest.raises(D.EvalDataError, match="band_stats.json: missing"):
    D.load("geobench:" + broken, "train", S2_12)


class _Evil:
  def __reduce__(self):
    return (os.system, ("touch should-not-exist",))


def test_restricted_unpickler_never_runs_code(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  blob = pickle.dumps({"label": 3, "x": _Evil(), "a": np.arange(4, dtype=np.int16)})
  out = G.safe_loads(blob)
  assert not (tmp_path / "should-not-exist").exists()
  assert isinstance(out["x"], G.Stub) and out["x"].pickle_class.endswith(".system")
  assert out["label"] == 3 and out["a"].dtype == np.int16 and out["a"].tolist() == [0, 1, 2, 3]
  # geobench's own encoding: str() of the pickle's bytes, parsed back with literal_eval.
  assert G.safe_loads(ast.literal_eval(str(pickle.dumps([1, 2.5])))) == [1, 2.5]


# ---------------------------------------------------------------------------------------------
# Band mapping and resizing

def test_band_mapping_rule():
  m = D.band_mapping(("B2", "B3", "B4", "B5", "B8", "B11", "B12", None), S2_12)
  assert m.present == ("B2", "B3", "B4", "B5", "B8", "B11", "B12")
  # nearest by central wavelength: B1 <- B2 (490 nm), B6 <- B5, B7, B8A, B9 <- B8 (842 nm)
  assert m.filled == {"B1": "B2", "B6": "B5", "B7": "B8", "B8A": "B8", "B9": "B8"}
  assert m.dropped == ("#7",)
  x = np.arange(8, dtype=np.float32)[None, None, :] * np.ones((2, 2, 1), np.float32)
  y = m.apply(x)
  assert y.shape == (2, 2, 12) and y[0, 0].tolist() == [0, 0, 1, 2, 3, 3, 4, 4, 4, 4, 5, 6]
  z = D.band_mapping(("B4", "B3", "B2"), ["B2", "B3", "B4", "B8"], fill="zero")
  assert z.indices == (2, 1, 0, None) and z.filled == {"B8": None}
  with pytest.raises(D.EvalDataError, match=r"toy: has only 1 of the encoder's 3 bands"):
    D.band_mapping(("B4",), ["B4", "B3", "B2"], dataset="toy")
  assert D.geobench_band_name("08A - Red edge 4") == "B8A"
  assert D.geobench_band_name("B08") == "B8" and D.geobench_band_name("12 - SWIR") == "B12"
  assert D.geobench_band_name("01 - VH.Real") is None
  assert D.geobench_band_name("02 - Blue", "Landsat8") is None


def test_image_resize_matches_jax_linear():
  """The loaders' image resize (`ops.resize` bilinear with antialias) is jax.image.resize's."""
  import jax
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 12, 3)).astype(np.float32)
  for size in [(32, 24), (8, 6), (20, 5)]:
    want = np.asarray(jax.image.resize(x, size + (3,), method="linear"))
    np.testing.assert_allclose(R.resize(x, size, "bilinear", antialias=True), want, atol=1e-5)
  assert np.allclose(R.resize(np.full((5, 5), 2.0), 7, "bilinear", antialias=True), 2.0)


# ---------------------------------------------------------------------------------------------
# TFDS (mocked records with the real feature specs; nothing is downloaded)

def _tfds_raw(name, n):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=n):
    ds = tfds.data_source(name, split="train")
    return [ds[i] for i in range(n)]


def test_tfds_eurosat_all_puts_b8a_in_place():
  import tensorflow_datasets as tfds
  recs = _tfds_raw("eurosat/all", 10)
  x = np.stack([r["sentinel2"] for r in recs]).astype(np.float64)  # (10, 64, 64, 13)
  mean, std = x.mean((0, 1, 2)), x.std((0, 1, 2))  # all 10 train examples feed the stats
  with tfds.testing.mock_data(num_examples=10):
    d = D.load("tfds:eurosat/all", "train", S2_12)
  assert d.images.shape == (10, 64, 64, 12) and d.num_classes == 10 and not d.multilabel
  assert d.class_names[0] == "AnnualCrop" and d.name == "eurosat/all/train"
  assert d.labels.tolist() == [int(r["label"]) for r in recs]
  # EuroSAT's channel order is B1..B12, B8A: B8A is TFDS channel 12, B8 channel 7, B9 channel 8.
  for band, ch in [("B8A", 12), ("B8", 7), ("B9", 8), ("B1", 0), ("B12", 11)]:
    k = S2_12.index(band)
    np.testing.assert_allclose(d.images[..., k], (x[..., ch] - mean[ch]) / std[ch], atol=1e-4,
                               err_msg=band)
  assert d.mapping.dropped == ("B10",)
  with tfds.testing.mock_data(num_examples=10):
    r = D.load("tfds:eurosat", "train", ["B4", "B3", "B2"], max_examples=3, image_size=32)
  assert r.images.shape == (3, 32, 32, 3)


def test_tfds_so2sat_and_bigearthnet():
  import tensorflow_datasets as tfds
  recs = _tfds_raw("so2sat/all", 6)
  x = np.stack([r["sentinel2"] for r in recs]).astype(np.float64)
  with tfds.testing.mock_data(num_examples=6):
    d = D.load("tfds:so2sat/all", "train", S2_12)
  assert d.images.shape == (6, 32, 32, 12) and d.num_classes == 17
  # So2Sat: B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12; B1 and B9 copied from B2 and B8A.
  ch = {"B2": 0, "B8": 6, "B8A": 7, "B11": 8}
  for band, c in ch.items():
    want = (x[..., c] - x[..., c].mean()) / x[..., c].std()
    np.testing.assert_allclose(d.images[..., S2_12.index(band)], want, atol=1e-4)
  assert d.mapping.filled == {"B1": "B2", "B9": "B8A"}
  np.testing.assert_array_equal(d.images[..., 0], d.images[..., 1])

  recs = _tfds_raw("bigearthnet/all", 4)
  with tfds.testing.mock_data(num_examples=4):
    b = D.load("tfds:bigearthnet", "train", S2_12)
  assert b.images.shape == (4, 120, 120, 12) and b.multilabel and b.num_classes == 43
  assert b.labels.shape == (4, 43) and b.labels.dtype == np.float32
  for i, r in enumerate(recs):
    assert set(np.flatnonzero(b.labels[i])) == set(np.asarray(r["labels"]).tolist())
  # B1 is stored at 20 px, B8A at 60 px: upsampled to 120, then z-scored.
  up = lambda a: R.resize(np.asarray(a, np.float32), 120, "bilinear", antialias=True)  # noqa: E731
  b1 = np.stack([up(r["B01"]) for r in recs]).astype(np.float64)
  np.testing.assert_allclose(b.images[..., 0], (b1 - b1.mean()) / b1.std(), atol=1e-3)
  b8a = np.stack([up(r["B8A"]) for r in recs]).astype(np.float64)
  np.testing.assert_allclose(b.images[..., S2_12.index("B8A")], (b8a - b8a.mean()) / b8a.std(),
                             atol=1e-3)


def test_tfds_errors(tmp_path):
  with pytest.raises(D.EvalDataError, match="unknown TFDS dataset"):
    D.load("tfds:resisc45", "train", S2_12)
  with pytest.raises(D.EvalDataError, match="cannot open a prepared copy"):
    D.load("tfds:eurosat/all", "train", S2_12, data_dir=str(tmp_path))  # nothing prepared
  fake = types.SimpleNamespace(dataset_info=types.SimpleNamespace(splits={"train": None}))
  with pytest.raises(D.EvalDataError, match=r"no split 'test' \(has \['train'\]\).*train\[80%:\]"):
    D._check_tfds_split("eurosat/all", fake, "test")
  D._check_tfds_split("eurosat/all", fake, "train[:80%]")


# ---------------------------------------------------------------------------------------------
# MMEarth shards

@pytest.fixture(scope="module")
def mm(tmp_path_factory):
  src = str(tmp_path_factory.mktemp("mm_src"))
  synth.write_sample(src, n=16, size=64, seed=5)
  out = str(tmp_path_factory.mktemp("mm_shards"))
  convert.convert(src, out, shards=2, log=lambda *a: None)
  dw = str(tmp_path_factory.mktemp("mm_dw"))
  convert.convert(src, dw, shards=1, modalities=["sentinel2", "dynamic_world"],
                  log=lambda *a: None)
  return src, out, dw


def _expected_mmearth(src, split, crop=None, modality="esa_worldcover"):
  """(rows, dominant class) of the tiles of `split`, straight from the HDF5 file."""
  m = M.MODALITIES[modality]
  with h5py.File(os.path.join(src, "data_synth_64.h5")) as f:
    ids = [t.decode() for t in f["metadata"]["tile_id"]]
    lab = f[modality][:, 0]
  rows, labels = [], []
  for r, tid in enumerate(ids):
    if D.mmearth_split(tid) != split:
      continue
    y = lab[r]
    if crop:
      o = (64 - crop) // 2
      y = y[o:o + crop, o:o + crop]
    cls = np.array([m.label_map.get(int(v), -1) for v in y.ravel()])
    cls = cls[cls >= 0]
    if cls.size:
      rows.append(r)
      labels.append(int(np.bincount(cls, minlength=m.num_classes).argmax()))
  return rows, labels


def test_mmearth_labels_split_and_normalisation(mm):
  src, out, _ = mm
  tr = D.load("mmearth:" + out, "train", S2_12)
  te = D.load("mmearth:" + out, "test", S2_12)
  rows_tr, want_tr = _expected_mmearth(src, "train")
  rows_te, want_te = _expected_mmearth(src, "test")
  assert len(rows_te) > 0 and len(rows_tr) > len(rows_te)
  assert tr.labels.tolist() == want_tr and te.labels.tolist() == want_te
  assert tr.num_classes == 11 and tr.class_names == list(M.ESA_WORLDCOVER_CLASSES)
  assert tr.images.shape == (len(rows_tr), 64, 64, 12) and np.isfinite(tr.images).all()
  # The training pipeline's z-score: band stats by S2_type, no-data pixels -> 0.
  stats = json.load(open(os.path.join(src, "data_synth_64_band_stats.json")))
  idx = [M.S2_BANDS.index(b) for b in S2_12]
  with h5py.File(os.path.join(src, "data_synth_64.h5")) as f:
    r = rows_tr[0]
    s2 = f["sentinel2"][r].transpose(1, 2, 0)[..., idx].astype(np.float64)
    st = stats["sentinel2_" + f["metadata"][r]["S2_type"].decode()]
  z = (s2 - np.array(st["mean"])[idx]) / np.array(st["std"])[idx]
  z[s2 == 0] = 0
  np.testing.assert_allclose(tr.images[0], z, atol=1e-4)
  # Centre crop: image and label both from the central window.
  c = D.load("mmearth:" + out, "train", ["B4", "B3", "B2"], image_size=32, max_examples=4)
  assert c.images.shape == (4, 32, 32, 3)
  assert c.labels.tolist() == _expected_mmearth(src, "train", crop=32)[1][:4]
  np.testing.assert_allclose(c.images[0], z[16:48, 16:48, [3, 2, 1]], atol=1e-4)


def test_mmearth_dynamic_world_fallback_and_errors(mm, tmp_path):
  src, out, dw = mm
  d = D.load("mmearth:" + dw, "test", S2_12)
  assert d.num_classes == 9 and d.class_names == list(M.DYNAMIC_WORLD_CLASSES)
  assert d.labels.tolist() == _expected_mmearth(src, "test", modality="dynamic_world")[1]
  with pytest.raises(D.EvalDataError, match="split must be 'train' or 'test'"):
    D.load("mmearth:" + out, "valid", S2_12)
  with pytest.raises(D.EvalDataError, match="manifest.json: missing"):
    D.load("mmearth:" + str(tmp_path), "train", S2_12)
  with pytest.raises(D.EvalDataError, match="exceeds the tile size 64"):
    D.load("mmearth:" + out, "train", S2_12, image_size=96)
