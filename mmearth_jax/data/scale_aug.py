"""Scale-MAE's scale augmentation as a Grain pipeline (the reference's `main_pretrain.py`,
`lib/transforms.py` and `dataloaders/utils.py`).

    source -> shuffle(seed) (a new permutation every epoch) -> repeat
      -> per example (seeded by its global position):
           load      MMEarth shards: the z-scored Sentinel-2 bands of `data.input`, whole tile
                     (data.scale.pre_crop and data.mean / data.std do not apply)
                     image folder / tfds: decode to 0..1, random `pre_crop` square (zero padded
                     like torchvision's RandomCrop(pad_if_needed)), normalise by data.mean/std
           flip      horizontal, probability 1/2 (`data.scale.flip`)
           crop      a square of side s = round(sqrt(u * H * W)), u ~ U(scale_min, scale_max),
                     clipped to min(H, W), at a uniform position (RandomResizedCrop, ratio 1)
           target    the crop cut out and resized to target_size, bicubic (a = -0.75, borders
                     clamped, no antialias), align_corners=True
           image     the target resized to input_size, bilinear, align_corners=True
           gsd       base_resolution * (s - 1) / input_size   (the reference's input resolution)
           target_gsd  base_resolution * (s - 1) / target_size
      -> batch (this host's share of the global batch) -> this host's slice of batches
      -> threads / worker processes

The two resizes are kornia's (0.6.9; the same in 0.6.6 - 0.7.0): RandomResizedCrop's default
cropping_mode "slice" cuts the box out and calls F.interpolate(align_corners=True), and K.Resize
does the same to the whole target. The GSD uses kornia's inclusive box corners: the reference's
ratio is (top-right x - top-left x) / target height = (s - 1) / target_size (`lib/transforms.py`
CustomCompose), times base_resolution, times target / input for the input
(`dataloaders/utils.py` TransformCollateFn). `data.scale.align_corners = False` resizes with
half-pixel centres instead (torch's default; this library's behaviour before).

Sources, by `data.images`:
    ""                 the MMEarth shards at `data.path` (bands `data.input`)
    a directory        every *.jpg / *.jpeg / *.png / *.tif(f) below it in sorted order, or only
                       fMoW's `*_rgb.jpg` when there are any; decoded as RGB
    tfds:<name>[:split]  a prepared TFDS dataset's "image" feature via `tfds.data_source`
                       (split default "train"; `data.tfds_data_dir` if the config has it)

Each batch is a dict of numpy arrays, all finite:

    image       (B, input, input, C) float32    the encoder input
    target      (B, target, target, C) float32  the reconstruction target
    gsd         (B,) float32                    ground sample distance scale of `image`
    target_gsd  (B,) float32                    the same for `target`

GFM / SimMIM's augmentation (`make_crop_dataset`, data section `data.resized_crop`) reads the same
sources and replaces the scale augmentation by torchvision's RandomResizedCrop(size, scale,
ratio) (10 tries, then a centre crop) and a horizontal flip, giving {"image"} alone. The reference
crops PIL images, so the resize is PIL's bilinear, which widens its kernel when shrinking
(antialias); `data.resized_crop.antialias = False` resizes as torch's interpolate without it.

Resizes are `mmearth_jax.ops.resize` (equal to torch's `F.interpolate`): two small separable
matrices, so a 448 px bicubic resize costs a few ms.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Sequence

import grain
import ml_collections
import numpy as np

from mmearth_jax import modalities as M
from mmearth_jax.data import pipeline
from mmearth_jax.data.convert import load_manifest, shard_paths
from mmearth_jax.ops import resize as R

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
FMOW_SUFFIX = "_rgb.jpg"


# ---------------------------------------------------------------------------------------------
# The augmentation.


def _check_scale(input_size: int, target_size: int, scale_min: float, scale_max: float,
                 base_resolution: float) -> None:
  if not target_size > 0:
    raise ValueError(f"config data.scale.target_size = {target_size} must be > 0")
  if not 0 < input_size <= target_size:
    raise ValueError(f"config data.scale.input_size = {input_size} must be in (0, "
                     f"data.scale.target_size = {target_size}]")
  for name, v in (("scale_min", scale_min), ("scale_max", scale_max)):
    if not (math.isfinite(v) and 0 < v <= 1):
      raise ValueError(f"config data.scale.{name} = {v} must be in (0, 1] (a fraction of the "
                       "image area)")
  if scale_min > scale_max:
    raise ValueError(f"config data.scale.scale_min = {scale_min} is larger than "
                     f"data.scale.scale_max = {scale_max}")
  if not (math.isfinite(base_resolution) and base_resolution > 0):
    raise ValueError(f"config data.scale.base_resolution = {base_resolution} must be > 0")


class ScaleAugment(grain.transforms.RandomMap):
  """{"image": (H, W, C)} -> {"image", "target", "gsd", "target_gsd"} (see the module docstring).

  `return_crop` adds "crop": the side of the square taken from the image, in its pixels.
  `align_corners` is kornia's resize flag (True, the reference's) for both resizes.
  """

  def __init__(self, input_size: int, target_size: int, scale_min: float = 0.2,
               scale_max: float = 1.0, base_resolution: float = 1.0, flip: bool = False,
               return_crop: bool = False, align_corners: bool = True):
    _check_scale(input_size, target_size, scale_min, scale_max, base_resolution)
    self.input_size = int(input_size)
    self.target_size = int(target_size)
    self.scale_min = float(scale_min)
    self.scale_max = float(scale_max)
    self.base_resolution = float(base_resolution)
    self.flip = bool(flip)
    self.return_crop = bool(return_crop)
    self.align_corners = bool(align_corners)

  @classmethod
  def from_config(cls, scale: ml_collections.ConfigDict, **kw) -> "ScaleAugment":
    return cls(scale.input_size, scale.target_size, scale.scale_min, scale.scale_max,
               scale.base_resolution, scale.flip,
               align_corners=scale.get("align_corners", True), **kw)

  def crop_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(top, left, side) of a RandomResizedCrop with aspect ratio 1.

    torchvision / kornia redraw the area up to 10 times until the square fits, then fall back
    to a centre crop (torchvision) or the whole image (kornia). With ratio 1 that only happens
    on non-square images (pre_crop = 0); one draw clipped to the short side is the simpler rule.
    """
    u = rng.uniform(self.scale_min, self.scale_max)
    side = int(np.clip(np.round(math.sqrt(u * height * width)), 1, min(height, width)))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    return top, left, side

  def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict:
    x = np.asarray(element["image"], np.float32)
    if x.ndim != 3:
      raise ValueError(f"ScaleAugment expects an (H, W, C) image, got shape {x.shape}")
    if self.flip and rng.random() < 0.5:
      x = x[:, ::-1]
    top, left, side = self.crop_box(x.shape[0], x.shape[1], rng)
    # kornia's "slice" crop: taps near the box edge read clamped crop pixels, not the image.
    crop = np.ascontiguousarray(x[top:top + side, left:left + side])
    target = R.resize(crop, self.target_size, "bicubic", align_corners=self.align_corners)
    image = R.resize(target, self.input_size, "bilinear", align_corners=self.align_corners)
    # The reference's box spans corner x to corner x + side - 1: side - 1 pixels, over target.
    target_gsd = self.base_resolution * (side - 1) / self.target_size
    out = {"image": image.astype(np.float32, copy=False),
           "target": target.astype(np.float32, copy=False),
           "gsd": np.float32(target_gsd * self.target_size / self.input_size),
           "target_gsd": np.float32(target_gsd)}
    if self.return_crop:
      out["crop"] = np.int32(side)
    return out

  __call__ = random_map


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float],
                            ratio: tuple[float, float], rng: np.random.Generator
                            ) -> tuple[int, int, int, int]:
  """(top, left, crop height, crop width) by torchvision's RandomResizedCrop.get_params: up to
  10 draws of area fraction U(scale) and log-uniform aspect ratio w/h in `ratio` until the box
  fits, else a centre crop with the aspect clamped to `ratio`."""
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


