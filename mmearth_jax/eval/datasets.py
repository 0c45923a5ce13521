"""Downstream datasets: classification for frozen-encoder evaluation (kNN, linear probes) and
segmentation for U-Net fine-tuning (`load_segmentation`, see the end of this docstring).

`load(dataset, split, bands)` returns an `EvalData`: every image of one split in memory, as
float32 `(N, H, W, C)` with the channels in the ENCODER's band order (`bands`, MMEarth
Sentinel-2 names such as `S2_INPUT_BANDS` or `("B4", "B3", "B2")`), normalised. Sources:

    geobench:<task folder>   a GEO-Bench classification task (m-eurosat, m-bigearthnet, ...)
    tfds:<name>              a prepared TFDS dataset: eurosat[/all|/rgb], so2sat[/all|/rgb],
                             bigearthnet[/all|/rgb] (no config: the all-bands one)
    mmearth:<shards folder>  our converted MMEarth shards, labelled by land cover
    eurosat_ms:<folder|zip>  the EuroSAT MS release read with rasterio (the `geo` extra): its
                             EuroSAT_MS.zip, or the folder it was extracted into (holding
                             EuroSAT_MS/<Class>/<Class>_<i>.tif), or EuroSAT_MS/ itself

A relative path or TFDS name is resolved against `data_dir` (TFDS: its data_dir).

Band mapping (`band_mapping`, used by every loader; `EvalData.mapping` keeps it):
  each dataset channel is named by its MMEarth band; an encoder band the dataset has gets that
  channel; a dataset band the encoder does not use is dropped; an encoder band the dataset
  lacks is filled, by default (`fill="nearest"`), with a copy of the dataset's band nearest in
  central wavelength, after normalisation. That is what MMEarth's own GEO-Bench code does
  (MMEarth-train `BAND_NAMES_v1_full.json`: m-so2sat, which lacks B1 and B9, feeds "02 - Blue"
  twice and "08A" twice). `fill="zero"` fills with zeros instead (the band mean after
  z-scoring). If fewer than half of the encoder's bands are present, `load` raises.

  Two departures from MMEarth-train, both on purpose: channels are matched by name, so B8A and
  B8 land where the encoder expects them (MMEarth-train feeds GEO-Bench's order, B8 then B8A,
  to an encoder pretrained on B8A then B8); and the published GEO-Bench m-eurosat and
  m-brick-kiln, whose stored band names do not match their channels (geo-bench issues #28
  and #29), are corrected (`bands.GEOBENCH_BAND_FIXES`; `fix_band_names=False` reads the names
  as stored, which is what MMEarth-train saw).

Normalisation:
  geobench  z-score with the task's `band_stats.json` (mean, std per stored band name); for
            m-so2sat, whose stats are in reflectance x 1e4 while its pixels are reflectance,
            the stats are divided by 1e4 first (as MMEarth-train does; `GEOBENCH_STATS_SCALE`).
  tfds      z-score with per-channel mean / std of the TRAIN split, from at most
            `TFDS_STATS_EXAMPLES` evenly spaced examples, cached per (dataset, data_dir).
  mmearth   exactly the training pipeline's z-score (`pipeline.Transform`): manifest band
            stats by the tile's S2_type, no-data pixels set to 0.
  eurosat_ms
            the files hold Sentinel-2 L1C digital numbers, MMEarth's units: given the
            encoder's model card (`card`, `mmearth_jax.cards`) with L1C statistics, z-scored with
            those (what the encoder was pretrained with; no-data, raw 0, set to 0 as the pipeline
            does); otherwise like tfds, with the train split's statistics
            (`EUROSAT_STATS_EXAMPLES`). `EvalData.notes` says which.
  NaN or inf after normalisation becomes 0. A band with std 0 is only centred.

EuroSAT MS splits (`eurosat_ms_split_names`): the published train / val / test lists
(`EUROSAT_SPLIT_FILES`, Neumann et al. 2019, which torchgeo uses) when they lie beside the data
(in the folder given, beside EuroSAT_MS/ or beside the zip); otherwise a seeded split of each
class, 60 / 20 / 20 (the lists' proportions). Either way a split's images come in a seeded random
order, so `max_examples` keeps a random subset of about the split's class balance.

`image_size`: geobench, tfds and eurosat_ms images are resized (`ops.resize`: bilinear,
antialiased when shrinking, half-pixel centres, edge-clamped: like
`jax.image.resize(method="linear")`); mmearth tiles are centre-cropped. Memory: the whole split
is held as float32, e.g. m-bigearthnet's 20k train images at 120 px with 12 bands are 14 GB
(EuroSAT MS's 27k images at 64 px, 5.3 GB); pass `image_size` or `max_examples` to bound it.

Segmentation (`load_segmentation` -> `SegmentationData`: the same images plus a per-pixel class
map, -1 = no label):
  mmearth   the tiles' land-cover maps (ESA WorldCover if stored, else Dynamic World), the same
            tiles, split, z-score and centre crop as the classification loader.
  geobench  a GEO-Bench segmentation task: the sample files hold the class map as an HDF5
            dataset named "label" (geobench's `write_sample_hdf5` appends the label `Band`, whose
            band info is a `SegmentationClasses` named "label", to the bands); the class count
            and names come from `task_specs.pkl`, else from that band info.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import zipfile
from typing import Any, Callable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from mmearth_jax import bands as B
from mmearth_jax import modalities as M
from mmearth_jax.eval import geobench_format as G
from mmearth_jax.ops import resize as R


class EvalDataError(ValueError):
  """A downstream dataset cannot be loaded as asked; the message names the file or key."""


@dataclasses.dataclass
class EvalData:
  images: np.ndarray  # float32 (N, H, W, C), channels in the encoder's band order, normalised
  labels: np.ndarray  # int64 (N,) single-label; float32 multi-hot (N, K) if multilabel
  num_classes: int
  multilabel: bool
  class_names: list[str] | None
  name: str  # e.g. "m-eurosat/train"
  mapping: BandMapping | None = None  # how dataset channels became encoder channels
  notes: tuple[str, ...] = ()  # how the split was chosen and normalised, where a source says


FILL_NEAREST = "nearest"
FILL_ZERO = "zero"


@dataclasses.dataclass(frozen=True)
class BandMapping:
  """Where each encoder channel comes from.

  Attributes:
    encoder_bands: the encoder's input bands, in its order.
    dataset_bands: the MMEarth name of each dataset channel (None: not a Sentinel-2 band).
    indices: for each encoder band, the dataset channel copied into it; None = zeros.
    present: encoder bands the dataset has.
    filled: encoder bands the dataset lacks -> the dataset band copied in (None: zeros).
    dropped: dataset channels the encoder does not use (their MMEarth name, or "#<index>").
  """
  encoder_bands: tuple[str, ...]
  dataset_bands: tuple[str | None, ...]
  indices: tuple[int | None, ...]
  present: tuple[str, ...]
  filled: dict[str, str | None]
  dropped: tuple[str, ...]

  @property
  def used(self) -> list[int]:
    """Dataset channels that are read, ascending."""
    return sorted({i for i in self.indices if i is not None})

  def apply(self, x: np.ndarray) -> np.ndarray:
    """(..., C_dataset) -> (..., C_encoder) float32, missing bands per the fill rule."""
    out = np.zeros(x.shape[:-1] + (len(self.indices),), np.float32)
    for k, i in enumerate(self.indices):
      if i is not None:
        out[..., k] = x[..., i]
    return out

  def describe(self) -> str:
    parts = [f"{len(self.present)}/{len(self.encoder_bands)} encoder bands present"]
    if self.filled:
      parts.append("filled: " + ", ".join(f"{b}<-{s or 'zeros'}" for b, s in self.filled.items()))
    if self.dropped:
      parts.append("dropped: " + ", ".join(self.dropped))
    return "; ".join(parts)


def band_mapping(dataset_bands: Sequence[str | None], encoder_bands: Sequence[str], *,
                 fill: str = FILL_NEAREST, dataset: str = "dataset") -> BandMapping:
  """Maps dataset channels (MMEarth band names, None for non-Sentinel-2 channels) onto the
  encoder's bands; see the module docstring for the rule. Raises `EvalDataError` if fewer than
  half of the encoder's bands are present, naming `dataset` and the missing bands."""
  if fill not in (FILL_NEAREST, FILL_ZERO):
    raise EvalDataError(f"fill must be {FILL_NEAREST!r} or {FILL_ZERO!r}, got {fill!r}")
  unknown = [b for b in encoder_bands if b not in B.S2_WAVELENGTH_NM]
  if unknown or not encoder_bands:
    raise EvalDataError(f"encoder bands {unknown or list(encoder_bands)} are not Sentinel-2 band "
                        f"names; use MMEarth names {list(M.S2_BANDS)}")
  where: dict[str, int] = {}
  for i, b in enumerate(dataset_bands):
    if b is not None and b not in where:  # first occurrence wins (a repeated band is dropped)
      where[b] = i
  present = tuple(b for b in encoder_bands if b in where)
  missing = [b for b in encoder_bands if b not in where]
  if 2 * len(present) < len(encoder_bands):
    raise EvalDataError(
        f"{dataset}: has only {len(present)} of the encoder's {len(encoder_bands)} bands "
        f"(missing {missing}; the dataset's bands are "
        f"{[b for b in dataset_bands if b is not None] or 'none that are Sentinel-2'}); "
        "fewer than half present is refused")
  indices: list[int | None] = []
  filled: dict[str, str | None] = {}
  for b in encoder_bands:
    if b in where:
      indices.append(where[b])
    elif fill == FILL_ZERO:
      indices.append(None)
      filled[b] = None
    else:
      # Nearest present band in wavelength; ties go to the shorter wavelength.
      nm = B.S2_WAVELENGTH_NM
      src = min(where, key=lambda s: (abs(nm[s] - nm[b]), nm[s]))
      indices.append(where[src])
      filled[b] = src
  used = {i for i in indices if i is not None}
  dropped = tuple(b if b is not None else f"#{i}" for i, b in enumerate(dataset_bands)
                  if i not in used)
  return BandMapping(tuple(encoder_bands), tuple(dataset_bands), tuple(indices), present, filled,
                     dropped)


