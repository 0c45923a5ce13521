"""The Grain input pipeline over converted ArrayRecord shards.

    ArrayRecordDataSource -> shuffle(seed) (a new permutation every epoch) -> repeat
      -> this host's slice [process_index::process_count]
      -> decode + random crop shared by all pixel modalities (seeded per record)
      -> label remaps, no-data -> invalid, z-score (Sentinel-2 by the tile's S2_type)
      -> batch (this host's share of the global batch) -> threads / worker processes

Each batch is a dict of numpy arrays, all finite:

    image        (B, h, w, C_in) float32   the encoder input; missing pixels are 0 (the mean)
    targets      {modality: array}         pixel regression (B, h, w, C) float32 z-scored,
                                           segmentation (B, h, w) int32 with -1 = missing,
                                           image regression (B, C) float32 z-scored,
                                           classification (B,) int32 with -1 = missing
    valid        {modality: bool array}    where the target was measured (same shape as the
                                           regression target; label >= 0 for classes)
    s2_type      (B,) int32                0 = l1c, 1 = l2a
    row          (B,) int32                row of the source HDF5 file

NaN never leaves the pipeline; a band with degenerate statistics (std 0 or NaN, mean NaN, as for
an all-missing band) is passed through unscaled instead of producing inf or NaN.

`data.upstream_compat=True` reproduces the reference loader's data quirks exactly (MMEarth-train
`mmearth_dataset.py`, and the biome / eco_region rule of its loss): ESA WorldCover tree cover is
lost and values 1..9 are kept as classes (`modalities.ESA_WORLDCOVER_UPSTREAM_LABELS`), canopy
height is signed with no no-data (`upstream_valid`), biome / eco_region are the argmax with no
ignore (`upstream_class_label`), and Sentinel-2 is z-scored by tile_info's S2_type
(`upstream_s2_type`). Off by default: each of them drops or corrupts targets.
"""
from __future__ import annotations

import bisect
import dataclasses
import threading
from typing import Any, Mapping, Sequence

import grain
import ml_collections
import numpy as np

from array_record.python import array_record_module

from mmearth_jax import config_lib
from mmearth_jax import modalities as M
from mmearth_jax.data import records
from mmearth_jax.data.convert import load_manifest, shard_paths
from mmearth_jax.data.source import TILE_INFO_S2_TYPE


class ShardSource(grain.sources.RandomAccessDataSource):
  """Random access over the shards of a manifest, with a read buffer sized for whole tiles.

  Grain's `ArrayRecordDataSource` reads through a fixed 32 KB buffer, made for small records; an
  MMEarth tile is about 1 MB, so each read became dozens of system calls. Readers open lazily,
  once per process, so the source pickles into Grain's worker processes.
  """

  def __init__(self, paths: Sequence[str], counts: Sequence[int], buffer_bytes: int = 4 << 20):
    self._paths = list(paths)
    self._starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    self._buffer = buffer_bytes
    self._readers: list = [None] * len(self._paths)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, index) -> bytes:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range [0, {len(self)})")
    k = bisect.bisect_right(self._starts, index) - 1
    reader = self._readers[k]
    if reader is None:
      with self._lock:
        if self._readers[k] is None:
          self._readers[k] = array_record_module.ArrayRecordReader(
              self._paths[k], "readahead_buffer_size:0", file_reader_buffer_size=self._buffer)
        reader = self._readers[k]
    return reader.read([index - self._starts[k]])[0]

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_readers"] = [None] * len(self._paths)
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"ShardSource({len(self._paths)} shards, {len(self)} records)"


def default_config() -> ml_collections.ConfigDict:
  """The data section of a training config; its defaults live in `config_lib.data_config`."""
  return config_lib.data_config()


