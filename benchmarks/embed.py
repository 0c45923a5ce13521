"""Scene embedding throughput: `mmearth-jax embed --scene` against plain-PyTorch tiled inference of
the same model on the same scene and tiles, side by side in one run.

Both sides run the same pipeline: the scene (a 12-band uint16 UTM GeoTIFF written here) is read
window by window with rasterio, normalised with the model card, cut into the same overlapping
tiles, stitched from the same cells and written as the same cloud-optimised GeoTIFF; only the
forward pass differs: our jitted Flax encoder sharded over the local devices
(`scenes.embed_scene`) vs the plain-PyTorch reference module (`interop.torch_convnextv2`,
`interop.torch_vit`) loaded strictly from our exported weights, in eval mode under
`torch.inference_mode()`, with all CPU threads. The two maps are compared cell by cell.

Columns: megapixels of scene per second end to end around an already compiled forward pass,
the forward pass alone over the same tiles, the ratio PyTorch time / JAX time (> 1: JAX
faster), the seconds of a first `scenes.embed_scene` call (what one `embed --scene` costs,
compilation included) and the largest difference between the two maps, relative to the largest
value.

    python benchmarks/embed.py [--models atto,vit_b] [--size 1024] [--repeats 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from mmearth_jax import bands as B
from mmearth_jax import cards, pretrained, scenes, testing
from mmearth_jax.interop import compare, hub
from mmearth_jax.methods import encoders

BANDS = list(B.S2_INPUT_BANDS)


def make_model(name: str) -> tuple[pretrained.Pretrained, int]:
  """A randomly initialised encoder with a card holding L2A statistics, and its tile size."""
  if name == "atto":
    spec, tile = encoders.convnextv2_spec("atto", bands=BANDS, patch_size=16), 256
  elif name == "vit_b":
    spec = encoders.vit_spec({"variant": "B", "patch_size": 16, "embed_dim": 0, "depth": 0,
                              "num_heads": 0}, img_size=224, bands=BANDS, in_chans=len(BANDS))
    tile = 224
  else:
    raise SystemExit(f"--models: unknown model {name!r}; choose atto, vit_b")
  size = 64 if name == "atto" else 224
  params = pretrained.build(spec).init(jax.random.key(0),
                                       jnp.zeros((1, size, size, len(BANDS))))["params"]
  card = cards.from_spec(spec, {"kind": "benchmark"})
  card["normalisation"] = {"L2A": {"mean": [1500.0] * len(BANDS), "std": [800.0] * len(BANDS),
                                   "units": "reflectance x 10000", "stats_key": "sentinel2_l2a"}}
  return pretrained.Pretrained(spec, jax.tree.map(np.asarray, params), name, card), tile


def torch_module(model: pretrained.Pretrained, tile: int) -> tuple[torch.nn.Module, str]:
  spec = model.spec
  layout = "mmearth" if spec["arch"] == "convnextv2" else "timm"
  state = hub.export_state_dict(spec, model.params, layout)
  net = compare.torch_encoder(spec, layout, (tile, tile))
  own = set(net.state_dict())
  net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items() if k in own},
                      strict=True)
  return net.eval(), spec["arch"]


def torch_dense(net: torch.nn.Module, arch: str, patch: int):
  def run(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.inference_mode():
      if arch == "convnextv2":
        return net.forward_map(t).permute(0, 2, 3, 1).numpy()
      tokens = net.forward_encoder(t)[:, 1:]
      n, h, w = x.shape[0], x.shape[1] // patch, x.shape[2] // patch
      return tokens.reshape(n, h, w, -1).numpy()
  return run


def pipeline(model, run, cells_tile: int, path: str, out: str, opts: scenes.Options) -> None:
  """The read / tile / stitch / write of `scenes.embed_scene` with a given forward pass `run`
  (tiles (B, T, T, C) -> maps (B, cells_tile, cells_tile, D))."""
  card = model.card
  src, reader, _, _ = scenes.prepare(path, card, opts)
  with src:
    stride = int(card["output_stride"])
    grid = scenes.grid_of(card, lambda n: cells_tile if n == opts.tile else n // stride)
    rows = scenes.axis(src.height, opts.tile, opts.overlap, grid, "height")
    cols = scenes.axis(src.width, opts.tile, opts.overlap, grid, "width")
    scenes.write_map(out, reader, run, grid, rows, cols, count=int(card["feature_dim"]),
                     dtype="float32", nodata=scenes.EMBEDDING_NODATA, batch=opts.batch_size,
                     show_progress=False, tags={}, resampling="AVERAGE")


def forward_only(fn, tiles: np.ndarray, batch: int) -> float:
  t0 = time.perf_counter()
  for i in range(0, len(tiles), batch):
    np.asarray(fn(tiles[i:i + batch]))
  return time.perf_counter() - t0


def best_of(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def bench(name: str, size: int, repeats: int, batch: int, folder: str) -> dict:
  model, tile = make_model(name)
  scene = os.path.join(folder, f"scene_{size}.tif")
  if not os.path.exists(scene):
    testing.write_s2_scene(scene, BANDS, height=size, width=size, seed=0)
  stride = int(model.card["output_stride"])
  opts = scenes.Options(tile=tile, overlap=tile // 4 // stride * stride, batch_size=batch,
                        progress=False)
  net, arch = torch_module(model, tile)
  jax_out, torch_out = os.path.join(folder, "jax.tif"), os.path.join(folder, "torch.tif")
  # What a user's first `embed --scene` costs: the library call, compilation included.
  t0 = time.perf_counter()
  written = scenes.embed_scene(model, scene, jax_out, opts)
  j_first = time.perf_counter() - t0
  # Steady state: the same pipeline around an already compiled forward pass, against torch's.
  from mmearth_jax.eval import features
  enc_params = pretrained.encoder_params(model.spec, model.params)
  sharded = features.Sharded(pretrained.dense_fn(model.spec), enc_params, batch_size=batch)
  run_batch = sharded.batch_for(written.tiles)  # as embed_scene batches
  opts = dataclasses.replace(opts, batch_size=run_batch)
  jax_run = lambda x: sharded(x, run_batch)  # noqa: E731
  t_run = torch_dense(net, arch, int(model.spec["patch_size"]))
  cells = written.shape[1] if written.tiles == 1 else jax_run(
      np.zeros((1, tile, tile, len(BANDS)), np.float32)).shape[1]  # also compiles
  steady = os.path.join(folder, "jax_steady.tif")
  j_best = best_of(lambda: pipeline(model, jax_run, cells, scene, steady, opts), repeats)
  t_best = best_of(lambda: pipeline(model, t_run, cells, scene, torch_out, opts), repeats)
  import rasterio
  with rasterio.open(jax_out) as a, rasterio.open(torch_out) as b:
    ja, tb = a.read(), b.read()
  diff = float(np.max(np.abs(ja - tb)) / (np.max(np.abs(tb)) + 1e-12))
  # The forward pass alone over the same number of tiles, at the same batch size.
  tiles = np.random.default_rng(0).standard_normal(
      (written.tiles, tile, tile, len(BANDS))).astype(np.float32)
  j_fwd = best_of(lambda: forward_only(jax_run, tiles, run_batch), repeats)
  t_fwd = best_of(lambda: forward_only(t_run, tiles, run_batch), repeats)
  mp = size * size / 1e6
  return {"model": name, "scene": f"{size}x{size}x{len(BANDS)}",
          "tiles": f"{written.tiles}x{tile}", "jax_first_s": j_first, "jax_mps": mp / j_best,
          "torch_mps": mp / t_best, "ratio": t_best / j_best, "jax_fwd_mps": mp / j_fwd,
          "torch_fwd_mps": mp / t_fwd, "fwd_ratio": t_fwd / j_fwd, "rel_diff": diff}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="atto,vit_b")
  p.add_argument("--size", type=int, default=1024, help="scene side (px)")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--batch", type=int, default=8, help="tiles per forward pass")
  args = p.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  print(f"device: {jax.devices()[0].device_kind} x {jax.local_device_count()} (JAX "
        f"{jax.__version__}), torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
  head = (f"{'model':<7}{'scene':>16}{'tiles':>9}{'JAX MP/s':>10}{'torch MP/s':>11}"
          f"{'ratio':>7}{'fwd JAX':>9}{'fwd torch':>10}{'ratio':>7}{'1st JAX s':>10}"
          f"{'max rel diff':>13}")
  rows = []
  with tempfile.TemporaryDirectory() as folder:
    for name in args.models.split(","):
      rows.append(bench(name, args.size, args.repeats, args.batch, folder))
  print(head)
  for r in rows:
    print(f"{r['model']:<7}{r['scene']:>16}{r['tiles']:>9}{r['jax_mps']:>10.3f}"
          f"{r['torch_mps']:>11.3f}{r['ratio']:>7.2f}{r['jax_fwd_mps']:>9.3f}"
          f"{r['torch_fwd_mps']:>10.3f}{r['fwd_ratio']:>7.2f}{r['jax_first_s']:>10.1f}"
          f"{r['rel_diff']:>13.1e}")


if __name__ == "__main__":
  main()
