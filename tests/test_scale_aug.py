"""Scale-MAE's scale augmentation: the crop / resize / GSD rules checked against torch's
interpolate (kornia 0.6.9's calls), GFM's crop against PIL, the three sources (shards, image
folder, mocked TFDS), errors, and resume."""
import os

import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmearth_jax.data import scale_aug as S

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _cfg(path="", images="", input="rgb", **scale):
  c = ml_collections.ConfigDict()
  c.path = path
  c.images = images
  c.input = input
  c.outputs = "none"
  c.scale = ml_collections.ConfigDict(dict(input_size=16, target_size=32, scale_min=0.2,
                                           scale_max=1.0, base_resolution=2.5, pre_crop=0,
                                           flip=True))
  c.scale.update(scale)
  c.mean = MEAN
  c.std = STD
  c.global_batch_size = 4
  c.seed = 0
  c.num_epochs = 0
  c.workers = 0
  c.read_threads = 2
  c.prefetch = 2
  return c


def _batches(cfg, n, state=None, **kw):
  it, info = S.make_dataset(cfg, process_index=0, process_count=1, **kw)
  it = iter(it)
  if state is not None:
    it.set_state(state)
  out = [next(it) for _ in range(n)]
  st = it.get_state()
  it.close()
  return out, st, info


