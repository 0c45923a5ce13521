"""Segmentation fine-tuning: the U-Net on ConvNeXt V2 stages, the frozen-then-trained encoder,
mIoU, label fractions, the MMEarth and GEO-Bench segmentation loaders, `mmearth-jax segment` and
the label-fraction sweep.

Every fine-tuning here uses one tiny architecture on one 16 px GEO-Bench task, so the two
jitted steps compile once for the whole module (`segmentation._programs` is cached per model).
"""
import json
import os
import sys

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmearth_jax import config_lib, testing
from mmearth_jax import modalities as M
from mmearth_jax.eval import datasets as D
from mmearth_jax.eval import geobench_format as G
from mmearth_jax.eval import segmentation as S
from mmearth_jax.models import unet
from mmearth_jax.models.convnextv2 import ConvNeXtV2
from mmearth_jax.models.mp_mae import MPMAE

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))
S2_12 = M.S2_INPUT_BANDS


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  """A 3-class GEO-Bench segmentation task, 16 px, all 13 Sentinel-2 bands."""
  root = str(tmp_path_factory.mktemp("geobench_seg"))
  return testing.write_geobench_segmentation_sample(root, name="m-cashew-plant", n=20, size=16,
                                                    num_classes=3, seed=0)


@pytest.fixture(scope="module")
def splits(task):
  return (D.load_segmentation(f"geobench:{task}", "train", S2_12),
          D.load_segmentation(f"geobench:{task}", "test", S2_12))


def tiny_encoder():
  return unet.encoder_spec_for("atto", **TINY, patch_size=8, bands=S2_12)


def recipe(**fields):
  """configs/segment.py's default recipe with `fields` set (a misspelt field raises)."""
  cfg = config_lib.load("configs/segment.py")
  for key, value in fields.items():
    setattr(cfg, key, value)
  return cfg


# ---------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("stem,patch,size", [("mmearth", 8, (37, 45)), ("mmearth", 16, (33, 40)),
                                             ("official", 4, (64, 67)),
                                             ("official", 4, (45, 38))])
def test_unet_logits_have_the_input_size_for_both_stems(stem, patch, size):
  model = unet.UNetSegmenter(5, **TINY, stem=stem, patch_size=patch, decoder_dims=(12, 8, 4))
  x = jax.random.normal(jax.random.key(0), (2, *size, 12))
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  if (stem, patch, size) == ("mmearth", 8, (37, 45)):
    # The skips are not a factor of two apart: 35, 17, 8, 4 rows (unpadded 3x3 stem conv).
    stages = jax.eval_shape(lambda p, v: ConvNeXtV2(**TINY, stem=stem, patch_size=patch).apply(
        {"params": p}, v, return_stages=True), params["encoder"], x)
    assert [s.shape[1] for s in stages] == [35, 17, 8, 4]
  out = jax.eval_shape(model.apply, {"params": params}, x)
  assert out.shape == (2, *size, 5) and out.dtype == jnp.float32
  assert sorted(params) == ["classifier", "decoder_0", "decoder_1", "decoder_2", "encoder"]
  assert params["decoder_0"]["conv0"]["kernel"].shape == (3, 3, 16 + 16, 12)


def test_unet_decoder_widths():
  model = unet.UNetSegmenter(4, **TINY)
  assert model.widths() == (16, 16, 8)  # default: the skips' encoder widths, deepest first
  x = jnp.zeros((1, 21, 26, 12))
  with pytest.raises(ValueError, match="decoder_dims"):
    jax.eval_shape(unet.UNetSegmenter(4, **TINY, decoder_dims=(8, 8)).init, jax.random.key(0), x)


