"""Band facts: band names, their order in each dataset, centre wavelengths and aliases.

The one home of these facts; it imports nothing from mmearth_jax, so every layer may use it.
Band names are MMEarth's Sentinel-2 names ("B1" ... "B12", "B8A") unless a table says otherwise.
"""
from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# MMEarth.

# Sentinel-2 bands in the order the MMEarth files store them (B8A before B8).
S2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B8", "B9", "B10", "B11", "B12")
# MMEarth's encoder input: the 12 Sentinel-2 bands without the cirrus band B10.
S2_INPUT_BANDS = tuple(b for b in S2_BANDS if b != "B10")
# Sentinel-2 red, green, blue (the RGB subset, in display order).
RGB = ("B4", "B3", "B2")
# Sentinel-1 polarisations of both orbit directions, in the MMEarth files' order.
S1_BANDS = ("asc_VV", "asc_VH", "asc_HH", "asc_HV", "desc_VV", "desc_VH", "desc_HH", "desc_HV")
# ERA5 climate variables of three periods, in the MMEarth files' order.
ERA5_BANDS = tuple(f"{period}_{var}" for period in ("prev_month", "curr_month", "year")
                   for var in ("avg_temp", "min_temp", "max_temp", "total_precip"))

# The values MMEarth's `sentinel2` dataset stores (uint16, 0 = no data): what its band statistics
# and a model pretrained on it expect before z-scoring.
S2_STORED_UNITS = "Sentinel-2 reflectance x 10000"
# The ground sample distance (m) of MMEarth's tiles: every modality is on one 10 m grid.
MMEARTH_GSD_M = 10.0

# Central wavelengths (nm) of the Sentinel-2 bands.
S2_WAVELENGTH_NM = {"B1": 443, "B2": 490, "B3": 560, "B4": 665, "B5": 705, "B6": 740, "B7": 783,
                    "B8": 842, "B8A": 865, "B9": 945, "B10": 1375, "B11": 1610, "B12": 2190}

# ---------------------------------------------------------------------------------------------
# Other names of the same bands.

# Colour names of the RGB bands (lower case).
COLOUR_BANDS = {"red": "B4", "green": "B3", "blue": "B2"}
# Another name -> the MMEarth name: zero-padded numbers (BigEarthNet, GEO-Bench: "B01", "B08A"),
# a lower-case "a", colour names and "nir".
ALIASES: dict[str, str] = {
    **{f"B0{b[1:]}": b for b in S2_BANDS if len(b) == 2},
    "B08A": "B8A", "B8a": "B8A", "B08a": "B8A",
    **COLOUR_BANDS, "nir": "B8",
}


def canonical(name: str) -> str:
  """The MMEarth name of a Sentinel-2 band given by any name in `ALIASES` (or its own name)."""
  band = ALIASES.get(name, ALIASES.get(name.lower(), name))
  if band not in S2_WAVELENGTH_NM:
    raise KeyError(f"{name!r} is not a Sentinel-2 band; use one of {list(S2_BANDS)} or an alias "
                   f"in {sorted(ALIASES)}")
  return band


# ---------------------------------------------------------------------------------------------
# Channel orders of downstream datasets.

# TFDS. EuroSAT's multispectral GeoTIFFs hold B1..B12 then B8A (EuroSAT issue #7; torchgeo PR
# #2480); TFDS eurosat/all stores the file's channels unchanged.
EUROSAT_TFDS_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B11", "B12",
                      "B8A")
# The EuroSAT MS release (EuroSAT_MS.zip: one 13-band uint16 GeoTIFF per image, Sentinel-2 L1C
# digital numbers, i.e. top-of-atmosphere reflectance x 10000): the same channels in the same order.
EUROSAT_MS_BANDS = EUROSAT_TFDS_BANDS
# So2Sat LCZ42 `sen2`: B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12 (TFDS's rgb config takes
# channels 2, 1, 0 as R, G, B). Values are reflectance (0..~3).
SO2SAT_TFDS_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
# TFDS bigearthnet/all: one feature per band (keys zero-padded, see `ALIASES`).
BIGEARTHNET_TFDS_KEYS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09",
                         "B11", "B12")
