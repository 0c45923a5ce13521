"""Pretrained models on disk: what `embed`, `knn`, `probe`, `to-torch` and `from-torch` read and
write, and what `train` can start from.

A CHECKPOINT argument is any of
  * a training workdir (its `config.json` and the newest step under `checkpoints/`),
  * one step of a training run (`<workdir>/checkpoints/<step>`),
  * a model folder written by `save` (e.g. by `mmearth-jax from-torch`):
      <dir>/model.json   {"format": FORMAT, "spec": {...}, "source": "...", "card": {...}}
      <dir>/params/      the parameters (an Orbax PyTree checkpoint)

Each comes with its model card (`mmearth_jax.cards`): a run's `<workdir>/card.json` (written by
the trainer when the run starts) with the step filled in, or model.json's "card". Runs and folders
written before cards get a card computed from the spec (architecture facts only).

A spec is a JSON-able description of the architecture: {"arch": <name>, ...}. Each arch
belongs to a module of `mmearth_jax.methods`, whose docstring lists its keys: the plain encoders
"convnextv2" and "vit" (`methods.encoders`), "mp_mae", "scale_mae" and "mae", "gfm",
"dense_contrastive". `bands` names the encoder's input channels in order (MMEarth band names), or
None if unknown.
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

from mmearth_jax import cards, methods
from mmearth_jax.config_lib import ConfigError

FORMAT = "mmearth_jax.model/1"


class CheckpointError(ValueError):
  pass


@dataclasses.dataclass
class Pretrained:
  spec: dict
  params: Any
  source: str  # where it came from, for messages
  card: dict | None = None  # the model card (`mmearth_jax.cards`); None: the spec's

  def __post_init__(self):
    if self.card is None:
      self.card = cards.from_spec(_known(self.spec), {"source": self.source})

  @property
  def bands(self) -> list[str] | None:
    return self.spec.get("bands")


# ----------------------------------------------------------------------------------------------
# Specs.


def spec_from_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict:
  """The spec of the model a training config (or a run's config.json) builds."""
  c = config if isinstance(config, Mapping) else config.to_dict()
  try:
    return methods.get(c.get("method")).spec_from_config(c)
  except ConfigError as e:
    raise CheckpointError(str(e)) from e


def encoder_spec(spec: Mapping[str, Any]) -> dict:
  """The spec of the encoder inside `spec` (itself if it is an encoder)."""
  return methods.encoder_spec(_known(spec))


def encoder_params(spec: Mapping[str, Any], params: Mapping) -> Mapping:
  """The encoder's parameters inside the parameters of the model `spec` describes."""
  return methods.encoder_params(_known(spec), params)


def build(spec: Mapping[str, Any], dtype: jnp.dtype = jnp.float32):
  """The Flax module `spec` describes."""
  return methods.build(_known(spec), dtype)


def _known(spec: Mapping[str, Any]) -> Mapping[str, Any]:
  try:
    methods.arch(spec)
  except ValueError as e:
    raise CheckpointError(str(e)) from e
  return spec


def _encoder_fn(spec: Mapping[str, Any], dtype: jnp.dtype, gsd: float | None, kind: str
                ) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
  enc = encoder_spec(spec)
  model = build(enc, dtype)
  apply = getattr(methods.arch(enc), kind)  # Arch.features or Arch.dense

  def fn(params, images):
    return apply(model, params, images, gsd).astype(jnp.float32)
  return fn


def features_fn(spec: Mapping[str, Any], dtype: jnp.dtype = jnp.float32, gsd: float | None = None
                ) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
  """(encoder params, images (N, H, W, C)) -> (N, D) float32 embeddings.

  ConvNeXt V2: LayerNorm of the global average pool (the reference's `forward_features`);
  ViT: the CLS token after the final norm (MAE's and Scale-MAE's kNN features). `gsd` is the
  ViT's position-grid scale (Scale-MAE's GSD ratio; None = 1, plain MAE).
  """
  return _encoder_fn(spec, dtype, gsd, "features")


def dense_fn(spec: Mapping[str, Any], dtype: jnp.dtype = jnp.float32, gsd: float | None = None
             ) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
  """(encoder params, images (N, H, W, C)) -> (N, h, w, D) float32 feature maps, laid out as the
  card's output_stride and output_origin_px say. ConvNeXt V2: the last stage's map (the features
  a U-Net decoder reads); ViT: the patch tokens after the final norm."""
  return _encoder_fn(spec, dtype, gsd, "dense")


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


def save(path: str, spec: Mapping[str, Any], params: Any, *, source: str = "",
         card: Mapping[str, Any] | None = None) -> str:
  """Writes a model folder atomically: a crash leaves no folder that looks complete. `card`
  defaults to the spec's (`cards.from_spec`)."""
  card = dict(card) if card is not None else cards.from_spec(_known(spec), {"source": source})
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
      json.dump({"format": FORMAT, "spec": dict(spec), "source": source, "card": card}, f,
                indent=2)
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


def _model_meta(path: str) -> dict:
  meta_path = os.path.join(path, "model.json")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{meta_path}: unreadable ({e})") from e
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
  return meta


def _load_model_dir(path: str) -> Pretrained:
  meta = _model_meta(path)
  pdir = os.path.join(path, "params")
  try:
    tree = _as_dict(ocp.PyTreeCheckpointer().metadata(pdir).item_metadata.tree)
    params = _restore(pdir, _single_device_target(tree), partial=False)
  except Exception as e:  # noqa: BLE001 - any read failure: name the folder
    raise CheckpointError(f"{pdir}: cannot read the parameters ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]})") from e
  return Pretrained(dict(meta["spec"]), params, meta.get("source") or path, meta.get("card"))


def _run_spec(config_path: str) -> dict:
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{config_path}: the run's config is unreadable ({e})") from e
  return spec_from_config(config)


def _step_card(step_dir: str, config_path: str, spec: Mapping[str, Any]) -> dict:
  """The run's card.json for this step; a run from before model cards gets its spec's."""
  workdir = os.path.dirname(config_path)
  path = os.path.join(workdir, "card.json")
  note = "no card.json: a run from before model cards"
  if os.path.exists(path):
    try:
      return cards.for_step(cards.read(path), step_dir)
    except ValueError as e:  # the parameters are still good: give the spec's card
      note = str(e)
  card = cards.from_spec(_known(spec), {"kind": "trained", "workdir": workdir, "note": note})
  return cards.for_step(card, step_dir)


def _load_train_step(step_dir: str, config_path: str) -> Pretrained:
  spec = _run_spec(config_path)
  state_dir = os.path.join(step_dir, "state")
  try:
    tree = _as_dict(ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree)
    target = {"params": _single_device_target(tree["params"])}
    params = _restore(state_dir, target, partial=True)["params"]
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"{state_dir}: cannot read the parameters ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]})") from e
  return Pretrained(spec, params, step_dir, _step_card(step_dir, config_path, spec))


