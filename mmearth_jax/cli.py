"""The `mmearth-jax` command line (also `python -m mmearth_jax`).

Every command is one `Command` entry of `COMMANDS`: its name, help, description, handler and
arguments; argument groups that several commands share (`CHECKPOINT`, `EVAL_DATA`) are defined
once. Nothing here imports JAX or PyTorch at module level: handlers import what they use, and only
`to-torch` and `from-torch` import `mmearth_jax.interop` (PyTorch, the `torch` extra).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

from mmearth_jax.data import convert as convert_lib


@dataclasses.dataclass(frozen=True)
class Arg:
  """One `add_argument(*flags, **options)` call."""
  flags: tuple[str, ...]
  options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
  return Arg(flags, options)


@dataclasses.dataclass(frozen=True)
class Command:
  """One subcommand: its parser and the function that runs it."""
  name: str
  help: str
  description: str
  handler: Callable[[argparse.Namespace], int]
  arguments: tuple[Arg, ...]
  overrides: bool = False  # takes --config.<key>=<value> overrides of its --config
  raw_description: bool = False  # keep the description's line breaks (a module docstring)


# ----------------------------------------------------------------------------------------------
# Data preparation.


def _synth(args: argparse.Namespace) -> int:
  from mmearth_jax.data import synth
  stem = synth.write_sample(args.out, n=args.n, size=args.size, seed=args.seed,
                            scene_variation=args.scene_variation)
  print(f"wrote {args.n} tiles of {args.size} px to {args.out}/{stem}.h5 "
        "(+ _band_stats.json, _splits.json, _tile_info.json)")
  return 0


def _convert(args: argparse.Namespace) -> int:
  modalities = args.modalities.split(",") if args.modalities else None
  convert_lib.convert(args.src, args.out, shards=args.shards, workers=args.workers,
                      split=args.split, modalities=modalities, compression=args.compression)
  return 0


def _verify(args: argparse.Namespace) -> int:
  problems = convert_lib.verify(args.dir)
  for p in problems:
    print(f"PROBLEM: {p}")
  if problems:
    return 1
  m = convert_lib.load_manifest(args.dir)
  print(f"{args.dir}: OK, {len(m['shards'])} shards, {m['num_records']} records match the manifest")
  return 0


def _inspect(args: argparse.Namespace) -> int:
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


# ----------------------------------------------------------------------------------------------
# Jobs run from a config: pretraining and segmentation fine-tuning.


def _train(args: argparse.Namespace) -> int:
  from mmearth_jax import config_lib
  from mmearth_jax.parallel import distributed
  # Before anything touches a JAX backend.
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  config = config_lib.load(args.config, args.overrides)
  from mmearth_jax import train
  try:
    train.train(config, args.workdir,
                provenance={"config": args.config, "overrides": list(args.overrides)})
  except train.TrainingError as e:
    print(f"mmearth-jax train: error: {e}", file=sys.stderr)
    return 1
  return 0


def _segment(args: argparse.Namespace) -> int:
  import json
  from mmearth_jax import config_lib
  cfg = config_lib.load(args.config, args.overrides)  # a bad key fails before JAX loads
  from mmearth_jax.eval import segmentation as seg
  seg.check_config(cfg)
  enc, params, source = seg.encoder_from_config(cfg)
  train, test = seg.load_splits(cfg, enc["bands"])
  print(f"{cfg.dataset}: {len(train.images)} train / {len(test.images)} test tiles of "
        f"{train.images.shape[1]}x{train.images.shape[2]} px, {train.num_classes} classes; "
        f"encoder: {source}")
  result = seg.run(enc, params, train, test, cfg, log=print)
  print(f"fine-tuned on {result['train_tiles']} tiles ({100 * cfg.label_fraction:g} % of the "
        f"labels), {result['steps']} steps ({result['epochs']:g} epochs, encoder frozen for "
        f"{result['freeze_steps']}); test IoU:")
  print(seg.format_metrics(result))
  if cfg.json:
    with open(cfg.json, "w") as f:
      json.dump({"dataset": cfg.dataset, "encoder": source, **result}, f, indent=2)
  return 0


# ----------------------------------------------------------------------------------------------
# Pretrained encoders: embeddings, evaluation, PyTorch interop.


def _atomic_save_npy(path: str, array) -> None:
  import os
  import numpy as np
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  tmp = path + ".partial.npy"
  np.save(tmp, array)
  os.replace(tmp, path)


def _scene_options(args: argparse.Namespace):
  from mmearth_jax import scenes
  return scenes.Options(
      bands=[b.strip() for b in args.bands.split(",")] if args.bands else None,
      tile=args.tile, overlap=args.overlap, batch_size=args.batch_size,
      normalised=args.normalised, level=args.level, scale=args.scale, offset=args.offset,
      mask_band=args.mask_band, gsd=getattr(args, "gsd", None), progress=not args.no_progress)


def _report_scene(written, source: str) -> None:
  what = (f"{written.shape[0]} tile vectors of width {written.shape[1]}" if len(written.shape) == 2
          else f"a {written.shape[1]}x{written.shape[2]} grid of {written.shape[0]} bands")
  print(f"wrote {what} to {written.path} ({written.tiles} tiles of {written.tile[0]}x"
        f"{written.tile[1]} px; model from {source})")
  print(f"  bands: {written.bands}")
  print(f"  input: {written.normalisation}")
  if written.nodata_cells:
    print(f"  {written.nodata_cells} cells are nodata (more than half their pixels nodata or "
          "masked)")


def _embed(args: argparse.Namespace) -> int:
  from mmearth_jax import pretrained, scenes
  from mmearth_jax.eval import features
  if bool(args.scene) == bool(args.images):
    raise ValueError("give the input as --scene S2.tif (a raster) or --images stack.npy, one of "
                     "them")
  model = pretrained.load(args.checkpoint)
  if args.scene:
    args.batch_size = args.batch_size or 16
    _report_scene(scenes.embed_scene(model, args.scene, args.out, _scene_options(args),
                                     pool=args.pool), model.source)
    return 0
  if args.pool or args.bands or args.mask_band:
    raise ValueError("--pool, --bands and --mask-band apply to --scene; an --images stack is "
                     "in the encoder's band order already")
  stack = scenes.load_image_stack(args.images, args.channels_first)
  images, note = scenes.prepare_images(stack, model.card, args.images,
                                       normalised=args.normalised, level=args.level,
                                       scale=args.scale, offset=args.offset)
  enc = pretrained.encoder_spec(model.spec)
  out = features.extract(pretrained.features_fn(model.spec, gsd=args.gsd),
                         pretrained.encoder_params(model.spec, model.params), images,
                         batch_size=args.batch_size or 128)
  _atomic_save_npy(args.out, out)
  print(f"wrote {out.shape[0]} embeddings of width {out.shape[1]} to {args.out} "
        f"({enc['arch']} from {model.source}; {note})")
  return 0


def _segment_scene(args: argparse.Namespace) -> int:
  from mmearth_jax import pretrained, scenes
  model = pretrained.load(args.model)
  _report_scene(scenes.segment_scene(model, args.scene, args.out, _scene_options(args)),
                model.source)
  return 0


def _evaluate(args: argparse.Namespace, evaluators) -> int:
  import json
  from mmearth_jax import pretrained
  from mmearth_jax.eval import evaluate
  model = pretrained.load(args.checkpoint)
  bands = args.bands.split(",") if args.bands else model.bands
  cfg = evaluate.default_config()
  cfg.dataset, cfg.data_dir = args.dataset, args.data_dir or ""
  cfg.train_split, cfg.test_split, cfg.partition = args.train_split, args.test_split, args.partition
  cfg.max_examples, cfg.image_size = args.max_examples, args.image_size
  train, test = evaluate.load_splits(cfg, bands)
  ks = tuple(int(k) for k in args.k.split(",")) if getattr(args, "k", None) else (20,)
  scales = tuple(float(x) for x in args.scales.split(",")) if args.scales else (1.0,)
  result = evaluate.evaluate(model.spec, model.params, train, test, evaluators=evaluators, ks=ks,
                             batch_size=args.batch_size, scales=scales, gsd=args.gsd)
  print(f"{args.dataset}: {len(train.labels)} train / {len(test.labels)} test images, "
        f"{train.num_classes} classes; encoder from {model.source}")
  for k, v in result.items():
    print(f"  {k:<16} {100 * v:6.2f} %")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


def _knn(args: argparse.Namespace) -> int:
  return _evaluate(args, ("knn",))


def _probe(args: argparse.Namespace) -> int:
  from mmearth_jax.eval import evaluate
  return _evaluate(args, evaluate.parse_evaluators(args.kind))


def _to_torch(args: argparse.Namespace) -> int:
  from mmearth_jax import cards, methods, pretrained
  from mmearth_jax.interop import hub, torch_io
  model = pretrained.load(args.checkpoint)
  if not methods.arch(model.spec).export_layouts:
    # A model with no PyTorch layout of its own (GFM's SimMIM student, the dense contrastive
    # model): export its encoder, the part users fine-tune.
    model = pretrained.Pretrained(pretrained.encoder_spec(model.spec),
                                  pretrained.encoder_params(model.spec, model.params),
                                  model.source, model.card)
  state_dict = hub.export_state_dict(model.spec, model.params, args.layout)
  card = cards.for_export(model.card, model.spec, args.layout, args.out)
  torch_io.save_state_dict(state_dict, args.out, metadata=cards.metadata(card))
  card_file = cards.write(card, cards.card_path(args.out))
  print(f"wrote {len(state_dict)} tensors ({args.layout} layout, {model.spec['arch']}) to "
        f"{args.out}, its model card to {card_file}")
  if args.check:
    _check_export(model, args.out, args.layout, args.check)
  return 0


def _check_export(model, path: str, layout: str, check: str) -> None:
  """Print the first image's embedding from JAX and from PyTorch reading `path`."""
  import numpy as np
  from mmearth_jax import pretrained, scenes
  from mmearth_jax.eval import datasets, features
  from mmearth_jax.interop import compare
  if check.endswith(".npy"):
    image = scenes.load_image_stack(check).astype(np.float32)[:1]
  else:
    image = datasets.load(check, "train", model.bands, max_examples=1).images[:1]
  pretrained.check_images(pretrained.encoder_spec(model.spec), image, check)
  ours = features.extract(pretrained.features_fn(model.spec),
                          pretrained.encoder_params(model.spec, model.params), image)[0]
  theirs = compare.torch_features(model.spec, path, layout, image)[0]
  print(f"embedding of the first image of {check} ({image.shape[1]}x{image.shape[2]} px, "
        f"{image.shape[3]} bands):")
  print(compare.side_by_side(ours, theirs))


