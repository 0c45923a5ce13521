"""MP-MAE's loss at step 0 of continued pretraining in the two masked-forward geometries.

MMEarth pretrains with a sparse (MinkowskiEngine) encoder and fine-tunes with a dense one; the
two differ at the stem (`models.convnextv2` docstring). This script takes a pretrained MP-MAE
(a model folder, a training workdir, or a reference checkpoint imported with `mmearth-jax
from-torch --checkpoint mmearth.pth --out DIR`) and the shards to continue on, and prints the
MP-MAE loss, total and per output, on the same batches and the same patch masks in both
geometries: what continuing the run in the other geometry would start from.

    python benchmarks/pretrain_geometry.py data/demo/run --data data/demo/shards [--batches 8]
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

from mmearth_jax import config_lib, pretrained
from mmearth_jax.data import pipeline
from mmearth_jax.models.convnextv2 import MASKED_GEOMETRIES
from mmearth_jax.objectives.mp_mae import mp_mae_loss


def batches(shards: str, outputs: str, batch: int, n: int) -> list[dict]:
  cfg = config_lib.data_config()
  cfg.update(path=shards, outputs=outputs, global_batch_size=batch, num_epochs=0)
  it = iter(pipeline.make_dataset(cfg))
  out = [jax.tree.map(np.asarray, next(it)) for _ in range(n)]
  it.close()
  return out


def losses(model, params, data: list[dict], mask_ratio: float) -> dict[str, float]:
  loss = jax.jit(lambda b, k: mp_mae_loss(model, params, b, k, mask_ratio=mask_ratio,
                                          train=False))
  rows = [loss(b, jax.random.key(i)) for i, b in enumerate(data)]  # same masks in each geometry
  out = {"total": float(np.mean([float(t) for t, _ in rows]))}
  out.update({k: float(np.mean([float(r[1][k]) for r in rows])) for k in rows[0][1]})
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("checkpoint", help="MP-MAE model folder or training workdir")
  ap.add_argument("--data", required=True, help="shards written by `mmearth-jax convert`")
  ap.add_argument("--outputs", default="all", help="the data.outputs the model was trained on")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--batches", type=int, default=8)
  ap.add_argument("--mask-ratio", type=float, default=0.6)
  args = ap.parse_args()
  model_file = pretrained.load(args.checkpoint)
  if model_file.spec["arch"] != "mp_mae":
    raise SystemExit(f"{args.checkpoint}: an {model_file.spec['arch']} model, not mp_mae")
  data = batches(args.data, args.outputs, args.batch, args.batches)
  base = pretrained.build(model_file.spec)
  table = {g: losses(base.clone(masked_geometry=g), model_file.params, data, args.mask_ratio)
           for g in MASKED_GEOMETRIES}
  size, patch = data[0]["image"].shape[1], base.patch_size
  print(f"{args.checkpoint}: {args.batches} batches of {args.batch}, {size} px crops, "
        f"{patch} px patches, mask ratio {args.mask_ratio}, the same masks in both geometries")
  print(f"{'loss':<20}" + "".join(f"{g:>12}" for g in MASKED_GEOMETRIES) + f"{'rel diff':>12}")
  for key in table["dense"]:
    d, s = table["dense"][key], table["sparse"][key]
    print(f"{key:<20}{d:>12.4f}{s:>12.4f}{(d - s) / max(abs(s), 1e-12):>+12.1%}")


if __name__ == "__main__":
  main()
