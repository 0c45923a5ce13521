"""Writers of small fake datasets for tests and demos (like `tensorflow_datasets.testing`).

`write_geobench_sample` writes a small GEO-Bench classification task in the on-disk format that
`mmearth_jax.eval.geobench_format` reads, with learnable class-dependent spectra and the quirks of
the published release (`bands.GEOBENCH_BAND_FIXES`, `datasets.GEOBENCH_STATS_SCALE`);
`write_geobench_segmentation_sample` a segmentation task. The pickles name `geobench` classes:
stand-ins with the same module paths and attributes are registered while writing, so the files
read like the release's without the `geobench` package. `write_eurosat_ms_sample` writes a small
copy of the EuroSAT MS release (EuroSAT_MS.zip of 13-band GeoTIFFs; needs rasterio).

The library's readers never import this module.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import sys
import types
import zipfile
from typing import Any, Sequence

import h5py
import numpy as np

from mmearth_jax.bands import (EUROSAT_MS_BANDS, GEOBENCH_BAND_FIXES, GEOBENCH_RGB, GEOBENCH_S2,
                               GEOBENCH_S2_NAMES, S2_WAVELENGTH_NM)
from mmearth_jax.eval import datasets as D
from mmearth_jax.ops import resize as R


def _standin_classes() -> dict[str, dict[str, type]]:
  """Classes with the module paths and attributes of geobench's, for pickling only."""

  def make(module, name, init):
    cls = type(name, (), {"__init__": init, "__module__": module})
    cls.__qualname__ = name
    return cls

  def band_init(self, name, alt_names=(), spatial_resolution=None, wavelength=None):
    self.name, self.alt_names, self.spatial_resolution = name, tuple(alt_names), spatial_resolution
    if wavelength is not None:
      self.wavelength = wavelength

  def cls_init(self, n_classes, class_names=None):
    self.n_classes, self._class_names = n_classes, class_names

  def ml_init(self, n_classes, class_names=None):
    self.n_classes, self.class_name = n_classes, class_names

  def task_init(self, **kw):
    self.__dict__.update(kw)

  def seg_init(self, name, spatial_resolution, n_classes, class_names=None):
    self.name, self.alt_names, self.spatial_resolution = name, (), spatial_resolution
    self.n_classes, self._class_names = n_classes, class_names

  ds = "geobench.dataset"
  return {
      ds: {**{n: make(ds, n, band_init) for n in ("BandInfo", "SpectralBand", "Sentinel1",
                                                 "Sentinel2")},
           "SegmentationClasses": make(ds, "SegmentationClasses", seg_init)},
      "geobench.label": {"Classification": make("geobench.label", "Classification", cls_init),
                         "MultiLabelClassification": make("geobench.label",
                                                          "MultiLabelClassification", ml_init)},
      "geobench.task": {"TaskSpecifications": make("geobench.task", "TaskSpecifications",
                                                   task_init)},
  }


@contextlib.contextmanager
def _standin_modules():
  """Temporarily registers `geobench.*` modules holding the stand-in classes so that `pickle`
  can name them; whatever was in `sys.modules` before is put back."""
  classes = _standin_classes()
  names = ["geobench", *classes]
  saved = {n: sys.modules.get(n) for n in names}
  pkg = types.ModuleType("geobench")
  pkg.__path__ = []
  sys.modules["geobench"] = pkg
  for mod_name, members in classes.items():
    mod = types.ModuleType(mod_name)
    for k, v in members.items():
      setattr(mod, k, v)
    sys.modules[mod_name] = mod
    setattr(pkg, mod_name.split(".")[1], mod)
  try:
    yield classes
  finally:
    for n, m in saved.items():
      if m is None:
        sys.modules.pop(n, None)
      else:
        sys.modules[n] = m


def _band_info(classes, name: str):
  ds = classes["geobench.dataset"]
  if name in GEOBENCH_S2:
    return ds["Sentinel2"](name, (), 10, _S2_WAVELENGTH_UM[GEOBENCH_S2[name]])
  if "VV" in name or "VH" in name:
    return ds["Sentinel1"](name, (), 10)
  if name in GEOBENCH_RGB:
    return ds["SpectralBand"](name, (name.lower(),), 10)
  return ds["BandInfo"](name, (), 10)


