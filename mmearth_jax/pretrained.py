"""Pretrained models on disk: what `embed`, `knn`, `probe`, `to-torch` and `from-torch` read and
write, and what `train` can start from.

A CHECKPOINT argument is any of
  * a training workdir (its `config.json` and the newest step under `checkpoints/`),
  * one step of a training run (`<workdir>/checkpoints/<step>`),
  * a model folder written by `save` (e.g. by `mmearth-jax from-torch`):
      <dir>/model.json   {"format": FORMAT, "spec": {...}, "source": "..."}
      <dir>/params/      the parameters (an Orbax PyTree checkpoint)

A spec is a JSON-able description of the architecture, one of
  {"arch": "convnextv2", "depths", "dims", "stem", "patch_size", "in_chans", "num_classes", "bands"}
  {"arch": "mp_mae", <the convnextv2 keys>, "decoder_dim", "outputs": {modality: [bands]}}
  {"arch": "vit", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "in_chans",
   "img_size", "bands"}
  {"arch": "mae", <the vit keys>, "decoder_embed_dim", "decoder_depth", "decoder_num_heads"}
  {"arch": "scale_mae", <the mae keys>, "fcn_dim", "fcn_layers", "independent_fcn_head",
   "progressive", "out_chans", "pos_layout"}
  {"arch": "gfm", "encoder": <a convnextv2 or vit spec>, "distill_layer", "teacher_dim"}
    (GFM's SimMIM student, `models.gfm.SimMIM`; its encoder is `params["encoder"]`)
  {"arch": "dense_contrastive", "encoder": <a convnextv2 spec>, "feature_stage",
   "projector_*"} (`models.dense_contrastive.DenseContrastive`; encoder in `params["encoder"]`)
A ViT's optional "pos_layout" ("concat", MAE's and the released Scale-MAE's; or "interleave", the
Scale-MAE paper's) orders its sin-cos channels.
`bands` names the encoder's input channels in order (MMEarth band names), or None if unknown.
Only parameters are read from a training checkpoint (a partial restore: no optimizer state).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mmearth_jax.data import modalities as M
from mmearth_jax.models.convnextv2 import VARIANTS, ConvNeXtV2
from mmearth_jax.models import dense_contrastive
from mmearth_jax.models.gfm import SimMIM
from mmearth_jax.models.mp_mae import MPMAE
from mmearth_jax.models.scale_mae import ScaleMAE
from mmearth_jax.models.vit import MAE, VIT_VARIANTS, ViT

FORMAT = "mmearth_jax.model/1"
ENCODER_ARCHS = ("convnextv2", "vit")
ARCHS = ("convnextv2", "mp_mae", "vit", "mae", "scale_mae", "gfm", "dense_contrastive")
WRAPPERS = ("gfm", "dense_contrastive")  # pretraining models whose spec["encoder"] is the encoder
_VIT_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "in_chans", "img_size",
             "bands", "pos_layout")


class CheckpointError(ValueError):
  pass


@dataclasses.dataclass
class Pretrained:
  spec: dict
  params: Any
  source: str  # where it came from, for messages

  @property
  def bands(self) -> list[str] | None:
    return self.spec.get("bands")


# ----------------------------------------------------------------------------------------------
# Specs.


def spec_from_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict:
  """The spec of the model a training config builds."""
  c = config if isinstance(config, Mapping) else config.to_dict()
  if c.get("method") == "scale_mae":
    return _scale_mae_spec(c)
  if c.get("method") == "gfm":
    return _gfm_spec(c)
  if c.get("method") == "dense_contrastive":
    bands = list(M.resolve_input(c["data"]["input"]))
    return dense_contrastive.spec_from_config(c, len(bands), bands)
  if c.get("method") != "mp_mae":
    raise CheckpointError(f"config method {c.get('method')!r}: no model spec known for it")
  m, d = c["model"], c["data"]
  depths, dims = VARIANTS[m["variant"]]
  input_bands = M.resolve_input(d["input"])
  outputs = M.resolve_outputs(d["outputs"], input_bands)
  return {"arch": "mp_mae", "depths": list(m["depths"] or depths), "dims": list(m["dims"] or dims),
          "stem": m["stem"], "patch_size": int(m["patch_size"]), "in_chans": len(input_bands),
          "num_classes": 0, "bands": list(input_bands), "decoder_dim": int(m["decoder_dim"]),
          "outputs": {k: list(v) for k, v in outputs.items()}}


def _image_bands(d: Mapping[str, Any]) -> tuple[list[str] | None, int]:
  """(bands, channels) of the images an image-folder / tfds or shards data section feeds."""
  if d.get("images"):
    return (["B4", "B3", "B2"] if len(d["mean"]) == 3 else None), len(d["mean"])
  bands = list(M.resolve_input(d["input"]))
  return bands, len(bands)


def _scale_mae_spec(c: Mapping[str, Any]) -> dict:
  m, d = c["model"], c["data"]
  size = VIT_VARIANTS[m["variant"]]
  bands, in_chans = _image_bands(d)
  return {"arch": "scale_mae", "patch_size": int(m["patch_size"]),
          "embed_dim": int(m["embed_dim"] or size["embed_dim"]),
          "depth": int(m["depth"] or size["depth"]),
          "num_heads": int(m["num_heads"] or size["num_heads"]), "mlp_ratio": 4.0,
          "in_chans": in_chans, "img_size": int(d["scale"]["input_size"]), "bands": bands,
          "decoder_embed_dim": int(m["decoder_embed_dim"]),
          "decoder_depth": int(m["decoder_depth"]),
          "decoder_num_heads": int(m["decoder_num_heads"]), "fcn_dim": int(m["fcn_dim"]),
          "fcn_layers": int(m["fcn_layers"]),
          "independent_fcn_head": bool(m["independent_fcn_head"]),
          "progressive": bool(m["progressive"]), "out_chans": in_chans,
          "pos_layout": "concat" if m["pos_variant"] == "code" else "interleave"}


def _gfm_spec(c: Mapping[str, Any]) -> dict:
  m, d, o = c["model"], c["data"], c["objective"]
  bands, in_chans = _image_bands(d)
  if m["arch"] == "convnextv2":
    depths, dims = VARIANTS[m["variant"]]
    enc = {"arch": "convnextv2", "depths": list(m["depths"] or depths),
           "dims": list(m["dims"] or dims), "stem": "official",
           "patch_size": int(o["mask_patch"]), "in_chans": in_chans, "num_classes": 0,
           "bands": bands}
  elif m["arch"] == "vit":
    size = VIT_VARIANTS[m["variant"]]
    enc = {"arch": "vit", "patch_size": int(m["patch_size"]),
           "embed_dim": int(m["embed_dim"] or size["embed_dim"]),
           "depth": int(m["depth"] or size["depth"]),
           "num_heads": int(m["num_heads"] or size["num_heads"]), "mlp_ratio": 4.0,
           "in_chans": in_chans, "img_size": int(d["resized_crop"]["size"]), "bands": bands,
           "pos_layout": "concat"}
  else:
    raise CheckpointError(f"config model.arch {m['arch']!r}: GFM encoders are convnextv2 or vit")
  return {"arch": "gfm", "encoder": enc, "distill_layer": int(o["distill_layer"]),
          "teacher_dim": 0}


def encoder_spec(spec: Mapping[str, Any]) -> dict:
  """The spec of the encoder inside `spec` (itself if it is an encoder)."""
  arch = spec["arch"]
  if arch in ENCODER_ARCHS:
    return dict(spec)
  if arch == "mp_mae":
    keep = ("depths", "dims", "stem", "patch_size", "in_chans", "bands")
    return {"arch": "convnextv2", **{k: spec[k] for k in keep}, "num_classes": 0}
  if arch in ("mae", "scale_mae"):
    return {"arch": "vit", **{k: spec[k] for k in _VIT_KEYS if k in spec}}
  if arch in WRAPPERS:
    return dict(spec["encoder"])
  raise CheckpointError(f"unknown arch {arch!r}; choose from {ARCHS}")


def encoder_params(spec: Mapping[str, Any], params: Mapping) -> Mapping:
  return params["encoder"] if spec["arch"] in ("mp_mae", "mae", "scale_mae", *WRAPPERS) else params


def build(spec: Mapping[str, Any], dtype: jnp.dtype = jnp.float32):
  """The Flax module `spec` describes."""
  arch = spec.get("arch")
  if arch == "dense_contrastive":
    return dense_contrastive.from_spec(spec, dtype)
  if arch == "gfm":
    return SimMIM(encoder=build(spec["encoder"], dtype),
                  distill_layer=int(spec.get("distill_layer", -2)),
                  teacher_dim=int(spec.get("teacher_dim", 0)))
  if arch in ("convnextv2", "mp_mae"):
    common = dict(depths=tuple(spec["depths"]), dims=tuple(spec["dims"]), stem=spec["stem"],
                  patch_size=int(spec["patch_size"]), dtype=dtype)
    if arch == "convnextv2":
      return ConvNeXtV2(**common, num_classes=int(spec.get("num_classes", 0)))
    return MPMAE(outputs={k: tuple(v) for k, v in spec["outputs"].items()},
                 decoder_dim=int(spec["decoder_dim"]), **common)
  if arch in ("vit", "mae", "scale_mae"):
    common = dict(patch_size=int(spec["patch_size"]), embed_dim=int(spec["embed_dim"]),
                  depth=int(spec["depth"]), num_heads=int(spec["num_heads"]),
                  mlp_ratio=float(spec.get("mlp_ratio", 4.0)), dtype=dtype)
    if arch == "vit":
      return ViT(**common, pos_layout=spec.get("pos_layout", "concat"))
    if arch == "scale_mae":
      return ScaleMAE(decoder_embed_dim=int(spec["decoder_embed_dim"]),
                      decoder_depth=int(spec["decoder_depth"]),
                      decoder_num_heads=int(spec["decoder_num_heads"]),
                      fcn_dim=int(spec["fcn_dim"]), fcn_layers=int(spec["fcn_layers"]),
                      independent_fcn_head=bool(spec["independent_fcn_head"]),
                      progressive=bool(spec.get("progressive", False)),
                      out_chans=int(spec.get("out_chans", 0)),
                      pos_variant="paper" if spec.get("pos_layout") == "interleave" else "code",
                      **common)
    return MAE(decoder_embed_dim=int(spec["decoder_embed_dim"]),
               decoder_depth=int(spec["decoder_depth"]),
               decoder_num_heads=int(spec["decoder_num_heads"]), **common)
  raise CheckpointError(f"spec arch {arch!r} is unknown; choose from {ARCHS}")


def features_fn(spec: Mapping[str, Any], dtype: jnp.dtype = jnp.float32, gsd: float | None = None
                ) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
  """(encoder params, images (N, H, W, C)) -> (N, D) embeddings.

  ConvNeXt V2: LayerNorm of the global average pool (the reference's `forward_features`);
  ViT: the CLS token after the final norm (MAE's and Scale-MAE's kNN features). `gsd` is the
  ViT's position-grid scale (Scale-MAE's GSD ratio; None = 1, plain MAE).
  """
  enc = encoder_spec(spec)
  model = build(enc, dtype)
  if enc["arch"] == "convnextv2":
    def fn(params, images):
      return model.apply({"params": params}, images, method="features").astype(jnp.float32)
  else:
    def fn(params, images):
      out = model.apply({"params": params}, images, pos_scale=None if gsd is None else float(gsd))
      return out[:, 0].astype(jnp.float32)
  return fn


def check_images(spec: Mapping[str, Any], images: np.ndarray, what: str) -> None:
  """A clear error when `images` (N, H, W, C) do not fit the encoder."""
  if images.ndim != 4:
    raise CheckpointError(f"{what}: expected a stack of images (N, H, W, C), got shape "
                          f"{images.shape}")
  want = int(spec["in_chans"])
  if images.shape[-1] != want:
    bands = spec.get("bands")
    named = f" ({', '.join(bands)})" if bands else ""
    raise CheckpointError(f"{what}: the images have {images.shape[-1]} bands (last axis of "
                          f"{images.shape}) but the encoder takes {want}{named}; pass channels "
                          "in the encoder's band order (use --channels-first for (N, C, H, W))")


# ----------------------------------------------------------------------------------------------
# Reading and writing.


def save(path: str, spec: Mapping[str, Any], params: Any, *, source: str = "") -> str:
  """Writes a model folder atomically: a crash leaves no folder that looks complete."""
  path = os.path.abspath(path)
  if os.path.exists(path):
    raise CheckpointError(f"{path} exists; choose a new --out or remove it first")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".partial-", dir=parent)
  try:
    params = jax.tree.map(lambda x: np.asarray(x), params)
    with ocp.PyTreeCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "params"), params)
    with open(os.path.join(tmp, "model.json"), "w") as f:
      json.dump({"format": FORMAT, "spec": dict(spec), "source": source}, f, indent=2)
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def _single_device_target(tree) -> Any:
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)


def _restore(path: str, target: Any, partial: bool) -> Any:
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=partial))


def _as_dict(tree) -> Any:
  if isinstance(tree, Mapping):
    return {k: _as_dict(v) for k, v in tree.items()}
  return tree


def _load_model_dir(path: str) -> Pretrained:
  meta_path = os.path.join(path, "model.json")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{meta_path}: unreadable ({e})") from e
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
  pdir = os.path.join(path, "params")
  try:
    tree = _as_dict(ocp.PyTreeCheckpointer().metadata(pdir).item_metadata.tree)
    params = _restore(pdir, _single_device_target(tree), partial=False)
  except Exception as e:  # noqa: BLE001 - any read failure: name the folder
    raise CheckpointError(f"{pdir}: cannot read the parameters ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]})") from e
  return Pretrained(dict(meta["spec"]), params, meta.get("source") or path)


def _load_train_step(step_dir: str, config_path: str) -> Pretrained:
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{config_path}: the run's config is unreadable ({e})") from e
  spec = spec_from_config(config)
  state_dir = os.path.join(step_dir, "state")
  try:
    tree = _as_dict(ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree)
    target = {"params": _single_device_target(tree["params"])}
    params = _restore(state_dir, target, partial=True)["params"]
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"{state_dir}: cannot read the parameters ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]})") from e
  return Pretrained(spec, params, step_dir)


def _steps(ckpt_dir: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(ckpt_dir)
                if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n, "state")))


def load(path: str) -> Pretrained:
  """A model from a training workdir, one of its steps, or a model folder (see the module doc)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such checkpoint folder")
  if os.path.exists(os.path.join(path, "model.json")):
    return _load_model_dir(path)
  if os.path.exists(os.path.join(path, "config.json")):
    ckpt_dir = os.path.join(path, "checkpoints")
    steps = _steps(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    if not steps:
      raise CheckpointError(f"{path}: a training workdir without a finished checkpoint in "
                            f"{ckpt_dir}")
    return _load_train_step(os.path.join(ckpt_dir, str(steps[-1])), os.path.join(path, "config.json"))
  if os.path.isdir(os.path.join(path, "state")):
    config = os.path.join(os.path.dirname(os.path.dirname(path)), "config.json")
    if not os.path.exists(config):
      raise CheckpointError(f"{path}: a training step, but its run's config {config} is missing")
    return _load_train_step(path, config)
  raise CheckpointError(f"{path}: not a checkpoint; expected a training workdir (config.json + "
                        "checkpoints/), a step folder (<workdir>/checkpoints/<step>) or a model "
                        "folder (model.json + params/)")
