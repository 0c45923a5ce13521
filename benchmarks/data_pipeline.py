"""Input pipeline throughput: our Grain + ArrayRecord pipeline vs an h5py reference loader.

The reference loader reads random rows from the gzip HDF5, one dataset at a time, as the upstream
PyTorch `MMEarthDataset` does, in worker processes that each build whole batches (as a torch
DataLoader's workers do). Both apply the same transform (`pipeline.Transform`: crop, remaps,
z-score, masks) to the same built-in sample on the same number of processes. Also reports the
converter's throughput.

    python benchmarks/data_pipeline.py [--n 256] [--size 128] [--workers 2] [--batch 32]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import tempfile
import time

import h5py
import numpy as np

from mmearth_jax.data import convert, pipeline, source, synth

_REF = {}


def _ref_init(h5_path, names, transform):
  _REF.update(f=h5py.File(h5_path, "r"), names=names, transform=transform)


def _ref_batch(args):
  """One batch, read the upstream way: every modality's row read separately from the HDF5."""
  indices, seed = args
  f, transform = _REF["f"], _REF["transform"]
  examples = []
  for i in indices:
    arrays = {}
    for name in _REF["names"]:
      x = f[name][i]
      arrays[name] = x.transpose(1, 2, 0) if x.ndim == 3 else x
    md = f["metadata"][i]
    meta = {"tile_id": md["tile_id"].decode(), "S2_type": md["S2_type"].decode(), "row": int(i)}
    examples.append(transform.apply(arrays, meta, np.random.default_rng([seed, int(i)])))
  return {k: np.stack([e[k] for e in examples]) for k in ("image", "s2_type", "row")} | {
      group: {n: np.stack([e[group][n] for e in examples]) for n in examples[0][group]}
      for group in ("targets", "valid")}


def _ref_inline(batches_iter, h5_path, names, transform):
  _ref_init(h5_path, names, transform)
  return map(_ref_batch, batches_iter)


def bench_reference(folder, manifest, cfg, batches, workers):
  variant = source.open_variant(folder)
  input_bands, outputs, crop = pipeline.resolve_config(cfg, manifest)
  transform = pipeline.Transform(manifest["band_stats"], input_bands, outputs, crop)
  names = list(manifest["modalities"])
  order = np.random.default_rng(cfg.seed).permutation(variant.num_rows)
  b = cfg.global_batch_size
  jobs = [(np.sort(order[(k * b) % len(order):][:b]).tolist(), k) for k in range(batches + 2)]
  def timed(it):
    for _ in range(2):  # warm-up: workers start, files open
      next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * b / (time.perf_counter() - t0)

  if workers == 0:  # h5py serialises every call behind one lock, so threads would not help
    return timed(_ref_inline(iter(jobs), variant.h5_path, names, transform))
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(workers, _ref_init, (variant.h5_path, names, transform)) as pool:
    return timed(pool.imap(_ref_batch, jobs))


def bench_grain(cfg, batches):
  ds = pipeline.make_dataset(cfg, process_index=0, process_count=1)
  it = iter(ds)
  for _ in range(2):
    next(it)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches * cfg.global_batch_size / (time.perf_counter() - t0)
  it.close()
  return rate


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--n", type=int, default=256, help="tiles in the sample")
  p.add_argument("--size", type=int, default=128, choices=(128, 64))
  p.add_argument("--workers", type=int, default=2, help="processes for each loader and the converter")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--batches", type=int, default=24, help="timed batches per loader")
  p.add_argument("--compression", default=convert.DEFAULT_COMPRESSION)
  p.add_argument("--dir", default="", help="work folder (default: a temporary one)")
  args = p.parse_args()

  root = args.dir or tempfile.mkdtemp(prefix="mmearth_bench_")
  src, out = os.path.join(root, "h5"), os.path.join(root, "shards")
  if not os.path.exists(src):
    synth.write_sample(src, n=args.n, size=args.size, seed=0)
  stem = source.find_stem(src)
  h5_mb = os.path.getsize(os.path.join(src, f"{stem}.h5")) / 1e6
  if os.path.exists(os.path.join(out, convert.MANIFEST)):
    import shutil
    shutil.rmtree(out)
  t0 = time.perf_counter()
  manifest = convert.convert(src, out, shards=max(args.workers * 2, 4), workers=args.workers,
                             compression=args.compression, log=lambda *a: None)
  conv_s = time.perf_counter() - t0
  raw_mb = sum(s["raw_bytes"] for s in manifest["shards"]) / 1e6
  out_mb = sum(s["bytes"] for s in manifest["shards"]) / 1e6

  cfg = pipeline.default_config()
  cfg.path = out
  cfg.global_batch_size = args.batch
  rows = []
  for workers in (0, args.workers):
    rows.append((f"h5py reference, {workers or 1} process(es)", "ref",
                 bench_reference(src, manifest, cfg, args.batches, workers)))
  for workers in (0, args.workers):
    cfg.workers = workers
    what = f"{workers} worker processes" if workers else f"1 process, {cfg.read_threads} threads"
    rows.append((f"Grain + ArrayRecord, {what}", "ours", bench_grain(cfg, args.batches)))
  best_ref = max(r for _, k, r in rows if k == "ref")
  best_ours = max(r for _, k, r in rows if k == "ours")

  print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; sample: {args.n} tiles of "
        f"{args.size} px; batch {args.batch}; shards {args.compression}; all outputs")
  print(f"{'loader (same transform, same cores)':<48}{'samples/s':>10}{'vs best ref':>13}")
  for name, _, rate in rows:
    print(f"{name:<48}{rate:>10.1f}{rate / best_ref:>12.2f}x")
  print(f"best Grain / best reference: {best_ours / best_ref:.2f}x")
  print(f"\nconverter: {h5_mb:.0f} MB HDF5 -> {out_mb:.0f} MB shards ({raw_mb:.0f} MB decoded) in "
        f"{conv_s:.1f} s: {h5_mb / conv_s:.0f} MB/s of HDF5, {raw_mb / conv_s:.0f} MB/s decoded")


if __name__ == "__main__":
  main()