def _from_torch(args: argparse.Namespace) -> int:
  from mmearth_jax import cards, pretrained
  from mmearth_jax.interop import hub, torch_io
  state_dict = torch_io.load_state_dict(args.checkpoint)
  spec, params, notes = hub.import_state_dict(state_dict, args.model)
  if args.bands:
    spec["bands"] = args.bands.split(",")
  stats = cards.read_band_stats(args.band_stats) if args.band_stats else None
  attached, attached_from = cards.read_attached(args.checkpoint)
  card = cards.for_import(spec, notes, args.checkpoint, notes[0][len("layout: "):],
                          bands_given=bool(args.bands), band_stats=stats,
                          stats_from=args.band_stats, attached=attached,
                          attached_from=attached_from)
  spec["bands"] = cards.band_names(card)  # the attached card's, when it names them
  for note in notes:
    if not note.startswith("assumed: "):  # those are in the card's: printed below
      print(f"note: {note}")
  if attached_from:
    print(f"note: model card read from {attached_from}")
  for key in ("assumed", "unknown"):
    for item in card[key]:
      print(f"{key}: {item}")
  out = pretrained.save(args.out, spec, params, source=f"imported from {args.checkpoint}",
                        card=card)
  shape = {k: v for k, v in spec.items() if k not in ("outputs", "bands")}
  print(f"imported {spec['arch']} {shape} to {out}")
  return 0