BIGEARTHNET_TFDS_BANDS = tuple(canonical(k) for k in BIGEARTHNET_TFDS_KEYS)
# The rgb configs of the TFDS datasets: red, green, blue.
RGB_TFDS_BANDS = RGB

# GEO-Bench. The 13 Sentinel-2 band names it uses (geobench `sentinel2_13_bands`), in its order
# (B8 before B8A), with the MMEarth name of each.
GEOBENCH_S2 = {
    "01 - Coastal aerosol": "B1",
    "02 - Blue": "B2",
    "03 - Green": "B3",
    "04 - Red": "B4",
    "05 - Vegetation Red Edge": "B5",
    "06 - Vegetation Red Edge": "B6",
    "07 - Vegetation Red Edge": "B7",
    "08 - NIR": "B8",
    "08A - Vegetation Red Edge": "B8A",
    "09 - Water vapour": "B9",
    "10 - SWIR - Cirrus": "B10",
    "11 - SWIR": "B11",
    "12 - SWIR": "B12",
}
GEOBENCH_S2_NAMES = tuple(GEOBENCH_S2)
# The band names of GEO-Bench's RGB tasks.
GEOBENCH_RGB = {c.capitalize(): b for c, b in COLOUR_BANDS.items()}
# geobench `sentinel1_8_bands` (m-so2sat stores these before its 10 Sentinel-2 bands).
GEOBENCH_S1_NAMES = ("01 - VH.Real", "02 - VH.Imaginary", "03 - VV.Real", "04 - VV.Imaginary",
                     "05 - VH.LEE Filtered", "06 - VV.LEE Filtered", "07 - VH.LEE Filtered.Real",
                     "08 - VV.LEE Filtered.Imaginary")
# m-so2sat's Sentinel-2 bands: geobench sentinel2_13_bands[1:9] + [-2:].
GEOBENCH_SO2SAT_S2_NAMES = GEOBENCH_S2_NAMES[1:9] + GEOBENCH_S2_NAMES[-2:]
# m-bigearthnet's: sentinel2_13_bands[0:10] + [-2:] (no cirrus band).
GEOBENCH_BIGEARTHNET_NAMES = GEOBENCH_S2_NAMES[0:10] + GEOBENCH_S2_NAMES[-2:]

# Published GEO-Bench tasks whose stored band names do not name their channels: stored name ->
# the Sentinel-2 band the channel really holds (None: not a Sentinel-2 band).
#   m-eurosat: geobench wrote EuroSAT's channels (B1..B12, then B8A: EuroSAT issue #7, torchgeo
#     PR #2480) under B1..B8, B8A, B9..B12 (geo-bench issue #28).
#   m-brick-kiln: the source exports B1, B2, B3, B4, B5, B7, B8A, B8, B11, B12, TCI_R, TCI_G,
#     TCI_B, stored as the 13 Sentinel-2 names in order (geo-bench issue #29).
GEOBENCH_BAND_FIXES: dict[str, dict[str, str | None]] = {
    "m-eurosat": {"08A - Vegetation Red Edge": "B9", "09 - Water vapour": "B10",
                  "10 - SWIR - Cirrus": "B11", "11 - SWIR": "B12", "12 - SWIR": "B8A"},
    "m-brick-kiln": {"06 - Vegetation Red Edge": "B7", "07 - Vegetation Red Edge": "B8A",
                     "08 - NIR": "B8", "08A - Vegetation Red Edge": "B11",
                     "09 - Water vapour": "B12", "10 - SWIR - Cirrus": None, "11 - SWIR": None,
                     "12 - SWIR": None},
}