class ResizedCrop(grain.transforms.RandomMap):
  """{"image": (H, W, C)} -> {"image": (size, size, C)}: a RandomResizedCrop (bilinear) then a
  horizontal flip with probability 1/2 (GFM's SimMIMTransform order). `antialias` (True) is PIL's
  bilinear, which the reference's PIL images get; False is torch's interpolate without it.
  `return_box` adds "box": (top, left, height, width) of the crop."""

  def __init__(self, size: int, scale_min: float = 0.67, scale_max: float = 1.0,
               ratio_min: float = 3 / 4, ratio_max: float = 4 / 3, flip: bool = True,
               return_box: bool = False, antialias: bool = True):
    if not size > 0:
      raise ValueError(f"config data.resized_crop.size = {size} must be > 0")
    for name, v in (("scale_min", scale_min), ("scale_max", scale_max)):
      if not (math.isfinite(v) and 0 < v <= 1):
        raise ValueError(f"config data.resized_crop.{name} = {v} must be in (0, 1] (a fraction "
                         "of the image area)")
    if scale_min > scale_max:
      raise ValueError(f"config data.resized_crop.scale_min = {scale_min} is larger than "
                       f"scale_max = {scale_max}")
    if not (0 < ratio_min <= ratio_max and math.isfinite(ratio_max)):
      raise ValueError(f"config data.resized_crop.ratio_min / ratio_max = {ratio_min} / "
                       f"{ratio_max} must satisfy 0 < ratio_min <= ratio_max (width / height)")
    self.size = int(size)
    self.scale = (float(scale_min), float(scale_max))
    self.ratio = (float(ratio_min), float(ratio_max))
    self.flip = bool(flip)
    self.return_box = bool(return_box)
    self.antialias = bool(antialias)

  @classmethod
  def from_config(cls, rc: ml_collections.ConfigDict, **kw) -> "ResizedCrop":
    return cls(rc.size, rc.scale_min, rc.scale_max, rc.ratio_min, rc.ratio_max, rc.flip,
               antialias=rc.get("antialias", True), **kw)

  def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict:
    x = np.asarray(element["image"], np.float32)
    if x.ndim != 3:
      raise ValueError(f"ResizedCrop expects an (H, W, C) image, got shape {x.shape}")
    top, left, h, w = random_resized_crop_box(x.shape[0], x.shape[1], self.scale, self.ratio,
                                              rng)
    crop = np.ascontiguousarray(x[top:top + h, left:left + w])
    # PIL's bilinear (torch antialias=True's rule): the triangle widens by the shrink factor.
    image = R.resize(crop, (self.size, self.size), "bilinear", antialias=self.antialias)
    if self.flip and rng.random() < 0.5:
      image = np.ascontiguousarray(image[:, ::-1])
    out = {"image": image.astype(np.float32, copy=False)}
    if self.return_box:
      out["box"] = np.asarray([top, left, h, w], np.int32)
    return out

  __call__ = random_map


