"""The EuroSAT MS loader (`eurosat_ms:<folder or zip>`): the release's GeoTIFFs read with rasterio,
its bands mapped by name onto the encoder's, split by the published lists or a seeded stratified
split, and normalised with the model card's L1C statistics or the train split's."""
import os
import sys

import numpy as np
import pytest
import rasterio

from mmearth_jax import bands as B
from mmearth_jax import cards, testing
from mmearth_jax.eval import datasets as D
from mmearth_jax.eval import evaluate

BANDS = B.S2_INPUT_BANDS  # MMEarth's 12 (no B10), B8A before B8: not the files' order
PER_CLASS = 10


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
  """(the zip, the same images extracted) of a 10-per-class copy."""
  folder = tmp_path_factory.mktemp("eurosat")
  archive = testing.write_eurosat_ms_sample(str(folder / "zipped"), per_class=PER_CLASS)
  extracted = testing.write_eurosat_ms_sample(str(folder / "extracted"), per_class=PER_CLASS,
                                              archive=False)
  return archive, extracted


def identity_card(bands=BANDS, mean=0.0, std=1.0) -> dict:
  """A model card whose L1C statistics leave (mean 0, std 1) or shift the raw values."""
  n = len(bands)
  return {"bands": cards.band_entries(bands),
          "normalisation": {"L1C": {"mean": [mean] * n, "std": [std] * n}}}


def test_the_sample_is_laid_out_like_the_release(sample):
  archive, extracted = sample
  assert os.path.basename(archive) == "EuroSAT_MS.zip"
  path = os.path.join(extracted, "SeaLake", "SeaLake_3.tif")
  with rasterio.open(path) as f:
    assert (f.count, f.width, f.height, f.dtypes[0]) == (13, 64, 64, "uint16")
    assert f.crs.to_epsg() == 32632 and f.transform.a == 10


def test_zip_and_folder_give_the_same_split(sample):
  archive, extracted = sample
  a = D.load(f"eurosat_ms:{archive}", "train", BANDS)
  b = D.load(f"eurosat_ms:{os.path.dirname(extracted)}", "train", BANDS)  # beside EuroSAT_MS/
  c = D.load(f"eurosat_ms:{extracted}", "train", BANDS)  # EuroSAT_MS/ itself
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.images, c.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert a.images.shape == (10 * 6, 64, 64, 12) and a.name == "eurosat_ms/train"
  assert a.class_names == list(D.EUROSAT_CLASSES) and a.num_classes == 10
  assert a.mapping.dropped == ("B10",)


def test_the_seeded_split_is_stratified_disjoint_and_complete(sample):
  archive, _ = sample
  splits = {s: D.eurosat_ms_split_names(archive, s) for s in ("train", "val", "test")}
  names = {s: v[0] for s, v in splits.items()}
  assert all("seeded stratified 60 / 20 / 20" in note for _, note in splits.values())
  assert sum(map(len, names.values())) == len(set().union(*names.values())) == 10 * PER_CLASS
  for split, per_class in (("train", 6), ("val", 2), ("test", 2)):
    counts = np.bincount([D.EUROSAT_CLASSES.index(n.rsplit("_", 1)[0]) for n in names[split]])
    assert counts.tolist() == [per_class] * 10, split
  assert D.eurosat_ms_split_names(archive, "valid") == splits["val"]  # an alias
  assert D.eurosat_ms_split_names(archive, "train") == splits["train"]  # seeded: the same again
  # max_examples keeps the first images of the split's (shuffled) order: several classes.
  few = D.load(f"eurosat_ms:{archive}", "train", BANDS, max_examples=12)
  assert few.labels.tolist() == [D.EUROSAT_CLASSES.index(n.rsplit("_", 1)[0])
                                 for n in names["train"][:12]]
  assert len(set(few.labels.tolist())) > 3


