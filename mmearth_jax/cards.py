"""Model cards: what a pretrained model expects as input and where it came from, as a JSON-able
dict that travels with every model folder (`model.json`), training run (`<workdir>/card.json`)
and PyTorch export (`<file>.card.json`, and the `.safetensors` metadata).

The keys of a card:

  format            FORMAT
  method            the pretraining method (`mp_mae`, `scale_mae`, `mae`, `gfm`,
                    `dense_contrastive`), None when unknown
  arch              the spec's arch (the whole model, e.g. "mp_mae"); encoder_arch: its encoder's
  in_chans          input channels
  bands             [{"name": "B2", "wavelength_nm": 490}, ...] in the encoder's channel order
                    (names and centre wavelengths from `mmearth_jax.bands`), None when unknown
  normalisation     {"L1C": {...}, "L2A": {...}}: per input band, in the encoder's band order, the
                    mean and std the pretraining images were z-scored with, for Sentinel-2 tiles
                    of that processing level (either may be absent), each with "units" (the raw
                    values they apply to: MMEarth's stored uint16 Sentinel-2 values) and
                    "stats_key" (the data pipeline's statistics key); {"images": {...}} for a
                    model pretrained on an image folder / TFDS; {} when unknown. Degenerate bands
                    (std 0 or not finite) hold mean 0, std 1, as the pipeline applies them.
  gsd_m             ground sample distance of the pretraining pixels (m), None when unknown
  patch_size        the encoder's patch (ViT) or masking patch (ConvNeXt V2 FCMAE)
  input_size        the training crop (px), None when unknown
  min_input_size    the smallest input side (px) the encoder accepts (gives a 1 x 1 map)
  input_multiple    the input side must be a multiple of this (ViT: its patch; ConvNeXt: 1)
  output_stride     input pixels per feature-map cell
  output_origin_px  the centre of the first feature-map cell in input pixels (pixel q spans
                    [q, q + 1)); cell i is centred at output_origin_px + i * output_stride
  feature_dim       the width of the encoder's features
  provenance        {"kind": "trained" | "imported" | "exported", ...}: config, workdir and step;
                    or the imported file and its layout; or the exported file and the card of
                    what it was exported from
  assumed           every value that was assumed rather than known, in words
  unknown           every value that is not known (None or {} above), in words
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from mmearth_jax import bands as B
from mmearth_jax import methods
from mmearth_jax import modalities as M

FORMAT = "mmearth_jax.card/1"
Card = dict
CARD_SUFFIX = ".card.json"  # `to-torch --out atto.pth` writes atto.pth.card.json beside it
METADATA_KEY = "mmearth_jax.card"  # the card (JSON) in a .safetensors file's metadata
IMAGES = "images"  # the normalisation of a model pretrained on an image folder / TFDS
LEVEL_WORDS = {"l1c": "top-of-atmosphere (Level-1C)", "l2a": "surface (Level-2A)"}
IMAGE_UNITS = ("the image's integer values divided by their dtype's maximum (8-bit: / 255), "
               "channels in the encoder's order")


# ----------------------------------------------------------------------------------------------
# Building cards.


def band_entries(bands: Sequence[str] | None) -> list[dict] | None:
  """[{"name", "wavelength_nm"}] of band names (wavelength None for a non-Sentinel-2 name)."""
  if bands is None:
    return None
  return [{"name": b, "wavelength_nm": B.S2_WAVELENGTH_NM.get(b)} for b in bands]


def band_names(card: Mapping[str, Any]) -> list[str] | None:
  entries = card.get("bands")
  return None if entries is None else [e["name"] for e in entries]


def _applied(st: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) as the data pipeline applies them: a band with std 0 or not finite is left
  as it is (mean 0, std 1), a non-finite mean is 0."""
  mean = np.asarray(st["mean"], np.float64)
  std = np.asarray(st["std"], np.float64)
  ok = np.isfinite(std) & (std > 0)
  return np.where(np.isfinite(mean) & ok, mean, 0.0), np.where(ok, std, 1.0)