# ---------------------------------------------------------------------------------------------
# Sources.


def list_images(folder: str) -> list[str]:
  """Image files below `folder`, sorted; only fMoW's `*_rgb.jpg` when there are any."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"config data.images = {folder!r}: not a directory (give an image "
                            "folder, tfds:<name>, or leave it empty for the shards at data.path)")
  files = []
  for root, dirs, names in os.walk(folder, followlinks=True):
    dirs.sort()
    files.extend(os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
  files.sort()
  # fMoW stores each image as *_rgb.jpg plus a multispectral *_msrgb.jpg; the reference keeps rgb.
  fmow = [f for f in files if f.endswith(FMOW_SUFFIX)]
  files = fmow or files
  if not files:
    raise FileNotFoundError(f"config data.images = {folder!r}: no images "
                            f"({'/'.join('*' + e for e in IMAGE_EXTENSIONS)}) found below it")
  return files


def _to_unit(img: np.ndarray) -> np.ndarray:
  """Integer images -> float32 in 0..1 (uint8 / 255, as ToTensor); floats pass through."""
  if np.issubdtype(img.dtype, np.integer):
    return img.astype(np.float32) * np.float32(1.0 / np.iinfo(img.dtype).max)
  return img.astype(np.float32)


def random_crop_padded(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """torchvision's RandomCrop(size, pad_if_needed=True, fill=0): a side shorter than `size` is
  first zero-padded on both ends by the shortfall, then a uniform window is cut."""
  h, w = img.shape[:2]
  ph, pw = max(size - h, 0), max(size - w, 0)
  if ph or pw:
    img = np.pad(img, ((ph, ph), (pw, pw), (0, 0)))
    h, w = img.shape[:2]
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  return img[top:top + size, left:left + size]


class _ImageExample:
  """A decoded image -> pre-crop -> 0..1 -> (x - mean) / std, as {"image": (H, W, C)}."""

  def __init__(self, mean: Sequence[float], std: Sequence[float], pre_crop: int):
    self.mean = np.asarray(mean, np.float32)
    self.inv_std = (1.0 / np.asarray(std, np.float64)).astype(np.float32)
    self.pre_crop = int(pre_crop)

  def decode(self, record: Any) -> tuple[np.ndarray, str]:
    """(image (H, W, C), name for messages)."""
    raise NotImplementedError

  def __call__(self, record: Any, rng: np.random.Generator) -> dict:
    img, name = self.decode(record)
    if img.ndim == 2:
      img = img[..., None]
    if img.ndim != 3 or img.shape[-1] != len(self.mean):
      raise ValueError(f"{name}: image of shape {img.shape} has {img.shape[-1]} channels but "
                       f"config data.mean / data.std have {len(self.mean)}")
    # Crop before the float conversion: fMoW images are often thousands of pixels wide.
    if self.pre_crop > 0:
      img = random_crop_padded(img, self.pre_crop, rng)
    x = _to_unit(img)
    x -= self.mean
    x *= self.inv_std
    return {"image": x}


class FolderImages(_ImageExample):
  """Image file path -> normalised RGB example (PIL decode)."""

  def decode(self, record: Any) -> tuple[np.ndarray, str]:
    from PIL import Image  # the worker processes import it on first use

    path = record if isinstance(record, str) else bytes(record).decode()
    try:
      with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), path
    except Exception as e:  # noqa: BLE001 - PIL raises many types; name the file once
      raise ValueError(f"config data.images: cannot read image {path} "
                       f"({type(e).__name__}: {e})") from e


class TfdsImages(_ImageExample):
  """A TFDS example dict -> its "image" feature, normalised."""

  def __init__(self, name: str, *args, **kw):
    super().__init__(*args, **kw)
    self.name = name

  def decode(self, record: Any) -> tuple[np.ndarray, str]:
    return np.asarray(record["image"]), f"tfds:{self.name}"


class _Example(grain.transforms.RandomMap):
  """load then augment, sharing the example's generator (one random_map, one seed)."""

  def __init__(self, load, augment: grain.transforms.RandomMap):
    self.load = load
    self.augment = augment

  def random_map(self, element: Any, rng: np.random.Generator) -> dict:
    return self.augment.random_map(self.load(element, rng), rng)