def test_a_pretrained_mp_mae_encoder_drops_into_the_segmenter():
  x = jnp.zeros((1, 16, 16, 12))  # the size of the GEO-Bench task: init compiles once
  mpmae = MPMAE(outputs={"sentinel2": S2_12, "esa_worldcover": ("label",)}, **TINY,
                patch_size=8, decoder_dim=16)
  mp_params = jax.eval_shape(mpmae.init, jax.random.key(0), x, jnp.zeros((1, 2, 2)))["params"]
  encoder = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), mp_params["encoder"])
  model = S.build_segmenter(tiny_encoder(), 3)
  params = S.init_params(model, (16, 16, 12), 0, encoder)
  assert all(np.all(a == 0.5) for a in jax.tree.leaves(params["encoder"]))
  assert not all(np.all(a == 0.5) for a in jax.tree.leaves(params["classifier"]))
  bad = dict(encoder, stem_norm={"scale": np.ones(3), "bias": np.zeros(8)})
  with pytest.raises(ValueError, match="stem_norm"):
    S.init_params(model, (16, 16, 12), 0, bad)
  with pytest.raises(ValueError, match="missing"):
    S.init_params(model, (16, 16, 12), 0, {k: v for k, v in encoder.items() if k != "norm"})


# -------------------------------------------------------------------------------- the metrics


def test_miou_matches_a_hand_computed_confusion_matrix():
  target = np.array([[0, 0, 1, 1], [2, 2, -1, 3]])
  pred = np.array([[0, 1, 1, 1], [2, 0, 3, 3]])
  cm = S.confusion_matrix(pred, target, 5)
  want = np.zeros((5, 5), int)
  want[0, 0] = 1; want[0, 1] = 1  # noqa: E702
  want[1, 1] = 2
  want[2, 2] = 1; want[2, 0] = 1  # noqa: E702
  want[3, 3] = 1  # the -1 pixel (predicted 3) is not counted
  np.testing.assert_array_equal(cm, want)
  m = S.segmentation_metrics(cm, ["a", "b", "c", "d", "e"])
  # IoU = TP / (TP + FP + FN): a 1/3, b 2/3, c 1/2, d 1; e absent from both: not scored.
  iou = {"a": 1 / 3, "b": 2 / 3, "c": 1 / 2, "d": 1.0}
  for k, v in iou.items():
    assert m["iou"][k] == pytest.approx(v)
  assert m["iou"]["e"] is None and m["classes_scored"] == 4
  assert m["miou"] == pytest.approx(np.mean(list(iou.values())))
  assert m["pixel_accuracy"] == pytest.approx(5 / 7) and m["num_pixels"] == 7
  # A class only predicted (false positives) counts, with IoU 0.
  m2 = S.segmentation_metrics(S.confusion_matrix(np.array([4, 0]), np.array([0, 0]), 5))
  assert m2["iou"]["4"] == 0.0 and m2["miou"] == pytest.approx(0.25)
  with pytest.raises(ValueError, match="outside"):
    S.confusion_matrix(np.array([5]), np.array([0]), 5)


def test_the_loss_ignores_unlabelled_pixels():
  key = jax.random.key(0)
  logits = jax.random.normal(key, (2, 4, 4, 3))
  masks = jnp.asarray(np.random.default_rng(0).integers(-1, 3, (2, 4, 4)))
  loss = S.pixel_cross_entropy(logits, masks)
  keep = np.asarray(masks) >= 0
  lp = np.asarray(jax.nn.log_softmax(logits))
  want = -np.mean(np.take_along_axis(lp, np.maximum(np.asarray(masks), 0)[..., None], -1)[..., 0][
      keep])
  assert float(loss) == pytest.approx(want, rel=1e-5)
  # Anything at an ignored pixel changes neither the loss nor its gradient elsewhere.
  noisy = jnp.where((masks < 0)[..., None], 100.0 * logits, logits)
  assert float(S.pixel_cross_entropy(noisy, masks)) == pytest.approx(float(loss), rel=1e-6)
  g = jax.grad(S.pixel_cross_entropy)(logits, masks)
  assert bool(jnp.all(g[masks < 0] == 0))
  assert float(S.pixel_cross_entropy(logits, -jnp.ones_like(masks))) == 0.0


# -------------------------------------------------------------------------- label fractions


def test_label_subsets_are_seeded_nested_and_never_empty():
  a = S.label_subset(200, 0.05, seed=3)
  np.testing.assert_array_equal(a, S.label_subset(200, 0.05, seed=3))
  assert len(a) == 10 and len(set(a.tolist())) == 10 and np.all(np.diff(a) > 0)
  assert not np.array_equal(a, S.label_subset(200, 0.05, seed=4))
  small, mid, full = (set(S.label_subset(200, f, seed=3).tolist()) for f in (0.01, 0.5, 1.0))
  assert small <= set(a.tolist()) <= mid <= full == set(range(200))
  assert len(S.label_subset(30, 0.01, seed=0)) == 1  # at least one tile
  with pytest.raises(ValueError, match="fraction"):
    S.label_subset(30, 0.0)