# geobench records wavelengths in micrometres.
_S2_WAVELENGTH_UM = {b: nm / 1000 for b, nm in S2_WAVELENGTH_NM.items()}


def _stats(values: np.ndarray) -> dict[str, float]:
  q = np.percentile(values, [0.1, 1, 5, 50, 95, 99, 99.9])
  return {"min": float(values.min()), "max": float(values.max()), "mean": float(values.mean()),
          "std": float(values.std()), "median": float(q[3]), "percentile_0_1": float(q[0]),
          "percentile_1": float(q[1]), "percentile_5": float(q[2]), "percentile_95": float(q[4]),
          "percentile_99": float(q[5]), "percentile_99_9": float(q[6])}


LABEL_FRACTIONS = (0.01, 0.02, 0.05, 0.10, 0.20, 0.50, 1.00)


def write_geobench_sample(folder: str, *, name: str = "m-eurosat", n: int = 40, size: int = 16,
                          bands: Sequence[str] = GEOBENCH_S2_NAMES, num_classes: int = 10,
                          multilabel: bool = False, seed: int = 0) -> str:
  """Writes a small GEO-Bench classification task `<folder>/<name>/`; returns its path.

  `bands` are GEO-Bench band names (as stored). Each class has its own spectrum (a smooth
  random curve over wavelength, per true Sentinel-2 band), each sample is its class's spectrum
  (multi-label: the mean of its classes' spectra) with texture and noise, so a probe on good
  features (or on the pixels) separates the classes. Files: one `id_XXXX.hdf5` per sample in
  geobench's layout, `band_stats.json` (geobench's statistics, including its "label" entry for
  single-label tasks), `task_specs.pkl`, `default_partition.json` (60/20/20) and the label-
  fraction partitions `0.01x_train` ... `1.00x_train` (train subsets; same valid and test).

  Quirks of the published release are reproduced for tasks of the same name: m-eurosat stores
  true bands under shifted names (`bands.GEOBENCH_BAND_FIXES`), m-brick-kiln likewise, and
  m-so2sat stores reflectance / 1e4 while its band_stats are in reflectance units.
  """
  if n < 5:
    raise ValueError(f"n must be at least 5 (one sample per split), got {n}")
  out = os.path.join(folder, name)
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng(seed)
  fixes = GEOBENCH_BAND_FIXES.get(name, {})
  # The Sentinel-2 band each stored channel really holds (None: not a Sentinel-2 band).
  true_bands = [fixes[b] if b in fixes else GEOBENCH_S2.get(b) for b in bands]
  stored_scale = D.GEOBENCH_STATS_SCALE.get(name, 1.0)
  spectra, band_col = _class_spectra(rng, num_classes)
  class_names = [f"class_{c}" for c in range(num_classes)]

  names = [f"id_{i:04d}" for i in range(n)]
  values: dict[str, list[np.ndarray]] = {b: [] for b in bands}
  labels_seen = []
  with _standin_modules() as classes:
    infos = [_band_info(classes, b) for b in bands]
    for i, sname in enumerate(names):
      if multilabel:
        label = (rng.random(num_classes) < 2.0 / num_classes).astype(np.int64)
        if not label.any():
          label[rng.integers(num_classes)] = 1
        spec = spectra[label.astype(bool)].mean(0)
      else:
        label = int(rng.integers(num_classes))
        spec = spectra[label]
      labels_seen.append(label)
      texture = 1 + 0.1 * rng.standard_normal((size, size))
      attrs: dict[str, Any] = {"bands_order": list(bands), "label": label}
      with h5py.File(os.path.join(out, f"{sname}.hdf5"), "w") as f:
        for b, true, info in zip(bands, true_bands, infos):
          if true in band_col:
            img = spec[band_col[true]] * texture
          else:  # a non-Sentinel-2 band (Sentinel-1, TCI): unrelated noise
            img = rng.normal(0, 1, (size, size))
          img = img + rng.normal(0, 50 if true in band_col else 0.1, (size, size))
          values[b].append(img.ravel())
          if stored_scale != 1.0 and true in band_col:
            data = (img * stored_scale).astype(np.float32)
          elif true in band_col:
            data = np.clip(np.round(img), -32768, 32767).astype(np.int16)
          else:
            data = img.astype(np.float32)
          f.create_dataset(b, data=data)
          attrs[b] = {"date": None, "date_id": None, "spatial_resolution": 10,
                      "band_info": info, "meta_info": None, "transform": None, "crs": None}
        f.attrs["pickle"] = str(pickle.dumps(attrs))
    label_type = (classes["geobench.label"]["MultiLabelClassification"] if multilabel
                  else classes["geobench.label"]["Classification"])(num_classes, class_names)
    specs = classes["geobench.task"]["TaskSpecifications"](
        dataset_name=name, benchmark_name="classification_v1.0", patch_size=(size, size),
        n_time_steps=1, bands_info=infos, label_type=label_type, spatial_resolution=10)
    with open(os.path.join(out, "task_specs.pkl"), "wb") as fh:
      pickle.dump(specs, fh)

  # Statistics in the units the release's band_stats.json uses (reflectance for S2 bands).
  stats = {b: _stats(np.concatenate(v)) for b, v in values.items()}
  if not multilabel:
    stats["label"] = _stats(np.asarray(labels_seen, np.float64))
  with open(os.path.join(out, "band_stats.json"), "w") as fh:
    json.dump(stats, fh, indent=1)

  _write_partitions(out, names, rng)
  return out


