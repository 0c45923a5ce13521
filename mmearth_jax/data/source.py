"""Reading an upstream MMEarth variant folder (`<stem>.h5` and its JSON companions).

Everything is validated up front, so a bad download fails with a message that names the file and
dataset instead of a stack trace deep inside a worker.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import h5py
import numpy as np

from mmearth_jax import modalities as M


class SourceError(ValueError):
  """The upstream files are missing, malformed or inconsistent."""


COMPANIONS = ("band_stats", "splits", "tile_info")
# Record meta key: the tile's S2_type as tile_info.json gives it (the reference loader picks the
# Sentinel-2 statistics by it; this library by the HDF5 metadata's).
TILE_INFO_S2_TYPE = "tile_info_S2_type"


@dataclasses.dataclass
class Variant:
  """A validated MMEarth variant folder."""
  folder: str
  stem: str
  h5_path: str
  num_rows: int
  size: int  # tile height = width in pixels
  modalities: tuple[str, ...]  # registry modalities present and selected
  band_stats: dict
  splits: dict
  tile_info: dict
  tile_info_s2_types: list[str | None]  # per HDF5 row, tile_info's S2_type (None: absent)

  def companion(self, name: str) -> str:
    return os.path.join(self.folder, f"{self.stem}_{name}.json")


def find_stem(folder: str) -> str:
  """The stem of the single `<stem>.h5` in `folder`."""
  if not os.path.isdir(folder):
    raise SourceError(f"{folder}: not a directory")
  stems = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".h5"))
  if not stems:
    raise SourceError(f"{folder}: no .h5 file (expected <stem>.h5 with its _band_stats.json, "
                      "_splits.json and _tile_info.json)")
  if len(stems) > 1:
    raise SourceError(f"{folder}: several .h5 files {stems}; give a folder with one variant")
  return stems[0]


def _load_json(path: str) -> dict:
  if not os.path.exists(path):
    raise SourceError(f"missing companion file {path}")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise SourceError(f"{path}: not valid JSON ({e})") from None


def open_variant(folder: str, modalities: Sequence[str] | None = None,
                 split: str = "train") -> Variant:
  """Opens and validates a variant folder; `modalities` defaults to every registry modality."""
  stem = find_stem(folder)
  h5_path = os.path.join(folder, f"{stem}.h5")
  names = tuple(modalities) if modalities is not None else tuple(M.MODALITIES)
  for n in names:
    M.get(n)
  stats = _load_json(os.path.join(folder, f"{stem}_band_stats.json"))
  splits = _load_json(os.path.join(folder, f"{stem}_splits.json"))
  tile_info = _load_json(os.path.join(folder, f"{stem}_tile_info.json"))

  try:
    f = h5py.File(h5_path, "r")
  except OSError as e:
    raise SourceError(f"{h5_path}: cannot open as HDF5 (truncated or corrupt?): {e}") from None
  with f:
    if "metadata" not in f:
      raise SourceError(f"{h5_path}: missing dataset 'metadata'")
    meta = f["metadata"]
    n = meta.shape[0]
    for field in ("tile_id", "S2_type"):
      if meta.dtype.names is None or field not in meta.dtype.names:
        raise SourceError(f"{h5_path}: dataset 'metadata' has no field {field!r} "
                          f"(fields: {meta.dtype.names})")
    size = None
    for name in names:
      m = M.MODALITIES[name]
      if name not in f:
        raise SourceError(f"{h5_path}: missing dataset {name!r}")
      d = f[name]
      if d.dtype != np.dtype(m.dtype):
        raise SourceError(f"{h5_path}: dataset {name!r} has dtype {d.dtype}, expected {m.dtype}")
      if m.level == M.PIXEL:
        ok = len(d.shape) == 4 and d.shape[1] == m.num_bands and d.shape[2] == d.shape[3]
        size = d.shape[2] if ok and size is None else size
        ok = ok and d.shape[2] == size
        want = f"(N, {m.num_bands}, H, W) with H = W" + (f" = {size}" if size else "")
      else:
        ok = len(d.shape) == 2 and d.shape[1] == m.num_bands
        want = f"(N, {m.num_bands})"
      if not ok or d.shape[0] != n:
        raise SourceError(f"{h5_path}: dataset {name!r} has shape {d.shape}, expected {want} "
                          f"with N = {n} (rows of 'metadata')")
    try:
      tile_ids = [t.decode() for t in meta["tile_id"]]
    except OSError as e:
      raise SourceError(f"{h5_path}: cannot read dataset 'metadata' (corrupt?): {e}") from None

  splits_path = os.path.join(folder, f"{stem}_splits.json")
  if split not in splits:
    raise SourceError(f"{splits_path}: no split {split!r} (has {sorted(splits)})")
  rows = splits[split]
  bad = [r for r in rows if not isinstance(r, int) or r < 0 or r >= n]
  if bad:
    raise SourceError(f"{splits_path}: split {split!r} has indices out of range [0, {n}): "
                      f"{bad[:5]}{'...' if len(bad) > 5 else ''}")
  missing = [(r, tile_ids[r]) for r in rows if tile_ids[r] not in tile_info]
  if missing:
    r, t = missing[0]
    raise SourceError(f"{os.path.join(folder, stem + '_tile_info.json')}: no entry for tile "
                      f"{t!r} (row {r} of {h5_path}); {len(missing)} tile(s) missing")
  need = {M.stats_key_for(M.MODALITIES[nm], t) for nm in names for t in M.S2_TYPES} - {None}
  absent = sorted(k for k in need if k not in stats)
  if absent:
    raise SourceError(f"{os.path.join(folder, stem + '_band_stats.json')}: missing keys {absent}")
  s2_types = [tile_info[t].get("S2_type") if isinstance(tile_info.get(t), dict) else None
              for t in tile_ids]
  return Variant(folder, stem, h5_path, n, size or 0, names, stats, splits, tile_info, s2_types)


def read_rows(f: h5py.File, names: Sequence[str], rows: Sequence[int],
              tile_info_s2_types: Sequence[str | None] | None = None) -> list[dict]:
  """Reads `rows` (any order) of the datasets `names` plus metadata, one dict per row.

  Pixel modalities come back channels-last `(H, W, C)`; a read failure names file, dataset, rows.
  `tile_info_s2_types` (one per row of `rows`) goes into each meta as `TILE_INFO_S2_TYPE`.
  """
  rows = np.asarray(rows)
  order = np.argsort(rows, kind="stable")
  sorted_rows = rows[order]
  uniq, inverse = np.unique(sorted_rows, return_inverse=True)
  out = [dict() for _ in rows]
  for name in list(names) + ["metadata"]:
    try:
      block = f[name][uniq.tolist()] if len(uniq) > 1 else f[name][int(uniq[0])][None]
    except (OSError, ValueError, KeyError) as e:
      raise SourceError(f"{f.filename}: cannot read dataset {name!r} rows "
                        f"{int(uniq[0])}..{int(uniq[-1])}: {e}") from None
    block = block[inverse]
    if name != "metadata" and M.MODALITIES[name].level == M.PIXEL:
      block = block.transpose(0, 2, 3, 1)
    for i, src in enumerate(order):
      out[src][name] = block[i]
  for i, r in enumerate(rows):
    md = out[i].pop("metadata")
    out[i]["meta"] = {"tile_id": md["tile_id"].decode(), "S2_type": md["S2_type"].decode(),
                      "row": int(r)}
    if tile_info_s2_types is not None:
      out[i]["meta"][TILE_INFO_S2_TYPE] = tile_info_s2_types[i]
  return out