def _info(args: argparse.Namespace) -> int:
  import json
  import os
  from mmearth_jax import cards, pretrained
  if os.path.isfile(args.checkpoint):
    card = cards.read(args.checkpoint if args.checkpoint.endswith(".json")
                      else cards.card_path(args.checkpoint))
  else:
    card = pretrained.read_card(args.checkpoint)
  print(json.dumps(card, indent=2) if args.json else cards.format_card(card))
  return 0


# ----------------------------------------------------------------------------------------------
# The commands.

CHECKPOINT = arg("--checkpoint", required=True,
                 help="training workdir, step folder or model folder (from-torch)")
BATCH_SIZE = arg("--batch-size", type=int, default=128,
                 help="images per forward pass of the encoder (default 128)")
# The dataset a frozen encoder is evaluated on (knn, probe).
EVAL_DATA = (
    arg("--dataset", required=True,
        help="geobench:<task folder> | tfds:<name> (eurosat/all, so2sat/all, bigearthnet) | "
        "mmearth:<shards folder> (dominant land cover)"),
    arg("--data-dir", default=None, help="base folder for a relative geobench: / mmearth: path; "
        "for tfds: the TFDS data_dir"),
    arg("--train-split", default="train", help="split the evaluators fit on (default train)"),
    arg("--test-split", default="test", help="split they are scored on (default test)"),
    arg("--partition", default="default",
        help="GEO-Bench partition, e.g. default, 0.01x_train (label fraction)"),
    arg("--max-examples", type=int, default=0, help="at most this many per split (0: all)"),
    arg("--image-size", type=int, default=0,
        help="resize (geobench, tfds) or centre-crop (mmearth) the images to this size"),
    arg("--bands", default="", help="the encoder's input bands, comma separated, e.g. B4,B3,B2 "
        "(default: those the checkpoint names)"),
    BATCH_SIZE,
    arg("--json", default="", help="also write the metrics to this JSON file"),
    arg("--scales", default="", help="fractions of native resolution to evaluate at, e.g. "
        "0.125,0.25,0.5,1 (Scale-MAE's protocol): per-scale metrics and their mean"),
    arg("--gsd", type=float, default=0.0, help="Scale-MAE: the GSD scale at native resolution "
        "(the model is told gsd / fraction at each scale; the reference's eval_base_resolution "
        "is 1)"),
)

