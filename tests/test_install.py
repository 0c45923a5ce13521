"""`pip install` without a clone: the wheel of this checkout, installed in a fresh venv outside the
repository (tests/_wheel.py), runs the command line from another folder: a sample, its
conversion, a short training run from a shipped config by name, embeddings and a PyTorch export.
"""
import email
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from _wheel import wheel_venv  # noqa: F401  (the fixture)

# What `pip install 'mmearth_jax[EXTRA]'` adds (setup.py), as the wheel's metadata states it.
EXTRAS = {
    "torch": {"torch==2.13.0"},
    "geo": {"rasterio<1.5,>=1.4", "pyarrow>=16"},
    "cuda12": {"jax[cuda12]<0.11,>=0.10.2"},
    "tpu": {"jax[tpu]<0.11,>=0.10.2"},
}
# A seconds-to-compile MP-MAE (tests/test_train.py's `tiny`) on one CPU device.
TINY = ["model.depths=(1, 1, 1, 1)", "model.dims=(8, 16, 16, 16)", "model.decoder_dim=16",
        "data.global_batch_size=8", "data.read_threads=2", "train.num_steps=4",
        "train.log_every=1", "checkpoint.every_steps=2", "eval.every_steps=0",
        "optimizer.warmup_steps=1", "mesh.num_devices=1"]


def _metadata(wheel: str) -> email.message.Message:
  with zipfile.ZipFile(wheel) as z:
    (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(z.read(name))


def test_the_wheel_holds_the_package_configs_and_extras(wheel_venv):
  with zipfile.ZipFile(wheel_venv.wheel) as z:
    names = z.namelist()
  tops = {n.split("/")[0] for n in names}
  assert tops == {"mmearth_jax", os.path.basename(wheel_venv.wheel).split("-py")[0] + ".dist-info"}
  for module in ("mmearth_jax/cli.py", "mmearth_jax/configs/mp_mae.py",
                 "mmearth_jax/interop/hub.py", "mmearth_jax/eval/knn.py"):
    assert module in names
  meta = _metadata(wheel_venv.wheel)
  extras = {}
  for req in meta.get_all("Requires-Dist"):
    if "; extra ==" in req:
      spec, extra = req.split("; extra ==")
      extras.setdefault(extra.strip().strip('"'), set()).add(spec.strip())
  for extra, want in EXTRAS.items():
    assert extras.get(extra) == want, (extra, extras.get(extra))
  provided = set(meta.get_all("Provides-Extra"))
  assert {"torch", "test", "notebook", "geo", "cuda12", "tpu"} <= provided
  with open(os.path.join(wheel_venv.venv, "bin", "mmearth-jax")) as f:
    assert f.readline().strip() == f"#!{wheel_venv.python}"  # the console script is the venv's


def test_the_installed_package_runs_from_another_folder(wheel_venv, tmp_path):
  env, cli = wheel_venv.env(), wheel_venv.bin("mmearth-jax")

  def run(*args: str) -> str:
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"{' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout

  where = json.loads(run(wheel_venv.python, "-c", (
      "import json, sys, mmearth_jax, mmearth_jax.configs; "
      "print(json.dumps([mmearth_jax.__file__, mmearth_jax.configs.__file__, sys.path]))")))
  assert all(p.startswith(wheel_venv.venv + os.sep) for p in where[:2]), where[:2]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  paths = [os.path.realpath(p or tmp_path) for p in where[2]]  # "": the current folder
  assert not any(p == repo or p.startswith(repo + os.sep) for p in paths), where[2]

  run(cli, "synth", "--out", "h5", "--n", "24", "--size", "64", "--seed", "0")
  run(cli, "convert", "--src", "h5", "--out", "shards", "--shards", "2")
  run(cli, "train", "--config", "mp_mae:demo", "--workdir", "run", "--config.data.path=shards",
      *(f"--config.{o}" for o in TINY))
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4"]

  images = np.random.default_rng(0).normal(size=(3, 56, 56, 12)).astype(np.float32)
  np.save(tmp_path / "tiles.npy", images)
  out = run(cli, "embed", "--checkpoint", "run", "--images", "tiles.npy", "--normalised",
            "--out", "emb.npy")
  assert "wrote 3 embeddings of width 16" in out
  emb = np.load(tmp_path / "emb.npy")
  assert emb.shape == (3, 16) and np.isfinite(emb).all()

  out = run(cli, "to-torch", "--checkpoint", "run", "--layout", "mmearth", "--out", "m.pth",
            "--check", "tiles.npy")
  wrote = re.search(r"wrote (\d+) tensors \(mmearth layout, mp_mae\)", out)
  assert wrote and "embedding of the first image of tiles.npy" in out, out
  import torch
  state = torch.load(tmp_path / "m.pth", weights_only=True)["model"]
  assert len(state) == int(wrote.group(1))


@pytest.mark.slow
@pytest.mark.parametrize("extras", ["torch,geo", "cuda12", "tpu"])
def test_the_wheel_resolves_from_pypi(wheel_venv, extras, tmp_path):
  """Online: pip resolves the wheel's requirements with each extra from PyPI alone, as on a fresh
  machine (a dry run: metadata only, nothing installed). `--isolated` leaves out this machine's
  pip configuration (local indexes, wheel folders, constraints) but for the CA bundle."""
  cert = os.environ.get("PIP_CERT")
  report = tmp_path / "report.json"
  out = subprocess.run(
      [sys.executable, "-m", "pip", "--isolated", "install", *(["--cert", cert] if cert else []),
       "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
       f"{wheel_venv.wheel}[{extras}]"],
      cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"]
            for i in json.loads(report.read_text())["install"]}
  assert chosen["jax"].startswith("0.10.") and chosen["jaxlib"].startswith("0.10.")
  want = {"torch,geo": ("torch", "rasterio", "pyarrow"), "cuda12": ("jax-cuda12-plugin", "nvidia-cudnn-cu12"),
          "tpu": ("libtpu",)}[extras]
  assert all(name in chosen for name in want), sorted(chosen)
