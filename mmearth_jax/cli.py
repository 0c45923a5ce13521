"""The `mmearth-jax` command line (also `python -m mmearth_jax`)."""
from __future__ import annotations

import argparse
import sys

from mmearth_jax.data import convert as convert_lib


def _synth(args) -> int:
  from mmearth_jax.data import synth
  stem = synth.write_sample(args.out, n=args.n, size=args.size, seed=args.seed,
                            scene_variation=args.scene_variation)
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


# ----------------------------------------------------------------------------------------------
# Pretrained encoders: embeddings, evaluation, PyTorch interop.


def _load_images(path: str, channels_first: bool):
  import numpy as np
  try:
    x = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read images as a .npy array ({e})") from e
  if x.dtype.kind not in "fiu":
    raise ValueError(f"{path}: images must be a numeric array, got dtype {x.dtype}")
  if x.ndim == 3:  # one image
    x = x[None]
  if x.ndim != 4:
    raise ValueError(f"{path}: expected (N, H, W, C) or (N, C, H, W) images, got shape {x.shape}")
  if channels_first:
    x = x.transpose(0, 2, 3, 1)
  return x.astype(np.float32)


def _embed(args) -> int:
  import numpy as np
  from mmearth_jax import pretrained
  from mmearth_jax.eval import features
  model = pretrained.load(args.checkpoint)
  images = _load_images(args.images, args.channels_first)
  enc = pretrained.encoder_spec(model.spec)
  pretrained.check_images(enc, images, args.images)
  out = features.extract(pretrained.features_fn(model.spec),
                         pretrained.encoder_params(model.spec, model.params), images,
                         batch_size=args.batch_size)
  _atomic_save_npy(args.out, out)
  print(f"wrote {out.shape[0]} embeddings of width {out.shape[1]} to {args.out} "
        f"({enc['arch']} from {model.source})")
  return 0


def _atomic_save_npy(path: str, array) -> None:
  import os
  import numpy as np
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  tmp = path + ".partial.npy"
  np.save(tmp, array)
  os.replace(tmp, path)


def _evaluate(args, evaluators) -> int:
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


def _knn(args) -> int:
  return _evaluate(args, ("knn",))


def _probe(args) -> int:
  from mmearth_jax.eval import evaluate
  return _evaluate(args, evaluate.parse_evaluators(args.kind))


def _to_torch(args) -> int:
  from mmearth_jax import pretrained
  from mmearth_jax.interop import hub, torch_io
  model = pretrained.load(args.checkpoint)
  if isinstance(model.spec.get("encoder"), dict):
    # A pretraining wrapper (GFM's SimMIM student, the dense contrastive model): export the
    # encoder, the part users fine-tune.
    model = pretrained.Pretrained(pretrained.encoder_spec(model.spec),
                                  pretrained.encoder_params(model.spec, model.params),
                                  model.source)
  state_dict = hub.export_state_dict(model.spec, model.params, args.layout)
  torch_io.save_state_dict(state_dict, args.out)
  print(f"wrote {len(state_dict)} tensors ({args.layout} layout, {model.spec['arch']}) to "
        f"{args.out}")
  if args.check:
    _check_export(model, args.out, args.layout, args.check)
  return 0


def _check_export(model, path: str, layout: str, check: str) -> None:
  """Print the first image's embedding from JAX and from PyTorch reading `path`."""
  from mmearth_jax import pretrained
  from mmearth_jax.eval import datasets, features
  from mmearth_jax.interop import compare
  if check.endswith(".npy"):
    image = _load_images(check, channels_first=False)[:1]
  else:
    image = datasets.load(check, "train", model.bands, max_examples=1).images[:1]
  pretrained.check_images(pretrained.encoder_spec(model.spec), image, check)
  ours = features.extract(pretrained.features_fn(model.spec),
                          pretrained.encoder_params(model.spec, model.params), image)[0]
  theirs = compare.torch_features(model.spec, path, layout, image)[0]
  print(f"embedding of the first image of {check} ({image.shape[1]}x{image.shape[2]} px, "
        f"{image.shape[3]} bands):")
  print(compare.side_by_side(ours, theirs))


