"""Scenes in, maps out: a pretrained encoder (or fine-tuned segmenter) over a georeferenced raster
of any size, read and written with rasterio (the `geo` extra).

`embed_scene` reads the scene window by window (one tile at a time, so memory is bounded by the
tile and the batch, not the scene), matches the file's bands to the model's, normalises raw
values with the model card, runs batches of tiles over all local devices, and writes the
embedding grid as a cloud-optimised GeoTIFF in the scene's CRS:

  * Tiles. A scene that fits one tile is one forward pass (the map is the model's output on the
    whole scene, trimmed to whole patches for a ViT). A larger scene is cut into `tile` x `tile`
    windows that overlap by `overlap` pixels; both are multiples of the output stride, so every
    tile's cells fall on one grid. Each output cell is taken from the tile whose centre it is
    nearest (centre-crop stitching): cells next to a tile's inner edges, which saw zero padding
    instead of their neighbours, are replaced by a neighbour tile's.
  * Grid. Cell (i, j) covers input pixels [o - s/2 + i s, o + s/2 + i s) (rows; columns alike),
    with o the card's `output_origin_px` and s its `output_stride`; the output transform is the
    scene's, shifted by o - s/2 and scaled by s.
  * Masking. A pixel is invalid where GDAL's mask says so (the file's nodata value, an alpha or
    internal mask band), where a value is not finite, or where `mask_band` is non-zero (a cloud
    mask). Invalid pixels enter the model as 0 (the training data's mean after z-scoring, as the
    data pipeline fills no-data); a cell more than half of whose pixels are invalid is written as
    the output's nodata value.

`pool=True` writes one vector per tile instead (the encoder's pooled embedding, as `embed` gives
for an image) to a GeoParquet table with each tile's window and centre coordinates.
`segment_scene` predicts a fine-tuned segmenter's class map the same way (stride 1).
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from mmearth_jax import bands as B
from mmearth_jax import cards, methods

EMBEDDING_NODATA = -9999.0  # far outside any embedding's values; declared in the file
CLASS_NODATA = 255


class SceneError(ValueError):
  pass


def rasterio_module():
  """rasterio, or an error that names the extra that installs it."""
  try:
    import rasterio
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError("reading and writing scenes needs rasterio: pip install "
                              "'mmearth_jax[geo]'", name="rasterio") from e
  return rasterio


def open_scene(path: str):
  """The scene opened with rasterio; a clear error for a missing or unreadable file."""
  rasterio = rasterio_module()
  if not os.path.isfile(path):
    raise SceneError(f"{path}: no such file")
  try:
    src = rasterio.open(path)
  except rasterio.errors.RasterioIOError as e:
    raise SceneError(f"{path}: not a raster rasterio can read ({e}); give a GeoTIFF (or any "
                     "GDAL raster) of the scene") from e
  if src.count == 0 or src.width == 0 or src.height == 0:
    src.close()
    raise SceneError(f"{path}: the raster is empty ({src.count} bands, {src.width}x{src.height})")
  return src


# ----------------------------------------------------------------------------------------------
# Bands.


def _canonical(name: str) -> str:
  try:
    return B.canonical(name.strip())
  except KeyError:
    return name.strip()


def match_bands(path: str, descriptions: Sequence[str | None], wanted: Sequence[str], *,
                given: Sequence[str] | None = None, mask_band: int | None = None
                ) -> tuple[list[int], str]:
  """(1-based band indexes of the file, one per `wanted` band in the model's order, how the
  file's bands were named). The file's bands are named by `given` (one name per file band, in
  file order), else by their descriptions, else, when the file has exactly the model's number of
  bands, taken to be in the model's order. Names may be aliases ("B02", "red", "nir")."""
  indexes = [i + 1 for i in range(len(descriptions)) if i + 1 != mask_band]
  if given:
    if len(given) != len(descriptions):
      raise SceneError(f"{path}: --bands names {len(given)} bands ({', '.join(given)}) but the "
                       f"file has {len(descriptions)}; name every band of the file, in order")
    names, how = list(given), "--bands"
  elif all(descriptions[i - 1] for i in indexes):
    names, how = [d or "" for d in descriptions], "the file's band descriptions"
  elif len(indexes) == len(wanted):
    return indexes, (f"assumed: the file's {len(indexes)} bands have no descriptions and are "
                     f"taken to be the model's, in its order ({', '.join(wanted)})")
  else:
    raise SceneError(f"{path}: the file's bands have no descriptions and there are "
                     f"{len(indexes)} of them, not the model's {len(wanted)} "
                     f"({', '.join(wanted)}); name the file's bands in order with --bands, e.g. "
                     f"--bands {','.join(list(wanted)[:3])},...")
  canon = {_canonical(names[i - 1]): i for i in indexes}
  missing = [b for b in wanted if b not in canon]
  if missing:
    raise SceneError(f"{path}: the model needs the bands {', '.join(wanted)}; the file's bands "
                     f"(by {how}) are {', '.join(str(n) for n in names)}: missing "
                     f"{', '.join(missing)}. Give a scene with those bands, or name the file's "
                     "bands in order with --bands")
  return [canon[b] for b in wanted], how


# ----------------------------------------------------------------------------------------------
# Tiles and the output grid.


@dataclasses.dataclass(frozen=True)
class Axis:
  """How one axis of the scene is cut: tile starts and size (input px), cells per tile, and the
  [first, end) output cells each tile writes."""
  starts: tuple[int, ...]
  tile: int
  cells: int
  owned: tuple[tuple[int, int], ...]
  stride: int

  @property
  def total(self) -> int:
    return self.owned[-1][1]


@dataclasses.dataclass(frozen=True)
class Grid:
  """The model's output grid: input px per cell, centre of cell 0 (input px), the smallest and
  the multiple of an input side, and cells(n): the cells a forward pass on n px gives."""
  stride: int
  origin: float
  min_size: int
  multiple: int
  cells: Callable[[int], int]


def axis(length: int, tile: int, overlap: int, grid: Grid, what: str) -> Axis:
  """The tiles along an axis of `length` px (`what` names it in errors)."""
  s = grid.stride
  if length <= tile:  # one tile: the whole axis, trimmed to a multiple of the input unit
    size = length - length % grid.multiple
    if size < grid.min_size:
      raise SceneError(f"the scene's {what} is {length} px; the model needs at least "
                       f"{grid.min_size} px (its min_input_size)")
    n = grid.cells(size)
    return Axis((0,), size, n, ((0, n),), s)
  if tile % s or tile % grid.multiple or tile < grid.min_size:
    raise SceneError(f"--tile {tile}: must be a multiple of the output stride {s} (and of "
                     f"{grid.multiple}) and at least {grid.min_size} px")
  if overlap % s or not 0 <= overlap < tile:
    raise SceneError(f"--overlap {overlap}: must be a multiple of the output stride {s} and "
                     f"smaller than the tile ({tile} px)")
  last = (length - tile) // s * s  # every start a multiple of the stride: one common grid
  starts = list(range(0, last, tile - overlap)) + [last]
  n = grid.cells(tile)
  total = last // s + n
  centres = grid.origin + s * np.arange(total)
  st = np.asarray(starts)[:, None]
  inside = (centres >= st) & (centres < st + tile)
  depth = np.where(inside, np.minimum(centres - st, st + tile - centres), -np.inf)
  owner = np.argmax(depth, axis=0)  # the tile whose centre each cell is nearest
  owned = []
  for i in range(len(starts)):
    ks = np.flatnonzero(owner == i)
    owned.append((int(ks[0]), int(ks[-1]) + 1) if len(ks) else (0, 0))
  return Axis(tuple(starts), tile, n, tuple(owned), s)


def cell_validity(valid: np.ndarray, grid: Grid, cells: tuple[int, int]) -> np.ndarray:
  """(h, w) bool: cells at most half of whose input pixels are invalid, from a tile's (H, W)
  pixel validity."""
  s = grid.stride
  offset = int(round(grid.origin - s / 2))
  integral = np.zeros((valid.shape[0] + 1, valid.shape[1] + 1), np.int64)
  integral[1:, 1:] = np.cumsum(np.cumsum(valid, 0), 1)

  def edges(n_cells, n_px):
    lo = np.clip(offset + s * np.arange(n_cells), 0, n_px)
    return lo, np.clip(lo + s, 0, n_px)
  r0, r1 = edges(cells[0], valid.shape[0])
  c0, c1 = edges(cells[1], valid.shape[1])
  total = (integral[r1][:, c1] - integral[r0][:, c1] - integral[r1][:, c0]
           + integral[r0][:, c0])
  area = np.maximum((r1 - r0)[:, None] * (c1 - c0)[None, :], 1)
  return total * 2 >= area


# ----------------------------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass
class Reader:
  """Reads tiles of a scene: the model's bands in its order, raw values turned into its input
  (`normalise`), and each pixel's validity."""
  src: Any
  indexes: list[int]
  normalise: Callable[[np.ndarray], np.ndarray]  # (H, W, C) raw -> model input
  mask_band: int | None = None

  def read(self, row: int, col: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    from rasterio.windows import Window
    window = Window(col, row, width, height)
    raw = self.src.read(self.indexes, window=window)  # (C, H, W)
    valid = np.all(self.src.read_masks(self.indexes, window=window) > 0, axis=0)
    if raw.dtype.kind == "f":
      valid &= np.all(np.isfinite(raw), axis=0)
    if self.mask_band:
      valid &= self.src.read(self.mask_band, window=window) == 0
    x = self.normalise(np.moveaxis(raw, 0, -1))
    return np.where(valid[..., None], x, 0.0).astype(np.float32), valid


def normaliser(card: Mapping[str, Any], *, normalised: bool = False, level: str | None = None,
               scale: float = 1.0, offset: float = 0.0, what: str = "the images"
               ) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
  """(raw (..., C) -> model input, a line saying what it does). Raw values become
  (raw * scale + offset) z-scored with the card's statistics for `level` (default: L2A when the
  card has it, else L1C, else the image-folder statistics); `normalised` passes them through."""
  if normalised:
    return (lambda x: np.asarray(x, np.float32)), "input taken as already normalised"
  level, stats = card_stats(card, level, what)

  def fn(raw: np.ndarray) -> np.ndarray:
    x = np.asarray(raw, np.float32)
    if scale != 1.0 or offset:
      x = x * np.float32(scale) + np.float32(offset)
    return cards.normalise(card, x, level)
  note = f"raw values z-scored with the card's {level} statistics ({stats['units']})"
  if scale != 1.0 or offset:
    note += f", after raw * {scale:g} + {offset:g}"
  return fn, note


def card_stats(card: Mapping[str, Any], level: str | None, what: str) -> tuple[str, dict]:
  """(level, the card's statistics for it); level None: L2A when the card has it, else L1C,
  else the image-folder statistics. A clear error when the card has none."""
  norm = card.get("normalisation") or {}
  if not norm:
    raise SceneError(f"{what}: the model card has no normalisation statistics, so raw values "
                     "cannot be normalised; pass --normalised with images already z-scored the "
                     "way the encoder was pretrained, or import the model with its pretraining "
                     "statistics (from-torch --band-stats)")
  if level is None:
    level = next(k for k in ("L2A", "L1C", cards.IMAGES, *norm) if k in norm)
  key = next((k for k in norm if k.lower() == level.lower()), None)
  if key is None:
    raise SceneError(f"{what}: the model card has no {level} statistics (it has "
                     f"{', '.join(norm)}); choose --level from those")
  return key, norm[key]


def check_units(raw_valid: np.ndarray, card: Mapping[str, Any], level: str | None,
                what: str) -> None:
  """Refuses values that are clearly in other units than the card's (reflectance in 0..1 for
  statistics of reflectance x 10000), instead of embedding them silently."""
  if raw_valid.size == 0:
    return
  _, stats = card_stats(card, level, what)
  median, expected = float(np.median(raw_valid)), float(np.median(stats["mean"]))
  if expected > 100 and abs(median) < expected / 100:
    raise SceneError(f"{what}: the valid pixels' median value is {median:.4g}, but the model's "
                     f"statistics expect values near {expected:.4g} ({stats['units']}); "
                     "reflectance in 0..1? pass --scale 10000 (or --normalised for z-scored "
                     "input)")


# ----------------------------------------------------------------------------------------------
# Running tiles through the model.


@dataclasses.dataclass(frozen=True)
class Tile:
  row: int  # tile index along rows / columns
  col: int
  y0: int  # window origin (input px)
  x0: int


def tiles(rows: Axis, cols: Axis) -> Iterator[Tile]:
  """The tiles that write at least one cell, row-major."""
  for i, y0 in enumerate(rows.starts):
    for j, x0 in enumerate(cols.starts):
      if rows.owned[i][1] > rows.owned[i][0] and cols.owned[j][1] > cols.owned[j][0]:
        yield Tile(i, j, y0, x0)


def batches(items: Iterator[Tile], size: int) -> Iterator[list[Tile]]:
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def progress(total: int, enabled: bool, unit: str = "tile"):
  from tqdm import tqdm
  return tqdm(total=total, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def grid_of(card: Mapping[str, Any], cells: Callable[[int], int]) -> Grid:
  return Grid(stride=int(card["output_stride"]), origin=float(card["output_origin_px"]),
              min_size=int(card["min_input_size"]), multiple=int(card["input_multiple"]),
              cells=cells)


def output_transform(transform, grid: Grid):
  """The scene's affine transform moved to cell edges and scaled by the stride."""
  from rasterio.transform import Affine
  shift = grid.origin - grid.stride / 2
  return transform @ Affine.translation(shift, shift) @ Affine.scale(grid.stride)


@dataclasses.dataclass
class Written:
  """What a scene run wrote, for the CLI's message and the tests."""
  path: str
  shape: tuple[int, ...]  # (bands, rows, cols) of a map; (rows, width) of a table
  tiles: int
  tile: tuple[int, int]
  bands: str  # how the bands were matched
  normalisation: str
  nodata_cells: int = 0


def _remove(*paths: str) -> None:
  for p in paths:
    if os.path.exists(p):
      os.remove(p)


def write_map(path: str, reader: Reader, run: Callable[[np.ndarray], np.ndarray], grid: Grid,
              rows: Axis, cols: Axis, *, count: int, dtype: str, nodata: float, batch: int,
              show_progress: bool, tags: Mapping[str, str], resampling: str) -> int:
  """Runs every tile and writes its cells into a cloud-optimised GeoTIFF at `path`, atomically
  (a tiled GeoTIFF first, then GDAL's COG copy, then a rename). Returns the nodata cell count."""
  rasterio = rasterio_module()
  from rasterio.shutil import copy as gdal_copy
  src = reader.src
  tmp, cog = path + ".partial.tif", path + ".partial-cog.tif"
  block = 256 if min(rows.total, cols.total) >= 256 else 16
  profile = dict(driver="GTiff", height=rows.total, width=cols.total, count=count, dtype=dtype,
                 crs=src.crs, transform=output_transform(src.transform, grid), nodata=nodata,
                 tiled=True, blockxsize=block, blockysize=block, compress="deflate",
                 interleave="pixel", BIGTIFF="IF_SAFER")
  todo = list(tiles(rows, cols))
  nodata_cells = 0
  try:
    with rasterio.open(tmp, "w", **profile) as dst, progress(len(todo), show_progress) as bar:
      for group in batches(iter(todo), batch):
        reads = [reader.read(t.y0, t.x0, rows.tile, cols.tile) for t in group]
        out = run(np.stack([r[0] for r in reads]))
        for t, (_, valid), cells in zip(group, reads, out):
          nodata_cells += _write_owned(dst, t, cells, valid, grid, rows, cols, nodata)
        bar.update(len(group))
      dst.update_tags(**tags)
    gdal_copy(tmp, cog, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=256, BIGTIFF="IF_SAFER",
              RESAMPLING=resampling)
    os.replace(cog, path)
  finally:
    _remove(tmp, cog)
  return nodata_cells


def _write_owned(dst, t: Tile, cells: np.ndarray, valid: np.ndarray, grid: Grid, rows: Axis,
                 cols: Axis, nodata: float) -> int:
  from rasterio.windows import Window
  (r0, r1), (c0, c1) = rows.owned[t.row], cols.owned[t.col]
  dy, dx = t.y0 // grid.stride, t.x0 // grid.stride
  ok = cell_validity(valid, grid, cells.shape[:2])
  part = np.where(ok[..., None], cells, nodata)[r0 - dy:r1 - dy, c0 - dx:c1 - dx]
  dst.write(np.moveaxis(part, -1, 0).astype(dst.dtypes[0]),
            window=Window(c0, r0, c1 - c0, r1 - r0))
  return int((~ok[r0 - dy:r1 - dy, c0 - dx:c1 - dx]).sum())


# ----------------------------------------------------------------------------------------------
# Embeddings and class maps.


@dataclasses.dataclass
class Options:
  """How to read a scene (see `embed_scene`)."""
  bands: Sequence[str] | None = None  # the file's band names, in file order
  tile: int = 0  # tile side (px); 0: the card's input size, or 256
  overlap: int = -1  # px shared by neighbouring tiles; -1: a quarter of the tile (map), 0 (pool)
  batch_size: int = 16
  normalised: bool = False
  level: str | None = None
  scale: float = 1.0
  offset: float = 0.0
  mask_band: int | None = None  # 1-based; non-zero = masked (e.g. clouds)
  gsd: float | None = None  # a ViT's position-grid scale (Scale-MAE), as for `embed`
  progress: bool = True


def _tile_size(card: Mapping[str, Any], opts: Options, stride: int) -> int:
  """--tile, else a ViT's input size (its position grid was trained there), else 256 px
  (a ConvNeXt is fully convolutional: larger tiles, fewer edges)."""
  if opts.tile:
    return opts.tile
  size = card.get("input_size") if int(card.get("input_multiple") or 1) > 1 else None
  size = (size if isinstance(size, int) else int(min(size))) if size else 256
  return max(stride, size // stride * stride)


def _default_overlap(tile: int, stride: int, pool: bool, opts: Options) -> int:
  if opts.overlap >= 0:
    return opts.overlap
  return 0 if pool else tile // 4 // stride * stride


def prepare(path: str, card: Mapping[str, Any], opts: Options, what: str = "scene"):
  """(open dataset, Reader, bands note, normalisation note) for a scene and a model card."""
  wanted = cards.band_names(card)
  if not wanted:
    raise SceneError(f"{path}: the model card does not name the encoder's input bands, so the "
                     "scene's bands cannot be matched; import the model with --bands")
  src = open_scene(path)
  try:
    if opts.mask_band is not None and not 1 <= opts.mask_band <= src.count:
      raise SceneError(f"{path}: --mask-band {opts.mask_band}: the file has bands 1.."
                       f"{src.count}")
    indexes, how = match_bands(path, src.descriptions, wanted, given=opts.bands,
                               mask_band=opts.mask_band)
    norm, note = normaliser(card, normalised=opts.normalised, level=opts.level,
                            scale=opts.scale, offset=opts.offset, what=path)
    reader = Reader(src, indexes, norm, opts.mask_band)
    _check_first_values(reader, card, opts, path)
  except Exception:
    src.close()
    raise
  return src, reader, how, note


def _check_first_values(reader: Reader, card, opts: Options, path: str) -> None:
  if opts.normalised:
    return
  src = reader.src
  h, w = min(src.height, 256), min(src.width, 256)  # a corner: bounded, like a tile
  from rasterio.windows import Window
  raw = src.read(reader.indexes, window=Window(0, 0, w, h)).astype(np.float64)
  raw = raw * opts.scale + opts.offset
  valid = np.all(src.read_masks(reader.indexes, window=Window(0, 0, w, h)) > 0, axis=0)
  valid &= np.all(np.isfinite(raw), axis=0)
  check_units(raw[:, valid], card, opts.level, path)


def _cells_fn(fn: Callable, params: Any, channels: int) -> Callable[[int], int]:
  """cells(n): the output rows of a forward pass on an n x n input (shape inference only)."""
  import jax
  import jax.numpy as jnp

  def cells(n: int) -> int:
    shape = jax.eval_shape(fn, params, jax.ShapeDtypeStruct((1, n, n, channels), jnp.float32))
    return int(shape.shape[1])
  return cells


def embed_scene(model, path: str, out: str, opts: Options | None = None, *,
                pool: bool = False) -> Written:
  """Embeds a scene with a pretrained encoder (`pretrained.Pretrained`): the embedding grid as a
  cloud-optimised GeoTIFF at `out` (one band per feature, nodata EMBEDDING_NODATA), or with
  `pool` one pooled vector per tile as a GeoParquet table."""
  from mmearth_jax import pretrained
  from mmearth_jax.eval import features
  opts = opts or Options()
  card = model.card
  src, reader, how, note = prepare(path, card, opts)
  with src:
    enc_params = pretrained.encoder_params(model.spec, model.params)
    dense = pretrained.dense_fn(model.spec, gsd=opts.gsd)
    grid = grid_of(card, _cells_fn(dense, enc_params, len(reader.indexes)))
    tile = _tile_size(card, opts, grid.stride)
    overlap = _default_overlap(tile, grid.stride, pool, opts)
    rows = axis(src.height, tile, overlap, grid, "height")
    cols = axis(src.width, tile, overlap, grid, "width")
    n_tiles = len(list(tiles(rows, cols)))
    fn = pretrained.features_fn(model.spec, gsd=opts.gsd) if pool else dense
    run = features.Sharded(fn, enc_params, batch_size=opts.batch_size)
    batch = run.batch_for(n_tiles)
    tags = {"mmearth_jax_model": str(model.source), "mmearth_jax_card": json.dumps(card)}
    if pool:
      shape = write_pooled(out, reader, lambda x: run(x, batch), rows, cols, batch=batch,
                           show_progress=opts.progress, tags=tags)
      return Written(out, shape, n_tiles, (rows.tile, cols.tile), how, note)
    nodata_cells = write_map(out, reader, lambda x: run(x, batch), grid, rows, cols,
                             count=int(card["feature_dim"]), dtype="float32",
                             nodata=EMBEDDING_NODATA, batch=batch, show_progress=opts.progress,
                             tags=tags, resampling="AVERAGE")
    return Written(out, (int(card["feature_dim"]), rows.total, cols.total), n_tiles,
                   (rows.tile, cols.tile), how, note, nodata_cells)


def segment_scene(model, path: str, out: str, opts: Options | None = None) -> Written:
  """A fine-tuned segmenter's (`mmearth-jax segment --config.out=DIR`) class map of a scene, as
  a one-band uint8 cloud-optimised GeoTIFF at input resolution (nodata CLASS_NODATA)."""
  import jax.numpy as jnp
  from mmearth_jax import pretrained
  from mmearth_jax.eval import features
  if model.spec.get("arch") != "unet_segmenter":
    raise SceneError(f"{model.source}: a {model.spec.get('arch')} model, not a fine-tuned "
                     "segmenter; save one with `mmearth-jax segment --config.out=DIR`")
  opts = opts or Options()
  card = model.card
  num_classes = int(model.spec["num_classes"])
  if num_classes >= CLASS_NODATA:
    raise SceneError(f"{model.source}: {num_classes} classes do not fit a uint8 class map")
  net = pretrained.build(model.spec)

  def classes(params, images):
    logits = net.apply({"params": params}, images)
    return jnp.argmax(logits, -1).astype(jnp.float32)[..., None]
  src, reader, how, note = prepare(path, card, opts)
  with src:
    enc = pretrained.encoder_spec(model.spec)
    smallest = methods.geometry(enc)["min_input_size"]
    grid = Grid(stride=1, origin=0.5, min_size=smallest, multiple=1, cells=lambda n: n)
    tile = _tile_size(card, opts, 32)  # whole stages of the encoder in every tile
    overlap = _default_overlap(tile, 32, False, opts)
    rows = axis(src.height, tile, overlap, grid, "height")
    cols = axis(src.width, tile, overlap, grid, "width")
    n_tiles = len(list(tiles(rows, cols)))
    run = features.Sharded(classes, model.params, batch_size=opts.batch_size)
    batch = run.batch_for(n_tiles)
    tags = {"mmearth_jax_model": str(model.source),
            "class_names": json.dumps(model.spec.get("class_names") or [])}
    nodata_cells = write_map(out, reader, lambda x: run(x, batch), grid, rows, cols, count=1,
                             dtype="uint8", nodata=CLASS_NODATA, batch=batch,
                             show_progress=opts.progress, tags=tags, resampling="NEAREST")
    return Written(out, (1, rows.total, cols.total), n_tiles, (rows.tile, cols.tile), how, note,
                   nodata_cells)


# ----------------------------------------------------------------------------------------------
# Pooled vectors: GeoParquet.


def _point(transform, col: float, row: float) -> tuple[float, float]:
  """The CRS coordinates of a (fractional) pixel position."""
  a, b, c, d, e, f = tuple(transform)[:6]
  return a * col + b * row + c, d * col + e * row + f


def _wkb_point(x: float, y: float) -> bytes:
  return struct.pack("<BIdd", 1, 1, x, y)  # little-endian, type 1 (Point)


def geo_metadata(crs) -> dict:
  """GeoParquet 1.1 file metadata for one WKB point column in `crs` (PROJJSON; None: unknown)."""
  column = {"encoding": "WKB", "geometry_types": ["Point"]}
  column["crs"] = crs.to_dict(projjson=True) if crs is not None else None
  return {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}


def write_pooled(path: str, reader: Reader, run: Callable[[np.ndarray], np.ndarray], rows: Axis,
                 cols: Axis, *, batch: int, show_progress: bool,
                 tags: Mapping[str, str]) -> tuple[int, int]:
  """One row per tile at least half of whose pixels are valid: window (row, col, height,
  width in px), centre (x, y in the scene's CRS), valid_fraction, embedding, geometry."""
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError("--pool writes Parquet with pyarrow: pip install "
                              "'mmearth_jax[geo]'", name="pyarrow") from e
  src = reader.src
  table = {k: [] for k in ("row", "col", "height", "width", "x", "y", "valid_fraction",
                           "embedding", "geometry")}
  todo = list(tiles(rows, cols))
  with progress(len(todo), show_progress) as bar:
    for group in batches(iter(todo), batch):
      reads = [reader.read(t.y0, t.x0, rows.tile, cols.tile) for t in group]
      out = run(np.stack([r[0] for r in reads]))
      for t, (_, valid), vector in zip(group, reads, out):
        fraction = float(valid.mean())
        if fraction < 0.5:
          continue  # mostly nodata or masked: no vector
        x, y = _point(src.transform, t.x0 + cols.tile / 2, t.y0 + rows.tile / 2)
        for k, v in (("row", t.y0), ("col", t.x0), ("height", rows.tile),
                     ("width", cols.tile), ("x", x), ("y", y), ("valid_fraction", fraction),
                     ("embedding", vector.astype(np.float32)), ("geometry", _wkb_point(x, y))):
          table[k].append(v)
      bar.update(len(group))
  width = out.shape[-1] if todo else 0
  arrays = {k: pa.array(v, type=pa.int32()) for k, v in table.items()
            if k in ("row", "col", "height", "width")}
  arrays.update({k: pa.array(table[k], type=pa.float64()) for k in ("x", "y", "valid_fraction")})
  flat = np.asarray(table["embedding"], np.float32).reshape(-1)
  arrays["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(flat), width)
  arrays["geometry"] = pa.array(table["geometry"], type=pa.binary())
  meta = {b"geo": json.dumps(geo_metadata(src.crs)).encode(),
          **{k.encode(): v.encode() for k, v in tags.items()}}
  result = pa.table(arrays).replace_schema_metadata(meta)
  tmp = path + ".partial.parquet"
  try:
    pq.write_table(result, tmp)
    os.replace(tmp, path)
  finally:
    _remove(tmp)
  return (result.num_rows, width)


# ----------------------------------------------------------------------------------------------
# Image stacks (.npy), the other input of `embed`.


def load_image_stack(path: str, channels_first: bool = False) -> np.ndarray:
  """A .npy stack (N, H, W, C) (or (N, C, H, W), or one image) with clear errors for other
  files, non-numeric or empty arrays. The dtype is kept: integers are raw values."""
  if path.endswith(".npz"):
    raise SceneError(f"{path}: a .npz archive; save the stack as one .npy array "
                     "(np.save(path, images)), or give a GeoTIFF scene with --scene")
  try:
    x = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise SceneError(f"{path}: cannot read images as a .npy array ({e})") from e
  if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiu":
    raise SceneError(f"{path}: images must be a numeric array, got "
                     f"{getattr(x, 'dtype', type(x).__name__)}")
  if x.ndim == 3:  # one image
    x = x[None]
  if x.ndim != 4:
    raise SceneError(f"{path}: expected (N, H, W, C) or (N, C, H, W) images, got shape {x.shape}")
  if channels_first:
    x = x.transpose(0, 2, 3, 1)
  if x.size == 0:
    raise SceneError(f"{path}: the stack is empty (shape {x.shape})")
  return x


def prepare_images(images: np.ndarray, card: Mapping[str, Any], path: str, *,
                   normalised: bool = False, level: str | None = None, scale: float = 1.0,
                   offset: float = 0.0) -> tuple[np.ndarray, str]:
  """(model input float32, a line saying what was done) for a stack in the encoder's band
  order: raw values normalised with the card (`normaliser`), non-finite pixels set to 0 after
  it; images smaller than the encoder's minimum or with no finite pixel are refused."""
  n, h, w, c = images.shape
  if c != int(card["in_chans"]):
    names = ", ".join(cards.band_names(card) or [])
    raise SceneError(f"{path}: the images have {c} bands (last axis of {images.shape}) but the "
                     f"encoder takes {card['in_chans']}{f' ({names})' if names else ''}; pass "
                     "channels in the encoder's band order (--channels-first for (N, C, H, W))")
  smallest, multiple = int(card["min_input_size"]), int(card["input_multiple"] or 1)
  if min(h, w) < smallest or h % multiple or w % multiple:
    rule = f" and a multiple of {multiple}" if multiple > 1 else ""
    raise SceneError(f"{path}: the images are {h}x{w} px; the encoder needs sides of at least "
                     f"{smallest} px{rule}")
  finite = np.all(np.isfinite(images), axis=-1) if images.dtype.kind == "f" else None
  if finite is not None and not finite.reshape(n, -1).any(1).all():
    bad = np.flatnonzero(~finite.reshape(n, -1).any(1))
    raise SceneError(f"{path}: images {bad[:10].tolist()} have no finite pixel")
  norm, note = normaliser(card, normalised=normalised, level=level, scale=scale, offset=offset,
                          what=path)
  if not normalised:
    sample = images[:64] if finite is None else images[:64][finite[:64]]
    check_units(np.asarray(sample, np.float64).reshape(-1, c).T * scale + offset, card, level,
                path)
  x = norm(images)
  if finite is not None and not finite.all():
    x = np.where(finite[..., None], x, 0.0).astype(np.float32)
    note += f"; {int((~finite).sum())} non-finite pixels set to 0 (the mean)"
  return x, note