SYNTH = Command(
    "synth", "write a small built-in dataset in the MMEarth HDF5 layout",
    "Write a learnable synthetic sample in exactly the upstream MMEarth layout: <stem>.h5 with "
    "every dataset, plus _band_stats.json, _splits.json and _tile_info.json.", _synth, (
        arg("--out", required=True, help="folder to write the variant into"),
        arg("--n", type=int, default=256, help="number of tiles (default 256)"),
        arg("--size", type=int, default=128, choices=(128, 64),
            help="tile size in pixels: 128 (MMEarth, MMEarth100k) or 64 (MMEarth64)"),
        arg("--seed", type=int, default=0,
            help="random seed; the same seed writes the same data"),
        arg("--scene-variation", action="store_true",
            help="give each tile its own class appearance, illumination and haze (harder: a "
            "few labelled tiles no longer fix the spectra of the rest)"),
    ))

CONVERT = Command(
    "convert", "convert an MMEarth variant folder to ArrayRecord shards", convert_lib.__doc__,
    _convert, (
        arg("--src", required=True, help="variant folder holding <stem>.h5 and its JSON files"),
        arg("--out", required=True, help="output folder for the shards and manifest.json"),
        arg("--shards", type=int, default=8, help="number of shards (default 8)"),
        arg("--workers", type=int, default=1, help="parallel worker processes (default 1)"),
        arg("--split", default="train",
            help="split of _splits.json to convert (default train)"),
        arg("--modalities", default="",
            help="comma-separated datasets to store (default: every modality)"),
        arg("--compression", default=convert_lib.DEFAULT_COMPRESSION,
            help="ArrayRecord chunk compression: zstd:LEVEL, snappy, brotli:LEVEL or none "
            f"(default {convert_lib.DEFAULT_COMPRESSION})"),
    ), raw_description=True)

VERIFY = Command(
    "verify", "re-check converted shards against their manifest",
    "Re-check every shard's record count and SHA-256 against manifest.json; exit 1 on any "
    "mismatch.", _verify, (arg("dir", help="folder written by `mmearth-jax convert`"),))

INSPECT = Command(
    "inspect", "print statistics of a few training batches",
    "Run the input pipeline on converted shards and print the statistics of a few batches "
    "(shapes, z-scored moments, validity).", _inspect, (
        arg("dir", help="folder written by `mmearth-jax convert`"),
        arg("--batches", type=int, default=2, help="batches to print (default 2)"),
        arg("--batch", type=int, default=8, help="batch size (default 8)"),
        arg("--input", default="s2", help="input preset: s2, rgb, s2_all (default s2)"),
        arg("--outputs", default="all", help="outputs preset: all, s2_only, rgb_only, "
            "pixel_only, image_only (default all)"),
    ))