def _torch_resize(x, size, mode, align_corners=True):
  """(H, W, C) numpy -> (size, size, C) via F.interpolate (no antialias); align_corners=True is
  what kornia 0.6.9's RandomResizedCrop ("slice") and Resize pass, as the reference runs them."""
  t = torch.from_numpy(np.ascontiguousarray(x, np.float64)).permute(2, 0, 1)[None]
  y = F.interpolate(t, size=(size, size), mode=mode, align_corners=align_corners)
  return y[0].permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A few PNG / JPEG files, one non-square and smaller than the pre-crop, one in a subfolder."""
  d = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  os.makedirs(d / "sub")
  Image.fromarray(rng.integers(1, 256, (40, 40, 3), dtype=np.uint8)).save(d / "a.png")
  Image.fromarray(rng.integers(1, 256, (20, 30, 3), dtype=np.uint8)).save(d / "b.jpg")
  Image.fromarray(rng.integers(1, 256, (56, 48), dtype=np.uint8)).save(d / "sub" / "c.png")
  Image.fromarray(rng.integers(1, 256, (36, 44, 3), dtype=np.uint8)).save(d / "sub" / "d.jpeg")
  (d / "notes.txt").write_text("not an image")
  return str(d)


def _check_batch(b, n, inp, tgt, c):
  assert b["image"].shape == (n, inp, inp, c) and b["image"].dtype == np.float32
  assert b["target"].shape == (n, tgt, tgt, c) and b["target"].dtype == np.float32
  assert b["gsd"].shape == (n,) and b["gsd"].dtype == np.float32
  assert b["target_gsd"].shape == (n,) and b["target_gsd"].dtype == np.float32
  for x in b.values():
    assert np.isfinite(x).all()


# ---------------------------------------------------------------------------------------------
# The augmentation itself.


def test_shapes_and_gsd_follow_the_crop_side():
  aug = S.ScaleAugment(16, 32, 0.2, 1.0, base_resolution=2.5, flip=True, return_crop=True)
  x = np.random.default_rng(0).normal(size=(40, 40, 3)).astype(np.float32)
  sides = set()
  for i in range(64):
    out = aug(dict(image=x), np.random.default_rng(i))
    assert out["image"].shape == (16, 16, 3) and out["target"].shape == (32, 32, 3)
    s = int(out["crop"])
    sides.add(s)
    assert round(np.sqrt(0.2) * 40) <= s <= 40
    np.testing.assert_allclose(out["gsd"], 2.5 * (s - 1) / 16, rtol=1e-6)
    np.testing.assert_allclose(out["target_gsd"], 2.5 * (s - 1) / 32, rtol=1e-6)
  assert len(sides) > 10  # the scale is really drawn


def test_gsd_is_monotone_in_the_crop_side():
  """A smaller crop stretched to the same target covers less ground per pixel: finer GSD."""
  x = np.zeros((64, 64, 3), np.float32)
  gsd = {}
  for frac in (0.0625, 0.25, 0.5625, 1.0):
    aug = S.ScaleAugment(16, 32, frac, frac, base_resolution=2.5, return_crop=True)
    out = aug(dict(image=x), np.random.default_rng(0))
    assert out["crop"] == round(np.sqrt(frac) * 64)
    gsd[frac] = float(out["gsd"])
  values = [gsd[f] for f in sorted(gsd)]
  assert values == sorted(values) and len(set(values)) == 4
  assert gsd[1.0] == pytest.approx(2.5 * 63 / 16) and gsd[0.25] == pytest.approx(2.5 * 31 / 16)


@pytest.mark.parametrize("size,target,inp", [(37, 48, 24), (80, 48, 20), (32, 32, 32)])
@pytest.mark.parametrize("align_corners", [True, False])
def test_full_crop_is_torch_bicubic_then_bilinear(size, target, inp, align_corners):
  x = np.random.default_rng(size).normal(size=(size, size, 4)).astype(np.float32)
  aug = S.ScaleAugment(inp, target, 1.0, 1.0, base_resolution=1.0, flip=False, return_crop=True,
                       align_corners=align_corners)
  out = aug(dict(image=x), np.random.default_rng(0))
  assert out["crop"] == size
  ref_t = _torch_resize(x, target, "bicubic", align_corners)
  np.testing.assert_allclose(out["target"], ref_t, atol=2e-5)
  np.testing.assert_allclose(out["image"],
                             _torch_resize(out["target"], inp, "bilinear", align_corners),
                             atol=2e-5)


def test_crop_is_a_window_of_the_image():
  """A partial crop with target = side is the window itself (resizing to the same size is the
  identity), found at exactly one place of a generic image."""
  x = np.random.default_rng(1).normal(size=(24, 24, 2)).astype(np.float32)
  aug = S.ScaleAugment(9, 9, 0.14, 0.14, flip=False, return_crop=True)
  out = aug(dict(image=x), np.random.default_rng(3))
  assert out["crop"] == 9
  hits = [(i, j) for i in range(16) for j in range(16)
          if np.array_equal(x[i:i + 9, j:j + 9], out["target"])]
  assert len(hits) == 1


def test_flip_mirrors_the_image():
  x = np.random.default_rng(2).normal(size=(8, 8, 1)).astype(np.float32)
  aug = S.ScaleAugment(8, 8, 1.0, 1.0, flip=True)
  seen = set()
  for i in range(16):
    t = aug(dict(image=x), np.random.default_rng(i))["target"]
    assert np.array_equal(t, x) or np.array_equal(t, x[:, ::-1])
    seen.add(np.array_equal(t, x))
  assert seen == {True, False}


def test_crop_resizes_the_box_alone_with_corners_aligned():
  """kornia 0.6.9's RandomResizedCrop ("slice") cuts the box out and resizes it with
  align_corners=True: a 3 x 3 bump [0 1 0] x [0 1 0] to 5 x 5 is b x b with
  b = [0, 19/32, 1, 19/32, 0] (Keys a = -0.75 at t = 1/2: taps -3/32, 19/32, 19/32, -3/32,
  the outer tap clamped to the box), and K.Resize back to 3 x 3 picks b[0], b[2], b[4]. The
  1000s around the box never leak in."""
  x = np.full((9, 9, 1), 1000.0, np.float32)
  bump = np.outer([0.0, 1.0, 0.0], [0.0, 1.0, 0.0])
  x[2:5, 4:7, 0] = bump
  aug = S.ScaleAugment(3, 5, 1 / 9, 1 / 9, base_resolution=2.5, return_crop=True)
  aug.crop_box = lambda h, w, rng: (2, 4, 3)  # the box under test
  out = aug(dict(image=x), np.random.default_rng(0))
  b = np.array([0.0, 19 / 32, 1.0, 19 / 32, 0.0])
  np.testing.assert_allclose(out["target"][..., 0], np.outer(b, b), atol=1e-6)
  np.testing.assert_allclose(out["image"][..., 0], bump, atol=1e-6)


def test_gsd_uses_the_inclusive_box_corners():
  """The reference: ratio = (top-right x - top-left x) / target height, with kornia's box corners
  x0 and x0 + s - 1; target_gsd = base * ratio, gsd = target_gsd * target / input."""
  x = np.zeros((40, 40, 3), np.float32)
  aug = S.ScaleAugment(16, 32, 0.25, 0.25, base_resolution=2.5, flip=False, return_crop=True)
  out = aug(dict(image=x), np.random.default_rng(0))
  assert out["crop"] == 20
  assert out["target_gsd"] == np.float32(2.5 * 19 / 32)
  assert out["gsd"] == np.float32(2.5 * 19 / 16)


def _pil_resized_crop(x, box, size):
  """torchvision's RandomResizedCrop on a PIL image: crop, then PIL's bilinear resize (one float
  "F" image per channel)."""
  top, left, h, w = (int(v) for v in box)
  return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c]), mode="F")
                              .crop((left, top, left + w, top + h))
                              .resize((size, size), Image.BILINEAR)) for c in range(x.shape[-1])],
                  axis=-1)


def test_gfm_resized_crop_is_pil_bilinear():
  """GFM crops PIL images: the resize antialiases when shrinking (400 -> 192 halves the std of
  noise) and is plain bilinear when enlarging; the same numbers as PIL either way."""
  aug = S.ResizedCrop(192, flip=False, return_box=True)
  for shape in ((400, 400), (150, 170)):
    x = np.random.default_rng(0).normal(128, 50, size=(*shape, 2)).astype(np.float32)
    for seed in range(3):
      out = aug(dict(image=x), np.random.default_rng(seed))
      want = _pil_resized_crop(x, out["box"], 192)
      assert abs(out["image"].std() / want.std() - 1) < 1e-4, (shape, seed)
      np.testing.assert_allclose(out["image"], want, atol=1e-3, err_msg=f"{shape} {seed}")
  assert want.std() > 0.6 * x.std()  # enlarging: no smoothing beyond the bilinear's
  x = np.random.default_rng(0).normal(128, 50, size=(400, 400, 1)).astype(np.float32)
  shrunk = aug(dict(image=x), np.random.default_rng(0))["image"]
  assert shrunk.std() < 0.6 * x.std()  # antialiased: not the ~x.std() of a point sample


def test_recipes_default_to_the_reference_resizes():
  """configs/scale_mae.py: kornia's align_corners=True; configs/gfm.py: PIL's antialiased
  bilinear. The keys switch back to half-pixel / no-antialias resizes."""
  from mmearth_jax import config_lib
  root = os.path.join(os.path.dirname(__file__), "..", "configs")
  x = np.random.default_rng(0).normal(size=(40, 40, 1)).astype(np.float32)
  for variant in ("vitl", "demo"):
    cfg = config_lib.load(f"{os.path.join(root, 'scale_mae.py')}:{variant}")
    assert S.ScaleAugment.from_config(cfg.data.scale).align_corners is True
  sc = cfg.data.scale
  sc.update(align_corners=False, scale_min=1.0, flip=False)  # the whole image, half-pixel
  out = S.ScaleAugment.from_config(sc)(dict(image=x), np.random.default_rng(0))
  np.testing.assert_allclose(out["target"], _torch_resize(x, sc.target_size, "bicubic", False),
                             atol=2e-5)
  for variant in ("convnextv2_base", "demo"):
    cfg = config_lib.load(f"{os.path.join(root, 'gfm.py')}:{variant}")
    assert S.ResizedCrop.from_config(cfg.data.resized_crop).antialias is True
  cfg.data.resized_crop.antialias = False
  aug = S.ResizedCrop.from_config(cfg.data.resized_crop, return_box=True)
  out = aug(dict(image=x), np.random.default_rng(0))
  top, left, h, w = out["box"]
  want = S.R.resize(x[top:top + h, left:left + w], cfg.data.resized_crop.size, "bilinear")
  assert np.allclose(out["image"], want, atol=1e-6) or np.allclose(out["image"], want[:, ::-1],
                                                                    atol=1e-6)


def test_padded_pre_crop_matches_torchvision_rules(folder):
  """RandomCrop(48, pad_if_needed, fill 0) on a 20 x 30 image: zeros (then normalised to
  -mean/std) around a window of the original pixels."""
  load = S.FolderImages(MEAN, STD, 48)
  raw = np.asarray(Image.open(os.path.join(folder, "b.jpg")).convert("RGB"))
  pad = (0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
  for i in range(4):
    x = load(os.path.join(folder, "b.jpg"), np.random.default_rng(i))["image"]
    assert x.shape == (48, 48, 3)
    inside = ~np.all(np.isclose(x, pad, atol=1e-6), axis=-1)
    rows, cols = np.nonzero(inside.any(1))[0], np.nonzero(inside.any(0))[0]
    assert len(rows) == 20 and len(cols) == 30  # a 76 x 66 padded frame: the whole image fits
    win = x[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    np.testing.assert_allclose(win, (raw / 255.0 - MEAN) / STD, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Sources through make_dataset.


def test_image_folder_listing_and_batches(folder):
  files = S.list_images(folder)
  assert [os.path.relpath(f, folder) for f in files] == ["a.png", "b.jpg", "sub/c.png",
                                                         "sub/d.jpeg"]
  cfg = _cfg(images=folder, pre_crop=48)
  (b0, b1), _, info = _batches(cfg, 2, return_crop=True)
  assert info == {"num_records": 4, "bands": None, "channels": 3}
  for b in (b0, b1):
    _check_batch({k: v for k, v in b.items() if k != "crop"}, 4, 16, 32, 3)
    np.testing.assert_allclose(b["gsd"], 2.5 * (b["crop"] - 1) / 16, rtol=1e-6)
    assert (b["crop"] >= round(np.sqrt(0.2) * 48)).all() and (b["crop"] <= 48).all()


def test_fmow_rgb_files_are_preferred(tmp_path):
  for n in ("x_rgb.jpg", "x_msrgb.jpg", "y.png"):
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(tmp_path / n)
  assert S.list_images(str(tmp_path)) == [str(tmp_path / "x_rgb.jpg")]


def test_one_image_full_crop_equals_torch_reference(tmp_path):
  """No flip, scale 1, pre-crop = image size: target = bicubic(normalised image) and
  image = bilinear(target), exactly as the reference's transforms compute them."""
  raw = np.random.default_rng(5).integers(0, 256, (24, 24, 3), dtype=np.uint8)
  Image.fromarray(raw).save(tmp_path / "one.png")
  cfg = _cfg(images=str(tmp_path), pre_crop=24, scale_min=1.0, flip=False, base_resolution=0.3)
  (b,), _, _ = _batches(cfg, 1)
  x = (raw / 255.0 - np.array(MEAN)) / np.array(STD)
  t = _torch_resize(x, 32, "bicubic")
  for k in range(4):  # one image repeated
    np.testing.assert_allclose(b["target"][k], t, atol=1e-4)
    np.testing.assert_allclose(b["image"][k], _torch_resize(t, 16, "bilinear"), atol=1e-4)
  np.testing.assert_allclose(b["gsd"], 0.3 * 23 / 16, rtol=1e-6)
  np.testing.assert_allclose(b["target_gsd"], 0.3 * 23 / 32, rtol=1e-6)