# ---------------------------------------------------------------------------------------------
# Shared helpers.

def _center_crop(x: np.ndarray, size: int) -> np.ndarray:
  h, w = x.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return x[top:top + size, left:left + size]


class _ChannelStats:
  """Per-channel mean and std over the finite pixels of images added one by one (Chan et al.'s
  pairwise update: stable for large reflectance values)."""

  def __init__(self, channels: int):
    self.count = 0
    self.mean = np.zeros(channels)
    self.m2 = np.zeros(channels)

  def add(self, image: np.ndarray) -> None:
    x = image.reshape(-1, self.mean.size).astype(np.float64)
    x = x[np.isfinite(x).all(1)]
    if not len(x):
      return
    nb, mb = len(x), x.mean(0)
    m2b = ((x - mb) ** 2).sum(0)
    delta = mb - self.mean
    tot = self.count + nb
    self.mean = self.mean + delta * nb / tot
    self.m2 = self.m2 + m2b + delta ** 2 * self.count * nb / tot
    self.count = tot

  def result(self) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std), or None when no finite pixel was added."""
    return (self.mean, np.sqrt(self.m2 / self.count)) if self.count else None


def _evenly_spaced(n: int, k: int) -> np.ndarray:
  """At most `k` indices spread evenly over range(n), ascending."""
  return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int))


def _zscore_params(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """(mean, 1/std) with degenerate entries made harmless (std 0/NaN: only centre)."""
  mean = np.asarray(mean, np.float64)
  std = np.asarray(std, np.float64)
  ok = np.isfinite(std) & (std > 0)
  mean = np.where(np.isfinite(mean), mean, 0.0)
  inv = np.where(ok, 1.0 / np.where(ok, std, 1.0), 1.0)
  return mean.astype(np.float32), inv.astype(np.float32)


def _finite(x: np.ndarray) -> np.ndarray:
  return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0, copy=False)


def _resolve(path: str, data_dir: str | None) -> str:
  return os.path.join(data_dir, path) if data_dir and not os.path.isabs(path) else path


def _check_size(image_size: int | None) -> None:
  if image_size is not None and (not isinstance(image_size, (int, np.integer)) or image_size < 1):
    raise EvalDataError(f"image_size must be a positive int or None, got {image_size!r}")


def load(dataset: str, split: str, bands: Sequence[str], *, data_dir: str | None = None,
         partition: str = "default", max_examples: int | None = None,
         image_size: int | None = None, fill: str = FILL_NEAREST,
         fix_band_names: bool = True, card: Mapping[str, Any] | None = None) -> EvalData:
  """One split of a downstream dataset, in the encoder's band order (see the module docstring).

  Args:
    dataset: "geobench:<task folder>", "tfds:<name>", "mmearth:<shards folder>" or
      "eurosat_ms:<folder or zip>".
    split: geobench "train" / "valid" (or "val") / "test"; TFDS any split string of the prepared
      dataset ("train", "train[:80%]"); mmearth "train" / "test"; eurosat_ms "train" / "val" /
      "test".
    bands: the encoder's input bands, MMEarth Sentinel-2 names.
    data_dir: base folder for a relative path (geobench, mmearth) or the TFDS data_dir.
    partition: GEO-Bench partition, e.g. "default" or "0.01x_train" (`<name>_partition.json`).
    max_examples: keep the first this many examples of the split.
    image_size: resize (geobench, tfds) or centre-crop (mmearth) to this size.
    fill: how an encoder band the dataset lacks is filled, "nearest" (MMEarth) or "zero".
    fix_band_names: correct GEO-Bench tasks published with wrong band names.
    card: the encoder's model card (`Pretrained.card`); eurosat_ms z-scores with its L1C
      statistics when it has them. The other sources normalise as the module docstring says.
  """
  _check_size(image_size)
  if max_examples is not None and max_examples < 1:
    raise EvalDataError(f"max_examples must be positive or None, got {max_examples}")
  kind, sep, target = dataset.partition(":")
  if not sep or not target:
    raise EvalDataError(f"dataset {dataset!r}: expected geobench:<task folder>, tfds:<name>, "
                        "mmearth:<shards folder> or eurosat_ms:<folder or zip>")
  bands = tuple(bands)
  if kind == "geobench":
    return _load_geobench(_resolve(target, data_dir), split, bands, partition, max_examples,
                          image_size, fill, fix_band_names)
  if kind == "tfds":
    return _load_tfds(target, split, bands, data_dir, max_examples, image_size, fill)
  if kind == "mmearth":
    return _load_mmearth(_resolve(target, data_dir), split, bands, max_examples, image_size, fill)
  if kind == "eurosat_ms":
    return _load_eurosat_ms(_resolve(target, data_dir), split, bands, max_examples, image_size,
                            fill, card)
  raise EvalDataError(f"dataset {dataset!r}: unknown prefix {kind!r}; use geobench:, tfds:, "
                      "mmearth: or eurosat_ms:")


# ---------------------------------------------------------------------------------------------
# GEO-Bench.

# Band names, channel orders and the published tasks' band-name fixes: `mmearth_jax.bands`.
# Tasks whose band_stats.json is in other units than their Sentinel-2 pixels: stats x factor.
# m-so2sat: pixels are reflectance (0..~3), stats reflectance x 1e4 (MMEarth-train
# geobenchdataset.py divides them by 1e4). Applied only while the stats still look x 1e4.
GEOBENCH_STATS_SCALE = {"m-so2sat": 1e-4}
# Class counts of the GEO-Bench classification tasks, when task_specs.pkl cannot be read.
GEOBENCH_NUM_CLASSES = {"m-eurosat": 10, "m-bigearthnet": 43, "m-so2sat": 17, "m-brick-kiln": 2,
                        "m-pv4ger": 2, "m-forestnet": 12}
_SPLIT_ALIASES = {"val": "valid", "validation": "valid"}
_S2_PREFIX = re.compile(r"^\s*(?:B)?0?(\d{1,2})(A?)\b(?:\s*-.*)?$", re.IGNORECASE)


def geobench_band_name(name: str, info_class: str | None = None) -> str | None:
  """The MMEarth band of a GEO-Bench band (None: not a Sentinel-2 band).

  Sentinel-2 bands are recognised by their number ("08A - Vegetation Red Edge", "B8A", "8A");
  the plain "Red" / "Green" / "Blue" of RGB tasks map to B4 / B3 / B2. Bands whose pickled
  class says another sensor (Sentinel1, Landsat8, ...) are not Sentinel-2 even when numbered.
  """
  if info_class is not None and info_class not in ("Sentinel2", "SpectralBand", "BandInfo"):
    return None
  if name.lower() in B.COLOUR_BANDS:
    return B.COLOUR_BANDS[name.lower()]
  if info_class != "Sentinel2" and name not in B.GEOBENCH_S2 and (
      "VV" in name or "VH" in name or "HH" in name or "HV" in name):
    return None
  m = _S2_PREFIX.match(name)
  if not m:
    return None
  band = f"B{int(m.group(1))}{m.group(2).upper()}"
  return band if band in B.S2_WAVELENGTH_NM else None


def _load_json(path: str, what: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise EvalDataError(f"{path}: {what} is not valid JSON ({e})") from None


def _geobench_partition(folder: str, partition: str, split: str) -> list[str]:
  path = os.path.join(folder, f"{partition}_partition.json")
  if not os.path.exists(path):
    have = sorted(f[:-len("_partition.json")] for f in os.listdir(folder)
                  if f.endswith("_partition.json"))
    raise EvalDataError(f"{path}: partition file missing (partitions here: {have or 'none'})")
  parts = _load_json(path, "partition")
  key = _SPLIT_ALIASES.get(split, split)
  if not isinstance(parts, dict) or key not in parts:
    raise EvalDataError(f"{path}: no split {split!r} (has "
                        f"{sorted(parts) if isinstance(parts, dict) else 'no splits'})")
  names = parts[key]
  if not names:
    raise EvalDataError(f"{path}: split {key!r} is empty")
  return list(names)


def _open_sample(folder: str, name: str, split: str, partition: str):
  path = os.path.join(folder, f"{name}.hdf5")
  if not os.path.exists(path):
    raise EvalDataError(f"{path}: sample {name!r} is listed in split {split!r} of "
                        f"{partition}_partition.json but its file is missing")
  try:
    return path, h5py.File(path, "r")
  except OSError as e:
    raise EvalDataError(f"{path}: cannot open as HDF5 (truncated or corrupt?): {e}") from None


def _geobench_labels_info(folder: str, task: str, partition: str, first_label) -> dict:
  """num_classes / class_names / multilabel: task_specs.pkl, else the samples themselves."""
  specs = G.read_task_specs(folder)
  multilabel = not isinstance(first_label, int)
  if specs is not None and specs.get("segmentation"):
    raise EvalDataError(f"{folder}: a segmentation task (label type {specs['label_type']}); "
                        "load it with `load_segmentation` (CLI: `mmearth-jax segment`)")
  if specs is not None and specs["multilabel"] == multilabel:
    return specs
  if multilabel:
    return {"num_classes": int(first_label.shape[0]), "class_names": None, "multilabel": True}
  if task in GEOBENCH_NUM_CLASSES:
    return {"num_classes": GEOBENCH_NUM_CLASSES[task], "class_names": None, "multilabel": False}
  # Unknown task without readable specs: the largest label over every split of the partition.
  top = 0
  parts = _load_json(os.path.join(folder, f"{partition}_partition.json"), "partition")
  for split, names in parts.items():
    for name in names:
      path, f = _open_sample(folder, name, split, partition)
      with f:
        top = max(top, int(G.sample_label(path, f, G.read_attrs(f))))
  return {"num_classes": top + 1, "class_names": None, "multilabel": False}


@dataclasses.dataclass
class _GeoBenchSplit:
  """What reading the images of one split of a GEO-Bench task needs (see `_geobench_split`)."""
  folder: str
  task: str
  split: str
  partition: str
  names: list[str]
  ds_names: list[str]  # HDF5 dataset of each image channel, in file order
  mapping: BandMapping
  mu: np.ndarray
  inv: np.ndarray
  first_path: str
  first_attrs: dict

  def image(self, path: str, f: h5py.File, attrs: dict) -> np.ndarray:
    """The sample's channels, normalised, in the encoder's band order: (H, W, C) float32."""
    here = [c[0] for c in G.sample_bands(f, attrs)]
    if here != self.ds_names:
      raise EvalDataError(f"{path}: bands {here} differ from the first sample's {self.ds_names}")
    raw = {}
    for i in self.mapping.used:
      try:
        raw[i] = np.asarray(f[self.ds_names[i]], np.float32)
      except (OSError, KeyError) as e:
        raise EvalDataError(f"{path}: cannot read dataset {self.ds_names[i]!r}: {e}") from None
      if raw[i].ndim == 3 and raw[i].shape[-1] == 1:
        raw[i] = raw[i][..., 0]
      if raw[i].ndim != 2:
        raise EvalDataError(f"{path}: dataset {self.ds_names[i]!r} has shape {raw[i].shape}; "
                            "expected one (H, W) band (time series are not supported)")
    # Bands of different resolutions are brought to the largest grid, as geobench does.
    h = max(a.shape[0] for a in raw.values())
    w = max(a.shape[1] for a in raw.values())
    norm = {i: _finite((R.resize(a, (h, w), "bilinear", antialias=True) - self.mu[i])
                       * self.inv[i]) for i, a in raw.items()}
    x = np.zeros((h, w, len(self.mapping.indices)), np.float32)
    for k, i in enumerate(self.mapping.indices):
      if i is not None:
        x[..., k] = norm[i]
    return x

  def samples(self):
    """(path, open file, attrs) of every sample of the split, in partition order."""
    for name in self.names:
      path, f = _open_sample(self.folder, name, self.split, self.partition)
      with f:
        yield path, f, G.read_attrs(f)


def _geobench_split(folder: str, split: str, bands: tuple[str, ...], partition: str,
                    max_examples: int | None, fill: str, fix_band_names: bool) -> _GeoBenchSplit:
  """Partition, band mapping and normalisation of one split (shared by classification and
  segmentation tasks: the image side of the format is the same)."""
  folder = os.path.normpath(folder)
  if not os.path.isdir(folder):
    raise EvalDataError(f"{folder}: GEO-Bench task folder not found")
  task = os.path.basename(folder)
  names = _geobench_partition(folder, partition, split)
  if max_examples:
    names = names[:max_examples]
  stats_path = os.path.join(folder, "band_stats.json")
  if not os.path.exists(stats_path):
    raise EvalDataError(f"{stats_path}: missing (the task's per-band normalisation statistics)")
  band_stats = _load_json(stats_path, "band_stats")
  fixes = B.GEOBENCH_BAND_FIXES.get(task, {}) if fix_band_names else {}

  path, f = _open_sample(folder, names[0], split, partition)
  with f:
    attrs = G.read_attrs(f)
    channels = G.sample_bands(f, attrs)
  ds_names = [c[0] for c in channels]
  band_names = [c[1] for c in channels]
  mmearth = [fixes[b] if b in fixes else geobench_band_name(b, k) for _, b, k in channels]
  mapping = band_mapping(mmearth, bands, fill=fill, dataset=f"{folder} (bands {band_names})")

  # Normalisation of the channels that are read.
  mean = np.zeros(len(channels), np.float64)
  std = np.ones(len(channels), np.float64)
  for i in mapping.used:
    st = band_stats.get(band_names[i]) if isinstance(band_stats, dict) else None
    if not isinstance(st, dict) or "mean" not in st or "std" not in st:
      raise EvalDataError(f"{stats_path}: no mean/std for band {band_names[i]!r} (has "
                          f"{sorted(band_stats) if isinstance(band_stats, dict) else 'nothing'})")
    mean[i], std[i] = st["mean"], st["std"]
  scale = GEOBENCH_STATS_SCALE.get(task)
  s2_used = [i for i in mapping.used if mmearth[i] is not None]
  if scale and s2_used and np.median(mean[s2_used]) > 10:  # still in reflectance x 1e4
    mean[s2_used] *= scale
    std[s2_used] *= scale
  mu, inv = _zscore_params(mean, std)
  return _GeoBenchSplit(folder, task, split, partition, names, ds_names, mapping, mu, inv, path,
                        attrs)


def _load_geobench(folder: str, split: str, bands: tuple[str, ...], partition: str,
                   max_examples: int | None, image_size: int | None, fill: str,
                   fix_band_names: bool) -> EvalData:
  gs = _geobench_split(folder, split, bands, partition, max_examples, fill, fix_band_names)
  with h5py.File(gs.first_path, "r") as f:
    first_label = G.sample_label(gs.first_path, f, gs.first_attrs)
  info = _geobench_labels_info(gs.folder, gs.task, partition, first_label)
  images, labels = [], []
  for path, f, attrs in gs.samples():
    x = gs.image(path, f, attrs)
    label = G.sample_label(path, f, attrs)
    images.append(R.resize(x, image_size, "bilinear", antialias=True) if image_size else x)
    if isinstance(label, int) == info["multilabel"]:
      raise EvalDataError(f"{path}: label {label!r} does not match the task's "
                          f"{'multi-label' if info['multilabel'] else 'single-label'} type")
    labels.append(label)
  return _finish(images, labels, info, f"{gs.task}/{split}", gs.mapping)


def _finish(images: list[np.ndarray], labels: list, info: dict, name: str,
            mapping: BandMapping, notes: Sequence[str] = ()) -> EvalData:
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise EvalDataError(f"{name}: images of different shapes {sorted(shapes)}; pass image_size")
  if info["multilabel"]:
    y = np.stack([np.asarray(v, np.float32) for v in labels])
    if y.shape[1] != info["num_classes"]:
      raise EvalDataError(f"{name}: multi-hot labels of length {y.shape[1]}, expected "
                          f"{info['num_classes']}")
  else:
    y = np.asarray(labels, np.int64)
    bad = y[(y < 0) | (y >= info["num_classes"])]
    if bad.size:
      raise EvalDataError(f"{name}: labels {sorted(set(bad.tolist()))[:5]} outside "
                          f"[0, {info['num_classes']})")
  return EvalData(np.stack(images).astype(np.float32, copy=False), y, int(info["num_classes"]),
                  bool(info["multilabel"]), info.get("class_names"), name, mapping, tuple(notes))


# ---------------------------------------------------------------------------------------------
# TFDS.

# The datasets' channel orders are in `mmearth_jax.bands` (EUROSAT_TFDS_BANDS, ...).
TFDS_STATS_EXAMPLES = 2000


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
  keys: tuple[str, ...]  # one image feature (H, W, C), or one feature per band (H, W)
  bands: tuple[str, ...]  # MMEarth band of each channel
  label_key: str
  multilabel: bool


TFDS_DATASETS: dict[str, _TfdsSpec] = {
    "eurosat/all": _TfdsSpec(("sentinel2",), B.EUROSAT_TFDS_BANDS, "label", False),
    "eurosat/rgb": _TfdsSpec(("image",), B.RGB_TFDS_BANDS, "label", False),
    "so2sat/all": _TfdsSpec(("sentinel2",), B.SO2SAT_TFDS_BANDS, "label", False),
    "so2sat/rgb": _TfdsSpec(("image",), B.RGB_TFDS_BANDS, "label", False),
    # One feature per band at its native resolution (20, 60 or 120 px).
    "bigearthnet/all": _TfdsSpec(B.BIGEARTHNET_TFDS_KEYS, B.BIGEARTHNET_TFDS_BANDS, "labels",
                                 True),
    "bigearthnet/rgb": _TfdsSpec(("image",), B.RGB_TFDS_BANDS, "labels", True),
}
_TFDS_DEFAULT_CONFIG = {"eurosat": "all", "so2sat": "all", "bigearthnet": "all"}
_TFDS_STATS_CACHE: dict[tuple[str, str | None], tuple[np.ndarray, np.ndarray]] = {}


def clear_cache() -> None:
  """Forgets the cached train statistics (TFDS, EuroSAT MS)."""
  _TFDS_STATS_CACHE.clear()
  _EUROSAT_STATS_CACHE.clear()


def _tfds_name(name: str) -> tuple[str, str, _TfdsSpec]:
  """(name as given to TFDS, canonical "ds/config", spec). A version suffix passes through."""
  base, _, version = name.partition(":")
  ds, _, config = base.partition("/")
  config = config or _TFDS_DEFAULT_CONFIG.get(ds, "")
  canon = f"{ds}/{config}"
  if canon not in TFDS_DATASETS:
    raise EvalDataError(f"tfds:{name}: unknown TFDS dataset; supported: "
                        f"{sorted(TFDS_DATASETS)} (a bare name uses its all-bands config)")
  return canon + (f":{version}" if version else ""), canon, TFDS_DATASETS[canon]


def _tfds_source(full: str, split: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # heavy: only when a TFDS dataset is asked for

  try:
    return tfds.data_source(full, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # noqa: BLE001 - TFDS raises many types; report one clear message
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "split" in msg.lower() or isinstance(e, (KeyError, ValueError)) and split in msg:
      raise EvalDataError(f"tfds:{full}: split {split!r} not available ({msg}); TFDS eurosat "
                          "and bigearthnet only have 'train', so2sat 'train' and 'validation': "
                          "hold out a slice such as 'train[:80%]' / 'train[80%:]'") from None
    raise EvalDataError(f"tfds:{full}: cannot open a prepared copy under data_dir "
                        f"{data_dir or '(TFDS default)'} ({type(e).__name__}: {msg}); prepare it "
                        "with `tfds build` where TensorFlow is installed") from None


def _check_tfds_split(full: str, ds, split: str) -> None:
  """Raises for a split the prepared dataset does not have (mocked data list no splits)."""
  have = list(getattr(ds.dataset_info, "splits", {}) or {})
  base = re.match(r"^\s*([A-Za-z_]+)", split)
  if have and (base is None or base.group(1) not in have):
    raise EvalDataError(f"tfds:{full}: no split {split!r} (has {sorted(have)}); hold out a "
                        "slice such as 'train[:80%]' / 'train[80%:]'")


def _tfds_image(ex: dict, spec: _TfdsSpec) -> np.ndarray:
  if len(spec.keys) == 1:
    return np.asarray(ex[spec.keys[0]], np.float32)
  # Per-band features at native resolutions (BigEarthNet: 20/60/120 px) -> the finest grid.
  arrs = [np.asarray(ex[k], np.float32) for k in spec.keys]
  h = max(a.shape[0] for a in arrs)
  w = max(a.shape[1] for a in arrs)
  return np.stack([R.resize(a, (h, w), "bilinear", antialias=True) for a in arrs], axis=-1)


def _tfds_label(ex: dict, spec: _TfdsSpec, num_classes: int):
  y = np.asarray(ex[spec.label_key])
  if not spec.multilabel:
    return int(y)
  hot = np.zeros(num_classes, np.float32)
  idx = y.astype(np.int64).ravel()
  hot[idx[(idx >= 0) & (idx < num_classes)]] = 1
  return hot


def _tfds_stats(full: str, spec: _TfdsSpec, data_dir: str | None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel (mean, std) over at most TFDS_STATS_EXAMPLES evenly spaced train examples."""
  key = (full, data_dir)
  if key not in _TFDS_STATS_CACHE:
    ds = _tfds_source(full, "train", data_dir)
    acc = _ChannelStats(len(spec.bands))
    for i in _evenly_spaced(len(ds), TFDS_STATS_EXAMPLES):
      acc.add(_tfds_image(ds[int(i)], spec))
    stats = acc.result()
    if stats is None:
      raise EvalDataError(f"tfds:{full}: the train split has no finite pixels to normalise with")
    _TFDS_STATS_CACHE[key] = stats
  return _TFDS_STATS_CACHE[key]