# ---------------------------------------------------------------------------------- loaders


def test_geobench_segmentation_round_trip(task, splits):
  train, test = splits
  part = json.load(open(os.path.join(task, "default_partition.json")))
  assert len(train.images) == len(part["train"]) and len(test.images) == len(part["test"])
  assert train.images.shape[1:] == (16, 16, 12) and train.masks.dtype == np.int32
  assert train.num_classes == 3 and train.class_names == ["class_0", "class_1", "class_2"]
  stats = json.load(open(os.path.join(task, "band_stats.json")))
  for i, name in enumerate(part["train"][:3]):
    with h5py.File(os.path.join(task, f"{name}.hdf5")) as f:
      np.testing.assert_array_equal(train.masks[i], np.asarray(f["label"]))
      red = np.asarray(f["04 - Red"], np.float64)
    st = stats["04 - Red"]
    np.testing.assert_allclose(train.images[i, ..., S2_12.index("B4")],
                               (red - st["mean"]) / st["std"], rtol=1e-4, atol=1e-4)
  # The label map is stored the way geobench's write_sample_hdf5 stores a label Band.
  with h5py.File(os.path.join(task, f"{part['train'][0]}.hdf5")) as f:
    attrs = G.read_attrs(f)
  assert attrs["bands_order"][-1] == "label"
  assert G.stub_class(attrs["label"]["band_info"]) == "SegmentationClasses"
  assert G.pixel_label_classes(attrs) == (3, ["class_0", "class_1", "class_2"])
  assert G.read_task_specs(task)["segmentation"]
  resized = D.load_segmentation(f"geobench:{task}", "test", S2_12, image_size=24)
  assert resized.images.shape[1:3] == (24, 24) and set(np.unique(resized.masks)) <= {0, 1, 2}


def test_geobench_segmentation_errors_name_the_file(task, tmp_path):
  import shutil
  copy = str(tmp_path / "m-cashew-plant")
  shutil.copytree(task, copy)
  name = json.load(open(os.path.join(copy, "default_partition.json")))["train"][1]
  path = os.path.join(copy, f"{name}.hdf5")
  with h5py.File(path, "a") as f:
    f["label"][0, 0] = 7  # outside the 3 classes
  with pytest.raises(D.EvalDataError, match=rf"{name}\.hdf5.*outside \[0, 3\)"):
    D.load_segmentation(f"geobench:{copy}", "train", S2_12)
  with h5py.File(path, "a") as f:
    del f["label"]
  with pytest.raises(G.GeoBenchFormatError, match=rf"{name}\.hdf5: no HDF5 dataset 'label'"):
    D.load_segmentation(f"geobench:{copy}", "train", S2_12)
  # The classification loader points segmentation tasks to the segmentation loader.
  with pytest.raises(ValueError, match="load_segmentation"):
    D.load(f"geobench:{task}", "train", S2_12)
  # And the segmentation loader refuses a classification task.
  cls = testing.write_geobench_sample(str(tmp_path), name="m-eurosat-like", n=6, size=8,
                                      num_classes=2)
  with pytest.raises(D.EvalDataError, match="not a segmentation task"):
    D.load_segmentation(f"geobench:{cls}", "train", S2_12)
  with pytest.raises(D.EvalDataError, match="mmearth:<shards folder> or geobench"):
    D.load_segmentation("tfds:eurosat", "train", S2_12)


def test_mmearth_land_cover_maps_share_tiles_with_the_classification_loader(shards64):
  seg_train = D.load_segmentation(f"mmearth:{shards64}", "train", S2_12, image_size=32)
  seg_test = D.load_segmentation(f"mmearth:{shards64}", "test", S2_12, image_size=32)
  cls_train = D.load(f"mmearth:{shards64}", "train", S2_12, image_size=32)
  assert seg_train.num_classes == 11 and seg_train.class_names == list(M.ESA_WORLDCOVER_CLASSES)
  assert seg_train.masks.min() >= -1 and seg_train.masks.max() < 11
  assert len(seg_train.images) + len(seg_test.images) <= 48 and len(seg_test.images) > 0
  # Same tiles, images and z-score; the classification label is the map's dominant class.
  np.testing.assert_array_equal(seg_train.images, cls_train.images)
  dominant = [np.bincount(m[m >= 0], minlength=11).argmax() for m in seg_train.masks]
  np.testing.assert_array_equal(dominant, cls_train.labels)