def _parse_tfds(spec: str) -> tuple[str, str]:
  """"tfds:name[/config][:version][:split]" -> (name with version, split)."""
  parts = spec[len("tfds:"):].split(":")
  name, rest = parts[0], parts[1:]
  if rest and re.fullmatch(r"\d+(\.\d+)*|\d+\.\d+\.\*|\*", rest[0]):
    name, rest = f"{name}:{rest[0]}", rest[1:]
  if not parts[0]:
    raise ValueError(f"config data.images = {spec!r}: expected tfds:<name>[:split]")
  return name, ":".join(rest) or "train"  # a split may hold colons: "train[:80%]"


def _tfds_source(cfg: ml_collections.ConfigDict, spec: str):
  import tensorflow_datasets as tfds  # heavy: only when a TFDS dataset is asked for

  name, split = _parse_tfds(spec)
  data_dir = cfg.get("tfds_data_dir", None) or None
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # noqa: BLE001 - TFDS raises many types; report one clear message
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ValueError(f"config data.images = {spec!r}: cannot open the prepared TFDS dataset "
                     f"{name!r} split {split!r} under data_dir {data_dir or '(TFDS default)'} "
                     f"({type(e).__name__}: {msg})") from None
  features = getattr(ds.dataset_info, "features", None)
  if features is None or "image" not in features:
    have = sorted(features.keys()) if features is not None else []
    raise ValueError(f"config data.images = {spec!r}: the dataset has no 'image' feature "
                     f"(features: {have})")
  shape = tuple(features["image"].shape)
  channels = shape[-1] if len(shape) == 3 else 1
  return ds, name, channels


def _check_norm(cfg: ml_collections.ConfigDict, channels: int | None, where: str) -> None:
  mean, std = tuple(cfg.mean), tuple(cfg.std)
  if len(mean) != len(std):
    raise ValueError(f"config data.mean has {len(mean)} values but data.std has {len(std)}")
  if not all(math.isfinite(s) and s > 0 for s in std):
    raise ValueError(f"config data.std = {std} must be finite and > 0")
  if channels is not None and channels != len(mean):
    raise ValueError(f"{where} has {channels} channels but config data.mean / data.std have "
                     f"{len(mean)} values")