def _load_tfds(name: str, split: str, bands: tuple[str, ...], data_dir: str | None,
               max_examples: int | None, image_size: int | None, fill: str) -> EvalData:
  full, canon, spec = _tfds_name(name)
  mapping = band_mapping(spec.bands, bands, fill=fill, dataset=f"tfds:{canon}")
  ds = _tfds_source(full, split, data_dir)
  _check_tfds_split(full, ds, split)
  feature = ds.dataset_info.features[spec.label_key]
  label_feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel) for multi-label
  num_classes = int(label_feature.num_classes)
  class_names = list(label_feature.names) if getattr(label_feature, "names", None) else None
  mean, std = _tfds_stats(full, spec, data_dir)
  mu, inv = _zscore_params(mean, std)
  n = len(ds) if not max_examples else min(len(ds), max_examples)
  if n == 0:
    raise EvalDataError(f"tfds:{full}: split {split!r} is empty")
  images, labels = [], []
  used = mapping.used
  for i in range(n):
    ex = ds[i]
    x = _tfds_image(ex, spec)
    z = np.zeros(x.shape[:2] + (len(spec.bands),), np.float32)
    z[..., used] = _finite((x[..., used] - mu[used]) * inv[used])
    z = mapping.apply(z)
    images.append(R.resize(z, image_size, "bilinear", antialias=True) if image_size else z)
    labels.append(_tfds_label(ex, spec, num_classes))
  info = {"num_classes": num_classes, "class_names": class_names, "multilabel": spec.multilabel}
  return _finish(images, labels, info, f"{canon}/{split}", mapping)


