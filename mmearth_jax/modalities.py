"""The one registry of MMEarth modalities.

Everything that needs to know a modality's bands, dtype, no-data value, task kind or label
mapping reads it from here: the sample writer, the converter, the input pipeline and the model
heads. The facts are those of the upstream MMEarth release: its HDF5 file stores one dataset per
modality, in the dtypes, band orders and no-data values below. Band names and orders come from
`mmearth_jax.bands`, the one home of band facts.

Pixel modalities are stored and served channels-last, `(H, W, C)`, the layout JAX convolutions
want; the upstream HDF5 file stores them channels-first, `(C, H, W)`.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from mmearth_jax import bands as B

PIXEL = "pixel"
IMAGE = "image"

REGRESSION = "regression"
SEGMENTATION = "segmentation"
CLASSIFICATION = "classification"

S2_TYPES = ("l1c", "l2a")


@dataclasses.dataclass(frozen=True)
class Modality:
  """One dataset of the upstream `.h5` file.

  Attributes:
    name: dataset name in the HDF5 file (and key everywhere in this library).
    bands: band names in the order the file stores them.
    dtype: numpy dtype the file stores.
    nodata: the value that marks a missing measurement (`None`: every value is valid).
    level: `pixel` (a map on the 10 m grid) or `image` (one vector per tile).
    task: how the modality is used as a pretext target (`None`: not a target).
    num_classes: classes of a segmentation or classification target.
    label_map: raw value -> class index for segmentation labels; any other value is missing.
    stats_key: key of `band_stats.json` used to z-score it (`None`: not normalised).
      Sentinel-2 picks `sentinel2_l1c` or `sentinel2_l2a` by the tile's `S2_type`.
    unsigned_view: the file's dtype is read as this dtype (canopy height is int8 on disk but its
      values mean 0..255).
    upstream_label_map: raw value -> class as the reference loader (MMEarth-train) makes it,
      where that differs from `label_map`; used only with `data.upstream_compat`.
  """
  name: str
  bands: tuple[str, ...]
  dtype: str
  nodata: float | int | None
  level: str
  task: str | None = None
  num_classes: int = 0
  label_map: Mapping[int, int] | None = None
  stats_key: str | None = None
  unsigned_view: str | None = None
  upstream_label_map: Mapping[int, int] | None = None

  @property
  def num_bands(self) -> int:
    return len(self.bands)

  def band_indices(self, bands: Sequence[str]) -> list[int]:
    """Positions of `bands` in the stored order; a clear error names an unknown band."""
    out = []
    for b in bands:
      if b not in self.bands:
        raise KeyError(f"modality {self.name!r} has no band {b!r}; its bands are {list(self.bands)}")
      out.append(self.bands.index(b))
    return out


S2_BANDS = B.S2_BANDS
S1_BANDS = B.S1_BANDS
ERA5_BANDS = B.ERA5_BANDS

# Dynamic World is stored 1..9 (0 = no data); classes 0..8.
DYNAMIC_WORLD_CLASSES = ("water", "trees", "grass", "flooded_vegetation", "crops",
                         "shrub_and_scrub", "built", "bare", "snow_and_ice")
# ESA WorldCover codes in class order; classes 0..10.
ESA_WORLDCOVER_CODES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
ESA_WORLDCOVER_CLASSES = ("tree_cover", "shrubland", "grassland", "cropland", "built_up",
                          "bare_sparse_vegetation", "snow_and_ice", "permanent_water_bodies",
                          "herbaceous_wetland", "mangroves", "moss_and_lichen")
# ESA WorldCover as the reference loader labels it: it maps the codes to 0..10, then applies its
# no-data test (value 0) once more, so tree cover (code 10 -> class 0) is never a target; values up
# to 10 outside the code list (1..9) are kept as those classes; anything else is missing.
ESA_WORLDCOVER_UPSTREAM_LABELS = {
    **{v: v for v in range(1, len(ESA_WORLDCOVER_CODES)) if v not in ESA_WORLDCOVER_CODES},
    **{code: i for i, code in enumerate(ESA_WORLDCOVER_CODES) if i != 0}}
NUM_BIOMES = 14
NUM_ECOREGIONS = 846

_NEG_INF = float("-inf")

MODALITIES: dict[str, Modality] = {m.name: m for m in [
    Modality("sentinel2", S2_BANDS, "uint16", 0, PIXEL, REGRESSION, stats_key="sentinel2"),
    Modality("sentinel2_cloudmask", ("QA60",), "uint16", 65535, PIXEL,
             stats_key="sentinel2_cloudmask"),
    Modality("sentinel2_cloudprod", ("MSK_CLDPRB",), "uint16", 65535, PIXEL,
             stats_key="sentinel2_cloudprod"),
    Modality("sentinel2_scl", ("SCL",), "uint8", 255, PIXEL),
    Modality("sentinel1", S1_BANDS, "float32", _NEG_INF, PIXEL, REGRESSION, stats_key="sentinel1"),
    Modality("aster", ("elevation", "slope"), "int16", _NEG_INF, PIXEL, REGRESSION,
             stats_key="aster"),
    Modality("era5", ERA5_BANDS, "float32", float("nan"), IMAGE, REGRESSION, stats_key="era5"),
    Modality("dynamic_world", ("label",), "uint8", 0, PIXEL, SEGMENTATION,
             num_classes=len(DYNAMIC_WORLD_CLASSES),
             label_map={v + 1: v for v in range(len(DYNAMIC_WORLD_CLASSES))}),
    Modality("canopy_height_eth", ("height", "std"), "int8", 255, PIXEL, REGRESSION,
             stats_key="canopy_height_eth", unsigned_view="uint8"),
    Modality("esa_worldcover", ("label",), "uint8", 0, PIXEL, SEGMENTATION,
             num_classes=len(ESA_WORLDCOVER_CODES),
             label_map={code: i for i, code in enumerate(ESA_WORLDCOVER_CODES)},
             upstream_label_map=ESA_WORLDCOVER_UPSTREAM_LABELS),
    Modality("lat", ("sin", "cos"), "float32", _NEG_INF, IMAGE, REGRESSION, stats_key="lat"),
    Modality("lon", ("sin", "cos"), "float32", _NEG_INF, IMAGE, REGRESSION, stats_key="lon"),
    Modality("month", ("sin", "cos"), "float32", _NEG_INF, IMAGE, REGRESSION, stats_key="month"),
    Modality("biome", tuple(f"biome_{i}" for i in range(NUM_BIOMES)), "uint8", 255, IMAGE,
             CLASSIFICATION, num_classes=NUM_BIOMES),
    Modality("eco_region", tuple(f"eco_region_{i}" for i in range(NUM_ECOREGIONS)), "uint16", 65535,
             IMAGE, CLASSIFICATION, num_classes=NUM_ECOREGIONS),
]}

# The compound `metadata` dataset: fixed-width byte strings.
METADATA_DTYPE = np.dtype([("tile_id", "S100"), ("S2_type", "S10")])

# Keys `band_stats.json` carries.
BAND_STATS_KEYS = ("sentinel2_l1c", "sentinel2_l2a", "sentinel2_cloudmask", "sentinel2_cloudprod",
                   "sentinel1", "aster", "canopy_height_eth", "lat", "lon", "month", "era5")


def stats_key_for(modality: Modality, s2_type: str) -> str | None:
  """The `band_stats.json` key that normalises `modality` on a tile of `s2_type`."""
  if modality.name == "sentinel2":
    return f"sentinel2_{s2_type}"
  return modality.stats_key


def get(name: str) -> Modality:
  try:
    return MODALITIES[name]
  except KeyError:
    raise KeyError(f"unknown modality {name!r}; known: {sorted(MODALITIES)}") from None


# ---------------------------------------------------------------------------------------------
# Input and output selections (the paper's ablations), as {modality: bands}.

# MMEarth's encoder input: the 12 Sentinel-2 bands without the cirrus band B10.
S2_INPUT_BANDS = B.S2_INPUT_BANDS
RGB_BANDS = B.RGB

INPUT_PRESETS: dict[str, tuple[str, ...]] = {
    "s2": S2_INPUT_BANDS,
    "rgb": RGB_BANDS,
    "s2_all": S2_BANDS,
}

# The 12 pretext targets of MP-MAE in the upstream order (MMEarth's OUT_MODALITIES), which is
# also the order of its loss's `log_vars`: an exported model puts each modality's log-variance in
# the slot upstream reads it from.
ALL_OUTPUTS = ("sentinel2", "sentinel1", "aster", "era5", "dynamic_world", "canopy_height_eth",
               "lat", "lon", "biome", "eco_region", "month", "esa_worldcover")


OUTPUT_PRESETS = ("all", "s2_only", "rgb_only", "pixel_only", "image_only")


def _bands_for_output(name: str, s2_bands: Sequence[str]) -> tuple[str, ...]:
  return tuple(s2_bands) if name == "sentinel2" else MODALITIES[name].bands


def output_preset(preset: str, input_bands: Sequence[str] = S2_INPUT_BANDS) -> dict[str, tuple[str, ...]]:
  """Output modalities of a paper ablation: all, s2_only, rgb_only, pixel_only, image_only.

  Sentinel-2 as a target reconstructs the input bands (the MAE target), except `rgb_only`.
  """
  if preset == "all":
    names = ALL_OUTPUTS
  elif preset in ("s2_only", "rgb_only"):
    names = ("sentinel2",)
  elif preset == "pixel_only":
    names = tuple(n for n in ALL_OUTPUTS if MODALITIES[n].level == PIXEL)
  elif preset == "image_only":
    # The image-level ablation still reconstructs the masked input, as in the paper.
    names = ("sentinel2",) + tuple(n for n in ALL_OUTPUTS if MODALITIES[n].level == IMAGE)
  else:
    raise KeyError(f"unknown output preset {preset!r}; choose from "
                   "all, s2_only, rgb_only, pixel_only, image_only")
  s2 = RGB_BANDS if preset == "rgb_only" else input_bands
  return {n: _bands_for_output(n, s2) for n in names}


def _as_list(spec: str | Sequence[str], presets) -> str | list[str]:
  """A preset name stays a string; "a,b" (as a config override writes it) becomes a list."""
  if isinstance(spec, str) and (spec in presets or "," not in spec and spec not in MODALITIES
                                and spec not in S2_BANDS):
    return spec
  return [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)


def resolve_input(spec: str | Sequence[str]) -> tuple[str, ...]:
  """Sentinel-2 input bands from a preset name, a band list, or "B4,B3,B2"."""
  spec = _as_list(spec, INPUT_PRESETS)
  if isinstance(spec, str):
    if spec not in INPUT_PRESETS:
      raise KeyError(f"unknown input preset {spec!r}; choose from {sorted(INPUT_PRESETS)} "
                     "or give a list of Sentinel-2 bands")
    return INPUT_PRESETS[spec]
  MODALITIES["sentinel2"].band_indices(spec)
  return tuple(spec)


def resolve_outputs(spec: str | Sequence[str], input_bands: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """Output modalities from a preset name, a list of modality names, or "sentinel1,biome"."""
  spec = _as_list(spec, OUTPUT_PRESETS)
  if isinstance(spec, str):
    return output_preset(spec, input_bands)
  out = {}
  for name in spec:
    m = get(name)
    if m.task is None:
      raise KeyError(f"modality {name!r} is not a pretext target")
    out[name] = _bands_for_output(name, input_bands)
  return out