TRAIN = Command(
    "train", "pretrain a model from a config (one CPU to a TPU pod)",
    "Train, or resume from the newest readable checkpoint in --workdir. Override any config "
    "field with --config.<key>=<value>, e.g. --config.data.path=/data/shards "
    "--config.mesh.fsdp=8. The same command runs on every host of a multi-host job.", _train, (
        arg("--config", required=True, help="config and variant: a shipped one by name, e.g. "
            "mp_mae:atto, or a file, e.g. configs/mp_mae.py:atto (see its docstring)"),
        arg("--workdir", required=True,
            help="folder for checkpoints, metrics.jsonl, TensorBoard files and config.json"),
        arg("--coordinator", default=None,
            help="HOST:PORT of process 0 for an explicit multi-process launch "
            "(or MMEARTH_COORDINATOR); TPU pods and SLURM are detected without it"),
        arg("--num-processes", type=int, default=None,
            help="number of processes of an explicit launch (or MMEARTH_NUM_PROCESSES)"),
        arg("--process-id", type=int, default=None,
            help="this process's index in an explicit launch (or MMEARTH_PROCESS_ID)"),
    ), overrides=True)

SEGMENT = Command(
    "segment", "fine-tune a U-Net segmenter on an encoder and report mIoU",
    "Fine-tune a U-Net decoder on the four ConvNeXt V2 stages of a pretrained encoder (or a "
    "random one) on a fraction of a segmentation dataset's training tiles, MMEarth's way (AdamW "
    "+ cosine, the encoder frozen for the first part of training), then report per-class IoU, "
    "mIoU and pixel accuracy on the test split. The recipe is a config, configs/segment.py "
    "(its docstring lists the variants and every field); override any field with "
    "--config.<key>=<value>, e.g. --config.dataset=geobench:/data/m-cashew-plant "
    "--config.checkpoint=runs/mpmae_atto --config.label_fraction=0.01.", _segment, (
        arg("--config", default="segment", help="config and variant (default segment: "
            "configs/segment.py's MMEarth protocol, which needs --config.dataset; segment:demo "
            "runs on the built-in sample), or a file of your own, e.g. my_segment.py:VARIANT"),
    ), overrides=True)

# How `embed --scene` and `segment-scene` read a scene.
SCENE_READING = (
    arg("--bands", default="", help="the file's bands in file order, comma separated (MMEarth "
        "names or aliases: B2 or B02, red, nir), when its band descriptions do not name them"),
    arg("--tile", type=int, default=0, help="tile side in px, a multiple of the output stride "
        "(default: a ViT's input size, else 256); a scene that fits one tile is one forward pass"),
    arg("--overlap", type=int, default=-1, help="px shared by neighbouring tiles, a multiple of "
        "the output stride (default: a quarter of the tile for maps, 0 for --pool)"),
    arg("--mask-band", type=int, default=None, help="1-based band of the file whose non-zero "
        "pixels are masked (e.g. clouds); nodata pixels (the file's mask) are always masked"),
    arg("--no-progress", action="store_true", help="no progress bar"),
)
# How raw values become the encoder's input (both inputs of `embed`, and `segment-scene`).
NORMALISATION = (
    arg("--normalised", action="store_true", help="the values are already z-scored the way the "
        "encoder was pretrained (default: raw values, normalised with the model card)"),
    arg("--level", default=None, help="which of the card's statistics normalise raw values: "
        "L1C (top of atmosphere) or L2A (surface reflectance); default L2A when the card has it"),
    arg("--scale", type=float, default=1.0, help="raw values are first multiplied by this (e.g. "
        "10000 for reflectance in 0..1; the card says which units it expects)"),
    arg("--offset", type=float, default=0.0, help="...and added this (e.g. -1000 for L2A "
        "products of processing baseline 04.00 and later, whose BOA_ADD_OFFSET is -1000)"),
)