# ---------------------------------------------------------------------------------------------
# MMEarth shards.

MMEARTH_TRAIN_PERCENT = 80


def mmearth_split(tile_id: str) -> str:
  """"train" or "test" for a tile: SHA-256 of its id, first 8 bytes mod 100 < 80 -> train."""
  h = int.from_bytes(hashlib.sha256(tile_id.encode()).digest()[:8], "big")
  return "train" if h % 100 < MMEARTH_TRAIN_PERCENT else "test"


@dataclasses.dataclass
class _MMEarthSplit:
  """One split of converted MMEarth shards, tile by tile (see `_mmearth_split_tiles`)."""
  folder: str
  stem: str
  label_name: str  # "esa_worldcover" or "dynamic_world"
  num_classes: int
  class_names: list[str]
  mapping: BandMapping
  tiles: Any  # iterator of (image (h, w, C) float32, land-cover map (h, w) int64, -1 = missing)


def _mmearth_split_tiles(folder: str, split: str, bands: tuple[str, ...],
                         image_size: int | None, fill: str) -> _MMEarthSplit:
  """The tiles of one split with their land-cover maps, shared by the classification loader
  (dominant class) and the segmentation loader (the map itself).

  Label map: ESA WorldCover (11 classes) when the shards store it, else Dynamic World (9), with
  the reference loader's remaps; no-data -> -1. Split: a fixed hash of the tile id, 80 % train /
  20 % test (`mmearth_split`); the converter's recorded split is not used because the upstream
  release puts every tile in "train" (its val / test lists are empty). Images: the Sentinel-2
  bands z-scored exactly as the training pipeline does; image and map centre-cropped to
  `image_size`.
  """
  from mmearth_jax.data import pipeline, records  # grain-based: import only when needed
  from mmearth_jax.data.convert import ConversionError, load_manifest, shard_paths

  if split not in ("train", "test"):
    raise EvalDataError(f"mmearth:{folder}: split must be 'train' or 'test', got {split!r}")
  if not os.path.isdir(folder):
    raise EvalDataError(f"{folder}: MMEarth shards folder not found")
  try:
    manifest = load_manifest(folder)
  except ConversionError as e:
    raise EvalDataError(str(e)) from None
  stored = manifest.get("modalities", {})
  if "sentinel2" not in stored:
    raise EvalDataError(f"{folder}/manifest.json: the shards do not store 'sentinel2'")
  label_name = next((n for n in ("esa_worldcover", "dynamic_world") if n in stored), None)
  if label_name is None:
    raise EvalDataError(f"{folder}/manifest.json: the shards store neither 'esa_worldcover' nor "
                        "'dynamic_world', so tiles cannot be labelled")
  tile = int(manifest["tile_size"])
  if image_size and image_size > tile:
    raise EvalDataError(f"mmearth:{folder}: image_size {image_size} exceeds the tile size {tile} "
                        "(MMEarth tiles are centre-cropped, not resized)")
  mapping = band_mapping(M.S2_BANDS, bands, fill=fill, dataset=f"mmearth:{folder}")
  s2 = M.MODALITIES["sentinel2"]
  # The pipeline's own z-score (stats by S2_type, no-data -> 0): same numbers as training.
  transform = pipeline.Transform(manifest["band_stats"], bands, {}, image_size or tile)
  lab = M.MODALITIES[label_name]
  lut = np.full(np.iinfo(lab.dtype).max + 1, -1, np.int64)
  for raw, cls in lab.label_map.items():
    lut[raw] = cls
  source = pipeline.ShardSource(shard_paths(folder, manifest),
                                [s["num_records"] for s in manifest["shards"]])

  def tiles():
    for r in range(len(source)):
      arrays, meta = records.decode(source[r])
      if mmearth_split(meta["tile_id"]) != split:
        continue
      x = arrays["sentinel2"]
      y = lut[arrays[label_name][..., 0]]
      if image_size:
        x, y = _center_crop(x, image_size), _center_crop(y, image_size)
      z, _ = transform.zscore(s2, x, transform.input_idx, meta["S2_type"])
      yield _finite(z.astype(np.float32, copy=False)), y

  classes = (M.ESA_WORLDCOVER_CLASSES if label_name == "esa_worldcover"
             else M.DYNAMIC_WORLD_CLASSES)
  stem = manifest.get("source_stem", os.path.basename(os.path.normpath(folder)))
  return _MMEarthSplit(folder, stem, label_name, lab.num_classes, list(classes), mapping,
                       tiles())


