"""`mmearth-jax synth`: a small built-in dataset in exactly the upstream MMEarth layout.

The content is learnable, not noise. Each tile gets a location, a month and a climate zone; a
spatially coherent land-cover map (smooth random class fields, arg-maxed) is drawn with class
priors of that zone; every other modality is rendered from the map: Sentinel-2 spectra per class
(top-of-atmosphere offsets for L1C, B10 = 0 for L2A, seasonal vegetation), Sentinel-1 backscatter
per class, elevation and slope, canopy height under trees, ESA WorldCover from the Dynamic World
classes; biome, ecoregion and ERA5 climate follow from location, season and land cover. Quirks of
the real release are reproduced: no-data patches, HH/HV mostly missing, some NaN ERA5, L1C tiles
with no SCL or cloud probability. Deterministic for a seed.

`scene_variation=True` (`synth --scene-variation`) gives each tile its own class appearance
(soil moisture, crop stage, species mix), illumination and haze, as real scenes have: the spectra
of a few labelled tiles then do not fix those of the rest, while Sentinel-1, elevation and canopy
height stay tied to the class. That is the regime where pretraining pays off at few labels (the
label-fraction sweep); the default sample, where class spectra are nearly fixed, is not.
"""
from __future__ import annotations

import json
import os
import tempfile

import h5py
import numpy as np

from mmearth_jax import modalities as M

# Surface reflectance x 1e4 per Dynamic World class, bands in file order (B8A before B8).
_SPECTRA = np.array([
    # B1   B2    B3    B4    B5    B6    B7    B8A   B8    B9    B10  B11   B12
    [300, 400, 500, 350, 300, 250, 230, 200, 210, 100, 10, 80, 50],            # water
    [250, 300, 500, 300, 800, 2200, 2800, 3000, 3100, 900, 10, 1500, 700],     # trees
    [350, 450, 750, 600, 1200, 2300, 2700, 2900, 2900, 900, 15, 2300, 1400],   # grass
    [300, 400, 600, 450, 900, 1800, 2100, 2200, 2200, 700, 10, 1200, 600],     # flooded veg.
    [400, 500, 800, 700, 1300, 2600, 3100, 3300, 3300, 1000, 15, 2500, 1500],  # crops
    [500, 650, 900, 1000, 1400, 1900, 2100, 2300, 2250, 900, 20, 2900, 2100],  # shrub and scrub
    [1100, 1200, 1300, 1400, 1500, 1650, 1750, 1850, 1800, 900, 30, 2200, 1900],  # built
    [1300, 1500, 1900, 2300, 2600, 2800, 2950, 3100, 3050, 1100, 30, 3800, 3200],  # bare
    [8000, 8500, 8300, 8200, 8000, 7800, 7600, 7200, 7300, 3000, 100, 1500, 1200],  # snow, ice
], np.float32)
# Top-of-atmosphere path radiance added to L1C tiles (blue scatters most); B10 sees cirrus.
_TOA_OFFSET = np.array([1100, 800, 550, 350, 300, 250, 220, 200, 200, 150, 25, 60, 30], np.float32)
_VEGETATION = np.array([0, 1, 1, 1, 1, 1, 0, 0, 0], np.float32)
_NIR = np.array([M.S2_BANDS.index(b) for b in ("B6", "B7", "B8A", "B8")])
# Sentinel-1 VV backscatter in dB per class; VH is lower by the class's depolarisation gap.
_VV_DB = np.array([-22, -7, -11, -9, -10, -10, -2, -14, -13], np.float32)
_VH_GAP = np.array([8, 5, 7, 6, 7, 7, 6, 9, 8], np.float32)
_CANOPY_M = np.array([0, 18, 0.3, 3, 1, 2, 0, 0, 0], np.float32)
# Dynamic World class -> ESA WorldCover code.
_DW_TO_ESA = np.array([80, 10, 30, 90, 40, 20, 50, 60, 70], np.uint8)
_DW_TO_SCL = np.array([6, 4, 4, 4, 4, 4, 5, 5, 11], np.uint8)
# Class priors (log-weights) per climate zone: tropical, arid, temperate, boreal, polar.
_ZONE_PRIORS = np.log(np.array([
    [0.10, 0.40, 0.05, 0.12, 0.18, 0.05, 0.06, 0.03, 0.01],
    [0.03, 0.02, 0.10, 0.01, 0.08, 0.30, 0.06, 0.40, 0.00],
    [0.08, 0.25, 0.20, 0.03, 0.25, 0.07, 0.10, 0.02, 0.00],
    [0.15, 0.45, 0.08, 0.07, 0.04, 0.15, 0.02, 0.02, 0.02],
    [0.10, 0.02, 0.08, 0.05, 0.00, 0.15, 0.00, 0.25, 0.35],
]) + 1e-3)
# (zone, dominant class) -> biome of the 14 WWF biomes (0-based).
_BIOME = np.array([
    [13, 0, 6, 13, 0, 1, 0, 6, 0],      # tropical: mangroves by water, moist forest, savanna
    [12, 11, 7, 12, 12, 12, 12, 12, 12],  # arid: deserts and xeric shrublands, Mediterranean
    [8, 3, 7, 8, 7, 11, 3, 7, 4],       # temperate: broadleaf, grassland, conifer
    [5, 5, 10, 5, 5, 5, 5, 10, 10],     # boreal: taiga, tundra
    [10, 5, 10, 10, 10, 10, 10, 10, 10],  # polar: tundra
])


