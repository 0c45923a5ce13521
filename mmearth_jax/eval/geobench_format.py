"""The GEO-Bench on-disk format: reading it without the `geobench` package, and writing test tasks.

A GEO-Bench task folder (e.g. `classification_v1.0/m-eurosat/`) holds

    <sample>.hdf5                 one file per sample: one HDF5 dataset per band, named by the
                                  band's name (plus `_<date>` when the band has a date); the
                                  file attribute `pickle` is `str(pickle.dumps(attrs))`, where
                                  attrs = {<dataset name>: {"band_info", "date", ...},
                                  "bands_order": [...], "label": int | multi-hot ndarray}.
                                  Segmentation tasks (`segmentation_v1.0/m-cashew-plant`, ...)
                                  instead store the class map as a dataset named "label" (in
                                  `bands_order`; band info a `SegmentationClasses`)
    band_stats.json               {band name: {"mean", "std", "min", "max", "median", ...}}
    task_specs.pkl                pickled `geobench` TaskSpecifications (label type, class names)
    <name>_partition.json         {"train": [sample names], "valid": [...], "test": [...]};
                                  `default`, and label fractions `0.01x_train` ... `1.00x_train`

The pickles name `geobench` classes (band infos, label types) and sometimes rasterio / affine
objects. They are read with `safe_loads`: a restricted unpickler that builds a few plain
builtin, datetime and numpy types and replaces every other class by an inert stand-in that only
records its constructor arguments and state. It never imports a module the pickle names and
never calls anything outside its allow-list, so a crafted file cannot run code.

`write_geobench_sample` writes a small classification task in this format (the notebook and the
tests use it), with learnable class-dependent spectra and the quirks of the published release
(see `datasets.GEOBENCH_BAND_FIXES` and `datasets.GEOBENCH_STATS_SCALE`);
`write_geobench_segmentation_sample` a segmentation task.
"""
from __future__ import annotations

import ast
import builtins
import contextlib
import importlib
import io
import json
import math
import os
import pickle
import sys
import types
from typing import Any, Sequence

import h5py
import numpy as np

# The 13 Sentinel-2 band names GEO-Bench uses (geobench `sentinel2_13_bands`), in its order
# (B8 before B8A), with the MMEarth name of each.
GEOBENCH_S2 = {
    "01 - Coastal aerosol": "B1",
    "02 - Blue": "B2",
    "03 - Green": "B3",
    "04 - Red": "B4",
    "05 - Vegetation Red Edge": "B5",
    "06 - Vegetation Red Edge": "B6",
    "07 - Vegetation Red Edge": "B7",
    "08 - NIR": "B8",
    "08A - Vegetation Red Edge": "B8A",
    "09 - Water vapour": "B9",
    "10 - SWIR - Cirrus": "B10",
    "11 - SWIR": "B11",
    "12 - SWIR": "B12",
}
GEOBENCH_S2_NAMES = tuple(GEOBENCH_S2)
# geobench `sentinel1_8_bands` (m-so2sat stores these before its 10 Sentinel-2 bands).
GEOBENCH_S1_NAMES = ("01 - VH.Real", "02 - VH.Imaginary", "03 - VV.Real", "04 - VV.Imaginary",
                     "05 - VH.LEE Filtered", "06 - VV.LEE Filtered", "07 - VH.LEE Filtered.Real",
                     "08 - VV.LEE Filtered.Imaginary")
# m-so2sat's Sentinel-2 bands: geobench sentinel2_13_bands[1:9] + [-2:].
GEOBENCH_SO2SAT_S2_NAMES = GEOBENCH_S2_NAMES[1:9] + GEOBENCH_S2_NAMES[-2:]
# m-bigearthnet's: sentinel2_13_bands[0:10] + [-2:] (no cirrus band).
GEOBENCH_BIGEARTHNET_NAMES = GEOBENCH_S2_NAMES[0:10] + GEOBENCH_S2_NAMES[-2:]


class GeoBenchFormatError(ValueError):
  """A GEO-Bench file is missing, malformed or not what the loader supports."""