def _load_mmearth(folder: str, split: str, bands: tuple[str, ...], max_examples: int | None,
                  image_size: int | None, fill: str) -> EvalData:
  """Tiles of converted MMEarth shards labelled by their dominant land-cover class.

  Label: the most frequent class of the tile's land-cover map (`_mmearth_split_tiles`) over its
  valid pixels; tiles with no valid label pixel are skipped.
  """
  ms = _mmearth_split_tiles(folder, split, bands, image_size, fill)
  images, labels = [], []
  for z, y in ms.tiles:
    y = y[y >= 0]
    if not y.size:
      continue  # no labelled pixel: nothing to evaluate against
    images.append(z)
    labels.append(int(np.bincount(y, minlength=ms.num_classes).argmax()))
    if max_examples and len(images) >= max_examples:
      break
  if not images:
    raise EvalDataError(f"mmearth:{folder}: split {split!r} has no labelled tiles")
  info = {"num_classes": ms.num_classes, "class_names": ms.class_names, "multilabel": False}
  return _finish(images, labels, info, f"mmearth:{ms.stem}/{split}", ms.mapping)


# ---------------------------------------------------------------------------------------------
# EuroSAT MS: the release's GeoTIFFs (EuroSAT_MS.zip).

EUROSAT_MS_FOLDER = "EuroSAT_MS"
# The release's class folders; labels number them alphabetically, as TFDS and torchgeo do.
EUROSAT_CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
                   "Pasture", "PermanentCrop", "Residential", "River", "SeaLake")