def _class_spectra(rng: np.random.Generator, num_classes: int
                   ) -> tuple[np.ndarray, dict[str, int]]:
  """Class spectra (K, 13): smooth random curves over the 13 Sentinel-2 bands in wavelength
  order, 300..5000 (reflectance x 1e4); and each band's column."""
  order = sorted(_S2_WAVELENGTH_UM, key=_S2_WAVELENGTH_UM.get)
  knots = rng.uniform(300, 5000, size=(num_classes, 5))
  xs = np.linspace(0, 1, 5)
  pos = {b: i / (len(order) - 1) for i, b in enumerate(order)}
  spectra = np.array([[np.interp(pos[b], xs, knots[c]) for b in order]
                      for c in range(num_classes)])  # (K, 13)
  return spectra, {b: i for i, b in enumerate(order)}


def _write_partitions(out: str, names: list[str], rng: np.random.Generator) -> None:
  """`default_partition.json` (60/20/20) and the label-fraction train subsets."""
  n = len(names)
  perm = [names[i] for i in rng.permutation(n)]
  n_train, n_valid = int(round(0.6 * n)), int(round(0.2 * n))
  default = {"train": perm[:n_train], "valid": perm[n_train:n_train + n_valid],
             "test": perm[n_train + n_valid:]}
  with open(os.path.join(out, "default_partition.json"), "w") as fh:
    json.dump(default, fh, indent=1)
  for frac in LABEL_FRACTIONS:
    k = max(1, int(math.ceil(frac * n_train)))
    part = dict(default, train=default["train"][:k])
    with open(os.path.join(out, f"{frac:.2f}x_train_partition.json"), "w") as fh:
      json.dump(part, fh, indent=1)