# ------------------------------------------------------------------------------- fine-tuning


def test_the_encoder_is_frozen_then_trained(splits):
  train, _ = splits
  model = S.build_segmenter(tiny_encoder(), train.num_classes)
  params = S.init_params(model, train.images.shape[1:], seed=0)
  cfg = recipe(steps=6, freeze_fraction=0.5, lr=1e-2, warmup_steps=1)
  seen = {}
  S.finetune(model, params, train, cfg, on_step=lambda step, p: seen.__setitem__(
      step, jax.tree.map(np.asarray, p)))
  enc0 = params["encoder"]
  for step in (1, 2, 3):  # bit-identical while frozen: no update, no weight decay
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(enc0),
                                                    jax.tree.leaves(seen[step]["encoder"])))
    # ... while the decoder trains.
    assert not np.array_equal(seen[step]["classifier"]["kernel"], params["classifier"]["kernel"])
  for step in (4, 6):
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(enc0),
                                                        jax.tree.leaves(seen[step]["encoder"]))]
    assert sum(changed) > len(changed) // 2
  # The caller's parameters survive the donated steps.
  assert np.isfinite(np.asarray(jax.tree.leaves(params["encoder"])[0])).all()
  dec_lr, enc_lr = S.schedules(cfg, len(train.images))
  assert np.all(enc_lr[:3] == 0) and np.all(enc_lr[3:] > 0) and np.all(dec_lr > 0)
  assert dec_lr[0] == pytest.approx(1e-2) and enc_lr[3] == pytest.approx(1e-2)  # warmup of 1


def test_an_epoch_budget_gives_small_fractions_few_steps():
  cfg = recipe(epochs=200, batch_size=8)
  assert S.num_steps(cfg, 2) == 50 and S.freeze_steps(cfg, 2) == 12  # 50 of 200 epochs frozen
  assert S.num_steps(cfg, 200) == 5000
  assert S.num_steps(recipe(epochs=200, max_steps=300), 200) == 300
  assert S.num_steps(recipe(steps=7), 200) == 7
  with pytest.raises(ValueError, match="freeze_fraction"):
    S.check_config(recipe(freeze_fraction=1.5))
  with pytest.raises(ValueError, match="label_fraction"):
    S.check_config(recipe(label_fraction=0.0))


def test_the_default_recipe_is_the_old_segment_defaults():
  """configs/segment.py's default variant holds what `segment`'s flags and FinetuneConfig
  defaulted to before the recipe became a config."""
  want = dict(dataset="", data_dir="", partition="default", train_split="train",
              test_split="test", image_size=0, max_examples=0, label_fraction=1.0,
              checkpoint="random", variant="atto", depths=(), dims=(), stem="mmearth",
              patch_size=8, bands="", epochs=200.0, steps=0, max_steps=0, batch_size=8, lr=3e-3,
              encoder_lr_scale=1.0, weight_decay=0.05, warmup_steps=5, freeze_fraction=0.25,
              flips=True, decoder_dims=(), eval_batch_size=32, seed=0, json="", out="")
  cfg = config_lib.load("segment")
  assert cfg.to_dict() == want
  assert config_lib.load("segment:mmearth").to_dict() == want
  demo = config_lib.load("configs/segment.py:demo").to_dict()
  assert {k: v for k, v in demo.items() if want[k] != v} == {
      "dataset": "mmearth:data/demo/shards", "image_size": 32, "label_fraction": 0.01,
      "max_steps": 300}


def test_fine_tuning_learns_the_geobench_task(splits):
  train, test = splits
  cfg = recipe(steps=40, lr=1e-2, warmup_steps=1, label_fraction=1.0)
  result = S.run(tiny_encoder(), None, train, test, cfg)
  assert result["train_tiles"] == len(train.images) and result["steps"] == 40
  # Class spectra are well apart: far above the 1/3 of a constant prediction.
  assert result["miou"] > 0.6 and result["pixel_accuracy"] > 0.8
  cfg.label_fraction = 0.1
  few = S.run(tiny_encoder(), None, train, test, cfg)
  assert few["train_tiles"] == 1