@pytest.mark.parametrize("bands,channels", [("rgb", 3), ("s2", 12)])
def test_mmearth_shards(shards64, bands, channels):
  cfg = _cfg(path=shards64, input=bands, target_size=64, input_size=32)
  (b,), _, info = _batches(cfg, 1, return_crop=True)
  assert info["num_records"] == 48 and info["channels"] == channels
  assert len(info["bands"]) == channels and (bands != "rgb" or info["bands"] == ["B4", "B3", "B2"])
  _check_batch({k: v for k, v in b.items() if k != "crop"}, 4, 32, 64, channels)
  np.testing.assert_allclose(b["gsd"], 2.5 * (b["crop"] - 1) / 32, rtol=1e-6)
  assert abs(b["target"].mean()) < 1.0  # z-scored bands


def test_mmearth_full_tile_is_the_zscored_input(shards64):
  """scale 1, no flip, target = tile size: the target is the pipeline's z-scored whole tile."""
  from mmearth_jax.data import pipeline
  from mmearth_jax.data import records
  from mmearth_jax.data.convert import load_manifest
  cfg = _cfg(path=shards64, target_size=64, input_size=32, scale_min=1.0, flip=False)
  source, load, _ = S.build_source(cfg)
  aug = S.ScaleAugment.from_config(cfg.scale)
  manifest = load_manifest(shards64)
  tf = pipeline.Transform(manifest["band_stats"], ("B4", "B3", "B2"), {}, 64)
  rec = source[5]
  ref = tf.apply(*records.decode(rec), np.random.default_rng(0))["image"]
  out = aug(load(rec, np.random.default_rng(1)), np.random.default_rng(2))
  np.testing.assert_allclose(out["target"], ref, atol=1e-6)
  np.testing.assert_allclose(out["image"], _torch_resize(ref, 32, "bilinear"), atol=1e-5)