def write_geobench_segmentation_sample(folder: str, *, name: str = "m-cashew-plant", n: int = 20,
                                       size: int = 32, bands: Sequence[str] = GEOBENCH_S2_NAMES,
                                       num_classes: int = 4, seed: int = 0) -> str:
  """Writes a small GEO-Bench segmentation task `<folder>/<name>/`; returns its path.

  The layout of geobench's `write_sample_hdf5` for a sample whose label is a `Band`: one HDF5
  dataset per band and one named "label" holding the (H, W) class map (uint8), listed last in
  `bands_order`, its band info a `SegmentationClasses` ("label", n_classes, class names);
  `task_specs.pkl` with that label type; `band_stats.json`; the same partitions as
  `write_geobench_sample`. Content: a spatially coherent class map (arg-max of smooth random
  fields), each pixel its class's spectrum (`bands` that are Sentinel-2 or Red/Green/Blue) with
  texture and noise, so a segmenter can learn the classes from the pixels.
  """
  if n < 5:
    raise ValueError(f"n must be at least 5 (one sample per split), got {n}")
  if not 2 <= num_classes <= 255:
    raise ValueError(f"num_classes must be in [2, 255] (uint8 class maps), got {num_classes}")
  out = os.path.join(folder, name)
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng(seed)
  spectra, band_col = _class_spectra(rng, num_classes)
  true_bands = [GEOBENCH_S2.get(b) or GEOBENCH_RGB.get(b) for b in bands]
  class_names = [f"class_{c}" for c in range(num_classes)]
  names = [f"id_{i:04d}" for i in range(n)]
  values: dict[str, list[np.ndarray]] = {b: [] for b in bands}
  label_values = []
  grid = max(2, size // 8)
  with _standin_modules() as classes:
    infos = [_band_info(classes, b) for b in bands]
    seg = classes["geobench.dataset"]["SegmentationClasses"]("label", 10, num_classes,
                                                             class_names)
    for sname in names:
      fields = R.resize(rng.standard_normal((grid, grid, num_classes)).astype(np.float32),
                        size, "bilinear", antialias=True)
      label = fields.argmax(-1).astype(np.uint8)
      label_values.append(label.ravel())
      texture = 1 + 0.1 * rng.standard_normal((size, size))
      attrs: dict[str, Any] = {}
      with h5py.File(os.path.join(out, f"{sname}.hdf5"), "w") as f:
        for b, true, info in zip(bands, true_bands, infos):
          if true in band_col:
            img = spectra[label, band_col[true]] * texture + rng.normal(0, 50, (size, size))
            data = np.clip(np.round(img), -32768, 32767).astype(np.int16)
          else:  # a non-optical band: unrelated noise
            img = rng.normal(0, 1, (size, size))
            data = img.astype(np.float32)
          values[b].append(img.ravel())
          f.create_dataset(b, data=data)
          attrs[b] = {"date": None, "date_id": None, "spatial_resolution": 10,
                      "band_info": info, "meta_info": None, "transform": None, "crs": None}
        f.create_dataset("label", data=label)
        attrs["label"] = {"date": None, "date_id": None, "spatial_resolution": 10,
                          "band_info": seg, "meta_info": None, "transform": None, "crs": None}
        attrs["bands_order"] = [*bands, "label"]
        f.attrs["pickle"] = str(pickle.dumps(attrs))
    specs = classes["geobench.task"]["TaskSpecifications"](
        dataset_name=name, benchmark_name="segmentation_v1.0", patch_size=(size, size),
        n_time_steps=1, bands_info=infos, label_type=seg, spatial_resolution=10)
    with open(os.path.join(out, "task_specs.pkl"), "wb") as fh:
      pickle.dump(specs, fh)
  stats = {b: _stats(np.concatenate(v)) for b, v in values.items()}
  stats["label"] = _stats(np.concatenate(label_values).astype(np.float64))
  with open(os.path.join(out, "band_stats.json"), "w") as fh:
    json.dump(stats, fh, indent=1)
  _write_partitions(out, names, rng)
  return out


def write_eurosat_ms_sample(folder: str, *, per_class: int = 5, size: int = 64, seed: int = 0,
                            archive: bool = True, split_lists: bool = False) -> str:
  """Writes a small EuroSAT MS release into `folder`; returns the path of `EuroSAT_MS.zip`
  (`archive`) or of the `EuroSAT_MS` folder.

  Laid out like the release: `EuroSAT_MS/<Class>/<Class>_<i>.tif` (i from 1) for each of the 10
  classes (`datasets.EUROSAT_CLASSES`), each a 13-band uint16 GeoTIFF in the release's band order
  (`bands.EUROSAT_MS_BANDS`) on a 10 m UTM grid (EPSG:32632). Each class has its own spectrum
  (values ~300..5000, like L1C digital numbers), with texture and noise. `split_lists` also
  writes `eurosat-<split>.txt` beside it, naming images as the published lists do
  (`<Class>_<i>.jpg`): per class, the first 60 % by number train, the next 20 % val, the rest
  test.
  """
  import rasterio  # the `geo` extra
  from rasterio.transform import Affine

  if per_class < 1:
    raise ValueError(f"per_class must be positive, got {per_class}")
  rng = np.random.default_rng(seed)
  spectra, band_col = _class_spectra(rng, len(D.EUROSAT_CLASSES))
  cols = [band_col[b] for b in EUROSAT_MS_BANDS]
  root = os.path.join(folder, D.EUROSAT_MS_FOLDER)
  profile = {"driver": "GTiff", "width": size, "height": size, "count": len(cols),
             "dtype": "uint16", "crs": "EPSG:32632"}
  lists: dict[str, list[str]] = {s: [] for s in D.EUROSAT_SPLIT_FILES}
  for label, cls in enumerate(D.EUROSAT_CLASSES):
    os.makedirs(os.path.join(root, cls), exist_ok=True)
    for i in range(1, per_class + 1):
      texture = 1 + 0.1 * rng.standard_normal((size, size, 1))
      img = spectra[label, cols] * texture + rng.normal(0, 50, (size, size, len(cols)))
      data = np.clip(np.round(img), 1, 65535).astype(np.uint16).transpose(2, 0, 1)
      x0, y0 = 500_000 + 1000 * label, 5_500_000 + 1000 * i
      with rasterio.open(os.path.join(root, cls, f"{cls}_{i}.tif"), "w", **profile,
                         transform=Affine(10.0, 0.0, x0, 0.0, -10.0, y0)) as dst:
        dst.write(data)
      frac = (i - 1) / per_class
      split = "train" if frac < 0.6 else "val" if frac < 0.8 else "test"
      lists[split].append(f"{cls}_{i}.jpg")
  if split_lists:
    for split, names in lists.items():
      with open(os.path.join(folder, D.EUROSAT_SPLIT_FILES[split]), "w") as fh:
        fh.write("\n".join(names) + "\n")
  if not archive:
    return root
  path = os.path.join(folder, D.EUROSAT_MS_FOLDER + ".zip")
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    for cls in D.EUROSAT_CLASSES:
      for name in sorted(os.listdir(os.path.join(root, cls))):
        z.write(os.path.join(root, cls, name), f"{D.EUROSAT_MS_FOLDER}/{cls}/{name}")
  shutil.rmtree(root)
  return path


def write_s2_scene(path: str, bands: Sequence[str], *, height: int, width: int, seed: int = 0,
                   dtype: str = "uint16", nodata: float | None = 0,
                   descriptions: Sequence[str | None] | None = None, crs: str = "EPSG:32633",
                   origin: tuple[float, float] = (399_960.0, 5_300_040.0),
                   gsd_m: float = 10.0, holes: Sequence[tuple[int, int, int, int]] = (),
                   block: int = 256) -> np.ndarray:
  """Writes a Sentinel-2-like scene as the Copernicus products are usually exported: a tiled
  GeoTIFF on a UTM grid (north-up, `gsd_m` pixels, upper-left corner `origin`), one band per
  name in `bands` (band descriptions `descriptions`, default the names; None entries leave a
  band undescribed), values like L2A reflectance x 10000 (uint16, 0 = nodata) with fields and
  texture. `holes` (row, col, height, width) windows are set to `nodata` (NaN for float scenes
  without one). Returns the written array (C, H, W)."""
  import rasterio  # the `geo` extra
  from rasterio.transform import Affine

  rng = np.random.default_rng(seed)
  base = {b: 400 + 300 * i for i, b in enumerate(bands)}
  fields = rng.integers(0, 4, (height // 16 + 1, width // 16 + 1))
  field = np.kron(fields, np.ones((16, 16), np.int64))[:height, :width]
  data = np.stack([base[b] * (1 + 0.5 * field) + rng.normal(0, 60, (height, width))
                   for b in bands])
  data = np.clip(data, 1, 12000)
  if np.dtype(dtype).kind != "f":
    data = np.round(data)
  data = data.astype(dtype)
  fill = nodata if nodata is not None else np.nan
  for r, c, h, w in holes:
    data[:, r:r + h, c:c + w] = fill
  profile = {"driver": "GTiff", "width": width, "height": height, "count": len(bands),
             "dtype": dtype, "crs": crs, "nodata": nodata, "tiled": True,
             "blockxsize": block, "blockysize": block, "compress": "deflate",
             "transform": Affine(gsd_m, 0.0, origin[0], 0.0, -gsd_m, origin[1])}
  with rasterio.open(path, "w", **profile) as dst:
    dst.write(data)
    for i, d in enumerate(descriptions if descriptions is not None else bands):
      if d is not None:
        dst.set_band_description(i + 1, d)
  return data