def paper_crop(tile_size: int) -> int:
  return {128: 112, 64: 56}.get(tile_size, tile_size - tile_size // 8)


# ---------------------------------------------------------------------------------------------
# data.upstream_compat: the reference loader's quirks, one function each (ESA WorldCover's is the
# registry's `upstream_label_map`).


def upstream_valid(m: M.Modality, x: np.ndarray) -> np.ndarray:
  """The reference loader's no-data test on stored integers, `x != nodata` in the file's dtype.

  Canopy height is int8 on disk: read as is, bytes >= 128 are negative heights, and its no-data
  value 255 is never an int8, so nothing is missing (no-data trains as height -1).
  """
  info = np.iinfo(x.dtype)
  if m.nodata is None or not info.min <= m.nodata <= info.max:
    return np.ones(x.shape, bool)
  return x != m.nodata


def upstream_class_label(m: M.Modality, x: np.ndarray) -> np.int32:
  """The reference's biome / eco_region class: the loader turns no-data entries into -1 and the
  loss takes the argmax with no ignore, so an all-zero or no-data vector trains as class 0."""
  return np.int32(np.argmax(np.where(x == m.nodata, -1, x.astype(np.int64))))


def upstream_s2_type(meta: Mapping[str, Any]) -> str:
  """The Sentinel-2 statistics the reference uses: l2a where tile_info.json's S2_type is "l2a",
  else l1c (the HDF5 metadata's S2_type is never read)."""
  if TILE_INFO_S2_TYPE not in meta:
    raise ValueError(f"tile {meta.get('tile_id')}: the shards carry no tile_info S2_type, which "
                     "data.upstream_compat needs; re-convert them with `mmearth-jax convert`")
  s2_type = meta[TILE_INFO_S2_TYPE]
  if s2_type is None:  # the reference's loader fails on such a tile too (KeyError)
    raise ValueError(f"tile {meta.get('tile_id')}: tile_info.json gives no S2_type")
  return "l2a" if s2_type == "l2a" else "l1c"


@dataclasses.dataclass(frozen=True)
class _Target:
  name: str
  band_idx: np.ndarray | None  # stored bands to keep (regression)
  lut: np.ndarray | None  # raw value -> class (segmentation)


class Transform:
  """Record bytes -> one training example (numpy). Picklable for Grain worker processes."""

  def __init__(self, band_stats: Mapping[str, Any], input_bands: Sequence[str],
               outputs: Mapping[str, Sequence[str]], crop: int, upstream_compat: bool = False):
    self.crop = crop
    self.upstream_compat = upstream_compat
    s2 = M.MODALITIES["sentinel2"]
    self.input_idx = np.array(s2.band_indices(input_bands))
    self.outputs = {}
    for name, bands in outputs.items():
      m = M.MODALITIES[name]
      lut = None
      if m.task == M.SEGMENTATION:
        lut = np.full(np.iinfo(m.dtype).max + 1, -1, np.int32)
        label_map = m.label_map
        if upstream_compat and m.upstream_label_map is not None:
          label_map = m.upstream_label_map
        for raw, cls in label_map.items():
          lut[raw] = cls
      self.outputs[name] = _Target(name, np.array(m.band_indices(bands)), lut)
    # (mean, 1/std) per stats key, degenerate bands made harmless.
    self.stats = {}
    for key, st in band_stats.items():
      if st is None:
        continue
      mean = np.asarray(st["mean"], np.float64)
      std = np.asarray(st["std"], np.float64)
      ok_std = np.isfinite(std) & (std > 0)
      mean = np.where(np.isfinite(mean) & ok_std, mean, 0.0)
      inv = np.where(ok_std, 1.0 / np.where(ok_std, std, 1.0), 1.0)
      self.stats[key] = (mean.astype(np.float32), inv.astype(np.float32))

  def zscore(self, m: M.Modality, x: np.ndarray, idx: np.ndarray, s2_type: str):
    """Selected bands of `x` (..., C) z-scored, with invalid values set to 0, and the mask."""
    if m.unsigned_view and not self.upstream_compat:  # upstream reads the file's dtype as is
      x = x.view(m.unsigned_view)
    x = x[..., idx]
    if np.issubdtype(x.dtype, np.floating):
      valid = np.isfinite(x)
      if m.nodata is not None and np.isfinite(m.nodata):
        valid &= x != m.nodata
    elif self.upstream_compat:
      valid = upstream_valid(m, x)
    else:
      valid = x != m.nodata
    key = M.stats_key_for(m, s2_type)
    if key not in self.stats:
      raise KeyError(f"band_stats has no key {key!r} needed for modality {m.name!r}")
    mean, inv = self.stats[key]
    z = x.astype(np.float32)
    z -= mean[idx]
    z *= inv[idx]
    z[~valid] = 0
    return z, valid

  def __call__(self, record: bytes, rng: np.random.Generator) -> dict:
    arrays, meta = records.decode(record)
    return self.apply(arrays, meta, rng)

  def apply(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
            rng: np.random.Generator) -> dict:
    """The example of one decoded tile (pixel modalities channels-last)."""
    if self.upstream_compat:
      s2_type = upstream_s2_type(meta)
    else:
      s2_type = meta["S2_type"]
      if s2_type not in M.S2_TYPES:
        raise ValueError(f"tile {meta.get('tile_id')}: unknown S2_type {s2_type!r}")
    size = arrays["sentinel2"].shape[0]
    top, left = rng.integers(0, size - self.crop + 1, size=2)
    win = (slice(top, top + self.crop), slice(left, left + self.crop))
    image, _ = self.zscore(M.MODALITIES["sentinel2"], arrays["sentinel2"][win], self.input_idx,
                            s2_type)
    targets, valid = {}, {}
    for name, t in self.outputs.items():
      m = M.MODALITIES[name]
      x = arrays[name]
      if m.level == M.PIXEL:
        x = x[win]
      if m.task == M.REGRESSION:
        targets[name], valid[name] = self.zscore(m, x, t.band_idx, s2_type)
      elif m.task == M.SEGMENTATION:
        labels = t.lut[x[..., 0]]
        targets[name], valid[name] = labels, labels >= 0
      elif self.upstream_compat:
        targets[name], valid[name] = upstream_class_label(m, x), np.bool_(True)
      else:  # classification from a one-hot vector; any no-data entry makes it missing
        label = np.int32(-1) if np.any(x == m.nodata) or not x.any() else np.int32(x.argmax())
        targets[name], valid[name] = label, np.bool_(label >= 0)
    return {"image": image, "targets": targets, "valid": valid,
            "s2_type": np.int32(M.S2_TYPES.index(s2_type)), "row": np.int32(meta["row"])}


def resolve_config(cfg: ml_collections.ConfigDict, manifest: Mapping[str, Any]):
  """(input bands, output {modality: bands}, crop) from a data config and a manifest."""
  input_bands = M.resolve_input(cfg.input)
  outputs = M.resolve_outputs(cfg.outputs, input_bands)
  stored = manifest["modalities"]
  missing = [n for n in ["sentinel2", *outputs] if n not in stored]
  if missing:
    raise KeyError(f"config data.outputs needs modalities {missing} that the shards in "
                   f"{cfg.path!r} do not store (stored: {sorted(stored)})")
  tile = manifest["tile_size"]
  crop = cfg.crop or paper_crop(tile)
  if not 0 < crop <= tile:
    raise ValueError(f"config data.crop = {crop} must be in (0, {tile}] (the tile size)")
  return input_bands, outputs, crop


def make_dataset(cfg: ml_collections.ConfigDict, *, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """This host's iterator of batches for the data config `cfg` (see `default_config`)."""
  if process_index is None or process_count is None:
    import jax  # only for the host's place in the job
    process_index, process_count = jax.process_index(), jax.process_count()
  if cfg.global_batch_size % process_count:
    raise ValueError(f"config data.global_batch_size = {cfg.global_batch_size} is not divisible "
                     f"by the {process_count} processes")
  manifest = load_manifest(cfg.path)
  input_bands, outputs, crop = resolve_config(cfg, manifest)
  transform = Transform(manifest["band_stats"], input_bands, outputs, crop,
                        upstream_compat=cfg.upstream_compat)
  source = ShardSource(shard_paths(cfg.path, manifest),
                       [s["num_records"] for s in manifest["shards"]])
  if cfg.upstream_compat and len(source):
    upstream_s2_type(records.decode(source[0])[1])  # shards from before it fail here, not later
  ds = grain.MapDataset.source(source).shuffle(seed=cfg.seed)
  ds = ds.repeat(cfg.num_epochs or None)
  if cfg.num_epochs:
    # Whole global batches only: otherwise hosts could get different batch counts and hang.
    ds = ds[:len(ds) // cfg.global_batch_size * cfg.global_batch_size]
  # Crops are drawn from the global position of each example, and each global batch is the
  # hosts' slices in host order: any process count sees the same global batches.
  ds = ds.random_map(transform, seed=cfg.seed + 1)
  ds = ds.batch(cfg.global_batch_size // process_count, drop_remainder=True)
  ds = ds[process_index::process_count]
  if cfg.workers > 0:
    # Worker processes are the parallelism; a thread prefetcher inside each one can make
    # close() wait for a timeout (google/grain#1372).
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  else:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=cfg.prefetch))
  if cfg.workers > 0:
    from absl import flags  # Grain's workers read absl flags; a plain program never parses them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers))
  return it
