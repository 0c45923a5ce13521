"""Pretraining pays off when labels are scarce (the Embedding Earth / MMEarth result, issue 7).

On the built-in sample with per-tile scene variation (`synth --scene-variation`: each tile has
its own class appearance, illumination and haze, so two labelled tiles do not fix the spectra of
the rest), a U-Net fine-tuned on 1 % of the labels (2 tiles) from an MP-MAE encoder scores a
higher test mIoU than the same U-Net from random weights.

Cost-bounded for the 2-core CI: a reduced ConvNeXt V2 (depths 1-1-2-1, widths 32-256) pretrained
for 1000 steps at 32 px on the pixel-level outputs minus land cover (Sentinel-2, Sentinel-1,
elevation, canopy height: the land-cover maps are the labels under test and must not leak).
Measured here (mIoU points, pretrained - random, label subsets 0-7): +3.6, -0.0, +3.6, +5.5,
+8.1, +0.5, +2.4, +0.8 (mean +3.1; random 16.9 +- 3.9, pretrained 20.0 +- 2.7); the test takes
subsets 0-5 (mean +3.6, 5 wins) to stay within the suite's time (about 5 minutes alone).
"""
import numpy as np
import pytest

from mmearth_jax import config_lib, train
from mmearth_jax.data import convert, synth
from mmearth_jax.eval import segmentation as seg
from _env import REPO

# Not in `make test`: about 5 minutes alone on 2 cores, and its margin is within the spread of
# 2-tile fine-tunes (on another CPU of this workplace it measured +5.4, +3.1, -0.1, -2.2, +7.1,
# -9.7 and failed). `make test-slow` runs it.
pytestmark = [pytest.mark.usefixtures("jax_compilation_cache"), pytest.mark.slow]

SUBSETS = range(6)
MIN_MEAN_GAIN = 0.01  # mIoU (as a fraction): the pretrained mean must lead by a clear point
MIN_WINS = 4  # and win in most label subsets, not through one lucky draw


def test_pretrained_init_beats_random_init_at_one_percent_of_labels(tmp_path):
  h5, shards = str(tmp_path / "h5"), str(tmp_path / "shards")
  synth.write_sample(h5, n=256, size=64, seed=0, scene_variation=True)
  convert.convert(h5, shards, shards=8, log=lambda *a: None)
  cfg = config_lib.load(f"{REPO}/configs/mp_mae.py:demo", [
      f"data.path={shards}", "data.crop=32",
      "data.outputs=sentinel2,sentinel1,aster,canopy_height_eth",
      "model.depths=(1, 1, 2, 1)", "model.dims=(32, 64, 128, 256)",
      "optimizer.base_lr=8e-2", "train.num_steps=1000", "train.log_every=500",
      "eval.every_steps=0", "checkpoint.every_steps=1000", "train.progress=off",
      "mesh.num_devices=1"])  # one device: 8 simulated ones on 2 cores only add overhead
  workdir = str(tmp_path / "pretrain")
  train.train(cfg, workdir, log=lambda m: None)

  spec, params, _ = seg.resolve_encoder(workdir)
  data = {split: seg.load_segmentation(f"mmearth:{shards}", split, spec["bands"], image_size=32)
          for split in ("train", "test")}
  gains, rows = [], []
  for s in SUBSETS:
    # The sweep's defaults; the seed draws the label subset too.
    ft = config_lib.load(f"{REPO}/configs/segment.py", [
        "epochs=200", "max_steps=300", "label_fraction=0.01", f"seed={s}"])
    miou = {name: seg.run(spec, p, data["train"], data["test"], ft)["miou"]
            for name, p in (("random", None), ("mp_mae", params))}
    gains.append(miou["mp_mae"] - miou["random"])
    rows.append(f"subset {s}: random {100 * miou['random']:.1f}, mp_mae {100 * miou['mp_mae']:.1f}")
  report = "; ".join(rows)
  assert np.mean(gains) >= MIN_MEAN_GAIN, report
  assert sum(g > 0 for g in gains) >= MIN_WINS, report