def normalisation(band_stats: Mapping[str, Any], bands: Sequence[str] | None) -> dict:
  """The card's `normalisation` from statistics keyed like the data pipeline's
  (`modalities.stats_key_for`: "sentinel2_l1c", "sentinel2_l2a"; one value per stored Sentinel-2
  band) for the encoder's `bands`, plus {"images": ...} of an image-folder run."""
  out = {}
  if band_stats.get(IMAGES):
    mean, std = _applied(band_stats[IMAGES])
    out[IMAGES] = {"mean": mean.tolist(), "std": std.tolist(), "units": IMAGE_UNITS,
                   "stats_key": IMAGES}
  s2 = M.get("sentinel2")
  if bands is None or any(b not in s2.bands for b in bands):
    return out
  idx = s2.band_indices(bands)
  for s2_type in M.S2_TYPES:
    key = M.stats_key_for(s2, s2_type)
    if not band_stats.get(key):
      continue
    mean, std = _applied(band_stats[key])
    if len(mean) != len(s2.bands) or len(std) != len(s2.bands):
      raise ValueError(f"band statistics {key!r} hold {len(mean)} means and {len(std)} stds; "
                       f"expected one per stored Sentinel-2 band ({len(s2.bands)}: "
                       f"{', '.join(s2.bands)})")
    out[s2_type.upper()] = {
        "mean": [float(mean[i]) for i in idx], "std": [float(std[i]) for i in idx],
        "units": f"{B.S2_STORED_UNITS}, {LEVEL_WORDS[s2_type]}, as stored by MMEarth (uint16; "
                 "0 = no data, left out of the statistics)",
        "stats_key": key}
  return out


def _unknowns(card: Mapping[str, Any]) -> list[str]:
  out = []
  if card["method"] is None:
    out.append("method: the weights alone do not say how the encoder was pretrained")
  if card["bands"] is None:
    out.append(f"bands: {card['in_chans']} input channels without names")
  if not card["normalisation"]:
    out.append("normalisation: no statistics of the pretraining data came with the model")
  if card["gsd_m"] is None:
    out.append("gsd_m: the ground sample distance of the pretraining pixels")
  if card["input_size"] is None:
    out.append("input_size: the training crop is not recorded")
  return out


def from_spec(spec: Mapping[str, Any], provenance: Mapping[str, Any] | None = None) -> Card:
  """The card of a spec alone: architecture facts, nothing about the data (a model folder or
  run written before model cards)."""
  enc = methods.encoder_spec(spec)
  card = {"format": FORMAT, "method": None if methods.is_encoder(spec) else spec["arch"],
          "arch": spec["arch"], "encoder_arch": enc["arch"], "in_chans": int(enc["in_chans"]),
          "bands": band_entries(enc.get("bands")), "normalisation": {}, "gsd_m": None,
          **methods.geometry(spec), "provenance": dict(provenance or {}), "assumed": []}
  card["unknown"] = _unknowns(card)
  return card


def for_training(config: ml_collections.ConfigDict, spec: Mapping[str, Any],
                 info: methods.DataInfo, workdir: str,
                 provenance: Mapping[str, Any] | None = None) -> Card:
  """The card of a training run: `spec` trained by `config` on the data `info` describes.
  `provenance` adds to what the config says (the CLI gives the config name and overrides)."""
  card = from_spec(spec)
  card["method"] = config.method
  card["normalisation"] = normalisation(info.band_stats or {}, band_names(card))
  card["gsd_m"] = info.gsd_m
  if info.input_size:
    card["input_size"] = int(info.input_size)
  card["provenance"] = {"kind": "trained", "method": config.method,
                        "variant": config.model.get("variant"), **dict(provenance or {}),
                        "workdir": os.path.abspath(workdir), "data": info.source, "step": None}
  if config.get("init_from"):
    card["provenance"]["init_from"] = config.init_from
  card["unknown"] = _unknowns(card)
  return card


def for_step(card: Mapping[str, Any], step_dir: str) -> Card:
  """A run's card for one of its checkpoints (`<workdir>/checkpoints/<step>`)."""
  out = json.loads(json.dumps(card))
  name = os.path.basename(os.path.normpath(step_dir))
  out.setdefault("provenance", {})
  out["provenance"].update(step=int(name) if name.isdigit() else None,
                           checkpoint=os.path.abspath(step_dir))
  return out


