"""A pretrained encoder end to end: periodic evaluation in training, `embed`, `knn`, `to-torch`
with the side-by-side check, `from-torch`, and `train` initialised from the imported folder.

One small training run (the reduced ConvNeXt V2 of test_train) is shared by the module.
"""
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from _env import REPO, cpu_env
from test_train import CONFIG, tiny

from mmearth_jax import config_lib, metrics, pretrained, train
from mmearth_jax.eval import datasets, features
from mmearth_jax.interop import hub, torch_io


# A program compiled again in this process (each periodic evaluation jits the features function
# anew) is loaded from JAX's persistent compilation cache (conftest).
pytestmark = pytest.mark.usefixtures("jax_compilation_cache")


def cli(*args: str, devices: int = 1) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "mmearth_jax", *args], env=cpu_env(devices),
                        cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(shards64, tmp_path_factory, jax_compilation_cache):
  workdir = str(tmp_path_factory.mktemp("eval_run"))
  cfg = config_lib.load(f"{CONFIG}:demo", tiny(
      shards64, "eval.every_steps=8", f"eval.dataset=mmearth:{shards64}",
      "eval.evaluators=knn,lsq", "eval.knn_k=(5, 10)"))
  train.train(cfg, workdir, log=lambda m: None)
  return workdir


@pytest.fixture(scope="module")
def images(shards64):
  data = datasets.load(f"mmearth:{shards64}", "train", pretrained.spec_from_config(
      config_lib.load(f"{CONFIG}:demo"))["bands"], max_examples=5)
  return data.images


def test_periodic_evaluation_is_logged(run_dir):
  rows = metrics.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
  for step in (0, 8):  # step 0: the random-init baseline
    for key in ("eval/knn_top1_k5", "eval/knn_top5_k10", "eval/lsq_top1"):
      assert 0.0 <= rows[step][key] <= 1.0
  assert "eval/knn_top1_k5" not in rows[4] and "loss" in rows[8]  # merged with the step's row


def test_a_workdir_and_its_steps_load_as_pretrained_models(run_dir):
  latest = pretrained.load(run_dir)
  assert latest.spec["arch"] == "mp_mae" and latest.spec["dims"] == [8, 16, 16, 16]
  assert latest.source.endswith(os.path.join("checkpoints", "8"))
  step4 = pretrained.load(os.path.join(run_dir, "checkpoints", "4"))
  differs = jax.tree.map(lambda a, b: not np.array_equal(a, b), latest.params, step4.params)
  assert any(jax.tree.leaves(differs))  # two different steps, not the same file twice


