"""notebooks/knn_eval.ipynb, executed headless with papermill as on a fresh runtime: its kernel is
the python of a fresh venv holding only the wheel of this checkout (tests/_wheel.py), started
outside the repository, and every cell runs, the install cell included (pip offline, from the
packages the venv links to). Two runs:

  * nothing given: the notebook "downloads" a small EuroSAT_MS.zip laid out like the release (a
    file:// URL), extracts it, refuses split lists whose MD5 is not the published lists' (a
    seeded stratified split instead), pretrains a tiny MP-MAE on the built-in sample and
    reports kNN accuracy per k, the confusion matrix and the nearest neighbours;
  * an MMEarth PyTorch checkpoint and a GEO-Bench task: the importer path.
"""
import argparse
import json
import os
import re
import subprocess

import numpy as np
import papermill
import pytest
import torch
from _env import REPO
from _wheel import wheel_venv  # noqa: F401  (the fixture)

from mmearth_jax import testing
from mmearth_jax.eval import datasets
from mmearth_jax.interop import torch_convnextv2 as tc

NOTEBOOK = os.path.join(REPO, "notebooks", "knn_eval.ipynb")
# A seconds-to-compile MP-MAE (tests/test_train.py's `tiny`) on one CPU device.
TINY = ["model.depths=(1, 1, 1, 1)", "model.dims=(8, 16, 16, 16)", "model.decoder_dim=16",
        "data.global_batch_size=8", "data.read_threads=2", "train.log_every=1",
        "optimizer.warmup_steps=1", "mesh.num_devices=1"]
PER_CLASS = 10  # seeded 60 / 20 / 20: 6 train and 2 test images per class


@pytest.fixture(scope="module")
def kernel(wheel_venv, tmp_path_factory) -> str:
  """A JUPYTER_PATH with the kernelspec "wheel": ipykernel run by the fresh venv's python."""
  prefix = tmp_path_factory.mktemp("kernelspec")
  subprocess.run([wheel_venv.python, "-m", "ipykernel", "install", "--prefix", str(prefix),
                  "--name", "wheel"], env=wheel_venv.env(), cwd=prefix, check=True,
                 capture_output=True)
  return str(prefix / "share" / "jupyter")


def execute(parameters: dict, tmp_path, monkeypatch, wheel_venv, kernel):
  """Runs the notebook in `tmp_path` with `parameters`; returns the executed notebook."""
  for k, v in wheel_venv.env().items():  # the kernel inherits this environment
    monkeypatch.setenv(k, v)
  monkeypatch.delenv("PYTHONPATH", raising=False)
  monkeypatch.setenv("JUPYTER_PATH", kernel)
  monkeypatch.setenv("PIP_NO_INDEX", "1")  # the install cell resolves offline
  monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
  return papermill.execute_notebook(
      NOTEBOOK, str(tmp_path / "executed.ipynb"), kernel_name="wheel", cwd=str(tmp_path),
      progress_bar=False,
      parameters={"PACKAGE": wheel_venv.wheel, "OUTPUT_DIR": "out", **parameters})


def stdout(nb) -> str:
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []) if o.get("output_type") == "stream")


def figures(nb, saved_as: str) -> int:
  """PNG outputs of the cell that saves `saved_as`."""
  (cell,) = [c for c in nb.cells if c.cell_type == "code" and f'"{saved_as}"), dpi' in c.source]
  return sum("image/png" in o.get("data", {}) for o in cell.outputs)


def check_results(nb, out, test_labels: np.ndarray, ks, num_queries: int) -> dict:
  """The outputs every run has: the kNN table, both figures, knn.json."""
  text = stdout(nb)
  for k in ks:  # one row per k: k, top-1 %, top-5 %
    assert re.search(rf"^\s+{k}\s+\d+\.\d\d\s+\d+\.\d\d$", text, re.M), (k, text[-3000:])
  assert figures(nb, "confusion_matrix.png") == 1 and figures(nb, "neighbours.png") == 1
  assert (out / "confusion_matrix.png").stat().st_size > 1000
  assert (out / "neighbours.png").stat().st_size > 1000
  result = json.loads((out / "knn.json").read_text())
  cm = np.array(result["confusion_matrix"])
  n = len(cm)
  assert result["confusion_matrix_k"] == ks[0]  # 20 is not in KS
  assert cm.sum() == len(test_labels)  # each test image once
  np.testing.assert_array_equal(cm.sum(1), np.bincount(test_labels, minlength=n))
  assert result[f"knn_top1_k{ks[0]}"] == pytest.approx(np.trace(cm) / cm.sum())
  assert np.array(result["neighbours"]["train_indices"]).shape == (num_queries, 3)
  sim = np.array(result["neighbours"]["similarity"])  # the nearest first
  assert sim.shape == (num_queries, 3) and (np.diff(sim, axis=1) <= 0).all()
  return result


