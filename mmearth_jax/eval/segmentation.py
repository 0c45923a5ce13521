"""Segmentation fine-tuning of a ConvNeXt V2 encoder with a U-Net decoder, scored by mIoU.

MMEarth's segmentation protocol: a U-Net decoder on the encoder's four stages
(`models.unet.UNetSegmenter`), the encoder frozen for the first part of training (50 of 200
epochs in the paper: `freeze_fraction` = 0.25) and then fine-tuned with the decoder.

The recipe is a config, `configs/segment.py` (`mmearth-jax segment [--config
segment:<variant>] --config.key=value ...`; in Python `config_lib.load("segment:<variant>")`):
an `ml_collections.ConfigDict` whose fields every function here reads (`check_config` lists the
constraints; `encoder_from_config` and `load_splits` read its encoder and data fields).

  data       `datasets.load_segmentation`: images (N, H, W, C) normalised in the encoder's band
             order, class maps (N, H, W) with -1 = no label (ignored by loss and metrics);
             mmearth:<shards> (land-cover maps) or geobench:<task folder>.
  labels     `label_subset`: a seeded subset of the training tiles (at least one), nested across
             fractions (the 1 % tiles are among the 5 %, ...) and the same for every init, so a
             comparison of initialisations sees the same labels.
  training   AdamW, linear warmup + cosine decay, softmax cross-entropy over labelled pixels,
             random horizontal / vertical flips. The budget is in epochs over the labelled
             tiles (MMEarth: 200, frozen for the first 50), so small fractions train for few
             steps. Two jitted steps: while frozen, gradients are taken w.r.t. the decoder
             only (the encoder's backward pass is never computed and its parameters are not
             touched: no update, no weight decay); after, both, the encoder with its own AdamW
             state and a schedule that restarts at the unfreezing step, at `encoder_lr_scale` x
             the decoder's peak lr. Learning rates are step arguments: a whole sweep compiles
             the two steps once.
  metrics    one confusion matrix over every labelled test pixel: per-class IoU = TP / (TP + FP
             + FN), mIoU = their mean over the classes present in the ground truth or in the
             predictions (a class absent from both is excluded), pixel accuracy.

Runs on one device (the default one); the datasets involved are small enough.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmearth_jax import bands as B
from mmearth_jax import cards, optim, pretrained
from mmearth_jax.eval.datasets import SegmentationData, load_segmentation  # noqa: F401 (API)
from mmearth_jax.models import unet


# ----------------------------------------------------------------------------------------------
# The recipe: the fields of configs/segment.py.


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the config key of the first fine-tuning field out of range."""
  def bad(key: str, want: str) -> ValueError:
    return ValueError(f"config {key} = {cfg[key]!r} must be {want}")
  if not 0.0 < cfg.label_fraction <= 1.0:
    raise bad("label_fraction", "in (0, 1] (0.01 = 1 % of the training tiles)")
  if cfg.steps < 0 or cfg.max_steps < 0:
    raise bad("steps" if cfg.steps < 0 else "max_steps", ">= 0")
  if cfg.steps == 0 and cfg.epochs <= 0:
    raise bad("epochs", "> 0 (or steps > 0)")
  for key in ("batch_size", "eval_batch_size"):
    if cfg[key] < 1:
      raise bad(key, ">= 1")
  if not 0.0 <= cfg.freeze_fraction <= 1.0:
    raise bad("freeze_fraction", "in [0, 1]")
  if cfg.lr <= 0:
    raise bad("lr", "> 0")
  for key in ("encoder_lr_scale", "weight_decay", "warmup_steps"):
    if cfg[key] < 0:
      raise bad(key, ">= 0")
  if cfg.stem not in ("mmearth", "official"):
    raise bad("stem", "'mmearth' or 'official'")


def num_steps(cfg: ml_collections.ConfigDict, num_tiles: int) -> int:
  """Optimizer steps for `num_tiles` labelled tiles: `steps`, or `epochs` over the tiles capped
  at `max_steps` (MMEarth's budget: a smaller label fraction trains for fewer steps)."""
  n = cfg.steps or max(1, math.ceil(cfg.epochs * num_tiles / cfg.batch_size))
  return min(n, cfg.max_steps) if cfg.max_steps else n


def freeze_steps(cfg: ml_collections.ConfigDict, num_tiles: int) -> int:
  """The first steps, `freeze_fraction` of them, during which the encoder is frozen."""
  return int(round(cfg.freeze_fraction * num_steps(cfg, num_tiles)))