# The published split lists (Neumann et al. 2019, "In-domain representation learning for remote
# sensing"; torchgeo reads them): one image per line, named as in the RGB release
# (`<Class>_<i>.jpg`), with their MD5 as torchgeo checks them. 16,200 / 5,400 / 5,400 images.
EUROSAT_SPLIT_FILES = {"train": "eurosat-train.txt", "val": "eurosat-val.txt",
                       "test": "eurosat-test.txt"}
EUROSAT_SPLIT_MD5 = {"train": "908f142e73d6acdf3f482c5e80d851b1",
                     "val": "95de90f2aa998f70a3b2416bfe0687b4",
                     "test": "7ae5ab94471417b6e315763121e67c5f"}
# Without the lists: each class split by a seeded permutation in the lists' proportions.
EUROSAT_SPLIT_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
EUROSAT_SEED = 0
EUROSAT_STATS_EXAMPLES = 2000
_EUROSAT_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                   "test": "test"}
_EUROSAT_MEMBER = re.compile(r"^(?:.*/)?([A-Za-z]+)/([A-Za-z]+)_(\d+)\.tif$")
_EUROSAT_STATS_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _rasterio():
  try:
    import rasterio  # the `geo` extra: only when GeoTIFFs are read
  except ModuleNotFoundError as e:
    if e.name != "rasterio":
      raise
    raise ModuleNotFoundError("reading the EuroSAT MS GeoTIFFs needs rasterio: pip install "
                              "'mmearth_jax[geo]'", name="rasterio") from None
  return rasterio


@dataclasses.dataclass(frozen=True)
class _EuroSATFiles:
  """The images of a EuroSAT MS copy: a folder of class folders, or the zip."""
  where: str  # the class folders' parent, or the zip
  archive: bool  # `where` is a zip; paths are its members
  files: dict[str, tuple[str, int]]  # "<Class>_<i>.tif" -> (path or member, label)
  list_dirs: tuple[str, ...]  # where the split lists are looked for


def _key(name: str) -> tuple[int, int]:
  """Sort key of "<Class>_<i>.tif": class, then number."""
  cls, _, num = name[:-len(".tif")].rpartition("_")
  return EUROSAT_CLASSES.index(cls), int(num)


def _eurosat_entries(paths: Sequence[str]) -> dict[str, tuple[str, int]]:
  """The release's images among `paths` ("<...>/<Class>/<Class>_<i>.tif", a known class)."""
  out = {}
  for p in paths:
    m = _EUROSAT_MEMBER.match(p.replace(os.sep, "/"))
    if m and m.group(1) == m.group(2) and m.group(1) in EUROSAT_CLASSES:
      out[f"{m.group(1)}_{m.group(3)}.tif"] = (p, EUROSAT_CLASSES.index(m.group(1)))
  return out


def _class_root(folder: str) -> str | None:
  """`folder`/EuroSAT_MS, or `folder` itself, whichever holds class folders."""
  for root in (os.path.join(folder, EUROSAT_MS_FOLDER), folder):
    if os.path.isdir(root) and any(os.path.isdir(os.path.join(root, c)) for c in EUROSAT_CLASSES):
      return root
  return None


def _eurosat_files(target: str) -> _EuroSATFiles:
  """Finds the images of `eurosat_ms:<target>` (see the module docstring)."""
  target = os.path.normpath(target)
  if os.path.isdir(target) and _class_root(target) is None:
    inner = os.path.join(target, EUROSAT_MS_FOLDER + ".zip")
    if os.path.isfile(inner):
      target = inner
  if os.path.isfile(target):
    try:
      with zipfile.ZipFile(target) as z:
        files = _eurosat_entries(z.namelist())
    except zipfile.BadZipFile as e:
      raise EvalDataError(f"{target}: not a readable zip ({e}); expected EuroSAT_MS.zip") from None
    where, archive, dirs = target, True, (os.path.dirname(target),)
  else:
    root = _class_root(target) if os.path.isdir(target) else None
    if root is None:
      raise EvalDataError(f"eurosat_ms:{target}: expected EuroSAT_MS.zip, or a folder holding "
                          f"{EUROSAT_MS_FOLDER}/<Class>/<Class>_<i>.tif (the extracted zip)")
    paths = [os.path.join(root, c, f) for c in EUROSAT_CLASSES
             if os.path.isdir(os.path.join(root, c)) for f in os.listdir(os.path.join(root, c))]
    files = _eurosat_entries([os.path.relpath(p, root) for p in paths])
    files = {n: (os.path.join(root, p), y) for n, (p, y) in files.items()}
    where, archive = root, False
    dirs = tuple(dict.fromkeys((target, root, os.path.dirname(root))))
  if not files:
    raise EvalDataError(f"eurosat_ms:{target}: no <Class>/<Class>_<i>.tif images of the classes "
                        f"{', '.join(EUROSAT_CLASSES)}")
  return _EuroSATFiles(where, archive, files, dirs)