def _zone(lat: float, rng: np.random.Generator) -> int:
  a = abs(lat)
  if a < 23:
    return 0 if rng.random() > 0.2 else 1
  if a < 35:
    return 1 if rng.random() > 0.4 else 2
  if a < 52:
    return 2
  if a < 66:
    return 3
  return 4


def _interp_matrix(size: int, grid: int) -> np.ndarray:
  """(size, grid) bilinear interpolation weights from a coarse grid to `size` pixels."""
  pos = (np.arange(size) + 0.5) / size * (grid - 1)
  lo = np.minimum(np.floor(pos).astype(int), grid - 2)
  w = pos - lo
  u = np.zeros((size, grid), np.float32)
  u[np.arange(size), lo] = 1 - w
  u[np.arange(size), lo + 1] = w
  return u


def _smooth(rng: np.random.Generator, size: int, grid: int, channels: int) -> np.ndarray:
  """Spatially coherent noise, (channels, size, size), unit-ish variance."""
  u = _interp_matrix(size, grid)
  g = rng.standard_normal((channels, grid, grid)).astype(np.float32)
  return np.einsum("hi,cij,wj->chw", u, g, u)


def make_tile(rng: np.random.Generator, size: int, scene_variation: bool = False
              ) -> tuple[dict, dict]:
  """One tile: (arrays in upstream layout (C, H, W) / (C,), tile_info entry)."""
  lat = float(rng.uniform(-55, 72))
  lon = float(rng.uniform(-180, 180))
  month = int(rng.integers(1, 13))
  zone = _zone(lat, rng)
  s2_type = "l2a" if rng.random() < 0.5 else "l1c"
  # Northern summer is July; southern summer January.
  season = float(np.cos(2 * np.pi * (month - 7) / 12) * np.sign(lat))

  fields = 1.6 * _smooth(rng, size, 6, 9) + _ZONE_PRIORS[zone][:, None, None]
  if zone in (3, 4) and season < -0.3:
    fields[8] += 1.0  # winter snow
  dw = fields.argmax(0).astype(np.uint8)  # classes 0..8
  counts = np.bincount(dw.ravel(), minlength=9)
  dominant = int(counts.argmax())

  texture = _smooth(rng, size, 12, 1)[0]
  spectra = _SPECTRA
  if scene_variation:  # extra draws only here: the default sample stays what it was
    # A class looks different from tile to tile, so one tile's spectra do not label another's;
    # the class's other modalities do not change.
    appearance = 1 + 0.12 * rng.standard_normal((len(_SPECTRA), 1)) \
        + 0.06 * rng.standard_normal(_SPECTRA.shape)
    spectra = _SPECTRA * appearance.astype(np.float32)
  spectra = spectra[dw]  # (H, W, 13)
  green_up = 1 + 0.25 * season * _VEGETATION[dw] if zone in (2, 3) else 1.0
  spectra[..., _NIR] *= np.asarray(green_up)[..., None] if np.ndim(green_up) else green_up
  s2 = spectra * (1 + 0.06 * texture[..., None])
  s2 *= 1 + 0.03 * rng.standard_normal(s2.shape).astype(np.float32)
  if scene_variation:  # acquisition: sun elevation scales the spectrum, haze adds path radiance
    s2 = s2 * np.float32(rng.uniform(0.75, 1.25)) + np.float32(rng.uniform(0, 0.5)) * _TOA_OFFSET
  cloud = np.zeros((size, size), bool)
  if rng.random() < 0.25:
    c = _smooth(rng, size, 4, 1)[0]
    cloud = c > 1.0
    s2[cloud] = s2[cloud] * 0.3 + 6000
  if s2_type == "l1c":
    s2 += _TOA_OFFSET
  s2 = np.clip(s2, 1, 20000).astype(np.uint16).transpose(2, 0, 1)  # 0 is reserved for no data
  if s2_type == "l2a":
    s2[M.S2_BANDS.index("B10")] = 0  # L2A products drop the cirrus band

  # No-data swath edge: Sentinel-2 and the labels derived from it are missing there.
  nodata = np.zeros((size, size), bool)
  if rng.random() < 0.2:
    w = int(rng.integers(size // 8, size // 3))
    if rng.random() < 0.5:
      nodata[:, :w] = True
    else:
      nodata[-w:, :] = True
  s2[:, nodata] = 0

  vv = _VV_DB[dw] + 1.0 * texture + rng.standard_normal((size, size)).astype(np.float32)
  vh = vv - _VH_GAP[dw] + 0.8 * rng.standard_normal((size, size)).astype(np.float32)
  has_hh = rng.random() < 0.1
  hh = vv + 1.5 if has_hh else np.full_like(vv, -np.inf)
  hv = vh + 0.5 if has_hh else np.full_like(vv, -np.inf)
  asc = np.stack([vv, vh, hh, hv])
  desc = asc + np.float32(0.5) * rng.standard_normal(asc.shape).astype(np.float32)
  desc[2:] = asc[2:]
  s1 = np.concatenate([asc, desc]).astype(np.float32)
  bands_s1 = list(M.S1_BANDS) if has_hh else [b for b in M.S1_BANDS if "HH" not in b and "HV" not in b]
  if rng.random() < 0.1:  # no ascending pass
    s1[:4] = -np.inf
    bands_s1 = [b for b in bands_s1 if b.startswith("desc")]

  base = {0: 300, 1: 600, 2: 250, 3: 400, 4: 200}[zone] + 400 * rng.random()
  relief = 20 + 120 * rng.random()
  elevation = base + relief * _smooth(rng, size, 5, 1)[0]
  elevation[dw == 0] = elevation.min()  # water sits low
  gy, gx = np.gradient(elevation / 10.0)  # metres per 10 m pixel
  slope = np.degrees(np.arctan(np.hypot(gx, gy)))
  aster = np.stack([elevation, slope]).round().astype(np.int16)

  height = _CANOPY_M[dw] * (1 + 0.3 * texture) + 2 * (dw == 1) * rng.random((size, size))
  height = np.clip(height, 0, 60)
  canopy = np.stack([height, 1 + 0.2 * height]).round().astype(np.uint8)
  canopy[:, nodata] = 255
  canopy = canopy.view(np.int8)

  esa = _DW_TO_ESA[dw].copy()
  if zone == 0:
    esa[(dw == 3)] = 95  # tropical flooded vegetation is mangrove
  if zone == 4:
    esa[(dw == 7)] = 100  # polar bare ground is moss and lichen
  dw_stored = dw + 1
  dw_stored[nodata] = 0
  esa[nodata] = 0

  if s2_type == "l2a":
    scl = _DW_TO_SCL[dw].copy()
    scl[cloud] = 9
    scl[nodata] = 0
    cloudprod = np.where(cloud, 90, 2).astype(np.uint16)
  else:
    scl = np.full((size, size), 255, np.uint8)
    cloudprod = np.full((size, size), 65535, np.uint16)
  qa60 = np.where(cloud, 1024, 0).astype(np.uint16)

  biome = int(_BIOME[zone, dominant])
  eco_region = biome * 60 + int((lon + 180) / 6) % 60
  temp = 300 - 0.45 * abs(lat) + 12 * season * min(abs(lat) / 45, 1) + rng.normal(0, 1)
  prev_season = float(np.cos(2 * np.pi * (month - 8) / 12) * np.sign(lat))
  prev = temp - 12 * (season - prev_season) * min(abs(lat) / 45, 1)
  year = 300 - 0.45 * abs(lat)
  wet = (counts[0] + counts[1] + counts[3]) / counts.sum()
  precip = [0.02 + 0.2 * wet + 0.01 * rng.random() for _ in range(3)]
  era5 = np.array([[t, t - 5 - rng.random(), t + 5 + rng.random(), p]
                   for t, p in zip((prev, temp, year), precip)], np.float32).ravel()
  if rng.random() < 0.08:
    era5[:] = np.nan
  elif rng.random() < 0.08:
    era5[:4] = np.nan  # previous month missing

  biome_1h = np.zeros(M.NUM_BIOMES, np.uint8)
  biome_1h[biome] = 1
  eco_1h = np.zeros(M.NUM_ECOREGIONS, np.uint16)
  eco_1h[eco_region] = 1
  rad = np.radians
  arrays = {
      "sentinel2": s2,
      "sentinel2_cloudmask": qa60[None],
      "sentinel2_cloudprod": cloudprod[None],
      "sentinel2_scl": scl[None],
      "sentinel1": s1,
      "aster": aster,
      "era5": era5,
      "dynamic_world": dw_stored[None],
      "canopy_height_eth": canopy,
      "esa_worldcover": esa[None],
      "lat": np.array([np.sin(rad(lat)), np.cos(rad(lat))], np.float32),
      "lon": np.array([np.sin(rad(lon)), np.cos(rad(lon))], np.float32),
      "month": np.array([np.sin(2 * np.pi * month / 12), np.cos(2 * np.pi * month / 12)], np.float32),
      "biome": biome_1h,
      "eco_region": eco_1h,
  }
  info = {
      "S2_DATE": f"2020-{month:02d}-15", "S2_type": s2_type, "CRS": "EPSG:4326",
      "lat": lat, "lon": lon, "biome": biome, "eco_region": eco_region,
      "NO_DATA": bool(nodata.any()),
      "BANDS": {"sentinel2": list(M.S2_BANDS), "sentinel1": bands_s1,
                "aster": ["elevation", "slope"], "era5": list(M.ERA5_BANDS)},
      "era5": {"month1": month - 1 or 12, "month2": month, "year": 2020},
  }
  return arrays, info


class _Stats:
  """Per-band running mean/std/min/max over valid values (float64 sums)."""

  def __init__(self, bands: int):
    self.n = np.zeros(bands)
    self.s = np.zeros(bands)
    self.ss = np.zeros(bands)
    self.lo = np.full(bands, np.inf)
    self.hi = np.full(bands, -np.inf)

  def add(self, x: np.ndarray, valid: np.ndarray) -> None:
    for b in range(x.shape[0]):
      v = x[b][valid[b]].astype(np.float64)
      if v.size:
        self.n[b] += v.size
        self.s[b] += v.sum()
        self.ss[b] += (v * v).sum()
        self.lo[b] = min(self.lo[b], v.min())
        self.hi[b] = max(self.hi[b], v.max())

  def result(self) -> dict:
    with np.errstate(invalid="ignore", divide="ignore"):
      mean = self.s / self.n
      std = np.sqrt(np.maximum(self.ss / self.n - mean ** 2, 0))
    # Bands never observed get NaN statistics, as an all-missing band does upstream.
    lo = np.where(self.n > 0, self.lo, np.nan)
    hi = np.where(self.n > 0, self.hi, np.nan)
    return {k: [float(x) for x in v] for k, v in
            (("mean", mean), ("std", std), ("min", lo), ("max", hi))}


def _valid(name: str, x: np.ndarray) -> np.ndarray:
  m = M.MODALITIES[name]
  if m.unsigned_view:
    x = x.view(m.unsigned_view)
  if np.issubdtype(x.dtype, np.floating):
    valid = np.isfinite(x)
  else:
    valid = x != m.nodata
  return valid.reshape(x.shape[0], -1) if x.ndim > 1 else valid[:, None]


def write_sample(out: str, n: int = 256, size: int = 128, seed: int = 0,
                 scene_variation: bool = False) -> str:
  """Writes `data_synth_<size>.h5` and its JSON companions into `out`; returns the stem."""
  if size not in (128, 64):
    raise ValueError(f"--size must be 128 or 64, got {size}")
  if n < 1:
    raise ValueError(f"--n must be positive, got {n}")
  os.makedirs(out, exist_ok=True)
  stem = f"data_synth_{size}"
  h5_path = os.path.join(out, f"{stem}.h5")
  stats = {k: None for k in M.BAND_STATS_KEYS}
  acc = {}
  tile_info = {}
  # Write to a temporary name: an interrupted run never leaves a complete-looking file.
  fd, tmp = tempfile.mkstemp(suffix=".h5.tmp", dir=out)
  os.close(fd)
  try:
    with h5py.File(tmp, "w") as f:
      dsets = {}
      for name, m in M.MODALITIES.items():
        shape = (n, m.num_bands, size, size) if m.level == M.PIXEL else (n, m.num_bands)
        dsets[name] = f.create_dataset(name, shape, dtype=m.dtype, chunks=(1,) + shape[1:],
                                       compression="gzip")
      meta = f.create_dataset("metadata", (n,), dtype=M.METADATA_DTYPE, chunks=(1,),
                              compression="gzip")
      for i in range(n):
        rng = np.random.default_rng([seed, i])
        arrays, info = make_tile(rng, size, scene_variation)
        tile_id = f"synth{seed}_{size}_{i:06d}"
        tile_info[tile_id] = info
        meta[i] = (tile_id.encode(), info["S2_type"].encode())
        for name, x in arrays.items():
          dsets[name][i] = x
          m = M.MODALITIES[name]
          key = M.stats_key_for(m, info["S2_type"])
          if key is None:
            continue
          flat = x.reshape(x.shape[0], -1) if x.ndim > 1 else x[:, None]
          acc.setdefault(key, _Stats(m.num_bands)).add(
              flat.view(m.unsigned_view) if m.unsigned_view else flat, _valid(name, x))
    os.chmod(tmp, 0o644)
    os.replace(tmp, h5_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  for key in M.BAND_STATS_KEYS:
    stats[key] = (acc.get(key) or _Stats(_stats_bands(key))).result()
  rows = list(range(n))
  _write_json(os.path.join(out, f"{stem}_band_stats.json"), stats)
  _write_json(os.path.join(out, f"{stem}_splits.json"), {"train": rows, "val": [], "test": []})
  _write_json(os.path.join(out, f"{stem}_tile_info.json"), tile_info)
  with open(os.path.join(out, "LICENSE-data"), "w") as f:
    f.write("Synthetic sample generated by mmearth-jax synth; CC BY 4.0 like the MMEarth release.\n")
  return stem


def _stats_bands(key: str) -> int:
  name = "sentinel2" if key.startswith("sentinel2_l") else key
  return M.MODALITIES[name].num_bands


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f)
  os.replace(tmp, path)