def test_on_a_fresh_runtime_with_nothing_given(wheel_venv, kernel, tmp_path, monkeypatch):
  # The release, and split lists beside it that are not the published ones (their MD5 differs).
  release = testing.write_eurosat_ms_sample(str(tmp_path / "zenodo"), per_class=PER_CLASS,
                                            split_lists=True)
  nb = execute({"DATA_URL": f"file://{release}", "SPLITS_URL": f"file://{tmp_path}/zenodo/",
                "DATA_DIR": "data",
                "MAX_EXAMPLES": 0, "KS": [5, 10], "PRETRAIN_STEPS": 4, "PRETRAIN_TILES": 16,
                "PRETRAIN_OVERRIDES": TINY, "N_QUERIES": 4, "N_NEIGHBOURS": 3},
               tmp_path, monkeypatch, wheel_venv, kernel)
  text = stdout(nb)
  # Installed with the [geo] extra, the JAX already there pinned by a constraint file.
  assert re.search(r"keeping the installed jax==0\.10\.\d+, jaxlib==0\.10\.\d+", text), text
  assert re.search(r"pip install -q \S+\.whl\[geo\] -c \S+keep-jax\.txt", text), text
  # Downloaded once into DATA_DIR and extracted: the release's layout.
  data = tmp_path / "data"
  assert (data / "EuroSAT_MS.zip").stat().st_size == os.path.getsize(release)
  assert sorted(os.listdir(data / "EuroSAT_MS")) == sorted(datasets.EUROSAT_CLASSES)
  assert re.search(r"no published split lists \(\S+eurosat-train.txt: MD5 \w+, expected "
                   r"908f142e73d6acdf3f482c5e80d851b1\); a seeded stratified split instead", text)
  assert not [n for n in os.listdir(data) if n.endswith(".txt")]  # all three lists dropped
  # The checkpoint pretrained here, its card's L1C statistics normalising EuroSAT.
  run = tmp_path / "pretrain" / "run"
  assert sorted(os.listdir(run / "checkpoints")) == ["4"]
  assert f"checkpoint pretrained here: convnextv2 from {run / 'checkpoints' / '4'}" in text
  assert "12/12 encoder bands present; dropped: B10" in text
  result = check_results(nb, tmp_path / "out", np.repeat(np.arange(10), 2), [5, 10], 4)
  assert result["checkpoint_kind"] == "pretrained here"
  assert result["dataset"] == "eurosat_ms:data"
  assert any("seeded stratified 60 / 20 / 20" in n for n in result["notes"]), result["notes"]
  assert any("the model card's L1C statistics" in n for n in result["notes"]), result["notes"]
  assert result["knn_top1_k5"] > 0.3  # classes differ in spectrum: well above chance (0.1)


@pytest.fixture
def mmearth_torch_checkpoint(tmp_path):
  """A (small) MMEarth-layout file as the MMEarth code saves it: model, optimizer, epoch, args."""
  torch.manual_seed(0)
  model = tc.ConvNeXtV2MMEarth(in_chans=12, depths=(1, 1, 1, 1), dims=(16, 32, 32, 32),
                               patch_size=16)
  path = tmp_path / "mmearth_checkpoint.pth"
  torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 199,
              "args": argparse.Namespace(model="convnextv2_atto", input_size=112)}, path)
  return str(path)


def test_a_pytorch_checkpoint_on_a_geobench_task(mmearth_torch_checkpoint, wheel_venv, kernel,
                                                 tmp_path, monkeypatch):
  task = testing.write_geobench_sample(str(tmp_path / "geobench"), name="m-eurosat", n=80,
                                       size=32, num_classes=10, seed=0)
  nb = execute({"TORCH_CHECKPOINT": mmearth_torch_checkpoint, "DATASET": f"geobench:{task}",
                "MAX_EXAMPLES": 0, "KS": [5, 10], "N_QUERIES": 4, "N_NEIGHBOURS": 3},
               tmp_path, monkeypatch, wheel_venv, kernel)
  text = stdout(nb)
  assert "keeping the installed torch 2.13.0" in text  # no [torch] extra over it
  assert "imported convnextv2" in text  # from-torch's report
  assert not (tmp_path / "data").exists()  # a dataset given: nothing downloaded
  test = datasets.load(f"geobench:{task}", "test", ["B2", "B3", "B4"])
  result = check_results(nb, tmp_path / "out", test.labels, [5, 10], 4)
  assert result["checkpoint_kind"] == "imported from PyTorch"
  assert result["knn_top1_k5"] > 0.3