EMBED = Command(
    "embed", "embeddings of a scene (GeoTIFF) or a stack of images from a pretrained encoder",
    "With --scene: read a georeferenced raster of any size window by window, match its bands to "
    "the encoder's (band descriptions, --bands, or the card's order), normalise raw values with "
    "the model card, run overlapping tiles over all local devices and write the stitched "
    "embedding grid (ConvNeXt V2: the last stage's map; ViT: the patch tokens) as a "
    "cloud-optimised GeoTIFF in the scene's CRS, its transform scaled by the output stride; "
    "cells more than half nodata or masked are nodata (-9999). --pool writes one vector per "
    "tile with its centre coordinates to a GeoParquet table instead. With --images: embeddings "
    "(ConvNeXt V2: LayerNorm of the global average pool, the reference's forward_features; ViT: "
    "the normed CLS token) of a .npy stack in the encoder's band order.", _embed, (
        CHECKPOINT,
        arg("--scene", default="", help="a GeoTIFF (any GDAL raster) of the scene"),
        arg("--images", default="", help=".npy array (N, H, W, C) in the encoder's band order"),
        arg("--channels-first", action="store_true", help="the --images are (N, C, H, W)"),
        arg("--out", required=True, help="--scene: a .tif for the embedding grid (a .parquet "
            "with --pool); --images: a .npy for the (N, D) embeddings"),
        arg("--pool", action="store_true", help="--scene: one pooled vector per tile, to a "
            "GeoParquet table"),
        *SCENE_READING, *NORMALISATION,
        arg("--gsd", type=float, default=None, help="ViT position-grid scale (Scale-MAE's GSD "
            "ratio; default 1)"),
        arg("--batch-size", type=int, default=0, help="images (default 128) or tiles (default "
            "16) per forward pass, rounded up to a multiple of the local devices"),
    ))

SEGMENT_SCENE = Command(
    "segment-scene", "a fine-tuned segmenter's class map of a scene (GeoTIFF)",
    "Predict the class of every pixel of a georeferenced raster with a segmenter saved by "
    "`mmearth-jax segment --config.out=DIR`: the scene is read, matched, normalised and tiled as "
    "`embed --scene` does, and the class map is written as a one-band uint8 cloud-optimised "
    "GeoTIFF on the scene's grid (nodata 255 where more than half the pixel is nodata or "
    "masked; the class names are in its metadata).", _segment_scene, (
        arg("--model", required=True, help="the model folder `segment --config.out` wrote"),
        arg("--scene", required=True, help="a GeoTIFF (any GDAL raster) of the scene"),
        arg("--out", required=True, help="a .tif for the class map"),
        *SCENE_READING, *NORMALISATION,
        arg("--batch-size", type=int, default=8, help="tiles per forward pass (default 8)"),
    ))

KNN = Command(
    "knn", "weighted kNN accuracy of a frozen encoder on a dataset",
    "Weighted kNN (cosine, votes weighted exp(sim/0.07)) on frozen features: top-1/top-5 "
    "accuracy, or micro-F1 for multi-label tasks.", _knn, (
        CHECKPOINT, *EVAL_DATA,
        arg("--k", default="10,20,100,200", help="neighbour counts (default 10,20,100,200)"),
    ))

PROBE = Command(
    "probe", "linear probes of a frozen encoder on a dataset",
    "Logistic regression (linear) and closed-form least-squares (lsq) probes on frozen "
    "features.", _probe, (
        CHECKPOINT, *EVAL_DATA,
        arg("--kind", default="linear,lsq", help="evaluators, comma separated, any of linear, "
            "lsq and knn (with k = 20) (default linear,lsq)"),
    ))

TO_TORCH = Command(
    "to-torch", "export a checkpoint to a PyTorch state dict",
    "Write {'model': state_dict} (.pth) or .safetensors in the MMEarth, official ConvNeXt V2 "
    "or timm layout (ViT: timm, mae for a full MAE, or scale_mae for a full Scale-MAE in the "
    "released layout). A pretraining wrapper (GFM's student, the dense contrastive model) "
    "exports its encoder. The model card goes beside the file as <out>.card.json (e.g. "
    "atto.pth.card.json) and, for .safetensors, into its metadata (key mmearth_jax.card).",
    _to_torch, (
        CHECKPOINT,
        arg("--layout", required=True, choices=("mmearth", "official", "timm", "mae", "scale_mae"),
            help="ConvNeXt V2 / MP-MAE: mmearth, official or timm; ViT: timm, mae or scale_mae; "
            "MAE: timm or mae; Scale-MAE: scale_mae or timm"),
        arg("--out", required=True, help=".pth/.pt or .safetensors file"),
        arg("--check", default="", help="a .npy image stack or a dataset (as knn's --dataset): "
            "print the first image's embedding from JAX and from the plain-PyTorch reference "
            "model loaded with the written file, side by side"),
    ))