def test_tfds_source_mocked():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    cfg = _cfg(images="tfds:eurosat/rgb:train", pre_crop=48)
    (b,), _, info = _batches(cfg, 1)
  assert info == {"num_records": 6, "bands": None, "channels": 3}
  _check_batch(b, 4, 16, 32, 3)


def test_determinism_and_seeds(folder):
  cfg = _cfg(images=folder, pre_crop=32)
  a, _, _ = _batches(cfg, 2)
  b, _, _ = _batches(cfg, 2)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  cfg.seed = 1
  c, _, _ = _batches(cfg, 2)
  assert not np.array_equal(a[0]["target"], c[0]["target"])


def test_state_restore_resumes_at_the_same_batch(folder):
  cfg = _cfg(images=folder, pre_crop=32)
  full, _, _ = _batches(cfg, 4)
  _, state, _ = _batches(cfg, 2)
  rest, _, _ = _batches(cfg, 2, state=state)
  for x, y in zip(full[2:], rest):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_host_slices_make_the_global_batch(folder):
  cfg = _cfg(images=folder, pre_crop=32)
  (g,), _, _ = _batches(cfg, 1)
  parts = []
  for p in range(2):
    it, _ = S.make_dataset(cfg, process_index=p, process_count=2)
    it = iter(it)
    parts.append(next(it))
    it.close()
  np.testing.assert_array_equal(np.concatenate([p["target"] for p in parts]), g["target"])