def _split_list(ef: _EuroSATFiles, split: str) -> tuple[list[str], str] | None:
  """(images, note) of the published list of `split` if it lies beside the data, else None."""
  for folder in ef.list_dirs:
    path = os.path.join(folder, EUROSAT_SPLIT_FILES[split])
    if not os.path.isfile(path):
      continue
    lacking = [n for n in EUROSAT_SPLIT_FILES.values()
               if not os.path.isfile(os.path.join(folder, n))]
    if lacking:  # a list beside a seeded split of the rest would overlap it
      raise EvalDataError(f"{folder}: has {EUROSAT_SPLIT_FILES[split]} but not {lacking}; the "
                          "published split needs all three lists (none: a seeded split)")
    with open(path) as f:
      # Named as in the RGB release: "Forest_12.jpg" is the GeoTIFF "Forest_12.tif".
      names = [os.path.splitext(os.path.basename(line.strip()))[0] + ".tif" for line in f
               if line.strip()]
    missing = [n for n in names if n not in ef.files]
    if missing:
      raise EvalDataError(f"{path}: lists {len(missing)} of its {len(names)} images that "
                          f"{ef.where} lacks (first {missing[:3]}); the lists are for the whole "
                          "release: remove them to split what is here by a seeded permutation")
    return names, f"split {split}: the published list {path} ({len(names)} images)"
  return None


def _seeded_split(ef: _EuroSATFiles, split: str) -> tuple[list[str], str]:
  """Each class in a seeded random order, cut 60 / 20 / 20 (`EUROSAT_SPLIT_FRACTIONS`)."""
  by_class: dict[int, list[str]] = {}
  for name in sorted(ef.files, key=_key):
    by_class.setdefault(ef.files[name][1], []).append(name)
  order = list(EUROSAT_SPLIT_FRACTIONS)
  out = []
  for label, names in by_class.items():
    perm = np.random.default_rng([EUROSAT_SEED, label]).permutation(len(names))
    n_train = int(round(EUROSAT_SPLIT_FRACTIONS["train"] * len(names)))
    n_val = int(round(EUROSAT_SPLIT_FRACTIONS["val"] * len(names)))
    cuts = {"train": (0, n_train), "val": (n_train, n_train + n_val),
            "test": (n_train + n_val, len(names))}
    lo, hi = cuts[split]
    out += [names[i] for i in perm[lo:hi]]
  fractions = " / ".join(f"{round(100 * EUROSAT_SPLIT_FRACTIONS[s])}" for s in order)
  return out, (f"split {split}: seeded stratified {fractions} % of each class (seed "
               f"{EUROSAT_SEED}; no {EUROSAT_SPLIT_FILES[split]} beside the data)")


def eurosat_ms_split_names(target: str, split: str) -> tuple[list[str], str]:
  """(image file names "<Class>_<i>.tif", a note saying how they were chosen) of one split of
  the EuroSAT MS copy `target` (a folder or the zip), in the split's seeded random order."""
  key = _EUROSAT_SPLITS.get(split)
  if key is None:
    raise EvalDataError(f"eurosat_ms:{target}: split must be train, val or test, got {split!r}")
  return _eurosat_split(_eurosat_files(target), key)


def _eurosat_split(ef: _EuroSATFiles, split: str) -> tuple[list[str], str]:
  names, note = _split_list(ef, split) or _seeded_split(ef, split)
  if not names:
    raise EvalDataError(f"eurosat_ms:{ef.where}: split {split!r} is empty ({note})")
  names = sorted(names, key=_key)
  perm = np.random.default_rng(EUROSAT_SEED).permutation(len(names))
  return [names[i] for i in perm], note


@contextlib.contextmanager
def _eurosat_reader(ef: _EuroSATFiles) -> Iterator[Callable[[str], np.ndarray]]:
  """read(name) -> the image's 13 bands as float32 (H, W, 13), in the file's order."""
  rasterio = _rasterio()
  archive = zipfile.ZipFile(ef.where) if ef.archive else None

  def read(name: str) -> np.ndarray:
    path = ef.files[name][0]
    where = f"{ef.where}!{path}" if archive else path
    try:
      if archive is None:
        with rasterio.open(path) as src:
          x = src.read()
      else:
        with rasterio.MemoryFile(archive.read(path)) as mem, mem.open() as src:
          x = src.read()
    except (rasterio.errors.RasterioError, OSError, zipfile.BadZipFile) as e:
      raise EvalDataError(f"{where}: cannot read as a GeoTIFF ({e})") from None
    if x.ndim != 3 or x.shape[0] != len(B.EUROSAT_MS_BANDS):
      raise EvalDataError(f"{where}: {x.shape[0] if x.ndim == 3 else 'no'} bands; EuroSAT MS "
                          f"images hold {len(B.EUROSAT_MS_BANDS)} "
                          f"({', '.join(B.EUROSAT_MS_BANDS)})")
    return np.moveaxis(x, 0, -1).astype(np.float32)

  try:
    yield read
  finally:
    if archive is not None:
      archive.close()