def test_embed_cli_layouts_and_band_errors(run_dir, images, tmp_path):
  np.save(tmp_path / "x.npy", images)
  np.save(tmp_path / "x_cf.npy", images.transpose(0, 3, 1, 2))
  r = cli("embed", "--checkpoint", run_dir, "--images", str(tmp_path / "x.npy"),
          "--normalised", "--out", str(tmp_path / "e.npy"))
  assert r.returncode == 0, r.stderr
  r = cli("embed", "--checkpoint", run_dir, "--images", str(tmp_path / "x_cf.npy"),
          "--channels-first", "--normalised", "--out", str(tmp_path / "e_cf.npy"))
  assert r.returncode == 0, r.stderr
  e, e_cf = np.load(tmp_path / "e.npy"), np.load(tmp_path / "e_cf.npy")
  model = pretrained.load(run_dir)
  want = features.extract(pretrained.features_fn(model.spec), model.params["encoder"], images)
  assert e.shape == (5, 16)
  np.testing.assert_allclose(e, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(e, e_cf)
  np.save(tmp_path / "bad.npy", images[..., :10])
  r = cli("embed", "--checkpoint", run_dir, "--images", str(tmp_path / "bad.npy"),
          "--normalised", "--out", str(tmp_path / "bad_e.npy"))
  assert r.returncode == 2 and "10 bands" in r.stderr and "takes 12" in r.stderr
  assert not (tmp_path / "bad_e.npy").exists()


def test_knn_cli_on_the_sample(run_dir, shards64, tmp_path):
  out = tmp_path / "knn.json"
  r = cli("knn", "--checkpoint", run_dir, "--dataset", f"mmearth:{shards64}", "--k", "5,10",
          "--json", str(out), devices=2)
  assert r.returncode == 0, r.stderr
  assert "knn_top1_k5" in r.stdout and out.exists()


def test_to_torch_check_from_torch_and_train_init(run_dir, shards64, images, tmp_path):
  np.save(tmp_path / "x.npy", images)
  pth = tmp_path / "mp_mae.pth"
  r = cli("to-torch", "--checkpoint", run_dir, "--layout", "mmearth", "--out", str(pth),
          "--check", str(tmp_path / "x.npy"))
  assert r.returncode == 0, r.stderr
  # The side-by-side check: JAX and the plain-PyTorch reference on the written file agree.
  rel = float(re.search(r"max \|JAX - PyTorch\| / max \|PyTorch\| = (\S+)", r.stdout).group(1))
  assert rel < 1e-5, r.stdout
  state = torch_io.load_state_dict(str(pth))
  assert "encoder.initial_conv.0.weight" in state and "loss_fn.log_vars" in state

  imported = tmp_path / "imported"
  r = cli("from-torch", "--checkpoint", str(pth), "--out", str(imported))
  assert r.returncode == 0, r.stderr
  original, back = pretrained.load(run_dir), pretrained.load(str(imported))
  assert back.spec == original.spec  # architecture, bands and outputs inferred from the file
  jax.tree.map(np.testing.assert_array_equal, original.params, back.params)  # bit-exact
  again = hub.export_state_dict(back.spec, back.params, "mmearth")  # what to-torch writes
  assert list(again) == list(state)
  for k, v in state.items():
    np.testing.assert_array_equal(again[k].numpy(), v)

  # The imported folder starts a training run: with lr 0 the parameters stay exactly those.
  workdir = tmp_path / "finetune"
  cfg = config_lib.load(f"{CONFIG}:demo", tiny(
      shards64, f"init_from={imported}", "optimizer.base_lr=0.0", "train.num_steps=4"))
  train.train(cfg, str(workdir), log=lambda m: None)
  after = pretrained.load(str(workdir))
  jax.tree.map(np.testing.assert_array_equal, original.params, after.params)


def test_init_from_a_mismatched_model_names_the_tensors(run_dir, shards64, tmp_path):
  cfg = config_lib.load(f"{CONFIG}:demo", tiny(shards64, f"init_from={run_dir}",
                                               "model.dims=(8, 16, 16, 24)"))
  with pytest.raises(train.TrainingError, match=r"mis-shaped: encoder/.*\(16,\).*\(24,\)"):
    train.train(cfg, str(tmp_path / "w"), log=lambda m: None)


def test_features_of_a_trained_encoder_beat_a_random_one(tmp_path_factory):
  """The evaluators measure something: MP-MAE atto pretrained for 50 steps on the 256-tile
  sample gives features that classify dominant land cover better than its random init (the
  step-0 evaluation of the same run). It tests the evaluators, not the recipe's geometry: in the
  dense one kNN k=20 has risen by step 50; in the demo's sparse one it rises by step 100."""
  from mmearth_jax.data import convert, synth
  root = tmp_path_factory.mktemp("sample256")
  synth.write_sample(str(root / "h5"), n=256, size=64, seed=0)
  convert.convert(str(root / "h5"), str(root / "shards"), shards=4, log=lambda *a: None)
  shards = str(root / "shards")
  cfg = config_lib.load(f"{CONFIG}:demo", [
      f"data.path={shards}", "train.num_steps=50", "train.log_every=50", "eval.every_steps=50",
      f"eval.dataset=mmearth:{shards}", "eval.evaluators=knn,lsq", "eval.knn_k=(10, 20)",
      "checkpoint.every_steps=1000", "data.read_threads=2", "model.masked_geometry=dense",
      "mesh.num_devices=1"])  # one device: 8 simulated ones on 2 cores only add overhead
  workdir = str(root / "run")
  train.train(cfg, workdir, log=lambda m: None)
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  random_init, trained = rows[0], rows[50]
  assert trained["eval/lsq_top1"] > random_init["eval/lsq_top1"] + 0.1
  assert trained["eval/knn_top1_k10"] > random_init["eval/knn_top1_k10"]
  assert trained["eval/knn_top1_k20"] > random_init["eval/knn_top1_k20"]
