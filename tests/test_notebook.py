"""notebooks/knn_eval.ipynb, executed headless as a user would run it, on local sample data: an
MMEarth PyTorch checkpoint goes through the importer, a EuroSAT-like GEO-Bench task with all 13
bands is mapped onto the encoder's 12, and kNN accuracy and the confusion matrix come out."""
import argparse
import json
import os

import numpy as np
import papermill
import pytest
import torch
from _env import REPO, cpu_env

from mmearth_jax import testing
from mmearth_jax.eval import datasets
from mmearth_jax.interop import torch_convnextv2 as tc

NOTEBOOK = os.path.join(REPO, "notebooks", "knn_eval.ipynb")


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


def test_knn_notebook_runs_headless(mmearth_torch_checkpoint, tmp_path, monkeypatch):
  task = testing.write_geobench_sample(str(tmp_path / "geobench"), name="m-eurosat", n=80,
                                       size=32, num_classes=10, seed=0)
  out = tmp_path / "out"
  for k, v in cpu_env(1).items():  # the kernel inherits this environment
    monkeypatch.setenv(k, v)
  papermill.execute_notebook(
      NOTEBOOK, str(tmp_path / "executed.ipynb"), kernel_name="python3", cwd=str(tmp_path),
      progress_bar=False,
      parameters={"TORCH_CHECKPOINT": mmearth_torch_checkpoint, "DATASET": f"geobench:{task}",
                  "TRAIN_SPLIT": "train", "TEST_SPLIT": "test", "MAX_EXAMPLES": 0,
                  "KS": [5, 10], "OUTPUT_DIR": str(out)})
  result = json.loads((out / "knn.json").read_text())
  test = datasets.load(f"geobench:{task}", "test", [f"B{i}" for i in (2, 3, 4)])
  cm = np.array(result["confusion_matrix"])  # drawn for k = KS[0] = 5 (20 is not in KS)
  assert cm.shape == (10, 10) and cm.sum() == len(test.labels)  # each test image once
  np.testing.assert_array_equal(cm.sum(1), np.bincount(test.labels, minlength=10))
  assert result["knn_top1_k5"] == pytest.approx(np.trace(cm) / cm.sum())
  assert result["knn_top1_k5"] > 0.3  # classes differ in spectrum: well above chance (0.1)
  assert (out / "confusion_matrix.png").stat().st_size > 1000
