"""The Grain input pipeline: transforms checked against the raw HDF5, selection, resume, epochs."""
import json
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from mmearth_jax.data import convert, pipeline
from mmearth_jax import modalities as M


def _cfg(path, **kw):
  c = pipeline.default_config()
  c.path = path
  c.global_batch_size = 8
  for k, v in kw.items():
    setattr(c, k, v)
  return c


_UNCLOSED = []  # iterators of worker processes, ended by os._exit (see test_resume_with_...)


def _batches(cfg, n, state=None):
  it = iter(pipeline.make_dataset(cfg, process_index=0, process_count=1))
  if state is not None:
    it.set_state(state)
  out = [next(it) for _ in range(n)]
  st = it.get_state()
  if cfg.workers:
    _UNCLOSED.append(it)
  else:
    it.close()
  return out, st


def _h5(sample):
  return h5py.File(os.path.join(sample, "data_synth_64.h5"))


def test_batch_structure_and_finiteness(shards64):
  (b,), _ = _batches(_cfg(shards64), 1)
  assert b["image"].shape == (8, 56, 56, 12) and b["image"].dtype == np.float32
  assert set(b["targets"]) == set(M.ALL_OUTPUTS) == set(b["valid"])
  t, v = b["targets"], b["valid"]
  assert t["sentinel1"].shape == (8, 56, 56, 8) and t["sentinel1"].dtype == np.float32
  assert t["dynamic_world"].shape == (8, 56, 56) and t["dynamic_world"].dtype == np.int32
  assert t["esa_worldcover"].max() <= 10 and t["dynamic_world"].max() <= 8
  assert t["era5"].shape == (8, 12) and t["biome"].shape == (8,) and t["eco_region"].dtype == np.int32
  for x in [b["image"], *t.values()]:
    assert np.isfinite(x).all()
  for name in t:
    assert v[name].dtype == bool and v[name].shape == t[name].shape
  # z-scored input: roughly standard over the valid pixels
  assert abs(b["image"].mean()) < 0.5 and 0.5 < b["image"].std() < 1.5


def test_every_target_matches_the_raw_tile_under_one_shared_crop(sample64, shards64):
  """Recomputes each example from the HDF5 row with the reference loader's rules."""
  (b,), _ = _batches(_cfg(shards64), 1)
  stats = json.load(open(os.path.join(sample64, "data_synth_64_band_stats.json")))
  with _h5(sample64) as f:
    for i, row in enumerate(b["row"]):
      s2_type = f["metadata"][row]["S2_type"].decode()
      assert b["s2_type"][i] == M.S2_TYPES.index(s2_type)
      s2 = f["sentinel2"][row].transpose(1, 2, 0).astype(np.float64)
      st = stats[f"sentinel2_{s2_type}"]
      idx = [M.S2_BANDS.index(x) for x in M.S2_INPUT_BANDS]
      z = (s2[..., idx] - np.array(st["mean"])[idx]) / np.array(st["std"])[idx]
      z[s2[..., idx] == 0] = 0
      # Find the crop offset from the input, then every pixel modality must use the same one.
      offsets = [(y, x) for y in range(9) for x in range(9)
                 if np.allclose(z[y:y + 56, x:x + 56], b["image"][i], atol=1e-4)]
      assert len(offsets) == 1, offsets
      y, x = offsets[0]
      win = (slice(y, y + 56), slice(x, x + 56))
      dw = f["dynamic_world"][row, 0][win].astype(int)
      np.testing.assert_array_equal(b["targets"]["dynamic_world"][i], np.where(dw == 0, -1, dw - 1))
      esa = f["esa_worldcover"][row, 0][win]
      lut = {c: k for k, c in enumerate(M.ESA_WORLDCOVER_CODES)}
      np.testing.assert_array_equal(b["targets"]["esa_worldcover"][i],
                                    np.vectorize(lambda c: lut.get(int(c), -1))(esa))
      s1 = f["sentinel1"][row].transpose(1, 2, 0)[win]
      s1s = stats["sentinel1"]
      want = (s1 - np.array(s1s["mean"])) / np.array(s1s["std"])
      np.testing.assert_array_equal(b["valid"]["sentinel1"][i], np.isfinite(s1))
      np.testing.assert_allclose(b["targets"]["sentinel1"][i], np.where(np.isfinite(s1), want, 0),
                                 atol=1e-5)
      canopy = f["canopy_height_eth"][row].view(np.uint8).transpose(1, 2, 0)[win]
      np.testing.assert_array_equal(b["valid"]["canopy_height_eth"][i], canopy != 255)
      era5 = f["era5"][row]
      np.testing.assert_array_equal(b["valid"]["era5"][i], np.isfinite(era5))
      assert b["targets"]["biome"][i] == f["biome"][row].argmax()
      assert b["targets"]["eco_region"][i] == f["eco_region"][row].argmax()