def _from_torch(args) -> int:
  from mmearth_jax import pretrained
  from mmearth_jax.interop import hub, torch_io
  state_dict = torch_io.load_state_dict(args.checkpoint)
  spec, params, notes = hub.import_state_dict(state_dict, args.model)
  if args.bands:
    spec["bands"] = args.bands.split(",")
  for note in notes:
    print(f"note: {note}")
  out = pretrained.save(args.out, spec, params, source=f"imported from {args.checkpoint}")
  shape = {k: v for k, v in spec.items() if k not in ("outputs", "bands")}
  print(f"imported {spec['arch']} {shape} to {out}")
  return 0


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(",") if x.strip()) if text else ()


def _segment(args) -> int:
  import json
  from mmearth_jax.eval import segmentation as seg
  if not 0.0 < args.label_fraction <= 1.0:
    raise ValueError(f"--label-fraction must be in (0, 1] (0.01 = 1 % of the training tiles), "
                     f"got {args.label_fraction}")
  bands = args.bands.split(",") if args.bands else ()
  enc, params, source = seg.resolve_encoder(
      args.checkpoint, variant=args.variant, depths=_ints(args.depths), dims=_ints(args.dims),
      stem=args.stem, patch_size=args.patch_size, bands=bands)
  kw = dict(data_dir=args.data_dir, partition=args.partition,
            max_examples=args.max_examples or None, image_size=args.image_size or None)
  train = seg.load_segmentation(args.dataset, args.train_split, enc["bands"], **kw)
  test = seg.load_segmentation(args.dataset, args.test_split, enc["bands"], **kw)
  cfg = seg.FinetuneConfig(
      epochs=args.epochs, steps=args.steps, max_steps=args.max_steps, batch_size=args.batch_size,
      lr=args.lr, encoder_lr_scale=args.encoder_lr_scale, weight_decay=args.weight_decay,
      warmup_steps=args.warmup_steps, freeze_fraction=args.freeze_fraction,
      flips=not args.no_flips, decoder_dims=_ints(args.decoder_dims), seed=args.seed)
  print(f"{args.dataset}: {len(train.images)} train / {len(test.images)} test tiles of "
        f"{train.images.shape[1]}x{train.images.shape[2]} px, {train.num_classes} classes; "
        f"encoder: {source}")
  result = seg.run(enc, params, train, test, cfg, label_fraction=args.label_fraction,
                   subset_seed=args.seed, log=print)
  print(f"fine-tuned on {result['train_tiles']} tiles ({100 * args.label_fraction:g} % of the "
        f"labels), {result['steps']} steps ({result['epochs']:g} epochs, encoder frozen for "
        f"{result['freeze_steps']}); test IoU:")
  print(seg.format_metrics(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"dataset": args.dataset, "encoder": source, **result}, f, indent=2)
  return 0