def _ints(values: Sequence[Any]) -> tuple[int, ...]:
  return tuple(int(v) for v in values)


# ----------------------------------------------------------------------------------------------
# Label fractions.


def label_subset(num_tiles: int, fraction: float, seed: int = 0) -> np.ndarray:
  """Sorted indices of `max(1, round(fraction * num_tiles))` training tiles: the first ones of a
  permutation drawn from `seed`, so smaller fractions are subsets of larger ones."""
  if num_tiles < 1:
    raise ValueError("no training tiles to take a label fraction of")
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
  k = max(1, int(round(fraction * num_tiles)))
  order = np.random.default_rng(seed).permutation(num_tiles)
  return np.sort(order[:k])


def subset(data: SegmentationData, indices: np.ndarray) -> SegmentationData:
  return dataclasses.replace(data, images=data.images[indices], masks=data.masks[indices],
                             name=f"{data.name}[{len(indices)}/{len(data.images)}]")


# ----------------------------------------------------------------------------------------------
# Metrics.


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
  """(K, K) int64 counts, rows = ground truth, columns = prediction, over pixels with target
  >= 0 (-1 = no label)."""
  pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
  keep = target >= 0
  t, p = target[keep].astype(np.int64), pred[keep].astype(np.int64)
  if t.size and (t.max() >= num_classes or p.min() < 0 or p.max() >= num_classes):
    raise ValueError(f"classes outside [0, {num_classes}) in the targets or predictions")
  return np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(
      num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray,
                         class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """{"miou", "pixel_accuracy", "iou": {class: IoU or None}, "num_pixels", "classes_scored"}.

  IoU_c = TP / (TP + FP + FN); a class absent from both ground truth and predictions (TP + FP +
  FN = 0) has IoU None and is left out of the mean."""
  cm = np.asarray(confusion, np.float64)
  k = cm.shape[0]
  names = list(class_names) if class_names else [str(c) for c in range(k)]
  tp = np.diag(cm)
  union = cm.sum(0) + cm.sum(1) - tp
  scored = union > 0
  iou = np.where(scored, tp / np.where(scored, union, 1.0), np.nan)
  total = cm.sum()
  return {"miou": float(iou[scored].mean()) if scored.any() else 0.0,
          "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
          "iou": {n: (float(v) if s else None) for n, v, s in zip(names, iou, scored)},
          "num_pixels": int(total), "classes_scored": int(scored.sum())}


# ----------------------------------------------------------------------------------------------
# Model and parameters.


def build_segmenter(encoder_spec: Mapping[str, Any], num_classes: int,
                    decoder_dims: Sequence[int] = ()) -> unet.UNetSegmenter:
  """The U-Net segmenter for an encoder spec (`pretrained.encoder_spec(...)`); decoder widths
  deepest first, () = the encoder's."""
  return unet.from_encoder_spec(encoder_spec, num_classes, decoder_dims=_ints(decoder_dims))


@functools.lru_cache(maxsize=8)
def _init_fn(model: unet.UNetSegmenter) -> Callable:
  return jax.jit(model.init)  # once per model: every init of a sweep reuses the compile


def init_params(model: unet.UNetSegmenter, image_shape: Sequence[int], seed: int = 0,
                encoder_params: Any = None) -> dict:
  """Random parameters for `model` on (H, W, C) images; `encoder_params` (a pretrained
  encoder's tree) replace the random encoder's, after checking every path and shape."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  params = _init_fn(model)(jax.random.key(seed), x)["params"]
  params = jax.tree.map(np.asarray, dict(params))
  if encoder_params is not None:
    _check_same_tree(params["encoder"], encoder_params)
    params["encoder"] = jax.tree.map(lambda a: np.asarray(a, np.float32), encoder_params)
  return params


def _check_same_tree(want: Any, got: Any) -> None:
  flat_w = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(want)}
  flat_g = {jax.tree_util.keystr(k): np.shape(v)
            for k, v in jax.tree_util.tree_leaves_with_path(got)}
  missing = sorted(set(flat_w) - set(flat_g))
  extra = sorted(set(flat_g) - set(flat_w))
  if missing or extra:
    raise ValueError(f"pretrained encoder parameters do not fit the segmenter's encoder: missing "
                     f"{missing[:5]}, unexpected {extra[:5]}")
  bad = [f"{k}: {flat_g[k]} vs {flat_w[k]}" for k in flat_w if tuple(flat_g[k]) != flat_w[k]]
  if bad:
    raise ValueError(f"pretrained encoder parameter shapes differ from the segmenter's: "
                     f"{bad[:5]}")


# ----------------------------------------------------------------------------------------------
# Training.


@dataclasses.dataclass(frozen=True)
class _Programs:
  """The optimizers and jitted steps of one model, built once per process. Learning rates are
  step arguments (`optax.inject_hyperparams`), so every schedule, label fraction and
  initialisation of a sweep runs the same two compiled steps."""
  tx: optax.GradientTransformation
  frozen_step: Callable
  full_step: Callable


def _with_lr(state, lr):
  return state._replace(hyperparams={**state.hyperparams, "learning_rate": lr})


@functools.lru_cache(maxsize=8)
def _programs(model: unet.UNetSegmenter, weight_decay: float, flips: bool) -> _Programs:
  tx = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=0.0, b1=0.9, b2=0.999, weight_decay=weight_decay, mask=optim.decay_mask)

  def loss_fn(dec_p, enc_p, images, masks, key, train_encoder):
    logits = model.apply({"params": {"encoder": enc_p, **dec_p}}, images, train=train_encoder,
                         rngs={"drop_path": key})
    return pixel_cross_entropy(logits, masks)

  @functools.partial(jax.jit, donate_argnums=(0, 2))
  def frozen_step(dec_p, enc_p, dec_s, images, masks, key, lr):
    ka, kd = jax.random.split(key)
    if flips:
      images, masks = _augment(images, masks, ka)
    # Gradients w.r.t. the decoder only: the encoder is a constant here.
    loss, g = jax.value_and_grad(loss_fn)(dec_p, enc_p, images, masks, kd, False)
    upd, dec_s = tx.update(g, _with_lr(dec_s, lr), dec_p)
    return optax.apply_updates(dec_p, upd), dec_s, loss

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2, 3))
  def full_step(dec_p, enc_p, dec_s, enc_s, images, masks, key, lr, enc_lr):
    ka, kd = jax.random.split(key)
    if flips:
      images, masks = _augment(images, masks, ka)
    loss, (gd, ge) = jax.value_and_grad(loss_fn, argnums=(0, 1))(dec_p, enc_p, images, masks,
                                                                  kd, True)
    upd, dec_s = tx.update(gd, _with_lr(dec_s, lr), dec_p)
    eupd, enc_s = tx.update(ge, _with_lr(enc_s, enc_lr), enc_p)
    return (optax.apply_updates(dec_p, upd), optax.apply_updates(enc_p, eupd), dec_s, enc_s,
            loss)

  return _Programs(tx, frozen_step, full_step)


def schedules(cfg: ml_collections.ConfigDict, num_tiles: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-step learning rates of the decoder and of the encoder (0 while it is frozen): linear
  warmup then cosine decay, the encoder's restarting at the unfreezing step. Step t uses the
  schedule's value at t + 1 of steps + 1, so no step is wasted at lr 0 (the first warmup step
  is peak / warmup, the last step a small positive lr)."""
  steps, freeze = num_steps(cfg, num_tiles), freeze_steps(cfg, num_tiles)

  def curve(peak: float, n: int) -> np.ndarray:
    fn = optim.warmup_cosine(peak, min(cfg.warmup_steps, n), n + 1)
    return np.asarray(fn(np.arange(1, n + 1)), np.float32)

  enc = np.zeros(steps, np.float32)
  enc[freeze:] = curve(cfg.lr * cfg.encoder_lr_scale, steps - freeze)
  return curve(cfg.lr, steps), enc


def _augment(images: jax.Array, masks: jax.Array, key: jax.Array):
  """Per-sample random horizontal and vertical flips, the same for image and mask."""
  kh, kv = jax.random.split(key)
  n = images.shape[0]
  fh = jax.random.bernoulli(kh, 0.5, (n,))
  fv = jax.random.bernoulli(kv, 0.5, (n,))
  images = jnp.where(fh[:, None, None, None], images[:, :, ::-1], images)
  masks = jnp.where(fh[:, None, None], masks[:, :, ::-1], masks)
  images = jnp.where(fv[:, None, None, None], images[:, ::-1], images)
  masks = jnp.where(fv[:, None, None], masks[:, ::-1], masks)
  return images, masks


def pixel_cross_entropy(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the pixels whose label is not -1 (0 if there are none)."""
  valid = masks >= 0
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, masks, 0))
  return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)


def _batches(n: int, batch_size: int, rng: np.random.Generator):
  """Endless index batches: epochs of shuffled tiles, concatenated (a batch may span epochs, and
  fewer tiles than the batch size repeat within it)."""
  buf = np.zeros((0,), np.int64)
  while True:
    while len(buf) < batch_size:
      buf = np.concatenate([buf, rng.permutation(n)])
    yield buf[:batch_size]
    buf = buf[batch_size:]


def finetune(model: unet.UNetSegmenter, params: dict, train: SegmentationData,
             cfg: ml_collections.ConfigDict, *, log: Callable[[str], None] | None = None,
             on_step: Callable[[int, dict], None] | None = None) -> tuple[dict, list[dict]]:
  """Fine-tunes `params` on `train`; returns (params, [{"step", "loss", "frozen"}, ...]).

  `on_step(step, params)` is called after every step (tests watch the encoder with it); the
  arrays it gets are donated to the next step, so copy what you keep (`np.asarray`)."""
  check_config(cfg)
  log = log or (lambda m: None)
  n = len(train.images)
  steps, freeze = num_steps(cfg, n), freeze_steps(cfg, n)
  dec_lr, enc_lr = schedules(cfg, n)
  prog = _programs(model, float(cfg.weight_decay), bool(cfg.flips))
  # Fresh device copies: the steps donate their inputs, the caller's arrays must survive.
  dec = jax.tree.map(lambda a: jnp.array(a, copy=True),
                     {k: v for k, v in params.items() if k != "encoder"})
  enc = jax.tree.map(lambda a: jnp.array(a, copy=True), params["encoder"])
  dec_s = prog.tx.init(dec)
  enc_s = None
  rng = np.random.default_rng(cfg.seed)
  key = jax.random.key(cfg.seed)
  batches = _batches(n, cfg.batch_size, rng)
  history: list[dict] = []
  t0 = time.perf_counter()
  every = max(steps // 10, 1)
  log(f"{steps} steps on {n} tiles ({steps * cfg.batch_size / n:.1f} epochs), encoder frozen "
      f"for the first {freeze}")
  for step in range(steps):
    idx = next(batches)
    images, masks = jnp.asarray(train.images[idx]), jnp.asarray(train.masks[idx])
    key, sub = jax.random.split(key)
    frozen = step < freeze
    if frozen:
      dec, dec_s, loss = prog.frozen_step(dec, enc, dec_s, images, masks, sub, dec_lr[step])
    else:
      if enc_s is None:
        enc_s = prog.tx.init(enc)
      dec, enc, dec_s, enc_s, loss = prog.full_step(dec, enc, dec_s, enc_s, images, masks, sub,
                                                    dec_lr[step], enc_lr[step])
    history.append({"step": step + 1, "loss": loss, "frozen": frozen})
    if on_step is not None:
      on_step(step + 1, {"encoder": enc, **dec})
    if (step + 1) % every == 0 or step + 1 == steps:
      log(f"step {step + 1}/{steps}: loss {float(loss):.4f} "
          f"({'encoder frozen' if frozen else 'encoder training'}, "
          f"{time.perf_counter() - t0:.1f} s)")
  for h in history:
    h["loss"] = float(h["loss"])
  bad = next((h["step"] for h in history if not np.isfinite(h["loss"])), None)
  if bad is not None:
    raise FloatingPointError(f"segmentation fine-tuning diverged: non-finite loss from step {bad} "
                             f"of {steps} (lr {cfg.lr}); lower the learning rate (config lr)")
  return {"encoder": enc, **dec}, history


# ----------------------------------------------------------------------------------------------
# Prediction and evaluation.


@functools.lru_cache(maxsize=8)
def _predict_fn(model: unet.UNetSegmenter) -> Callable:
  return jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x), -1).astype(jnp.int32))


def predict(model: unet.UNetSegmenter, params: dict, images: np.ndarray,
            batch_size: int = 32) -> np.ndarray:
  """(N, H, W) int32 arg-max classes; batches padded to one shape (one compile)."""
  fn = _predict_fn(model)
  n = len(images)
  b = min(batch_size, n)
  out = []
  for start in range(0, n, b):
    chunk = np.asarray(images[start:start + b], np.float32)
    k = len(chunk)
    if k < b:
      chunk = np.concatenate([chunk, np.zeros((b - k, *chunk.shape[1:]), np.float32)])
    out.append(np.asarray(fn(params, chunk))[:k])
  return np.concatenate(out)


def evaluate(model: unet.UNetSegmenter, params: dict, data: SegmentationData,
             batch_size: int = 32) -> dict[str, Any]:
  """mIoU, per-class IoU and pixel accuracy over every labelled pixel of `data`."""
  cm = np.zeros((data.num_classes, data.num_classes), np.int64)
  for start in range(0, len(data.images), 256):  # bounded host memory for the predictions
    sl = slice(start, start + 256)
    cm += confusion_matrix(predict(model, params, data.images[sl], batch_size), data.masks[sl],
                           data.num_classes)
  out = segmentation_metrics(cm, data.class_names)
  out["confusion"] = cm.tolist()
  return out


def resolve_encoder(checkpoint: str | None, *, variant: str = "atto",
                    depths: Sequence[int] = (), dims: Sequence[int] = (), stem: str = "mmearth",
                    patch_size: int = 8, bands: Sequence[str] = ()) -> tuple[dict, Any, str]:
  """(encoder spec, encoder params or None, description) for a pretrained CHECKPOINT (any that
  `pretrained.load` reads, e.g. an MP-MAE training workdir) or, with None / "random", a randomly
  initialised ConvNeXt V2 of the given shape (bands default: the 12 MMEarth input bands)."""
  if checkpoint and checkpoint != "random":
    model = pretrained.load(checkpoint)
    enc = pretrained.encoder_spec(model.spec)
    if enc["arch"] != "convnextv2":
      raise ValueError(f"{checkpoint}: a {enc['arch']} encoder; the U-Net decoder needs a "
                       "ConvNeXt V2")
    if bands:
      enc["bands"] = list(bands)
    if not enc.get("bands"):
      raise ValueError(f"{checkpoint}: the encoder does not name its input bands; give them "
                       "(config bands, e.g. \"B2,B3,...\")")
    return enc, pretrained.encoder_params(model.spec, model.params), model.source
  from mmearth_jax import modalities as M
  enc = unet.encoder_spec_for(variant, depths=depths, dims=dims, stem=stem,
                              patch_size=patch_size, bands=tuple(bands) or M.S2_INPUT_BANDS)
  return enc, None, f"random init ({variant}, dims {enc['dims']}, stem {stem})"


def encoder_from_config(cfg: ml_collections.ConfigDict) -> tuple[dict, Any, str]:
  """`resolve_encoder` of the config's `checkpoint` (or random init of `variant`, `depths`,
  `dims`, `stem`, `patch_size`) and `bands`."""
  bands = [b.strip() for b in cfg.bands.split(",") if b.strip()]
  return resolve_encoder(cfg.checkpoint, variant=cfg.variant, depths=_ints(cfg.depths),
                         dims=_ints(cfg.dims), stem=cfg.stem, patch_size=cfg.patch_size,
                         bands=bands)


def load_splits(cfg: ml_collections.ConfigDict, bands: Sequence[str]
                ) -> tuple[SegmentationData, SegmentationData]:
  """The config's `train_split` and `test_split` of `dataset`, in the encoder's band order."""
  if not cfg.dataset:
    raise ValueError("config dataset is empty; set it, e.g. --config.dataset=mmearth:<shards "
                     "folder> or --config.dataset=geobench:<task folder>")
  kw = dict(data_dir=cfg.data_dir or None, partition=cfg.partition,
            max_examples=cfg.max_examples or None, image_size=cfg.image_size or None)
  return (load_segmentation(cfg.dataset, cfg.train_split, bands, **kw),
          load_segmentation(cfg.dataset, cfg.test_split, bands, **kw))


def run(encoder_spec: Mapping[str, Any], encoder_params: Any, train: SegmentationData,
        test: SegmentationData, cfg: ml_collections.ConfigDict, *,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Fine-tunes a U-Net on the config's `label_fraction` of `train` (the subset drawn from
  `seed`; None `encoder_params`: random init) and scores it on `test`: the metrics of
  `evaluate` plus the run's facts."""
  check_config(cfg)
  enc = pretrained.encoder_spec(encoder_spec)
  pretrained.check_images(enc, train.images, train.name)
  if train.num_classes != test.num_classes:
    raise ValueError(f"{train.name} has {train.num_classes} classes, {test.name} "
                     f"{test.num_classes}")
  idx = label_subset(len(train.images), cfg.label_fraction, cfg.seed)
  part = subset(train, idx)
  model = build_segmenter(enc, train.num_classes, cfg.decoder_dims)
  params = init_params(model, train.images.shape[1:], cfg.seed, encoder_params)
  t0 = time.perf_counter()
  params, history = finetune(model, params, part, cfg, log=log)
  seconds = time.perf_counter() - t0
  out = evaluate(model, params, test, cfg.eval_batch_size)
  if cfg.get("out"):
    out["saved"] = save_segmenter(cfg.out, enc, params, train, cfg)
  tail = history[-max(len(history) // 10, 1):]
  steps = num_steps(cfg, len(idx))
  out.update({"label_fraction": float(cfg.label_fraction), "train_tiles": int(len(idx)),
              "test_tiles": int(len(test.images)), "steps": steps,
              "epochs": round(steps * cfg.batch_size / len(idx), 2),
              "freeze_steps": freeze_steps(cfg, len(idx)), "final_loss": float(np.mean(
                  [h["loss"] for h in tail])), "finetune_seconds": round(seconds, 2),
              "pretrained": encoder_params is not None})
  return out


def segmenter_spec(encoder_spec: Mapping[str, Any], data: SegmentationData,
                   decoder_dims: Sequence[int] = ()) -> dict:
  """The spec of a fine-tuned segmenter (arch "unet_segmenter", `methods.encoders`)."""
  return {"arch": "unet_segmenter", "encoder": dict(encoder_spec),
          "num_classes": int(data.num_classes), "decoder_dims": list(_ints(decoder_dims)),
          "class_names": list(data.class_names) if data.class_names is not None else None}


def _training_normalisation(cfg: ml_collections.ConfigDict, bands: Sequence[str]) -> dict:
  """The card normalisation of the images the segmenter was fine-tuned on: a shards folder's
  band statistics (what `load_segmentation` z-scores mmearth tiles with), else the encoder's
  card's (GEO-Bench images come normalised by the task's own statistics, not recorded)."""
  kind, _, target = cfg.dataset.partition(":")
  if kind == "mmearth":
    folder = target if not cfg.data_dir else os.path.join(cfg.data_dir, target)
    return cards.normalisation(cards.read_band_stats(folder), bands)
  if cfg.checkpoint and cfg.checkpoint != "random":
    return dict(pretrained.read_card(cfg.checkpoint).get("normalisation") or {})
  return {}


def save_segmenter(path: str, encoder_spec: Mapping[str, Any], params: Any,
                   data: SegmentationData, cfg: ml_collections.ConfigDict) -> str:
  """Saves the fine-tuned segmenter as a model folder (`pretrained.save`) whose card carries
  the fine-tuning data's normalisation and the run's facts; returns the folder."""
  spec = segmenter_spec(encoder_spec, data, cfg.decoder_dims)
  provenance = {"kind": "fine-tuned", "dataset": cfg.dataset, "encoder": cfg.checkpoint,
                "label_fraction": float(cfg.label_fraction), "seed": int(cfg.seed)}
  card = cards.for_finetune(cards.from_spec(spec, provenance),
                            _training_normalisation(cfg, encoder_spec["bands"]),
                            input_size=int(data.images.shape[1]),
                            gsd_m=B.MMEARTH_GSD_M if cfg.dataset.startswith("mmearth:") else None)
  return pretrained.save(path, spec, params, source=f"segment on {cfg.dataset}", card=card)


def format_metrics(result: Mapping[str, Any]) -> str:
  """Per-class IoU lines and the summary, for printing."""
  lines = [f"  {name:<26} {'-' if v is None else f'{100 * v:6.2f}'}"
           for name, v in result["iou"].items()]
  lines.append(f"  {'mIoU':<26} {100 * result['miou']:6.2f}  ({result['classes_scored']} "
               "classes scored)")
  lines.append(f"  {'pixel accuracy':<26} {100 * result['pixel_accuracy']:6.2f}")
  return "\n".join(lines)


__all__ = ["SegmentationData", "load_segmentation", "check_config", "num_steps", "freeze_steps",
           "label_subset", "subset", "confusion_matrix", "segmentation_metrics",
           "build_segmenter", "init_params", "finetune", "predict", "evaluate", "run",
           "format_metrics", "pixel_cross_entropy", "schedules", "resolve_encoder",
           "encoder_from_config", "load_splits", "segmenter_spec", "save_segmenter"]