def _steps(ckpt_dir: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(ckpt_dir)
                if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n, "state")))


def _locate(path: str) -> tuple[str, str | None]:
  """(the model folder or step folder `path` names, the run's config.json for a step, else
  None); see the module doc."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such checkpoint folder")
  if os.path.exists(os.path.join(path, "model.json")):
    return path, None
  if os.path.exists(os.path.join(path, "config.json")):
    ckpt_dir = os.path.join(path, "checkpoints")
    steps = _steps(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    if not steps:
      raise CheckpointError(f"{path}: a training workdir without a finished checkpoint in "
                            f"{ckpt_dir}")
    return os.path.join(ckpt_dir, str(steps[-1])), os.path.join(path, "config.json")
  if os.path.isdir(os.path.join(path, "state")):
    config = os.path.join(os.path.dirname(os.path.dirname(path)), "config.json")
    if not os.path.exists(config):
      raise CheckpointError(f"{path}: a training step, but its run's config {config} is missing")
    return path, config
  raise CheckpointError(f"{path}: not a checkpoint; expected a training workdir (config.json + "
                        "checkpoints/), a step folder (<workdir>/checkpoints/<step>) or a model "
                        "folder (model.json + params/)")


def load(path: str) -> Pretrained:
  """A model from a training workdir, one of its steps, or a model folder (see the module doc)."""
  where, config = _locate(path)
  return _load_model_dir(where) if config is None else _load_train_step(where, config)


def read_card(path: str) -> dict:
  """The model card of a CHECKPOINT (as `load` takes), without reading its parameters."""
  where, config = _locate(path)
  if config is not None:
    return _step_card(where, config, _run_spec(config))
  meta = _model_meta(where)
  return meta.get("card") or cards.from_spec(_known(meta["spec"]),
                                             {"source": meta.get("source") or where})