def build_source(cfg: ml_collections.ConfigDict, pre_crop: int | None = None
                 ) -> tuple[Any, Any, dict]:
  """(random-access source, per-record loader (record, rng) -> {"image"}, info) for `cfg`.

  `pre_crop` (image folders / tfds): None reads data.scale.pre_crop (Scale-MAE's configs)."""
  images = cfg.get("images", "") or ""
  if pre_crop is None:
    pre_crop = cfg.scale.get("pre_crop", 0) if "scale" in cfg else 0
  pre_crop = int(pre_crop or 0)
  if pre_crop < 0:
    raise ValueError(f"config data.scale.pre_crop = {pre_crop} must be >= 0 (0 = off)")
  if not images:
    # The shards: z-scored bands of the whole tile (the augmentation's crop is the only crop).
    if not cfg.get("path", ""):
      raise ValueError("config data.path is empty and data.images is not set: give the shards "
                       "folder (data.path) or an image folder / tfds:<name> (data.images)")
    manifest = load_manifest(cfg.path)
    if "sentinel2" not in manifest["modalities"]:
      raise KeyError(f"config data.path = {cfg.path!r}: the shards store no sentinel2")
    bands = M.resolve_input(cfg.input)
    load = pipeline.Transform(manifest["band_stats"], bands, {}, manifest["tile_size"])
    source = pipeline.ShardSource(shard_paths(cfg.path, manifest),
                                  [s["num_records"] for s in manifest["shards"]])
    return source, load, {"num_records": len(source), "bands": list(bands),
                          "channels": len(bands)}
  if images.startswith("tfds:"):
    source, name, channels = _tfds_source(cfg, images)
    _check_norm(cfg, channels, f"config data.images = {images!r}")
    load = TfdsImages(name, cfg.mean, cfg.std, pre_crop)
    return source, load, {"num_records": len(source), "bands": None, "channels": channels}
  files = list_images(images)
  _check_norm(cfg, 3, f"config data.images = {images!r} (decoded as RGB)")
  load = FolderImages(cfg.mean, cfg.std, pre_crop)
  return files, load, {"num_records": len(files), "bands": None, "channels": 3}


def make_dataset(cfg: ml_collections.ConfigDict, *, process_index: int | None = None,
                 process_count: int | None = None,
                 return_crop: bool = False) -> tuple[grain.IterDataset, dict]:
  """(this host's iterator of batches, {"num_records", "bands", "channels"}) for the `data`
  section `cfg` of a Scale-MAE config (see configs/scale_mae.py)."""
  if "scale" not in cfg:
    raise KeyError("config data.scale is missing (see configs/scale_mae.py)")
  augment = ScaleAugment.from_config(cfg.scale, return_crop=return_crop)
  return _make(cfg, augment, None, process_index, process_count)


def make_crop_dataset(cfg: ml_collections.ConfigDict, *, process_index: int | None = None,
                      process_count: int | None = None,
                      return_box: bool = False) -> tuple[grain.IterDataset, dict]:
  """The same for GFM's augmentation (`data.resized_crop`, see configs/gfm.py): batches
  {"image": (B, size, size, C)}."""
  if "resized_crop" not in cfg:
    raise KeyError("config data.resized_crop is missing (see configs/gfm.py)")
  augment = ResizedCrop.from_config(cfg.resized_crop, return_box=return_box)
  return _make(cfg, augment, cfg.resized_crop.get("pre_crop", 0), process_index, process_count)


def _make(cfg: ml_collections.ConfigDict, augment: grain.transforms.RandomMap,
          pre_crop: int | None, process_index: int | None, process_count: int | None
          ) -> tuple[grain.IterDataset, dict]:
  if process_index is None or process_count is None:
    import jax  # only for the host's place in the job
    process_index, process_count = jax.process_index(), jax.process_count()
  if cfg.global_batch_size % process_count:
    raise ValueError(f"config data.global_batch_size = {cfg.global_batch_size} is not divisible "
                     f"by the {process_count} processes")
  source, load, info = build_source(cfg, pre_crop)
  if info["num_records"] == 0:
    raise ValueError("config data.images / data.path: the source has no records")
  ds = grain.MapDataset.source(source).shuffle(seed=cfg.seed)
  ds = ds.repeat(cfg.num_epochs or None)
  if cfg.num_epochs:
    # Whole global batches only: otherwise hosts could get different batch counts and hang.
    ds = ds[:len(ds) // cfg.global_batch_size * cfg.global_batch_size]
  # Seeded by each example's global position: any process count sees the same global batches.
  ds = ds.random_map(_Example(load, augment), seed=cfg.seed + 1)
  ds = ds.batch(cfg.global_batch_size // process_count, drop_remainder=True)
  ds = ds[process_index::process_count]
  if cfg.workers > 0:
    # Worker processes are the parallelism; a thread prefetcher inside each one can make
    # close() wait for a timeout (google/grain#1372).
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    from absl import flags  # Grain's workers read absl flags; a plain program never parses them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers))
  else:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=cfg.prefetch))
  return it, info