def _add_eval_args(e: argparse.ArgumentParser) -> None:
  e.add_argument("--checkpoint", required=True, help="training workdir, step folder or model "
                 "folder (from-torch)")
  e.add_argument("--dataset", required=True,
                 help="geobench:<task folder> | tfds:<name> (eurosat/all, so2sat/all, "
                 "bigearthnet) | mmearth:<shards folder> (dominant land cover)")
  e.add_argument("--data-dir", default=None, help="TFDS data_dir")
  e.add_argument("--train-split", default="train")
  e.add_argument("--test-split", default="test")
  e.add_argument("--partition", default="default",
                 help="GEO-Bench partition, e.g. default, 0.01x_train (label fraction)")
  e.add_argument("--max-examples", type=int, default=0, help="at most this many per split")
  e.add_argument("--image-size", type=int, default=0, help="resize images to this size")
  e.add_argument("--bands", default="", help="the encoder's input bands, comma separated, "
                 "when the checkpoint does not name them")
  e.add_argument("--batch-size", type=int, default=128)
  e.add_argument("--json", default="", help="also write the metrics to this JSON file")
  e.add_argument("--scales", default="", help="fractions of native resolution to evaluate at, "
                 "e.g. 0.125,0.25,0.5,1 (Scale-MAE's protocol): per-scale metrics and their mean")
  e.add_argument("--gsd", type=float, default=0.0, help="Scale-MAE: the GSD scale at native "
                 "resolution (the model is told gsd / fraction at each scale; the reference's "
                 "eval_base_resolution is 1)")


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
  s.add_argument("--scene-variation", action="store_true",
                 help="give each tile its own class appearance, illumination and haze (harder: "
                 "a few labelled tiles no longer fix the spectra of the rest)")
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

  e = sub.add_parser("embed", help="embeddings of a stack of images from a pretrained encoder",
                     description="Embeddings (ConvNeXt V2: LayerNorm of the global average pool, "
                     "the reference's forward_features; ViT: the normed CLS token) of images "
                     "already in the encoder's band order and normalisation.")
  e.add_argument("--checkpoint", required=True, help="training workdir, step folder or model "
                 "folder (from-torch)")
  e.add_argument("--images", required=True, help=".npy float array (N, H, W, C)")
  e.add_argument("--channels-first", action="store_true", help="the images are (N, C, H, W)")
  e.add_argument("--out", required=True, help=".npy file for the (N, D) embeddings")
  e.add_argument("--batch-size", type=int, default=128)
  e.set_defaults(func=_embed)

  k = sub.add_parser("knn", help="weighted kNN accuracy of a frozen encoder on a dataset",
                     description="Weighted kNN (cosine, votes weighted exp(sim/0.07)) on frozen "
                     "features: top-1/top-5 accuracy, or micro-F1 for multi-label tasks.")
  _add_eval_args(k)
  k.add_argument("--k", default="10,20,100,200", help="neighbour counts (default 10,20,100,200)")
  k.set_defaults(func=_knn)

  pr = sub.add_parser("probe", help="linear probes of a frozen encoder on a dataset",
                      description="Logistic regression (linear) and closed-form least-squares "
                      "(lsq) probes on frozen features.")
  _add_eval_args(pr)
  pr.add_argument("--kind", default="linear,lsq", help="linear, lsq or both (default both)")
  pr.set_defaults(func=_probe)

  sg = sub.add_parser("segment", help="fine-tune a U-Net segmenter on an encoder and report mIoU",
                      description="Fine-tune a U-Net decoder on the four ConvNeXt V2 stages of a "
                      "pretrained encoder (or a random one) on a fraction of a segmentation "
                      "dataset's training tiles, MMEarth's way (AdamW + cosine, the encoder "
                      "frozen for the first part of training), then report per-class IoU, mIoU "
                      "and pixel accuracy on the test split.")
  sg.add_argument("--dataset", required=True, help="mmearth:<shards folder> (land-cover maps) or "
                  "geobench:<segmentation task folder> (m-cashew-plant, m-SA-crop-type, ...)")
  sg.add_argument("--checkpoint", default="random", help="training workdir, step folder or model "
                  "folder of a ConvNeXt V2 / MP-MAE model; 'random' (default) for random init")
  sg.add_argument("--variant", default="atto", help="random init: ConvNeXt V2 variant")
  sg.add_argument("--depths", default="", help="random init: blocks per stage, e.g. 1,1,1,1")
  sg.add_argument("--dims", default="", help="random init: widths per stage, e.g. 16,32,64,64")
  sg.add_argument("--stem", default="mmearth", choices=("mmearth", "official"),
                  help="random init: MMEarth's stem or the official 4x4 one")
  sg.add_argument("--patch-size", type=int, default=8, help="random init: the stem's patch size")
  sg.add_argument("--bands", default="", help="encoder input bands, comma separated (random init "
                  "default: the 12 MMEarth input bands)")
  sg.add_argument("--label-fraction", type=float, default=1.0,
                  help="fraction of the training tiles whose labels are used, e.g. 0.01 (a seeded "
                  "subset, at least one tile)")
  sg.add_argument("--epochs", type=float, default=200.0,
                  help="passes over the labelled tiles (MMEarth: 200; default 200)")
  sg.add_argument("--steps", type=int, default=0, help="> 0: this many steps instead of --epochs")
  sg.add_argument("--max-steps", type=int, default=0, help="> 0: cap on the steps of --epochs")
  sg.add_argument("--freeze-fraction", type=float, default=0.25,
                  help="encoder frozen for this fraction of the steps (MMEarth: 50 of 200 "
                  "epochs = 0.25)")
  sg.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
  sg.add_argument("--encoder-lr-scale", type=float, default=1.0,
                  help="encoder peak lr = lr x this once unfrozen (default 1)")
  sg.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
  sg.add_argument("--warmup-steps", type=int, default=5,
                  help="linear warmup of the decoder's lr, and of the encoder's once unfrozen")
  sg.add_argument("--batch-size", type=int, default=8, help="tiles per step (default 8)")
  sg.add_argument("--no-flips", action="store_true", help="no random flips")
  sg.add_argument("--decoder-dims", default="", help="U-Net widths, deepest first, e.g. 64,32,16 "
                  "(default: the encoder's)")
  sg.add_argument("--image-size", type=int, default=0, help="crop (mmearth) or resize (geobench) "
                  "to this size")
  sg.add_argument("--max-examples", type=int, default=0, help="at most this many tiles per split")
  sg.add_argument("--data-dir", default=None, help="base folder for a relative dataset path")
  sg.add_argument("--partition", default="default", help="GEO-Bench partition")
  sg.add_argument("--train-split", default="train", help="split to fine-tune on")
  sg.add_argument("--test-split", default="test", help="split to score (mIoU) on")
  sg.add_argument("--seed", type=int, default=0, help="label subset, decoder init, batch order")
  sg.add_argument("--json", default="", help="also write the metrics to this JSON file")
  sg.set_defaults(func=_segment)

  tt = sub.add_parser("to-torch", help="export a checkpoint to a PyTorch state dict",
                      description="Write {'model': state_dict} (.pth) or .safetensors in the "
                      "MMEarth, official ConvNeXt V2 or timm layout (ViT: timm, mae for a "
                      "full MAE, or scale_mae for a full Scale-MAE in the released layout).")
  tt.add_argument("--checkpoint", required=True)
  tt.add_argument("--layout", required=True,
                  choices=("mmearth", "official", "timm", "mae", "scale_mae"))
  tt.add_argument("--out", required=True, help=".pth/.pt or .safetensors file")
  tt.add_argument("--check", default="", help="a .npy image stack or a dataset (as for knn): "
                  "print the first image's embedding from JAX and from the plain-PyTorch "
                  "reference model loaded with the written file, side by side")
  tt.set_defaults(func=_to_torch)

  ft = sub.add_parser("from-torch", help="import a PyTorch checkpoint",
                      description="Import official ConvNeXt V2 / FCMAE, MMEarth (including its "
                      "sparse pretraining layout), timm ConvNeXt V2 and ViT, MAE and Scale-MAE "
                      "checkpoints; the architecture is inferred from the keys and shapes. Files "
                      "are read with weights_only=True (no code is unpickled).")
  ft.add_argument("--checkpoint", required=True, help=".pth/.pt/.safetensors file")
  ft.add_argument("--out", required=True, help="model folder to write")
  ft.add_argument("--model", default=None,
                  help="override the inferred architecture: convnextv2, mp_mae, vit, mae")
  ft.add_argument("--bands", default="", help="the encoder's input bands, comma separated")
  ft.set_defaults(func=_from_torch)
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
  except (convert_lib.ConversionError, ConfigError, ValueError, KeyError, FileNotFoundError,
          FloatingPointError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"mmearth-jax {args.command}: error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