def test_published_lists_beside_the_data_are_used(tmp_path):
  archive = testing.write_eurosat_ms_sample(str(tmp_path), per_class=5, split_lists=True)
  names, note = D.eurosat_ms_split_names(archive, "test")
  assert "published list" in note and "eurosat-test.txt" in note
  assert sorted(names) == sorted(f"{c}_5.tif" for c in D.EUROSAT_CLASSES)  # the lists' test
  data = D.load(f"eurosat_ms:{tmp_path}", "val", BANDS)
  assert sorted(data.labels.tolist()) == list(range(10)) and "eurosat-val.txt" in data.notes[0]
  # A list naming images that are not there, or one list without the others, is refused.
  with open(tmp_path / "eurosat-test.txt", "a") as f:
    f.write("Forest_99.jpg\n")
  with pytest.raises(D.EvalDataError, match=r"lists 1 of its 11 images .*Forest_99.tif"):
    D.load(f"eurosat_ms:{archive}", "test", BANDS)
  os.remove(tmp_path / "eurosat-val.txt")
  with pytest.raises(D.EvalDataError, match="needs all three lists"):
    D.load(f"eurosat_ms:{archive}", "train", BANDS)


def test_bands_are_mapped_by_name_and_the_card_normalises_raw_l1c(sample):
  archive, extracted = sample
  names, _ = D.eurosat_ms_split_names(archive, "train")
  with rasterio.open(os.path.join(extracted, names[0].rsplit("_", 1)[0], names[0])) as f:
    raw = f.read().astype(np.float32)  # (13, H, W) in the files' order, B8A last
  data = D.load(f"eurosat_ms:{archive}", "train", BANDS, card=identity_card(), max_examples=1)
  for k, band in enumerate(BANDS):
    np.testing.assert_array_equal(data.images[0, ..., k], raw[B.EUROSAT_MS_BANDS.index(band)])
  assert "model card's L1C statistics" in data.notes[1]
  shifted = D.load(f"eurosat_ms:{archive}", "train", BANDS, card=identity_card(mean=100, std=4),
                   max_examples=1)
  np.testing.assert_allclose(shifted.images, (data.images - 100) / 4, rtol=1e-6)


def test_without_l1c_statistics_the_train_split_normalises(sample):
  archive, _ = sample
  card = {"bands": cards.band_entries(BANDS), "normalisation": {}}  # an import without stats
  cfg = evaluate.default_config()
  cfg.dataset, cfg.train_split, cfg.test_split = f"eurosat_ms:{archive}", "train", "test"
  train, test = evaluate.load_splits(cfg, BANDS, card=card)
  assert "train split's statistics (the model card has no L1C statistics)" in train.notes[1]
  flat = train.images.reshape(-1, len(BANDS))
  np.testing.assert_allclose(flat.mean(0), 0, atol=1e-4)  # the train split's own z-score
  np.testing.assert_allclose(flat.std(0), 1, atol=1e-3)
  assert test.images.shape == (20, 64, 64, 12) and np.isfinite(test.images).all()
  other = identity_card(bands=("B4", "B3", "B2"))  # a card for other bands is not used
  rgb = D.load(f"eurosat_ms:{archive}", "train", BANDS, card=other, max_examples=2)
  assert "are not the encoder bands" in rgb.notes[1]


def test_errors_name_what_is_wrong(sample, tmp_path, monkeypatch):
  archive, _ = sample
  with pytest.raises(D.EvalDataError, match="split must be train, val or test"):
    D.load(f"eurosat_ms:{archive}", "train[:80%]", BANDS)
  with pytest.raises(D.EvalDataError, match=r"expected EuroSAT_MS.zip, or a folder holding"):
    D.load(f"eurosat_ms:{tmp_path}", "train", BANDS)
  monkeypatch.setitem(sys.modules, "rasterio", None)  # as if the `geo` extra were missing
  with pytest.raises(ModuleNotFoundError, match=r"mmearth_jax\[geo\]"):
    D.load(f"eurosat_ms:{archive}", "train", BANDS)