def for_import(spec: Mapping[str, Any], notes: Sequence[str], path: str, layout: str, *,
               bands_given: bool, band_stats: Mapping[str, Any] | None = None,
               stats_from: str = "", attached: Mapping[str, Any] | None = None,
               attached_from: str = "") -> Card:
  """The card of weights imported from the PyTorch file `path`: what the importer inferred, the
  statistics of `band_stats` (a band_stats.json given by the user), or the facts of the card
  `attached` to the file (written by `to-torch`); every value assumed is listed in "assumed"."""
  card = from_spec(spec, {"kind": "imported", "file": os.path.abspath(path), "layout": layout})
  card["assumed"] = [n[len("assumed: "):] for n in notes if n.startswith("assumed: ")]
  if attached is not None:
    card["provenance"]["card_from"] = attached_from
  named = bands_given or (attached is not None and _take_attached(card, attached, bands_given))
  if card["bands"] is not None and not named:
    card["assumed"].append(f"bands {','.join(band_names(card))}: guessed from the "
                           f"{card['in_chans']} input channels; give --bands if they differ")
  if band_stats is not None:
    card["normalisation"] = normalisation(band_stats, band_names(card))
    card["provenance"]["band_stats_from"] = os.path.abspath(stats_from)
    if not card["normalisation"]:
      raise ValueError(f"{stats_from}: no statistics for the encoder's bands "
                       f"({', '.join(band_names(card) or ['unknown'])}); expected keys "
                       "sentinel2_l1c / sentinel2_l2a with one value per stored Sentinel-2 band")
  names = band_names(card) or []
  if card["gsd_m"] is None and names and all(b in B.S2_WAVELENGTH_NM for b in names):
    card["gsd_m"] = B.MMEARTH_GSD_M
    card["assumed"].append(f"gsd_m {B.MMEARTH_GSD_M:g}: Sentinel-2's 10 m grid, as MMEarth's "
                           "(the file does not say)")
  card["unknown"] = _unknowns(card)
  return card


def for_finetune(card: Card, normalisation: Mapping[str, Any], *, input_size: int,
                 gsd_m: float | None) -> Card:
  """The card of a fine-tuned segmenter (`card`: its spec's): the normalisation and GSD of the
  images it was fine-tuned on, and its output, one class per input pixel."""
  card = dict(card, normalisation=dict(normalisation), input_size=int(input_size),
              output_stride=1, output_origin_px=0.5, gsd_m=gsd_m)
  card["unknown"] = _unknowns(card)
  return card


def _take_attached(card: Card, attached: Mapping[str, Any], bands_given: bool) -> bool:
  """Fills `card` from the card attached to an imported file, when that card describes these
  weights (same input channels and feature width); True when it named the bands."""
  for key in ("in_chans", "feature_dim"):
    if attached.get(key) != card[key]:
      card["assumed"].append(f"ignored the attached card: its {key} {attached.get(key)} is not "
                             f"the weights' {card[key]}")
      return False
  named = not bands_given and attached.get("bands") is not None
  if named:
    card["bands"] = band_entries([e["name"] for e in attached["bands"]])
  for key in ("method", "normalisation", "gsd_m", "input_size"):
    if attached.get(key) is not None:
      card[key] = attached[key]
  card["assumed"] += list(attached.get("assumed", []))
  card["provenance"]["card"] = attached.get("provenance", {})
  return named


def for_export(card: Mapping[str, Any], spec: Mapping[str, Any], layout: str, path: str) -> Card:
  """The card written beside a PyTorch export of the model `spec` describes."""
  out = json.loads(json.dumps(card))
  out["arch"] = spec["arch"]
  out["provenance"] = {"kind": "exported", "file": os.path.abspath(path), "layout": layout,
                       "from": card.get("provenance", {})}
  return out


# ----------------------------------------------------------------------------------------------
# Files.


def card_path(weights: str) -> str:
  """Where the card of a PyTorch file goes: `<file>.card.json` (atto.pth -> atto.pth.card.json)."""
  return weights + CARD_SUFFIX