# ---------------------------------------------------------------------------------------------
# Restricted unpickling.

class Stub:
  """Inert stand-in for a class a pickle names: keeps constructor arguments and state, runs no
  code of that class. `pickle_class` is "module.name" as the pickle wrote it."""
  pickle_class = "?"

  def __new__(cls, *args, **kwargs):  # NEWOBJ passes constructor args here: ignore them
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):  # REDUCE calls the class like a function
    self.__dict__["_args"] = args
    self.__dict__["_kwargs"] = kwargs

  def __setstate__(self, state):
    # BUILD: a state dict, or (dict, slots dict), or anything else the class chose.
    if isinstance(state, tuple) and len(state) == 2 and all(
        s is None or isinstance(s, dict) for s in state):
      for s in state:
        self.__dict__.update(s or {})
    elif isinstance(state, dict):
      self.__dict__.update(state)
    else:
      self.__dict__["_state"] = state

  def __repr__(self) -> str:
    keys = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
    return f"Stub[{self.pickle_class}]({keys})"


def _numpy_attr(modules: Sequence[str], name: str):
  for m in modules:
    try:
      return getattr(importlib.import_module(m), name)
    except (ImportError, AttributeError):
      continue
  raise pickle.UnpicklingError(f"numpy has no {name!r}")


_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")
# Callables a pickle may name, all pure constructors of plain values.
_ALLOWED = {
    ("builtins", n): None for n in ("list", "dict", "tuple", "set", "frozenset", "int", "float",
                                    "complex", "bool", "str", "bytes", "bytearray", "slice",
                                    "range", "object")
}
_ALLOWED.update({("__builtin__", n[1]): None for n in list(_ALLOWED)})
_ALLOWED.update({("collections", "OrderedDict"): None, ("datetime", "date"): None,
                 ("datetime", "datetime"): None, ("datetime", "timedelta"): None,
                 ("datetime", "timezone"): None, ("datetime", "time"): None,
                 ("_codecs", "encode"): None, ("copyreg", "_reconstructor"): None,
                 ("numpy", "ndarray"): None, ("numpy", "dtype"): None})
for _m in _MULTIARRAY:
  _ALLOWED[(_m, "_reconstruct")] = None
  _ALLOWED[(_m, "scalar")] = None
for _m in _NUMERIC:
  _ALLOWED[(_m, "_frombuffer")] = None
_ALLOWED.update({(m, n): None for m in ("numpy.dtypes",) for n in (
    "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType", "UInt16DType",
    "UInt32DType", "UInt64DType", "Float16DType", "Float32DType", "Float64DType", "BoolDType")})


class _SafeUnpickler(pickle.Unpickler):
  _stubs: dict[tuple[str, str], type] = {}

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      if module in ("builtins", "__builtin__"):
        return getattr(builtins, name)
      if module in ("collections", "datetime", "_codecs", "copyreg"):
        return getattr(importlib.import_module(module), name)
      if module in _MULTIARRAY:
        return _numpy_attr(_MULTIARRAY, name)
      if module in _NUMERIC:
        return _numpy_attr(_NUMERIC, name)
      return getattr(importlib.import_module(module), name)
    key = (module, name)
    stub = self._stubs.get(key)
    if stub is None:
      stub = type(name.replace(".", "_"), (Stub,), {"pickle_class": f"{module}.{name}"})
      self._stubs[key] = stub
    return stub


def safe_loads(data: bytes) -> Any:
  """Unpickles `data` with the restricted unpickler (unknown classes become `Stub`s)."""
  return _SafeUnpickler(io.BytesIO(data)).load()


def stub_class(obj: Any) -> str | None:
  """The class name ("Sentinel2", "Classification", ...) a stub stands for; None otherwise."""
  return obj.pickle_class.rsplit(".", 1)[-1] if isinstance(obj, Stub) else None


# ---------------------------------------------------------------------------------------------
# Reading.

