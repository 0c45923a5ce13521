"""The `mmearth-jax` command line (also `python -m mmearth_jax`)."""
from __future__ import annotations

import argparse
import sys

from mmearth_jax.data import convert as convert_lib


def _synth(args) -> int:
  from mmearth_jax.data import synth
  stem = synth.write_sample(args.out, n=args.n, size=args.size, seed=args.seed)
  print(f"wrote {args.n} tiles of {args.size} px to {args.out}/{stem}.h5 "
        "(+ _band_stats.json, _splits.json, _tile_info.json)")
  return 0


def _convert(args) -> int:
  modalities = args.modalities.split(",") if args.modalities else None
  convert_lib.convert(args.src, args.out, shards=args.shards, workers=args.workers,
                      split=args.split, modalities=modalities, compression=args.compression)
  return 0


def _verify(args) -> int:
  problems = convert_lib.verify(args.dir)
  for p in problems:
    print(f"PROBLEM: {p}")
  if problems:
    return 1
  m = convert_lib.load_manifest(args.dir)
  print(f"{args.dir}: OK, {len(m['shards'])} shards, {m['num_records']} records match the manifest")
  return 0


def _inspect(args) -> int:
  import numpy as np
  from mmearth_jax.data import pipeline
  cfg = pipeline.default_config()
  cfg.path = args.dir
  cfg.global_batch_size = args.batch
  cfg.outputs = args.outputs
  cfg.input = args.input
  ds = pipeline.make_dataset(cfg, process_index=0, process_count=1)
  it = iter(ds)
  for k in range(args.batches):
    b = next(it)
    img = b["image"]
    print(f"batch {k}: image {img.shape} {img.dtype} mean {img.mean():+.3f} std {img.std():.3f} "
          f"finite {bool(np.isfinite(img).all())}; l2a tiles {int(b['s2_type'].sum())}/{len(img)}")
    for name, t in b["targets"].items():
      v = b["valid"][name]
      if t.dtype.kind == "f":
        desc = f"mean {t[v].mean() if v.any() else 0:+.3f} std {t[v].std() if v.any() else 0:.3f}"
      else:
        classes = np.unique(t[t >= 0])
        desc = f"{len(classes)} classes present"
      print(f"   {name:<18} {str(t.shape):<18} {desc:<32} valid {v.mean():6.1%}")
  it.close()
  return 0


def _train(args) -> int:
  from mmearth_jax import config_lib
  from mmearth_jax.parallel import distributed
  # Before anything touches a JAX backend.
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  config = config_lib.load(args.config, args.overrides)
  from mmearth_jax import train
  try:
    train.train(config, args.workdir)
  except train.TrainingError as e:
    print(f"mmearth-jax train: error: {e}", file=sys.stderr)
    return 1
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mmearth-jax", description="Pretrain geospatial foundation "
                              "models in JAX: data preparation, training and evaluation.")
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

  s = sub.add_parser("synth", help="write a small built-in dataset in the MMEarth HDF5 layout",
                     description="Write a learnable synthetic sample in exactly the upstream "
                     "MMEarth layout: <stem>.h5 with every dataset, plus _band_stats.json, "
                     "_splits.json and _tile_info.json.")
  s.add_argument("--out", required=True, help="folder to write the variant into")
  s.add_argument("--n", type=int, default=256, help="number of tiles (default 256)")
  s.add_argument("--size", type=int, default=128, choices=(128, 64),
                 help="tile size in pixels: 128 (MMEarth, MMEarth100k) or 64 (MMEarth64)")
  s.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same data")
  s.set_defaults(func=_synth)

  c = sub.add_parser("convert", help="convert an MMEarth variant folder to ArrayRecord shards",
                     description=convert_lib.__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  c.add_argument("--src", required=True, help="variant folder holding <stem>.h5 and its JSON files")
  c.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
  c.add_argument("--shards", type=int, default=8, help="number of shards (default 8)")
  c.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
  c.add_argument("--split", default="train", help="split of _splits.json to convert (default train)")
  c.add_argument("--modalities", default="",
                 help="comma-separated datasets to store (default: every modality)")
  c.add_argument("--compression", default=convert_lib.DEFAULT_COMPRESSION,
                 help="ArrayRecord chunk compression: zstd:LEVEL, snappy, brotli:LEVEL or none "
                 f"(default {convert_lib.DEFAULT_COMPRESSION})")
  c.set_defaults(func=_convert)

  v = sub.add_parser("verify", help="re-check converted shards against their manifest",
                     description="Re-check every shard's record count and SHA-256 against "
                     "manifest.json; exit 1 on any mismatch.")
  v.add_argument("dir", help="folder written by `mmearth-jax convert`")
  v.set_defaults(func=_verify)

  i = sub.add_parser("inspect", help="print statistics of a few training batches",
                     description="Run the input pipeline on converted shards and print the "
                     "statistics of a few batches (shapes, z-scored moments, validity).")
  i.add_argument("dir", help="folder written by `mmearth-jax convert`")
  i.add_argument("--batches", type=int, default=2, help="batches to print (default 2)")
  i.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
  i.add_argument("--input", default="s2", help="input preset: s2, rgb, s2_all (default s2)")
  i.add_argument("--outputs", default="all",
                 help="outputs preset: all, s2_only, rgb_only, pixel_only, image_only (default all)")
  i.set_defaults(func=_inspect)

  t = sub.add_parser("train", help="pretrain a model from a config (one CPU to a TPU pod)",
                     description="Train, or resume from the newest readable checkpoint in "
                     "--workdir. Override any config field with --config.<key>=<value>, e.g. "
                     "--config.data.path=/data/shards --config.mesh.fsdp=8. The same command "
                     "runs on every host of a multi-host job.")
  t.add_argument("--config", required=True,
                 help="config file and variant, e.g. configs/mp_mae.py:atto (see its docstring)")
  t.add_argument("--workdir", required=True,
                 help="folder for checkpoints, metrics.jsonl, TensorBoard files and config.json")
  t.add_argument("--coordinator", default=None,
                 help="HOST:PORT of process 0 for an explicit multi-process launch "
                 "(or MMEARTH_COORDINATOR); TPU pods and SLURM are detected without it")
  t.add_argument("--num-processes", type=int, default=None,
                 help="number of processes of an explicit launch (or MMEARTH_NUM_PROCESSES)")
  t.add_argument("--process-id", type=int, default=None,
                 help="this process's index in an explicit launch (or MMEARTH_PROCESS_ID)")
  t.set_defaults(func=_train)
  return p


def main(argv=None) -> int:
  from mmearth_jax.config_lib import ConfigError, split_overrides
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    argv, overrides = split_overrides(argv)
  except ConfigError as e:
    print(f"mmearth-jax: error: {e}", file=sys.stderr)
    return 2
  args = build_parser().parse_args(argv)
  if overrides and args.command != "train":
    print(f"mmearth-jax {args.command}: error: --config.* overrides belong to `train`",
          file=sys.stderr)
    return 2
  args.overrides = overrides
  try:
    return args.func(args)
  except (convert_lib.ConversionError, ConfigError, ValueError, KeyError, FileNotFoundError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"mmearth-jax {args.command}: error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
