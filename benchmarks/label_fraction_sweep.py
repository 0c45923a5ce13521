"""Label-fraction sweep: U-Net segmentation fine-tuning from random and pretrained encoders.

For each label fraction (default 1, 5, 50, 100 % of the training tiles) and each
initialisation, fine-tunes a U-Net on the same seeded subset of tiles (`segmentation.run` with
the recipe of configs/segment.py, MMEarth's schedule, encoder frozen for the first quarter; the
flags below set its fields) and scores mIoU on the test split.
Prints a table (rows = fraction, columns = initialisation, mIoU in %) and one JSON line.

    python benchmarks/label_fraction_sweep.py --dataset mmearth:data/demo/shards \\
        --init random --init mp_mae=data/demo/run [--init contrastive=RUN_DIR] \\
        [--fractions 1,5,50,100] [--epochs 200 --max-steps 300] [--image-size 32] [--seeds 0,1]

    # pretrain first (configs/mp_mae.py:demo at 32 px without its land-cover outputs, and
    # configs/dense_contrastive.py:demo), then sweep; reuses finished runs in --pretrain-dir
    python benchmarks/label_fraction_sweep.py --dataset mmearth:data/demo/shards \\
        --pretrain-steps 300 --pretrain-dir runs/sweep

Random initialisation uses the architecture of the first pretrained encoder (the comparison
changes the weights only), or `--variant/--dims/--depths/--patch-size` when there is none.
With several `--seeds`, each seed draws its own label subset (shared by every initialisation)
and the table shows the mean (and the spread as +- std).

Measured (mIoU %, 1 % of labels = 2 tiles, 8 label subsets, random init vs MP-MAE atto
pretrained 1500 steps at 32 px without its land-cover outputs): on the default built-in sample
no gain (its class spectra are nearly fixed, so 2 tiles suffice: 24.4 vs 24.7 after 600 steps);
on `synth --scene-variation` (per-tile class appearance, illumination, haze) 16.3 +- 3.2 vs
20.1 +- 4.3, a gain in 7 of 8 subsets (+3.9 on average). The README has the table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ml_collections
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mmearth_jax import config_lib  # noqa: E402
from mmearth_jax import modalities as M  # noqa: E402
from mmearth_jax.eval import segmentation as seg  # noqa: E402

# Pretraining runs of --pretrain-steps: init name -> (config file and variant, overrides).
# MP-MAE drops its land-cover outputs here: the sweep's labels are the sample's land-cover maps,
# and a pretext that reconstructed them (on the test tiles too) would leak the labels the label
# fraction withholds. It pretrains at the sweep's 32 px crops (3x cheaper than the demo's 56).
LAND_COVER = ("dynamic_world", "esa_worldcover")
PRETRAIN_CONFIGS = {
    "mp_mae": ("configs/mp_mae.py:demo",
               ["data.crop=32", "data.outputs=" + ",".join(
                   n for n in M.ALL_OUTPUTS if n not in LAND_COVER)]),
    "contrastive": ("configs/dense_contrastive.py:demo", []),
}


def parse_inits(specs: list[str]) -> list[tuple[str, str | None]]:
  """["random", "mp_mae=PATH"] -> [("random", None), ("mp_mae", "PATH")]."""
  out = []
  for spec in specs:
    if spec == "random":
      out.append(("random", None))
      continue
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
      raise SystemExit(f"--init {spec!r}: expected 'random' or NAME=CHECKPOINT")
    out.append((name, path))
  if len({n for n, _ in out}) != len(out):
    raise SystemExit(f"--init names must be distinct, got {[n for n, _ in out]}")
  return out


def pretrain(dataset: str, steps: int, root: str, log) -> list[tuple[str, str]]:
  """Runs each available pretraining demo config for `steps` steps on the dataset's shards (a
  finished run in `root/<name>` is reused); returns [(name, workdir)]."""
  from mmearth_jax import config_lib, train
  kind, _, shards = dataset.partition(":")
  if kind != "mmearth":
    raise SystemExit("--pretrain-steps pretrains on MMEarth shards: use --dataset mmearth:<dir>")
  out = []
  for name, (cfg_spec, overrides) in PRETRAIN_CONFIGS.items():
    path = os.path.join(REPO, cfg_spec.split(":")[0])
    if not os.path.exists(path):
      log(f"{name}: {cfg_spec.split(':')[0]} not found, skipped")
      continue
    workdir = os.path.join(root, name)
    cfg = config_lib.load(os.path.join(REPO, cfg_spec),
                          [f"data.path={shards}", f"train.num_steps={steps}",
                           f"optimizer.warmup_steps={max(1, min(20, steps // 10))}",
                           f"checkpoint.every_steps={steps}", "eval.every_steps=0",
                           "train.progress=off", *overrides])
    t0 = time.perf_counter()
    train.train(cfg, workdir, log=lambda m: None)
    log(f"{name}: pretrained {steps} steps in {workdir} ({time.perf_counter() - t0:.0f} s)")
    out.append((name, workdir))
  return out


def recipe(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """configs/segment.py's default recipe with the sweep's fine-tuning flags; each run sets its
  own label_fraction and seed."""
  cfg = config_lib.load(os.path.join(REPO, "configs/segment.py"))
  cfg.epochs, cfg.steps, cfg.max_steps = args.epochs, args.steps, args.max_steps
  cfg.batch_size, cfg.lr, cfg.encoder_lr_scale = args.batch_size, args.lr, args.encoder_lr_scale
  cfg.freeze_fraction = args.freeze_fraction
  cfg.decoder_dims = tuple(int(x) for x in args.decoder_dims.split(",") if x.strip())
  seg.check_config(cfg)
  return cfg


def format_table(fractions: list[float], names: list[str], cells: dict) -> str:
  """Rows = label fraction, columns = init; each cell mIoU % (mean +- std over seeds)."""
  width = max(16, *(len(n) + 2 for n in names))
  lines = ["label fraction" + "".join(f"{n:>{width}}" for n in names)]
  for f in fractions:
    row = f"{100 * f:>13g}%"
    for n in names:
      v = [100 * r["miou"] for r in cells[n][f]]
      text = f"{np.mean(v):.1f}" + (f" +- {np.std(v):.1f}" if len(v) > 1 else "")
      row += f"{text:>{width}}"
    lines.append(row)
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
  p.add_argument("--dataset", default="mmearth:data/demo/shards")
  p.add_argument("--init", action="append", default=[],
                 help="'random' or NAME=CHECKPOINT (repeat); default: random")
  p.add_argument("--fractions", default="1,5,50,100", help="label fractions in percent")
  p.add_argument("--seeds", default="0", help="label-subset / fine-tuning seeds, comma separated")
  # The recipe's fields (configs/segment.py), with the sweep's defaults.
  p.add_argument("--epochs", type=float, default=200.0,
                 help="passes over the labelled tiles (config epochs)")
  p.add_argument("--steps", type=int, default=0, help="> 0: fixed steps for every fraction")
  p.add_argument("--max-steps", type=int, default=300, help="cap on the steps of --epochs")
  p.add_argument("--lr", type=float, default=3e-3, help="decoder peak lr (config lr)")
  p.add_argument("--encoder-lr-scale", type=float, default=1.0,
                 help="encoder peak lr = lr x this once unfrozen")
  p.add_argument("--freeze-fraction", type=float, default=0.25,
                 help="encoder frozen for this fraction of the steps")
  p.add_argument("--batch-size", type=int, default=8, help="tiles per step")
  p.add_argument("--decoder-dims", default="",
                 help="U-Net widths, deepest first, e.g. 64,32,16 (default: the encoder's)")
  p.add_argument("--image-size", type=int, default=32, help="crop / resize (0: as stored)")
  p.add_argument("--variant", default="atto", help="random init without a pretrained encoder")
  p.add_argument("--depths", default="")
  p.add_argument("--dims", default="")
  p.add_argument("--patch-size", type=int, default=8)
  p.add_argument("--pretrain-steps", type=int, default=0,
                 help="> 0: pretrain the demo configs this long first and add them as inits")
  p.add_argument("--pretrain-dir", default="runs/label_fraction_sweep")
  p.add_argument("--json", default="", help="also write the results to this file")
  args = p.parse_args(argv)
  log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
  base = recipe(args)  # a bad value fails before any pretraining or loading

  ints = lambda t: tuple(int(x) for x in t.split(",") if x.strip())  # noqa: E731
  inits = parse_inits(args.init or ["random"])
  if args.pretrain_steps:
    inits = ([i for i in inits if i[0] == "random"] or [("random", None)]) + [
        i for i in inits if i[0] != "random"] + pretrain(args.dataset, args.pretrain_steps,
                                                          args.pretrain_dir, log)
  fractions = [float(x) / 100 for x in args.fractions.split(",")]
  seeds = [int(x) for x in args.seeds.split(",")]

  # Encoders: pretrained ones first, so that random init copies the first one's architecture.
  encoders = {}
  for name, path in inits:
    if path is not None:
      encoders[name] = seg.resolve_encoder(path)
  if any(path is None for _, path in inits):
    like = next(iter(encoders.values()), None)
    if like is not None:
      spec = like[0]
      encoders["random"] = ({**spec}, None, f"random init (the architecture of {like[2]})")
    else:
      encoders["random"] = seg.resolve_encoder(None, variant=args.variant,
                                               depths=ints(args.depths), dims=ints(args.dims),
                                               patch_size=args.patch_size)
  names = [n for n, _ in inits]
  bands = {tuple(e[0]["bands"]) for e in encoders.values()}
  if len(bands) > 1:
    raise SystemExit(f"the encoders take different bands {sorted(bands)}; compare like with like")
  band_list = list(next(iter(bands)))
  kw = dict(image_size=args.image_size or None)
  train = seg.load_segmentation(args.dataset, "train", band_list, **kw)
  test = seg.load_segmentation(args.dataset, "test", band_list, **kw)
  log(f"{args.dataset}: {len(train.images)} train / {len(test.images)} test tiles, "
      f"{train.num_classes} classes; inits: " + ", ".join(f"{n} ({encoders[n][2]})" for n in names))

  cells: dict = {n: {f: [] for f in fractions} for n in names}
  t_all = time.perf_counter()
  for f in fractions:
    for seed in seeds:
      cfg = ml_collections.ConfigDict(base)  # a copy
      cfg.label_fraction, cfg.seed = f, seed  # the seed draws the label subset too
      for n in names:
        spec, params, _ = encoders[n]
        r = seg.run(spec, params, train, test, cfg)
        r.pop("confusion")
        cells[n][f].append(r)
        log(f"{100 * f:g} % seed {seed} {n}: mIoU {100 * r['miou']:.1f}, pixel accuracy "
            f"{100 * r['pixel_accuracy']:.1f} ({r['train_tiles']} tiles, {r['steps']} steps, "
            f"{r['finetune_seconds']:.0f} s)")
  budget = (f"{args.steps} steps" if args.steps else f"{args.epochs:g} epochs" + (
      f" capped at {args.max_steps} steps" if args.max_steps else ""))
  print(f"mIoU (%) on {test.name} ({len(test.images)} tiles), U-Net fine-tuning, {budget}")
  print(format_table(fractions, names, cells))
  summary = {"dataset": args.dataset, "fractions": fractions, "seeds": seeds,
             "inits": {n: encoders[n][2] for n in names},
             "miou": {n: {f"{100 * f:g}%": [r["miou"] for r in cells[n][f]] for f in fractions}
                      for n in names},
             "steps": {f"{100 * f:g}%": cells[names[0]][f][0]["steps"] for f in fractions},
             "train_tiles": {f"{100 * f:g}%": cells[names[0]][f][0]["train_tiles"]
                             for f in fractions},
             "seconds": round(time.perf_counter() - t_all, 1)}
  print(json.dumps(summary))
  if args.json:
    with open(args.json, "w") as fh:
      json.dump({**summary, "results": {n: {f"{100 * f:g}%": cells[n][f] for f in fractions}
                                        for n in names}}, fh, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