def read_attrs(f: h5py.File) -> dict:
  """The decoded `pickle` attribute of an open sample file ({} when it has none)."""
  raw = f.attrs.get("pickle")
  if raw is None:
    return {}
  if isinstance(raw, bytes) and raw[:1] != b"b":
    blob = raw  # a raw pickle (not written by geobench, but harmless to accept)
  else:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
      blob = ast.literal_eval(text)  # geobench stores str(pickle.dumps(...)): a bytes literal
    except (ValueError, SyntaxError) as e:
      raise GeoBenchFormatError(f"{f.filename}: attribute 'pickle' is not a bytes literal "
                                f"({e})") from None
  try:
    attrs = safe_loads(blob)
  except Exception as e:  # noqa: BLE001 - any decoding failure is a format error here
    raise GeoBenchFormatError(f"{f.filename}: cannot decode attribute 'pickle': {e}") from None
  if not isinstance(attrs, dict):
    raise GeoBenchFormatError(f"{f.filename}: attribute 'pickle' holds {type(attrs).__name__}, "
                              "expected a dict")
  return attrs


def sample_bands(f: h5py.File, attrs: dict) -> list[tuple[str, str, str | None]]:
  """(dataset name, band name, band-info class) of each image band, in the file's band order.

  The band name comes from the pickled `band_info` (the dataset name may carry a `_<date>`
  suffix); without a pickle the dataset name is used. Label datasets (`label*`) are skipped.
  """
  order = attrs.get("bands_order") or list(f.keys())
  out = []
  for ds_name in order:
    if ds_name.startswith("label"):
      continue
    if ds_name not in f:
      raise GeoBenchFormatError(f"{f.filename}: 'bands_order' names {ds_name!r}, which the file "
                                f"does not hold (datasets: {sorted(f.keys())})")
    info = (attrs.get(ds_name) or {}).get("band_info") if isinstance(attrs.get(ds_name),
                                                                     dict) else None
    name = getattr(info, "name", None) if info is not None else None
    out.append((ds_name, name if isinstance(name, str) else ds_name, stub_class(info)))
  return out


def sample_label(path: str, f: h5py.File, attrs: dict) -> int | np.ndarray:
  """The label of a classification sample: an int, or a multi-hot vector."""
  if any(k.startswith("label") for k in f.keys()):
    raise GeoBenchFormatError(f"{path}: holds a pixel label (a segmentation task); load it "
                              "with `datasets.load_segmentation` (CLI: `mmearth-jax segment`)")
  if "label" not in attrs:
    raise GeoBenchFormatError(f"{path}: no 'label' in its pickled attributes")
  label = attrs["label"]
  if isinstance(label, Stub):  # a geobench Band wrapping the label
    label = label.__dict__.get("data", label)
  arr = np.asarray(label)
  if arr.ndim == 0:
    return int(arr)
  if arr.ndim == 1 and arr.dtype != object:
    return arr.astype(np.float32)
  raise GeoBenchFormatError(f"{path}: label of shape {arr.shape} is neither a class index nor a "
                            "multi-hot vector")


# geobench's label types of segmentation tasks (its `SegmentationClasses` is both a band info and
# a label type).
SEGMENTATION_LABEL_TYPES = ("SegmentationClasses", "SemanticSegmentation")


def sample_pixel_label(path: str, f: h5py.File, attrs: dict) -> np.ndarray:
  """The class map (H, W) int64 of a segmentation sample: its HDF5 dataset named "label"."""
  if "label" not in f:
    others = [k for k in f.keys() if k.startswith("label")]
    hint = (f"; it has {others}, but geobench names the label band exactly 'label'" if others
            else "; its pickled attributes hold a classification label instead"
            if "label" in attrs else "")
    raise GeoBenchFormatError(f"{path}: no HDF5 dataset 'label' (the per-pixel class map of a "
                              f"GEO-Bench segmentation sample); datasets: {sorted(f.keys())}"
                              f"{hint}")
  try:
    y = np.asarray(f["label"])
  except (OSError, KeyError) as e:
    raise GeoBenchFormatError(f"{path}: cannot read dataset 'label': {e}") from None
  if y.ndim == 3 and y.shape[-1] == 1:
    y = y[..., 0]
  if y.ndim != 2 or y.dtype.kind not in "iub":
    raise GeoBenchFormatError(f"{path}: dataset 'label' has shape {y.shape} and dtype {y.dtype}; "
                              "expected an integer (H, W) class map")
  return y.astype(np.int64)