# ---------------------------------------------------------------------------------------------
# Errors.


def test_errors_name_the_field_or_path(tmp_path, folder):
  empty = tmp_path / "empty"
  os.makedirs(empty / "sub")
  with pytest.raises(FileNotFoundError, match="no images"):
    S.make_dataset(_cfg(images=str(empty)), process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    S.make_dataset(_cfg(images=str(tmp_path / "nope")), process_index=0, process_count=1)
  bad = [(dict(target_size=0), "target_size"), (dict(input_size=64), "input_size"),
         (dict(scale_min=0.0), "scale_min"), (dict(scale_max=1.5), "scale_max"),
         (dict(scale_min=0.9, scale_max=0.5), "scale_min"), (dict(pre_crop=-1), "pre_crop")]
  for kw, field in bad:
    with pytest.raises(ValueError, match=f"data.scale.{field}"):
      S.make_dataset(_cfg(images=folder, **kw), process_index=0, process_count=1)
  cfg = _cfg(images=folder)
  cfg.mean, cfg.std = (0.5,) * 4, (0.2,) * 4
  with pytest.raises(ValueError, match="3 channels.*4 values"):
    S.make_dataset(cfg, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="global_batch_size"):
    S.make_dataset(_cfg(images=folder), process_index=0, process_count=3)


def test_unreadable_image_is_named(tmp_path):
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "good.png")
  (tmp_path / "broken.png").write_bytes(b"this is not a png")
  with pytest.raises(ValueError, match="broken.png"):
    S.FolderImages(MEAN, STD, 0)(str(tmp_path / "broken.png"), np.random.default_rng(0))
  with pytest.raises(Exception, match="broken.png"):  # and through the pipeline
    _batches(_cfg(images=str(tmp_path)), 1)


def test_wrong_tfds_channels():
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = _cfg(images="tfds:eurosat/rgb")
  cfg.mean, cfg.std = (0.5,), (0.2,)
  with tfds.testing.mock_data(num_examples=2):
    with pytest.raises(ValueError, match="3 channels"):
      S.make_dataset(cfg, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="tfds:<name>"):
    S._parse_tfds("tfds:")
  assert S._parse_tfds("tfds:eurosat/rgb:2.0.0:train[:50%]") == ("eurosat/rgb:2.0.0",
                                                                  "train[:50%]")
  assert S._parse_tfds("tfds:resisc45") == ("resisc45", "train")
  assert S._parse_tfds("tfds:resisc45:train[:10]") == ("resisc45", "train[:10]")


def test_transforms_pickle_for_worker_processes(folder, shards64):
  import pickle
  for cfg in (_cfg(images=folder, pre_crop=32), _cfg(path=shards64)):
    source, load, _ = S.build_source(cfg)
    ex = S._Example(load, S.ScaleAugment.from_config(cfg.scale))
    ex2 = pickle.loads(pickle.dumps(ex))
    src2 = pickle.loads(pickle.dumps(source))
    a = ex.random_map(source[1], np.random.default_rng(7))
    b = ex2.random_map(src2[1], np.random.default_rng(7))
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