def _transform(stats=None, inputs=M.S2_INPUT_BANDS, outputs="all", crop=4):
  stats = stats or {k: {"mean": [0.0] * 846, "std": [1.0] * 846} for k in M.BAND_STATS_KEYS}
  return pipeline.Transform(stats, inputs, M.resolve_outputs(outputs, inputs), crop)


def _tile(size=4):
  t = {name: np.ones((size, size, m.num_bands) if m.level == M.PIXEL else (m.num_bands,),
                     m.dtype) for name, m in M.MODALITIES.items()}
  t["biome"] = np.eye(14, dtype=np.uint8)[3]
  t["eco_region"] = np.eye(846, dtype=np.uint16)[500]
  return t


def test_label_remaps_and_missing_values():
  tr = _transform()
  t = _tile()
  t["dynamic_world"][0, :, 0] = [0, 1, 9, 10]
  t["esa_worldcover"][0, :, 0] = [10, 95, 100, 255]
  t["esa_worldcover"][1, :, 0] = [0, 15, 50, 80]
  ex = tr.apply(t, {"S2_type": "l2a", "row": 0}, np.random.default_rng(0))
  np.testing.assert_array_equal(ex["targets"]["dynamic_world"][0], [-1, 0, 8, -1])
  np.testing.assert_array_equal(ex["targets"]["esa_worldcover"][0], [0, 9, 10, -1])
  np.testing.assert_array_equal(ex["targets"]["esa_worldcover"][1], [-1, -1, 4, 7])
  assert ex["targets"]["biome"] == 3 and ex["targets"]["eco_region"] == 500
  t["biome"] = np.full(14, 255, np.uint8)  # no-data one-hot
  t["eco_region"] = np.zeros(846, np.uint16)  # empty one-hot
  ex = tr.apply(t, {"S2_type": "l2a", "row": 0}, np.random.default_rng(0))
  assert ex["targets"]["biome"] == -1 and not ex["valid"]["biome"]
  assert ex["targets"]["eco_region"] == -1


def test_nodata_becomes_invalid_and_zero_never_nan():
  tr = _transform()
  t = _tile()
  t["sentinel2"][0, 0, :] = 0
  t["sentinel1"][1, 1, 2] = -np.inf
  t["sentinel1"][1, 2, 3] = np.nan
  t["canopy_height_eth"][2, 2, 0] = np.uint8(255).view(np.int8)
  t["era5"][:4] = np.nan
  t["lat"][:] = -np.inf
  ex = tr.apply(t, {"S2_type": "l1c", "row": 0}, np.random.default_rng(0))
  assert (ex["image"][0, 0] == 0).all() and not ex["valid"]["sentinel2"][0, 0].any()
  assert not ex["valid"]["sentinel1"][1, 1, 2] and not ex["valid"]["sentinel1"][1, 2, 3]
  assert ex["valid"]["sentinel1"].sum() == 4 * 4 * 8 - 2
  assert not ex["valid"]["canopy_height_eth"][2, 2, 0] and ex["valid"]["canopy_height_eth"][2, 2, 1]
  assert not ex["valid"]["era5"][:4].any() and ex["valid"]["era5"][4:].all()
  assert not ex["valid"]["lat"].any()
  for x in [ex["image"], *ex["targets"].values()]:
    assert np.isfinite(x).all()