def write(card: Mapping[str, Any], path: str) -> str:
  """Writes `card` to `path` atomically (a temporary file in the same folder, then renamed)."""
  path = os.path.abspath(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial",
                             dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(card, f, indent=2)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def read(path: str) -> Card:
  """A card from a JSON file."""
  try:
    with open(path) as f:
      card = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a readable model card ({e})") from e
  if not isinstance(card, dict) or "bands" not in card:
    raise ValueError(f"{path}: not a model card (a JSON object with 'bands', 'normalisation', ...)")
  return card


def metadata(card: Mapping[str, Any]) -> dict[str, str]:
  """The card as `.safetensors` metadata (string values)."""
  return {METADATA_KEY: json.dumps(card)}


def read_attached(weights: str) -> tuple[Card | None, str]:
  """(the card that came with a PyTorch file, where it was read), or (None, ""): the
  `<file>.card.json` beside it, else the card in a `.safetensors` file's metadata."""
  beside = card_path(weights)
  if os.path.exists(beside):
    return read(beside), beside
  if weights.lower().endswith(".safetensors"):
    from safetensors import safe_open  # numpy framework: no torch
    try:
      with safe_open(weights, framework="np") as f:
        text = (f.metadata() or {}).get(METADATA_KEY)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the importer
      return None, ""
    if text:
      return json.loads(text), f"{weights} (metadata {METADATA_KEY})"
  return None, ""


def read_band_stats(path: str) -> dict:
  """Band statistics from MMEarth's `<stem>_band_stats.json`, a shards folder's manifest.json
  (its `band_stats`) or that folder."""
  file = os.path.join(path, "manifest.json") if os.path.isdir(path) else path
  try:
    with open(file) as f:
      stats = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{file}: cannot read band statistics ({e})") from e
  if isinstance(stats, dict) and isinstance(stats.get("band_stats"), dict):
    stats = stats["band_stats"]
  s2 = M.get("sentinel2")
  keys = [M.stats_key_for(s2, t) for t in M.S2_TYPES]
  if not isinstance(stats, dict) or not any(k in stats for k in keys):
    raise ValueError(f"{file}: no Sentinel-2 band statistics; expected a band_stats.json (or a "
                     f"shards manifest.json) with {' / '.join(keys)}")
  return stats


# ----------------------------------------------------------------------------------------------
# Using cards.


def normalise(card: Mapping[str, Any], images: np.ndarray, level: str = "L2A") -> np.ndarray:
  """Raw images (..., C), channels in the encoder's band order and in the card's units,
  z-scored per band with the card's statistics for `level` ("L1C", "L2A" or "images"), as
  float32. (The training pipeline also sets no-data pixels, raw 0, to 0 after z-scoring.)"""
  norm = card.get("normalisation") or {}
  key = next((k for k in norm if k.lower() == level.lower()), None)
  if key is None:
    have = ", ".join(sorted(norm)) or "none"
    raise ValueError(f"the model card has no {level} normalisation statistics (it has: {have}; "
                     f"from {_origin(card)}); z-score the images yourself, or import the model "
                     "again with the pretraining data's statistics (from-torch --band-stats)")
  mean = np.asarray(norm[key]["mean"], np.float32)
  std = np.asarray(norm[key]["std"], np.float32)
  x = np.asarray(images, np.float32)
  if x.ndim == 0 or x.shape[-1] != mean.size:
    names = ", ".join(band_names(card) or []) or f"{mean.size} bands"
    raise ValueError(f"the images have {x.shape[-1] if x.ndim else 0} bands (last axis of shape "
                     f"{x.shape}) but the card's {key} statistics are for {mean.size} ({names}); "
                     "pass channels last, in the encoder's band order")
  return (x - mean) / std


def _origin(card: Mapping[str, Any]) -> str:
  p = card.get("provenance") or {}
  return str(p.get("file") or p.get("workdir") or p.get("source") or "an unknown source")


def _value(v: Any) -> str:
  return "unknown" if v is None else str(v)


def format_card(card: Mapping[str, Any]) -> str:
  """The card as text: a summary, a table of the bands and their statistics, provenance,
  assumptions and unknowns."""
  lines = [f"method            {_value(card.get('method'))}",
           f"arch              {card.get('arch')} (encoder {card.get('encoder_arch')}, "
           f"{card.get('in_chans')} input channels)"]
  for key in ("gsd_m", "patch_size", "input_size", "min_input_size", "input_multiple",
              "output_stride", "output_origin_px", "feature_dim"):
    lines.append(f"{key:<17} {_value(card.get(key))}")
  lines += _band_table(card)
  prov = card.get("provenance") or {}
  lines.append("provenance")
  lines += [f"  {k:<15} {json.dumps(v) if isinstance(v, (dict, list)) else _value(v)}"
            for k, v in prov.items()]
  for key in ("assumed", "unknown"):
    lines += [f"{key}: {item}" for item in card.get(key) or []]
  return "\n".join(lines)


def _band_table(card: Mapping[str, Any]) -> list[str]:
  norm = card.get("normalisation") or {}
  names = band_names(card)
  if names is None:
    return ["bands             unknown"] + [f"normalisation     {k}: {v['units']}"
                                          for k, v in norm.items()]
  head = f"  {'band':<6}{'nm':>6}" + "".join(f"{k + ' mean':>14}{k + ' std':>12}" for k in norm)
  rows = [head]
  for i, entry in enumerate(card["bands"]):
    row = f"  {entry['name']:<6}{_value(entry['wavelength_nm']):>6}"
    row += "".join(f"{v['mean'][i]:>14.6g}{v['std'][i]:>12.6g}" for v in norm.values())
    rows.append(row)
  units = [f"  {k}: {v['units']}" for k, v in norm.items()]
  return [f"bands             {len(names)}, in the encoder's order"] + rows + (
      ["normalisation units"] + units if units else ["normalisation     unknown"])