def _eurosat_stats(ef: _EuroSATFiles, read: Callable[[str], np.ndarray]
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Per-band (mean, std) of at most EUROSAT_STATS_EXAMPLES images of the train split."""
  names, _ = _eurosat_split(ef, "train")
  key = (ef.where, hashlib.sha256("\n".join(names).encode()).hexdigest())
  if key not in _EUROSAT_STATS_CACHE:
    acc = _ChannelStats(len(B.EUROSAT_MS_BANDS))
    for i in _evenly_spaced(len(names), EUROSAT_STATS_EXAMPLES):
      acc.add(read(names[i]))
    stats = acc.result()
    if stats is None:
      raise EvalDataError(f"eurosat_ms:{ef.where}: the train split has no finite pixels to "
                          "normalise with")
    _EUROSAT_STATS_CACHE[key] = stats
  return _EUROSAT_STATS_CACHE[key]


def _card_l1c(card: Mapping[str, Any] | None, bands: tuple[str, ...]) -> str | None:
  """Why the card cannot normalise L1C images of `bands` (None: it can)."""
  if card is None:
    return "no model card given"
  if not any(k.lower() == "l1c" for k in card.get("normalisation") or {}):
    return "the model card has no L1C statistics"
  names = [e["name"] for e in card.get("bands") or []]
  if names != list(bands):
    return f"the model card's bands {names} are not the encoder bands {list(bands)}"
  return None


def _eurosat_normaliser(ef: _EuroSATFiles, read: Callable[[str], np.ndarray],
                        mapping: BandMapping, card: Mapping[str, Any] | None
                        ) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
  """(raw (H, W, 13) -> normalised (H, W, C_encoder), a note saying how)."""
  why_not = _card_l1c(card, mapping.encoder_bands)
  if why_not is None:
    from mmearth_jax import cards  # the model side: only when a card is given

    def by_card(raw: np.ndarray) -> np.ndarray:
      x = mapping.apply(raw)
      z = cards.normalise(card, x, "L1C")
      z[x == 0] = 0.0  # no data, as the training pipeline does
      return _finite(z)
    return by_card, "normalisation: the model card's L1C statistics (the pretraining data's)"
  mu, inv = _zscore_params(*_eurosat_stats(ef, read))
  used = mapping.used

  def by_train(raw: np.ndarray) -> np.ndarray:
    z = np.zeros(raw.shape, np.float32)
    z[..., used] = _finite((raw[..., used] - mu[used]) * inv[used])
    return mapping.apply(z)
  return by_train, (f"normalisation: z-score with the train split's statistics ({why_not})")


def _load_eurosat_ms(target: str, split: str, bands: tuple[str, ...], max_examples: int | None,
                     image_size: int | None, fill: str,
                     card: Mapping[str, Any] | None) -> EvalData:
  key = _EUROSAT_SPLITS.get(split)
  if key is None:
    raise EvalDataError(f"eurosat_ms:{target}: split must be train, val or test, got {split!r}")
  ef = _eurosat_files(target)
  names, split_note = _eurosat_split(ef, key)
  if max_examples:
    names = names[:max_examples]
  mapping = band_mapping(B.EUROSAT_MS_BANDS, bands, fill=fill, dataset=f"eurosat_ms:{ef.where}")
  images = []
  with _eurosat_reader(ef) as read:
    normalise, norm_note = _eurosat_normaliser(ef, read, mapping, card)
    for name in names:
      z = normalise(read(name))
      images.append(R.resize(z, image_size, "bilinear", antialias=True) if image_size else z)
  info = {"num_classes": len(EUROSAT_CLASSES), "class_names": list(EUROSAT_CLASSES),
          "multilabel": False}
  return _finish(images, [ef.files[n][1] for n in names], info, f"eurosat_ms/{key}", mapping,
                 (split_note, norm_note))


# ---------------------------------------------------------------------------------------------
# Segmentation: per-pixel class maps.

@dataclasses.dataclass
class SegmentationData:
  images: np.ndarray  # float32 (N, H, W, C), channels in the encoder's band order, normalised
  masks: np.ndarray  # int32 (N, H, W): class per pixel, -1 = no label (ignored)
  num_classes: int
  class_names: list[str] | None
  name: str  # e.g. "m-cashew-plant/train"
  mapping: BandMapping | None = None


def load_segmentation(dataset: str, split: str, bands: Sequence[str], *,
                      data_dir: str | None = None, partition: str = "default",
                      max_examples: int | None = None, image_size: int | None = None,
                      fill: str = FILL_NEAREST, fix_band_names: bool = True) -> SegmentationData:
  """One split of a segmentation dataset, in the encoder's band order.

  Args:
    dataset: "mmearth:<shards folder>" (the land-cover maps of converted MMEarth shards: ESA
      WorldCover if stored, else Dynamic World; split and normalisation as `load`) or
      "geobench:<task folder>" (a GEO-Bench segmentation task: m-cashew-plant,
      m-SA-crop-type, m-chesapeake, m-pv4ger-seg, m-nz-cattle, m-NeonTree).
    split, bands, data_dir, partition, max_examples, fill, fix_band_names: as for `load`.
    image_size: mmearth tiles are centre-cropped to it; GEO-Bench images resized (bilinear) and
      their label maps resized by nearest neighbour.
  """
  _check_size(image_size)
  if max_examples is not None and max_examples < 1:
    raise EvalDataError(f"max_examples must be positive or None, got {max_examples}")
  kind, sep, target = dataset.partition(":")
  bands = tuple(bands)
  if kind == "mmearth" and target:
    return _segmentation_mmearth(_resolve(target, data_dir), split, bands, max_examples,
                                 image_size, fill)
  if kind == "geobench" and target:
    return _segmentation_geobench(_resolve(target, data_dir), split, bands, partition,
                                  max_examples, image_size, fill, fix_band_names)
  raise EvalDataError(f"dataset {dataset!r}: segmentation data is mmearth:<shards folder> or "
                      "geobench:<task folder>")


def _segmentation_mmearth(folder: str, split: str, bands: tuple[str, ...],
                          max_examples: int | None, image_size: int | None,
                          fill: str) -> SegmentationData:
  ms = _mmearth_split_tiles(folder, split, bands, image_size, fill)
  images, masks = [], []
  for z, y in ms.tiles:
    if not (y >= 0).any():
      continue  # no labelled pixel: nothing to train or score on
    images.append(z)
    masks.append(y.astype(np.int32))
    if max_examples and len(images) >= max_examples:
      break
  if not images:
    raise EvalDataError(f"mmearth:{folder}: split {split!r} has no tile with a labelled pixel")
  return SegmentationData(np.stack(images), np.stack(masks), ms.num_classes, ms.class_names,
                          f"mmearth:{ms.stem}/{split}", ms.mapping)


def _segmentation_geobench(folder: str, split: str, bands: tuple[str, ...], partition: str,
                           max_examples: int | None, image_size: int | None, fill: str,
                           fix_band_names: bool) -> SegmentationData:
  gs = _geobench_split(folder, split, bands, partition, max_examples, fill, fix_band_names)
  specs = G.read_task_specs(gs.folder)
  if specs is not None and not specs.get("segmentation"):
    raise EvalDataError(f"{gs.folder}/task_specs.pkl: label type {specs['label_type']}, not a "
                        "segmentation task; load it with `load` (kNN / probes)")
  num_classes = specs["num_classes"] if specs else None
  class_names = specs["class_names"] if specs else None
  if num_classes is None:  # no readable task_specs.pkl: the label band's own class count
    num_classes, class_names = G.pixel_label_classes(gs.first_attrs)
  images, masks = [], []
  for path, f, attrs in gs.samples():
    x = gs.image(path, f, attrs)
    y = G.sample_pixel_label(path, f, attrs)
    if y.shape != x.shape[:2]:  # a label on another grid than the bands: to the bands' grid
      y = R.resize(y, x.shape[:2], "nearest-exact")
    if image_size:
      x = R.resize(x, image_size, "bilinear", antialias=True)
      y = R.resize(y, image_size, "nearest-exact")
    images.append(x)
    masks.append(y)
  if num_classes is None:  # neither task specs nor a class count on the label band
    num_classes = int(max(m.max() for m in masks)) + 1
  for name, m in zip(gs.names, masks):
    bad = m[(m < 0) | (m >= num_classes)]
    if bad.size:
      raise EvalDataError(f"{os.path.join(gs.folder, name + '.hdf5')}: dataset 'label' holds "
                          f"classes {sorted(set(bad.tolist()))[:5]} outside [0, {num_classes})")
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise EvalDataError(f"{gs.task}/{split}: images of different shapes {sorted(shapes)}; pass "
                        "image_size")
  return SegmentationData(np.stack(images).astype(np.float32, copy=False),
                          np.stack(masks).astype(np.int32), int(num_classes), class_names,
                          f"{gs.task}/{split}", gs.mapping)


__all__ = ["EvalData", "EvalDataError", "BandMapping", "band_mapping", "load",
           "geobench_band_name", "mmearth_split", "clear_cache", "GEOBENCH_STATS_SCALE",
           "TFDS_DATASETS", "SegmentationData", "load_segmentation", "EUROSAT_CLASSES",
           "EUROSAT_MS_FOLDER", "EUROSAT_SPLIT_FILES", "EUROSAT_SPLIT_MD5",
           "eurosat_ms_split_names"]