def test_segment_cli_writes_metrics(task, tmp_path, capsys):
  from mmearth_jax import cli
  out = str(tmp_path / "seg.json")
  # The default config (configs/segment.py's mmearth variant) with overrides.
  rc = cli.main(["segment", f"--config.dataset=geobench:{task}", "--config.depths=1,1,1,1",
                 "--config.dims", "8,16,16,16", "--config.steps=4", "--config.freeze_fraction=0.5",
                 "--config.label_fraction=0.5", f"--config.json={out}"])
  assert rc == 0
  text = capsys.readouterr().out
  assert "mIoU" in text and "pixel accuracy" in text and "class_2" in text
  assert f"geobench:{task}: 12 train / 4 test tiles of 16x16 px, 3 classes; encoder: random" in text
  assert "fine-tuned on 6 tiles (50 % of the labels), 4 steps (" in text
  result = json.load(open(out))
  assert result["train_tiles"] == 6 and result["freeze_steps"] == 2 and 0 <= result["miou"] <= 1
  assert result["dataset"] == f"geobench:{task}" and result["encoder"].startswith("random init")
  assert cli.main(["segment", f"--config.dataset=geobench:{task}",
                   "--config.label_fraction=2"]) == 2
  assert "label_fraction" in capsys.readouterr().err
  assert cli.main(["segment", "--config.steps=4"]) == 2  # the default variant has no dataset
  assert "config dataset is empty" in capsys.readouterr().err
  sub = cli.build_parser()._subparsers._group_actions[0].choices["segment"]
  assert all(a.help for a in sub._actions if a.dest != "help")


def test_segment_cli_runs_the_demo_config(task, capsys):
  """`--config segment:demo` plus overrides: the demo's 1 % of the labels on the tiny task."""
  from mmearth_jax import cli
  rc = cli.main(["segment", "--config", "segment:demo", f"--config.dataset=geobench:{task}",
                 "--config.image_size=0", "--config.depths=(1, 1, 1, 1)",
                 "--config.dims=(8, 16, 16, 16)", "--config.steps=3"])
  assert rc == 0
  text = capsys.readouterr().out
  assert "fine-tuned on 1 tiles (1 % of the labels), 3 steps (24 epochs, encoder frozen for 1)" \
      in text
  assert "step 3/3: loss" in text and "mIoU" in text


def test_label_fraction_sweep_prints_a_table(task, capsys):
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
  import label_fraction_sweep as sweep
  rc = sweep.main(["--dataset", f"geobench:{task}", "--init", "random", "--fractions", "10,100",
                   "--steps", "3", "--depths", "1,1,1,1", "--dims", "8,16,16,16",
                   "--image-size", "0", "--seeds", "0,1"])
  assert rc == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[1].split() == ["label", "fraction", "random"]
  assert lines[2].split()[0] == "10%" and lines[3].split()[0] == "100%" and "+-" in lines[2]
  summary = json.loads(lines[-1])
  assert summary["train_tiles"] == {"10%": 1, "100%": 12} and len(summary["miou"]["random"]["10%"]) == 2
  with pytest.raises(SystemExit, match="NAME=CHECKPOINT"):
    sweep.parse_inits(["mp_mae"])


def test_sweep_pretrains_mp_mae_without_the_labels_it_evaluates():
  """The sweep's labels are land-cover maps: its MP-MAE pretraining must not reconstruct them
  (a leak of what the label fraction withholds), and keeps every other output."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
  import label_fraction_sweep as sweep
  from mmearth_jax import config_lib
  repo = os.path.dirname(os.path.dirname(__file__))
  spec, overrides = sweep.PRETRAIN_CONFIGS["mp_mae"]
  cfg = config_lib.load(os.path.join(repo, spec), overrides)
  outputs = M.resolve_outputs(cfg.data.outputs, M.S2_INPUT_BANDS)
  assert not {"esa_worldcover", "dynamic_world"} & set(outputs)
  assert set(outputs) == set(M.ALL_OUTPUTS) - {"esa_worldcover", "dynamic_world"}
  assert cfg.data.crop == 32  # the sweep's image size