FROM_TORCH = Command(
    "from-torch", "import a PyTorch checkpoint",
    "Import official ConvNeXt V2 / FCMAE, MMEarth (including its sparse pretraining layout), "
    "timm ConvNeXt V2 and ViT, MAE and Scale-MAE checkpoints; the architecture is inferred from "
    "the keys and shapes. Files are read with weights_only=True (no code is unpickled).",
    _from_torch, (
        arg("--checkpoint", required=True, help=".pth/.pt/.bin/.ckpt or .safetensors file"),
        arg("--out", required=True, help="model folder to write"),
        arg("--model", default=None, help="what to build instead of the inferred architecture, "
            "and what the weights do not tell: ARCH[:KEY=VALUE,...], ARCH one of convnextv2, "
            "mp_mae, vit, mae, scale_mae (convnextv2 on an MP-MAE file, or vit on a Scale-MAE "
            "file, imports the encoder alone); KEY one of num_heads, decoder_num_heads (ViT / "
            "MAE / Scale-MAE attention heads), img_size (ViT / MAE / Scale-MAE image size), "
            "patch_size (ConvNeXt V2 / MP-MAE), drop_pos_embed=1 (ViT / MAE: accept a position "
            "table that is not the fixed sin-cos one); e.g. vit:num_heads=8, "
            "mae:num_heads=8,decoder_num_heads=4, or options alone, :num_heads=8"),
        arg("--bands", default="", help="the encoder's input bands, comma separated (default "
            "from the input channels: 12 = MMEarth's Sentinel-2 input, 13 = all Sentinel-2 "
            "bands, 3 = RGB)"),
        arg("--band-stats", default="", help="the pretraining data's band statistics for the "
            "model card: MMEarth's <stem>_band_stats.json, or a shards folder (its "
            "manifest.json); default: a card written by to-torch beside the file "
            "(<file>.card.json) or in its .safetensors metadata, else unknown"),
    ))

INFO = Command(
    "info", "print a checkpoint's model card",
    "Print the model card of a checkpoint (training workdir, step folder or model folder), or of "
    "a PyTorch file written by to-torch (its <file>.card.json, or that JSON file itself): "
    "method, architecture, input bands and wavelengths, the per-band normalisation of the "
    "pretraining data and its units, GSD, patch, input and minimum input size, output stride, "
    "feature width, provenance, and every value that was assumed or is unknown.", _info, (
        arg("checkpoint", help="training workdir, step folder, model folder, or a to-torch "
            "file / its .card.json"),
        arg("--json", action="store_true", help="print the card as JSON"),
    ))

COMMANDS = (SYNTH, CONVERT, VERIFY, INSPECT, TRAIN, EMBED, KNN, PROBE, SEGMENT, SEGMENT_SCENE,
            TO_TORCH, FROM_TORCH, INFO)
_BY_NAME = {c.name: c for c in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
  # allow_abbrev=False everywhere: a prefix must not silently become another flag
  # (`probe --k 10,20` would be read as --kind).
  p = argparse.ArgumentParser(prog="mmearth-jax", allow_abbrev=False,
                              description="Pretrain geospatial foundation models in JAX: data "
                              "preparation, training and evaluation.")
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for c in COMMANDS:
    formatter = (argparse.RawDescriptionHelpFormatter if c.raw_description
                 else argparse.HelpFormatter)
    s = sub.add_parser(c.name, help=c.help, description=c.description, allow_abbrev=False,
                       formatter_class=formatter)
    for a in c.arguments:
      s.add_argument(*a.flags, **a.options)
    s.set_defaults(func=c.handler)
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
  if overrides and not _BY_NAME[args.command].overrides:
    takers = " and ".join(f"`{c.name}`" for c in COMMANDS if c.overrides)
    print(f"mmearth-jax {args.command}: error: --config.* overrides belong to {takers}",
          file=sys.stderr)
    return 2
  args.overrides = overrides
  try:
    return args.func(args)
  except (convert_lib.ConversionError, ConfigError, ValueError, KeyError, FileNotFoundError,
          FloatingPointError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"mmearth-jax {args.command}: error: {msg}", file=sys.stderr)
    return 2
  except ModuleNotFoundError as e:
    if e.name not in ("torch", "rasterio", "pyarrow"):
      raise
    # A command that reads or writes a PyTorch file, without the torch extra (mmearth_jax.interop
    # says which extra to install).
    print(f"mmearth-jax {args.command}: error: {e.msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
