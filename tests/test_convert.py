"""HDF5 -> ArrayRecord conversion: manifest, exact content, verify, crash/resume, bad input, CLI."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from array_record.python import array_record_module

from mmearth_jax import cli
from mmearth_jax.data import convert
from mmearth_jax import modalities as M
from mmearth_jax.data import records
from mmearth_jax.data import synth
from mmearth_jax.data.convert import ConversionError
from mmearth_jax.data.source import SourceError

N = 24
SIZE = 64
STEM = f"data_synth_{SIZE}"
QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
  """The pristine sample: N tiles of 64 px. Never modified: tests that break it copy it first."""
  folder = str(tmp_path_factory.mktemp("convert_sample"))
  assert synth.write_sample(folder, n=N, size=SIZE, seed=0) == STEM
  return folder


@pytest.fixture(scope="module")
def converted(sample, tmp_path_factory):
  """`sample` converted into 3 shards, serially. Never modified: tests that break it copy it."""
  out = str(tmp_path_factory.mktemp("convert_out"))
  manifest = convert.convert(sample, out, shards=3, workers=1, **QUIET)
  return out, manifest


def _h5(folder):
  return os.path.join(folder, f"{STEM}.h5")


def _read_shard(path):
  reader = array_record_module.ArrayRecordReader(path)
  try:
    n = reader.num_records()
    return [records.decode(r) for r in reader.read(list(range(n)))] if n else []
  finally:
    reader.close()


def _all_rows(out, manifest):
  rows = []
  for s in manifest["shards"]:
    rows += [meta["row"] for _, meta in _read_shard(os.path.join(out, s["file"]))]
  return rows


def _check_output(src, out, manifest, shards, names=None):
  """Manifest is self-consistent and every record equals its HDF5 row, each row exactly once."""
  names = list(M.MODALITIES) if names is None else list(names)
  assert manifest["format_version"] == records.FORMAT_VERSION
  assert manifest["source_stem"] == STEM
  assert manifest["split"] == "train"
  assert manifest["tile_size"] == SIZE
  assert manifest["num_records"] == N
  assert len(manifest["shards"]) == shards
  # Shard k holds rows [k*N//shards, (k+1)*N//shards).
  bounds = [k * N // shards for k in range(shards + 1)]
  for k, s in enumerate(manifest["shards"]):
    assert s["file"] == convert.shard_name(STEM, "train", k, shards)
    assert s["num_records"] == bounds[k + 1] - bounds[k], s
    assert (s["first_row"], s["last_row"]) == (bounds[k], bounds[k + 1] - 1)
    path = os.path.join(out, s["file"])
    assert os.path.getsize(path) == s["bytes"]
    assert convert.sha256_file(path) == s["sha256"]
  assert sum(s["num_records"] for s in manifest["shards"]) == N

  assert list(manifest["modalities"]) == names
  for name in names:
    m = M.MODALITIES[name]
    stored = manifest["modalities"][name]
    assert stored["bands"] == list(m.bands)
    assert stored["dtype"] == m.dtype
    assert stored["level"] == m.level
    want = [SIZE, SIZE, m.num_bands] if m.level == M.PIXEL else [m.num_bands]
    assert stored["shape"] == want, name
  with open(os.path.join(src, f"{STEM}_band_stats.json")) as f:
    assert manifest["band_stats"] == json.load(f)

  # The manifest on disk is what convert returned, and nothing is left over.
  assert convert.load_manifest(out) == manifest
  assert convert.verify(out) == []
  assert not os.path.exists(os.path.join(out, convert.PROGRESS))
  assert not glob.glob(os.path.join(out, "**", "*.tmp"), recursive=True)

  # Every record, decoded, equals the HDF5 row (pixel modalities channels-last).
  rows = []
  with h5py.File(_h5(src), "r") as f:
    data = {name: f[name][:] for name in names}
    meta = f["metadata"][:]
    for k, s in enumerate(manifest["shards"]):
      recs = _read_shard(os.path.join(out, s["file"]))
      assert len(recs) == s["num_records"]
      for arrays, rec_meta in recs:
        r = rec_meta["row"]
        rows.append(r)
        assert bounds[k] <= r < bounds[k + 1]
        assert rec_meta["tile_id"] == meta[r]["tile_id"].decode()
        assert rec_meta["S2_type"] == meta[r]["S2_type"].decode()
        assert set(arrays) == set(names)
        for name in names:
          want = data[name][r]
          if M.MODALITIES[name].level == M.PIXEL:
            want = want.transpose(1, 2, 0)
          got = arrays[name]
          assert got.dtype == want.dtype, (name, r)
          assert got.shape == want.shape, (name, r)
          # Bitwise: NaN (era5) and -inf (sentinel1) must survive unchanged too.
          assert got.tobytes() == np.ascontiguousarray(want).tobytes(), (name, r)
  assert rows == list(range(N))  # in order, each exactly once
  assert len(set(rows)) == len(rows)


# ---------------------------------------------------------------------------------------------
# 1. Conversion


def test_convert_serial_matches_hdf5(sample, converted):
  out, manifest = converted
  _check_output(sample, out, manifest, shards=3)
  assert [s["num_records"] for s in manifest["shards"]] == [8, 8, 8]


def test_convert_parallel_matches_hdf5(sample, tmp_path):
  out = str(tmp_path / "out")
  manifest = convert.convert(sample, out, shards=5, workers=2, **QUIET)
  _check_output(sample, out, manifest, shards=5)
  assert [s["num_records"] for s in manifest["shards"]] == [4, 5, 5, 5, 5]


def test_parallel_and_serial_shards_are_identical(sample, converted, tmp_path):
  out, manifest = converted
  out2 = str(tmp_path / "out")
  manifest2 = convert.convert(sample, out2, shards=3, workers=2, **QUIET)
  assert [s["sha256"] for s in manifest2["shards"]] == [s["sha256"] for s in manifest["shards"]]


def test_convert_modality_subset(sample, tmp_path):
  out = str(tmp_path / "out")
  names = ["sentinel2", "era5", "dynamic_world"]
  manifest = convert.convert(sample, out, shards=2, modalities=names, **QUIET)
  _check_output(sample, out, manifest, shards=2, names=names)


def test_rerun_on_finished_folder(sample, converted, tmp_path):
  out = str(tmp_path / "out")
  shutil.copytree(converted[0], out)
  mtimes = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "*"))}
  logs = []
  assert convert.convert(sample, out, shards=3, log=logs.append) == converted[1]
  assert any("already converted" in line for line in logs)
  assert {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "*"))} == mtimes
  with pytest.raises(ConversionError, match="finished conversion with other settings"):
    convert.convert(sample, out, shards=4, **QUIET)
  # Neither run leaves a `_progress` folder behind in the finished output.
  assert not os.path.exists(os.path.join(out, convert.PROGRESS))


def test_shards_out_of_range(sample, tmp_path):
  for shards in (0, N + 1):
    with pytest.raises(ConversionError, match=r"--shards must be in \[1, 24\]"):
      convert.convert(sample, str(tmp_path / f"out{shards}"), shards=shards, **QUIET)


# ---------------------------------------------------------------------------------------------
# 2. verify


def test_verify_detects_corrupted_shard(converted, tmp_path):
  out = str(tmp_path / "out")
  shutil.copytree(converted[0], out)
  assert convert.verify(out) == []
  path = os.path.join(out, converted[1]["shards"][1]["file"])
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 2)
    b = f.read(1)
    f.seek(size // 2)
    f.write(bytes([b[0] ^ 0xFF]))
  assert os.path.getsize(path) == size
  problems = convert.verify(out)
  assert len(problems) == 1, problems
  assert path in problems[0] and "sha256" in problems[0]
  # The other shards are not blamed.
  for s in (converted[1]["shards"][0], converted[1]["shards"][2]):
    assert s["file"] not in problems[0]


def test_verify_detects_missing_shard(converted, tmp_path):
  out = str(tmp_path / "out")
  shutil.copytree(converted[0], out)
  path = os.path.join(out, converted[1]["shards"][2]["file"])
  os.remove(path)
  problems = convert.verify(out)
  assert len(problems) == 1, problems
  assert path in problems[0] and "missing" in problems[0]


def test_verify_detects_wrong_record_count(converted, tmp_path):
  out = str(tmp_path / "out")
  shutil.copytree(converted[0], out)
  # Swap in a valid shard with another record count; fix its checksum so only the count is off.
  manifest = json.load(open(os.path.join(out, convert.MANIFEST)))
  s = manifest["shards"][0]
  s["num_records"] += 1
  manifest["num_records"] += 1
  with open(os.path.join(out, convert.MANIFEST), "w") as f:
    json.dump(manifest, f)
  problems = convert.verify(out)
  assert len(problems) == 1, problems
  assert s["file"] in problems[0] and "records" in problems[0]


# ---------------------------------------------------------------------------------------------
# 3. load_manifest on folders without a manifest


def test_load_manifest_unfinished_folder(tmp_path):
  folder = tmp_path / "partial"
  (folder / convert.PROGRESS).mkdir(parents=True)
  with pytest.raises(ConversionError) as e:
    convert.load_manifest(str(folder))
  msg = str(e.value)
  assert os.path.join(str(folder), convert.MANIFEST) in msg
  assert "unfinished" in msg and "re-run" in msg
  with pytest.raises(ConversionError, match="unfinished"):
    convert.verify(str(folder))


def test_load_manifest_not_an_output_folder(tmp_path):
  with pytest.raises(ConversionError) as e:
    convert.load_manifest(str(tmp_path))
  assert "not an `mmearth-jax convert` output folder" in str(e.value)
  assert "unfinished" not in str(e.value)


def test_load_manifest_wrong_format_version(converted, tmp_path):
  out = str(tmp_path / "out")
  shutil.copytree(converted[0], out)
  path = os.path.join(out, convert.MANIFEST)
  manifest = json.load(open(path))
  manifest["format_version"] = records.FORMAT_VERSION + 1
  json.dump(manifest, open(path, "w"))
  with pytest.raises(ConversionError, match="format_version"):
    convert.load_manifest(out)


# ---------------------------------------------------------------------------------------------
# 4. Crash and resume


def _convert_cmd(src, out, shards):
  return [sys.executable, "-m", "mmearth_jax", "convert", "--src", src, "--out", out,
          "--shards", str(shards), "--workers", "1"]


def _start_and_kill(src, out, shards, log_path):
  """Starts a conversion, SIGKILLs it as soon as one shard is noted done; returns the notes."""
  with open(log_path, "w") as log:
    proc = subprocess.Popen(_convert_cmd(src, out, shards), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
  pattern = os.path.join(out, convert.PROGRESS, "000*.json")
  deadline = time.monotonic() + 120
  try:
    while not glob.glob(pattern):
      if proc.poll() is not None:
        pytest.fail(f"conversion exited (rc {proc.returncode}) before any shard was noted "
                    f"done; output: {open(log_path).read()}")
      if time.monotonic() > deadline:
        pytest.fail("no shard was noted done within 120 s")
      time.sleep(0.003)
    os.killpg(proc.pid, signal.SIGKILL)
  finally:
    if proc.poll() is None:
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    proc.wait()
  assert proc.returncode == -signal.SIGKILL, (
      f"the conversion finished (rc {proc.returncode}) before it could be killed: make the "
      f"sample larger; output: {open(log_path).read()}")
  return sorted(glob.glob(pattern))


def test_crash_and_resume(tmp_path):
  n, shards = 64, 16
  src = str(tmp_path / "src")
  synth.write_sample(src, n=n, size=128, seed=3)
  out = str(tmp_path / "out")
  notes = _start_and_kill(src, out, shards, str(tmp_path / "run1.log"))
  assert not os.path.exists(os.path.join(out, convert.MANIFEST)), "conversion was not interrupted"
  assert 1 <= len(notes) < shards
  with pytest.raises(ConversionError, match="unfinished"):
    convert.load_manifest(out)

  done = {}
  for note in notes:
    entry = json.load(open(note))
    path = os.path.join(out, entry["file"])
    st = os.stat(path)
    assert st.st_size == entry["bytes"]
    done[path] = (st.st_mtime_ns, st.st_ino)

  # A different --shards on the partial folder is refused, naming the setting, touching nothing.
  with pytest.raises(ConversionError) as e:
    convert.convert(src, out, shards=8, **QUIET)
  assert "(shards)" in str(e.value) and out in str(e.value)
  assert "partial conversion" in str(e.value)
  # So is the CLI, with exit status 2.
  r = subprocess.run(_convert_cmd(src, out, 8), capture_output=True, text=True)
  assert r.returncode == 2 and "(shards)" in r.stderr, r.stderr
  assert sorted(glob.glob(os.path.join(out, convert.PROGRESS, "000*.json"))) == notes

  # Re-run to completion: the shards noted done are kept as they are.
  r = subprocess.run(_convert_cmd(src, out, shards), capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr
  assert f"resuming: {len(notes)} of {shards} shards already done" in r.stdout
  for path, (mtime, ino) in done.items():
    st = os.stat(path)
    assert (st.st_mtime_ns, st.st_ino) == (mtime, ino), f"{path} was rewritten"
  assert not glob.glob(os.path.join(out, "**", "*.tmp"), recursive=True)
  assert not os.path.exists(os.path.join(out, convert.PROGRESS))
  assert convert.verify(out) == []
  manifest = convert.load_manifest(out)
  assert manifest["num_records"] == n and len(manifest["shards"]) == shards
  assert sum(s["num_records"] for s in manifest["shards"]) == n
  assert sorted(glob.glob(os.path.join(out, "*.array_record"))) == sorted(
      os.path.join(out, s["file"]) for s in manifest["shards"])
  rows = _all_rows(out, manifest)
  assert rows == list(range(n))  # every row exactly once, in order


def test_resume_rewrites_shard_whose_size_does_not_match_its_note(sample, tmp_path):
  """A shard file that differs from its done note (e.g. truncated) is converted again."""
  out = str(tmp_path / "out")
  convert.convert(sample, out, shards=3, **QUIET)
  # Rebuild the partial state: plan and notes as the converter writes them, manifest not yet.
  manifest = convert.load_manifest(out)
  progress = os.path.join(out, convert.PROGRESS)
  os.makedirs(progress)
  convert._write_json_atomic(os.path.join(progress, convert.PLAN), manifest["plan"])
  for k, s in enumerate(manifest["shards"]):
    convert._write_json_atomic(os.path.join(progress, f"{k:05d}.json"), s)
  os.remove(os.path.join(out, convert.MANIFEST))
  bad = os.path.join(out, manifest["shards"][1]["file"])
  os.truncate(bad, os.path.getsize(bad) // 2)
  logs = []
  manifest2 = convert.convert(sample, out, shards=3, log=logs.append)
  assert any("resuming: 2 of 3 shards already done" in line for line in logs), logs
  assert manifest2["shards"] == manifest["shards"]
  _check_output(sample, out, manifest2, shards=3)


def test_partial_folder_with_other_settings_is_refused(sample, tmp_path):
  out = str(tmp_path / "out")
  variant_plan = convert._plan(convert.open_variant(sample), "train", 3, convert.DEFAULT_COMPRESSION)
  os.makedirs(os.path.join(out, convert.PROGRESS))
  convert._write_json_atomic(os.path.join(out, convert.PROGRESS, convert.PLAN), variant_plan)
  with pytest.raises(ConversionError) as e:
    convert.convert(sample, out, shards=3, compression="none", **QUIET)
  assert "(compression)" in str(e.value)
  with pytest.raises(ConversionError) as e:
    convert.convert(sample, out, shards=4, modalities=["sentinel2"], **QUIET)
  assert "(modalities, shards)" in str(e.value)
  assert not os.path.exists(os.path.join(out, convert.MANIFEST))
  # The same settings finish it.
  manifest = convert.convert(sample, out, shards=3, **QUIET)
  _check_output(sample, out, manifest, shards=3)


# ---------------------------------------------------------------------------------------------
# 5. Bad input


def _broken_copy(sample, tmp_path):
  src = str(tmp_path / "src")
  shutil.copytree(sample, src)
  return src


def _expect_error(src, tmp_path, exc, *fragments):
  out = str(tmp_path / "out")
  with pytest.raises(exc) as e:
    convert.convert(src, out, shards=3, **QUIET)
  msg = str(e.value)
  for frag in fragments:
    assert frag in msg, f"{frag!r} not in error message {msg!r}"
  assert not os.path.exists(os.path.join(out, convert.MANIFEST))
  return msg


def test_missing_companion_json(sample, tmp_path):
  src = _broken_copy(sample, tmp_path)
  path = os.path.join(src, f"{STEM}_tile_info.json")
  os.remove(path)
  _expect_error(src, tmp_path, SourceError, path, "missing")


def test_invalid_companion_json(sample, tmp_path):
  src = _broken_copy(sample, tmp_path)
  path = os.path.join(src, f"{STEM}_splits.json")
  with open(path, "w") as f:
    f.write('{"train": [0, 1,')
  _expect_error(src, tmp_path, SourceError, path, "not valid JSON")


def test_missing_dataset(sample, tmp_path):
  src = _broken_copy(sample, tmp_path)
  with h5py.File(_h5(src), "a") as f:
    del f["aster"]
  _expect_error(src, tmp_path, SourceError, _h5(src), "'aster'", "missing")


def test_misshaped_dataset(sample, tmp_path):
  src = _broken_copy(sample, tmp_path)
  with h5py.File(_h5(src), "a") as f:
    del f["aster"]
    f.create_dataset("aster", (N, 3, SIZE, SIZE), dtype="int16")
  msg = _expect_error(src, tmp_path, SourceError, _h5(src), "'aster'", "shape")
  assert "(24, 3, 64, 64)" in msg


def test_wrong_dtype(sample, tmp_path):
  src = _broken_copy(sample, tmp_path)
  with h5py.File(_h5(src), "a") as f:
    data = f["sentinel1"][:].astype(np.float64)
    del f["sentinel1"]
    f.create_dataset("sentinel1", data=data)
  _expect_error(src, tmp_path, SourceError, _h5(src), "'sentinel1'", "float64", "float32")


def test_truncated_hdf5(sample, tmp_path):
  src = _broken_copy(sample, tmp_path)
  os.truncate(_h5(src), os.path.getsize(_h5(src)) // 2)
  _expect_error(src, tmp_path, SourceError, _h5(src), "truncated")


def test_tile_missing_from_tile_info(sample, tmp_path):
  src = _broken_copy(sample, tmp_path)
  path = os.path.join(src, f"{STEM}_tile_info.json")
  info = json.load(open(path))
  tile = f"synth0_{SIZE}_{7:06d}"
  del info[tile]
  json.dump(info, open(path, "w"))
  _expect_error(src, tmp_path, SourceError, path, repr(tile), "row 7", _h5(src))


def test_split_index_out_of_range(sample, tmp_path):
  src = _broken_copy(sample, tmp_path)
  path = os.path.join(src, f"{STEM}_splits.json")
  splits = json.load(open(path))
  splits["train"].append(N + 5)
  json.dump(splits, open(path, "w"))
  _expect_error(src, tmp_path, SourceError, path, "'train'", str(N + 5), "out of range")


def test_unknown_and_empty_split(sample, tmp_path):
  path = os.path.join(sample, f"{STEM}_splits.json")
  with pytest.raises(SourceError) as e:
    convert.convert(sample, str(tmp_path / "a"), split="nope", **QUIET)
  assert path in str(e.value) and "'nope'" in str(e.value)
  with pytest.raises(SourceError) as e:
    convert.convert(sample, str(tmp_path / "b"), split="val", **QUIET)
  assert path in str(e.value) and "'val'" in str(e.value) and "empty" in str(e.value)


def test_unknown_modality(sample, tmp_path):
  with pytest.raises(KeyError, match="unknown modality 'sentinel3'"):
    convert.convert(sample, str(tmp_path / "out"), modalities=["sentinel3"], **QUIET)


# ---------------------------------------------------------------------------------------------
# 6. CLI


def test_cli_convert_bad_input(sample, tmp_path, capsys):
  src = _broken_copy(sample, tmp_path)
  path = os.path.join(src, f"{STEM}_tile_info.json")
  os.remove(path)
  out = str(tmp_path / "out")
  assert cli.main(["convert", "--src", src, "--out", out]) == 2
  err = capsys.readouterr().err
  assert "mmearth-jax convert: error:" in err and path in err
  assert "Traceback" not in err
  assert not os.path.exists(os.path.join(out, convert.MANIFEST))


def test_cli_convert_and_verify(sample, converted, tmp_path, capsys):
  out = str(tmp_path / "out")
  assert cli.main(["convert", "--src", sample, "--out", out, "--shards", "3"]) == 0
  assert convert.load_manifest(out) == converted[1]
  capsys.readouterr()
  assert cli.main(["verify", out]) == 0
  stdout = capsys.readouterr().out
  assert "OK" in stdout and "3 shards" in stdout and f"{N} records" in stdout

  os.remove(os.path.join(out, converted[1]["shards"][0]["file"]))
  assert cli.main(["verify", out]) == 1
  assert "PROBLEM" in capsys.readouterr().out

  assert cli.main(["verify", str(tmp_path)]) == 2
  assert "not an `mmearth-jax convert` output folder" in capsys.readouterr().err
