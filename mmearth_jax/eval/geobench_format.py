"""The GEO-Bench on-disk format: reading it without the `geobench` package.

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

GEO-Bench's band names and channel orders are in `mmearth_jax.bands`. Writers of small tasks in
this format, for tests and demos, are in `mmearth_jax.testing`.
"""
from __future__ import annotations

import ast
import builtins
import importlib
import io
import os
import pickle
from typing import Any, Sequence

import h5py
import numpy as np


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