def test_sentinel2_statistics_follow_the_tiles_s2_type():
  stats = {k: {"mean": [0.0] * 846, "std": [1.0] * 846} for k in M.BAND_STATS_KEYS}
  stats["sentinel2_l1c"] = {"mean": [100.0] * 13, "std": [10.0] * 13}
  stats["sentinel2_l2a"] = {"mean": [50.0] * 13, "std": [5.0] * 13}
  tr = _transform(stats)
  t = _tile()
  t["sentinel2"][:] = 200
  l1c = tr.apply(t, {"S2_type": "l1c", "row": 0}, np.random.default_rng(0))["image"]
  l2a = tr.apply(t, {"S2_type": "l2a", "row": 0}, np.random.default_rng(0))["image"]
  np.testing.assert_allclose(l1c, 10.0)
  np.testing.assert_allclose(l2a, 30.0)
  with pytest.raises(ValueError, match="unknown S2_type 'l3'"):
    tr.apply(t, {"S2_type": "l3", "row": 0, "tile_id": "x"}, np.random.default_rng(0))


def test_degenerate_band_statistics_give_finite_values():
  stats = {k: {"mean": [0.0] * 846, "std": [1.0] * 846} for k in M.BAND_STATS_KEYS}
  # asc_HH, asc_HV all missing upstream: NaN statistics; desc_VV with std 0.
  stats["sentinel1"] = {"mean": [1.0, 1.0, float("nan"), float("nan"), 2.0, 1.0, 1.0, 1.0],
                        "std": [1.0, 1.0, float("nan"), float("nan"), 0.0, 1.0, 1.0, 1.0]}
  tr = _transform(stats)
  t = _tile()
  t["sentinel1"][:] = 5.0
  ex = tr.apply(t, {"S2_type": "l2a", "row": 0}, np.random.default_rng(0))
  s1 = ex["targets"]["sentinel1"]
  assert np.isfinite(s1).all()
  np.testing.assert_allclose(s1[..., 0], 4.0)  # a normal band is z-scored
  np.testing.assert_allclose(s1[..., 2], 5.0)  # degenerate bands pass through unscaled
  np.testing.assert_allclose(s1[..., 4], 5.0)


def test_input_and_output_selection_from_config(shards64):
  (b,), _ = _batches(_cfg(shards64, input="rgb", outputs="image_only"), 1)
  assert b["image"].shape[-1] == 3
  assert set(b["targets"]) == {"sentinel2", "lat", "lon", "month", "era5", "biome", "eco_region"}
  assert b["targets"]["sentinel2"].shape[-1] == 3
  (full,), _ = _batches(_cfg(shards64), 1)
  s2 = list(M.S2_INPUT_BANDS)
  np.testing.assert_array_equal(b["image"], full["image"][..., [s2.index(x) for x in M.RGB_BANDS]])
  (p,), _ = _batches(_cfg(shards64, outputs="pixel_only"), 1)
  assert set(p["targets"]) == {n for n in M.ALL_OUTPUTS if M.MODALITIES[n].level == M.PIXEL}
  (s,), _ = _batches(_cfg(shards64, outputs="sentinel1,biome"), 1)
  assert set(s["targets"]) == {"sentinel1", "biome"}
  (r,), _ = _batches(_cfg(shards64, input="B4,B3,B2"), 1)
  np.testing.assert_array_equal(r["image"], b["image"])
  with pytest.raises(KeyError, match="unknown input preset 'rgbn'"):
    _batches(_cfg(shards64, input="rgbn"), 1)


def test_missing_modality_in_shards_is_a_clear_error(sample64, tmp_path):
  out = str(tmp_path / "s2only")
  convert.convert(sample64, out, shards=1, modalities=["sentinel2"], log=lambda *a: None)
  with pytest.raises(KeyError, match="do not store"):
    pipeline.make_dataset(_cfg(out), process_index=0, process_count=1)
  (b,), _ = _batches(_cfg(out, outputs="s2_only"), 1)
  assert set(b["targets"]) == {"sentinel2"}