def pixel_label_classes(attrs: dict) -> tuple[int | None, list[str] | None]:
  """(class count, class names) from the band info of a sample's "label" band (geobench's
  `SegmentationClasses`), or (None, None) when it does not say."""
  entry = attrs.get("label")
  info = entry.get("band_info") if isinstance(entry, dict) else None
  n = getattr(info, "n_classes", None)
  if not isinstance(n, int):
    return None, None
  names = getattr(info, "_class_names", None)
  names = [str(x) for x in names] if isinstance(names, (list, tuple)) and len(names) == n else None
  return n, names


def read_task_specs(folder: str) -> dict | None:
  """{"num_classes", "class_names", "multilabel", "segmentation", "label_type"} from
  `task_specs.pkl`, or None when it is absent or unreadable (callers then infer from the
  samples)."""
  path = os.path.join(folder, "task_specs.pkl")
  if not os.path.exists(path):
    return None
  try:
    with open(path, "rb") as fh:
      specs = safe_loads(fh.read())
  except Exception:  # noqa: BLE001 - optional metadata: fall back to inference
    return None
  label_type = getattr(specs, "label_type", None)
  kind = stub_class(label_type)
  n = getattr(label_type, "n_classes", None)
  if kind is None or not isinstance(n, int):
    return None
  names = getattr(label_type, "_class_names", None) or getattr(label_type, "class_name", None)
  names = [str(x) for x in names] if isinstance(names, (list, tuple)) and len(names) == n else None
  return {"num_classes": n, "class_names": names, "label_type": kind,
          "multilabel": kind == "MultiLabelClassification",
          "segmentation": kind in SEGMENTATION_LABEL_TYPES}


# ---------------------------------------------------------------------------------------------
# Writing (test and demo data).

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
  if name in ("Red", "Green", "Blue"):
    return ds["SpectralBand"](name, (name.lower(),), 10)
  return ds["BandInfo"](name, (), 10)


_S2_WAVELENGTH_UM = {"B1": 0.443, "B2": 0.49, "B3": 0.56, "B4": 0.665, "B5": 0.705, "B6": 0.74,
                     "B7": 0.783, "B8": 0.842, "B8A": 0.865, "B9": 0.945, "B10": 1.375,
                     "B11": 1.61, "B12": 2.19}


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
  true bands under shifted names (`datasets.GEOBENCH_BAND_FIXES`), m-brick-kiln likewise, and
  m-so2sat stores reflectance / 1e4 while its band_stats are in reflectance units.
  """
  from mmearth_jax.eval import datasets as D  # the quirk tables live with the loader

  if n < 5:
    raise ValueError(f"n must be at least 5 (one sample per split), got {n}")
  out = os.path.join(folder, name)
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng(seed)
  fixes = D.GEOBENCH_BAND_FIXES.get(name, {})
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


_RGB_NAMES = {"Red": "B4", "Green": "B3", "Blue": "B2"}


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
  from mmearth_jax.eval import datasets as D

  if n < 5:
    raise ValueError(f"n must be at least 5 (one sample per split), got {n}")
  if not 2 <= num_classes <= 255:
    raise ValueError(f"num_classes must be in [2, 255] (uint8 class maps), got {num_classes}")
  out = os.path.join(folder, name)
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng(seed)
  spectra, band_col = _class_spectra(rng, num_classes)
  true_bands = [GEOBENCH_S2.get(b) or _RGB_NAMES.get(b) for b in bands]
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
      fields = D.resize(rng.standard_normal((grid, grid, num_classes)).astype(np.float32),
                        (size, size))
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
