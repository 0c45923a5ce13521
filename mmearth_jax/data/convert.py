"""`mmearth-jax convert` / `verify`: MMEarth HDF5 -> ArrayRecord shards plus a manifest.

Layout of an output folder:

    <stem>_<split>-00000-of-00008.array_record   one record per tile (`records.py` encoding),
    ...                                          raw values, pixel modalities channels-last;
                                                 meta: tile_id, S2_type, row and tile_info's
                                                 S2_type (`source.TILE_INFO_S2_TYPE`)
    manifest.json                                written last: its presence means complete
    _progress/                                   per-shard completion notes while converting

Crash safety: a shard is written as `<name>.tmp`, checksummed, renamed, and only then noted
done in `_progress/`. A re-run with the same arguments skips the shards noted done and rewrites
the rest, so a killed run ends with every record exactly once. `manifest.json` (record counts,
SHA-256 per shard, modalities and bands stored, source, format version) is written atomically
after the last shard; `verify` re-checks counts and checksums against it.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import time
from typing import Sequence

import h5py
import numpy as np
from array_record.python import array_record_module

from mmearth_jax import modalities as M
from mmearth_jax.data import records
from mmearth_jax.data.source import SourceError, open_variant, read_rows

MANIFEST = "manifest.json"
PROGRESS = "_progress"
PLAN = "plan.json"
# One record per chunk so random access reads one record; zstd level 1 decodes fast.
DEFAULT_COMPRESSION = "zstd:1"
_READ_BLOCK = 16


class ConversionError(RuntimeError):
  pass


def shard_name(stem: str, split: str, k: int, shards: int) -> str:
  return f"{stem}_{split}-{k:05d}-of-{shards:05d}.array_record"


def _write_json_atomic(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _convert_shard(h5_path: str, names: Sequence[str], rows: Sequence[int], path: str,
                   compression: str, s2_types: Sequence[str | None]) -> dict:
  """Writes one shard; returns its manifest entry. Runs in a worker process."""
  tmp = path + ".tmp"
  options = f"group_size:1,{compression}" if compression != "none" else "group_size:1,uncompressed"
  writer = array_record_module.ArrayRecordWriter(tmp, options)
  raw_bytes = 0
  try:
    with h5py.File(h5_path, "r") as f:
      for start in range(0, len(rows), _READ_BLOCK):
        block = slice(start, start + _READ_BLOCK)
        for tile in read_rows(f, names, rows[block], s2_types[block]):
          meta = tile.pop("meta")
          rec = records.encode(tile, meta)
          raw_bytes += len(rec)
          writer.write(rec)
  finally:
    writer.close()
  entry = {"file": os.path.basename(path), "num_records": len(rows), "sha256": sha256_file(tmp),
           "bytes": os.path.getsize(tmp), "raw_bytes": raw_bytes,
           "first_row": int(rows[0]), "last_row": int(rows[-1])}
  os.replace(tmp, path)
  return entry


def _plan(variant, split: str, shards: int, compression: str) -> dict:
  rows = variant.splits[split]
  return {
      "format_version": records.FORMAT_VERSION,
      "source": {"stem": variant.stem, "h5_bytes": os.path.getsize(variant.h5_path),
                 "num_rows": variant.num_rows, "tile_size": variant.size},
      "split": split,
      "rows_sha256": hashlib.sha256(np.asarray(rows, np.int64).tobytes()).hexdigest(),
      "num_records": len(rows),
      "shards": shards,
      "compression": compression,
      "modalities": list(variant.modalities),
  }


def convert(src: str, out: str, shards: int = 8, workers: int = 1, split: str = "train",
            modalities: Sequence[str] | None = None, compression: str = DEFAULT_COMPRESSION,
            log=print) -> dict:
  """Converts a variant folder into ArrayRecord shards; resumes an interrupted run. Returns the manifest."""
  variant = open_variant(src, modalities, split)
  rows = variant.splits[split]
  if not rows:
    raise SourceError(f"{variant.companion('splits')}: split {split!r} is empty")
  if shards < 1 or shards > len(rows):
    raise ConversionError(f"--shards must be in [1, {len(rows)}] (records in split {split!r}), "
                          f"got {shards}")
  plan = _plan(variant, split, shards, compression)
  plan_path = os.path.join(out, PROGRESS, PLAN)
  manifest_path = os.path.join(out, MANIFEST)
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
    if manifest.get("plan") == plan:
      log(f"{out}: already converted ({manifest['num_records']} records); run `verify` to check")
      return manifest
    raise ConversionError(f"{out}: holds a finished conversion with other settings; "
                          "choose a new --out folder")
  os.makedirs(os.path.join(out, PROGRESS), exist_ok=True)
  if os.path.exists(plan_path):
    with open(plan_path) as f:
      old = json.load(f)
    if old != plan:
      diff = sorted(k for k in plan if old.get(k) != plan[k])
      raise ConversionError(f"{out}: holds a partial conversion with different settings "
                            f"({', '.join(diff)}); re-run with the same arguments to finish it, "
                            "or choose a new --out folder")
  else:
    _write_json_atomic(plan_path, plan)

  names = list(variant.modalities)
  # tile_info's S2_type of each row goes into the record's meta (for data.upstream_compat).
  s2_of = variant.tile_info_s2_types
  jobs, entries = [], {}
  for k in range(shards):
    path = os.path.join(out, shard_name(variant.stem, split, k, shards))
    done = os.path.join(out, PROGRESS, f"{k:05d}.json")
    if os.path.exists(done) and os.path.exists(path):
      with open(done) as f:
        entry = json.load(f)
      if entry["bytes"] == os.path.getsize(path):
        entries[k] = entry
        continue
    lo, hi = k * len(rows) // shards, (k + 1) * len(rows) // shards
    jobs.append((k, rows[lo:hi], path, done, [s2_of[r] for r in rows[lo:hi]]))
  if entries:
    log(f"resuming: {len(entries)} of {shards} shards already done")

  t0 = time.perf_counter()

  def finish(k, done, entry):
    _write_json_atomic(done, entry)
    entries[k] = entry
    log(f"shard {k + 1}/{shards}: {entry['num_records']} records, {entry['bytes'] / 1e6:.1f} MB")

  if workers <= 1 or len(jobs) <= 1:
    for k, shard_rows, path, done, s2 in jobs:
      finish(k, done, _convert_shard(variant.h5_path, names, shard_rows, path, compression, s2))
  else:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
      futures = {pool.submit(_convert_shard, variant.h5_path, names, r, p, compression, s2): (k, d)
                 for k, r, p, d, s2 in jobs}
      for fut in concurrent.futures.as_completed(futures):
        k, done = futures[fut]
        finish(k, done, fut.result())
  seconds = time.perf_counter() - t0

  with h5py.File(variant.h5_path, "r") as f:
    stored = {}
    for name in names:
      m = M.MODALITIES[name]
      shape = f[name].shape[1:]
      stored[name] = {"bands": list(m.bands), "dtype": m.dtype, "level": m.level,
                      "shape": [shape[1], shape[2], shape[0]] if m.level == M.PIXEL else list(shape)}
  manifest = {
      "format": "mmearth_jax ArrayRecord shards; record encoding in mmearth_jax/data/records.py",
      "format_version": records.FORMAT_VERSION,
      "source_stem": variant.stem,
      "split": split,
      "tile_size": variant.size,
      "num_records": len(rows),
      "compression": compression,
      "modalities": stored,
      "band_stats": variant.band_stats,
      "shards": [entries[k] for k in range(shards)],
      "plan": plan,
  }
  _write_json_atomic(manifest_path, manifest)
  for k in range(shards):
    os.remove(os.path.join(out, PROGRESS, f"{k:05d}.json"))
  os.remove(plan_path)
  os.rmdir(os.path.join(out, PROGRESS))
  if jobs:
    mb = sum(entries[k]["raw_bytes"] for k, *_ in jobs) / 1e6
    log(f"converted {sum(len(j[1]) for j in jobs)} records in {seconds:.1f} s "
        f"({mb / max(seconds, 1e-9):.0f} MB/s of decoded tiles) -> {manifest_path}")
  return manifest


def load_manifest(folder: str) -> dict:
  path = os.path.join(folder, MANIFEST)
  if not os.path.exists(path):
    partial = os.path.exists(os.path.join(folder, PROGRESS))
    raise ConversionError(
        f"{path}: missing; " + ("the conversion in this folder is unfinished: re-run "
                                "`mmearth-jax convert` with the same arguments to finish it"
                                if partial else "not an `mmearth-jax convert` output folder"))
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format_version") != records.FORMAT_VERSION:
    raise ConversionError(f"{path}: format_version {manifest.get('format_version')} is not "
                          f"{records.FORMAT_VERSION}; re-convert with this version")
  return manifest


def shard_paths(folder: str, manifest: dict | None = None) -> list[str]:
  manifest = manifest or load_manifest(folder)
  return [os.path.join(folder, s["file"]) for s in manifest["shards"]]


def verify(folder: str) -> list[str]:
  """Re-checks every shard against the manifest; returns the problems found (empty: all good)."""
  manifest = load_manifest(folder)
  problems = []
  total = 0
  for s in manifest["shards"]:
    path = os.path.join(folder, s["file"])
    if not os.path.exists(path):
      problems.append(f"{path}: missing")
      continue
    digest = sha256_file(path)
    if digest != s["sha256"]:
      problems.append(f"{path}: sha256 {digest[:12]}... does not match manifest {s['sha256'][:12]}...")
      continue
    reader = array_record_module.ArrayRecordReader(path)
    try:
      n = reader.num_records()
      if n != s["num_records"]:
        problems.append(f"{path}: {n} records, manifest says {s['num_records']}")
      elif n:
        records.decode(reader.read([0])[0])
    finally:
      reader.close()
    total += s["num_records"]
  if not problems and total != manifest["num_records"]:
    problems.append(f"{folder}: shards hold {total} records, manifest says {manifest['num_records']}")
  return problems