def test_one_epoch_covers_every_record_once_and_epochs_reshuffle(shards64):
  batches, _ = _batches(_cfg(shards64, num_epochs=2), 12)  # 48 records, batch 8
  rows = np.concatenate([b["row"] for b in batches])
  assert sorted(rows[:48]) == list(range(48))
  assert sorted(rows[48:]) == list(range(48))
  assert not np.array_equal(rows[:48], rows[48:])
  it = iter(pipeline.make_dataset(_cfg(shards64, num_epochs=1), process_index=0, process_count=1))
  assert sum(1 for _ in it) == 6


def test_seed_decides_order_and_crops(shards64):
  a, _ = _batches(_cfg(shards64, seed=1), 2)
  b, _ = _batches(_cfg(shards64, seed=1), 2)
  c, _ = _batches(_cfg(shards64, seed=2), 2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not np.array_equal(a[0]["row"], c[0]["row"])


def _resume_check(path, workers):
  """Batches 4..8 of a straight run vs. a run restored from the state saved after batch 4."""
  cfg = _cfg(path, workers=workers)
  straight, _ = _batches(cfg, 9)  # crosses the epoch boundary (6 batches per epoch)
  _, state = _batches(cfg, 4)
  state = json.loads(json.dumps(state))  # the state is plain JSON, as a checkpoint stores it
  resumed, _ = _batches(cfg, 5, state=state)
  for x, y in zip(straight[4:], resumed):
    np.testing.assert_array_equal(x["row"], y["row"])
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["targets"]["sentinel1"], y["targets"]["sentinel1"])


def test_resumed_iterator_sees_exactly_the_batches_of_an_uninterrupted_run(shards64):
  _resume_check(shards64, workers=0)


def test_resume_with_worker_processes(shards64):
  # In a child process that exits without finalisers: closing a Grain multiprocess iterator can
  # wait ~50 s for a blocked prefetch thread (google/grain#1372), which is not what is tested here.
  code = ("import os, sys; sys.path.insert(0, %r); import test_pipeline as t\n"
          "try:\n  t._resume_check(%r, 2); print('RESUME-OK', flush=True)\n"
          "finally:\n  sys.stdout.flush(); sys.stderr.flush(); os._exit(0)\n"
          % (os.path.dirname(__file__), shards64))
  wrapper = os.path.join(os.path.dirname(shards64), "resume_check.py")
  with open(wrapper, "w") as f:
    f.write("if __name__ == '__main__':\n" + "".join("  " + line + "\n" for line in code.splitlines()))
  log = wrapper + ".log"
  with open(log, "w") as f:
    child = subprocess.Popen([sys.executable, wrapper], stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
      child.wait(timeout=300)
    finally:
      os.killpg(child.pid, signal.SIGKILL)  # and the Grain workers it leaves behind
  text = open(log).read()
  assert "RESUME-OK" in text, text[-3000:]


def test_paper_crop_for_128_px(shards128):
  (b,), _ = _batches(_cfg(shards128, global_batch_size=4), 1)
  assert b["image"].shape == (4, 112, 112, 12)
  assert b["targets"]["aster"].shape == (4, 112, 112, 2)


def test_bad_config_values(shards64):
  with pytest.raises(ValueError, match="global_batch_size = 7 is not divisible by the 2"):
    pipeline.make_dataset(_cfg(shards64, global_batch_size=7), process_index=0, process_count=2)
  with pytest.raises(ValueError, match="data.crop = 80"):
    pipeline.make_dataset(_cfg(shards64, crop=80), process_index=0, process_count=1)


def test_finite_epochs_give_every_host_the_same_number_of_whole_batches(shards64):
  # 48 records, global batch 20: two whole global batches; the last 8 records are dropped.
  counts = []
  for host in range(2):
    cfg = _cfg(shards64, num_epochs=1, global_batch_size=20)
    it = iter(pipeline.make_dataset(cfg, process_index=host, process_count=2))
    counts.append(sum(1 for _ in it))
  single = iter(pipeline.make_dataset(_cfg(shards64, num_epochs=1, global_batch_size=20),
                                      process_index=0, process_count=1))
  assert counts == [2, 2] and sum(1 for _ in single) == 2
