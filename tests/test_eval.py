"""The evaluators: weighted kNN, the linear probes, sharded feature extraction, model folders."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmearth_jax import pretrained
from mmearth_jax.eval import features, knn, probe


def clustered(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, dim)) * 3
  labels = np.repeat(np.arange(num_classes), n_per_class)
  x = centres[labels] + spread * rng.normal(size=(len(labels), dim))
  order = rng.permutation(len(labels))
  return x[order].astype(np.float32), labels[order]


def brute_force_knn(train_x, train_y, test_x, k, num_classes, t=0.07):
  """The DINO weighted vote, written out one query at a time."""
  a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
  b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
  out = np.zeros((len(b), num_classes))
  for q in range(len(b)):
    sim = a @ b[q]
    nearest = np.argsort(-sim)[:k]
    for j in nearest:
      out[q, train_y[j]] += np.exp(sim[j] / t)
  return out


def test_knn_is_perfect_on_separable_features():
  x, y = clustered(30, 5, 16, 0.05, seed=0)
  res = knn.knn_evaluate(x[:100], y[:100], x[100:], y[100:], 5, ks=(10, 20))
  assert res["knn_top1_k10"] == 1.0 and res["knn_top1_k20"] == 1.0
  assert res["knn_top5_k20"] == 1.0


def test_knn_matches_the_weighted_vote_written_out():
  x, y = clustered(20, 6, 8, 2.5, seed=1)  # overlapping classes: votes matter
  train_x, train_y, test_x, test_y = x[:80], y[:80], x[80:], y[80:]
  scores = knn.knn_scores(train_x, knn.one_hot(train_y, 6), test_x, (7,))[7]
  ref = brute_force_knn(train_x, train_y, test_x, 7, 6)
  np.testing.assert_allclose(scores, ref / ref.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
  top1 = knn.knn_evaluate(train_x, train_y, test_x, test_y, 6, ks=(7,))["knn_top1_k7"]
  assert top1 == pytest.approx(np.mean(ref.argmax(1) == test_y))
  assert 0.2 < top1 < 1.0  # neither trivial nor chance: the test can tell a wrong vote


def test_knn_k_larger_than_the_training_set():
  x, y = clustered(3, 2, 4, 0.1, seed=2)
  res = knn.knn_evaluate(x, y, x, y, 2, ks=(200,))
  assert set(res) == {"knn_top1_k200", "knn_top5_k200"}  # all 6 neighbours vote, no error


def test_knn_multilabel_micro_f1():
  x, y = clustered(20, 4, 8, 0.05, seed=3)
  multi = np.zeros((len(y), 3), np.float32)  # label j present iff class has bit j
  for j in range(3):
    multi[:, j] = (y >> j) & 1
  res = knn.knn_evaluate(x[:60], multi[:60], x[60:], multi[60:], 3, multilabel=True, ks=(5,))
  assert res == {"knn_f1_k5": 1.0}
  assert knn.micro_f1(np.zeros((2, 3)), np.ones((2, 3))) == 0.0


def test_linear_probes_separate_separable_classes_and_not_noise():
  x, y = clustered(40, 4, 12, 0.3, seed=4)
  for fn, key in ((probe.linear_probe, "probe_top1"), (probe.least_squares, "lsq_top1")):
    assert fn(x[:120], y[:120], x[120:], y[120:], 4)[key] == 1.0
  rng = np.random.default_rng(5)
  noise_labels = rng.integers(0, 4, size=len(y))
  acc = probe.linear_probe(x[:120], noise_labels[:120], x[120:], noise_labels[120:], 4)["probe_top1"]
  assert acc < 0.6  # labels independent of the features: no better than chance + noise


def test_linear_probe_multilabel():
  x, y = clustered(30, 4, 8, 0.2, seed=6)
  multi = np.stack([(y >> j) & 1 for j in range(2)], 1).astype(np.float32)
  res = probe.linear_probe(x[:90], multi[:90], x[90:], multi[90:], 2, multilabel=True)
  assert res == {"probe_f1": 1.0}


# ---------------------------------------------------------------------------------- features


SMALL = {"arch": "convnextv2", "depths": [1, 1, 1, 1], "dims": [8, 16, 16, 16],
         "stem": "mmearth", "patch_size": 8, "in_chans": 12, "num_classes": 0,
         "bands": None}


def small_params(spec, size=24, seed=0):
  model = pretrained.build(spec)
  # Jitted: an eager init's values, without compiling each operation on its own.
  return jax.jit(model.init)(jax.random.key(seed),
                             jnp.zeros((1, size, size, spec["in_chans"])))["params"]


def test_batches_are_balanced_over_the_images():
  """As few calls as the batch size allows, each padded as little as the 8 devices allow: 70
  images at batch 32 run as 3 calls of 24 (2 padding rows), not 3 of 32 (26)."""
  run = features.Sharded(lambda p, x: x.sum((1, 2)) * p, jnp.float32(2.0), batch_size=32)
  assert (run.batch_for(70), run.batch_for(64), run.batch_for(5), run.batch_for(33)) == (24, 32,
                                                                                          8, 24)
  images = np.random.default_rng(0).normal(size=(70, 4, 4, 3)).astype(np.float32)
  got = features.extract(lambda p, x: x.sum((1, 2)) * p, jnp.float32(2.0), images, batch_size=32)
  np.testing.assert_allclose(got, images.sum((1, 2)) * 2, rtol=1e-6)


def test_sharded_extraction_equals_the_plain_forward():
  assert jax.device_count() == 8
  params = small_params(SMALL)
  fn = pretrained.features_fn(SMALL)
  images = np.random.default_rng(0).normal(size=(21, 24, 24, 12)).astype(np.float32)
  got = features.extract(fn, params, images, batch_size=16)  # 2 batches, the last padded
  want = np.asarray(jax.jit(fn)(params, images))
  assert got.shape == (21, 16)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_model_folder_round_trip_and_atomic_write(tmp_path, monkeypatch):
  params = small_params(SMALL)
  path = pretrained.save(str(tmp_path / "m"), SMALL, params, source="test")
  back = pretrained.load(path)
  assert back.spec == SMALL and back.source == "test"
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params, back.params)
  with pytest.raises(pretrained.CheckpointError, match="exists"):
    pretrained.save(path, SMALL, params)

  # A crash while writing leaves nothing that looks like a model folder.
  def crash(*a, **k):
    raise OSError("disk full")
  monkeypatch.setattr(json, "dump", crash)
  with pytest.raises(OSError):
    pretrained.save(str(tmp_path / "m2"), SMALL, params)
  assert not os.path.exists(tmp_path / "m2")
  assert [p for p in os.listdir(tmp_path) if p.startswith("m2")] == []


def test_load_names_what_is_wrong(tmp_path):
  with pytest.raises(pretrained.CheckpointError, match="no such checkpoint"):
    pretrained.load(str(tmp_path / "missing"))
  (tmp_path / "junk").mkdir()
  with pytest.raises(pretrained.CheckpointError, match="not a checkpoint"):
    pretrained.load(str(tmp_path / "junk"))
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text("{}")
  with pytest.raises(pretrained.CheckpointError, match="without a finished checkpoint"):
    pretrained.load(str(run))
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "model.json").write_text('{"format": "other"}')
  with pytest.raises(pretrained.CheckpointError, match="format"):
    pretrained.load(str(bad))


def test_band_count_mismatch_is_clear():
  with pytest.raises(pretrained.CheckpointError, match="13 bands .* encoder takes 12"):
    pretrained.check_images(SMALL, np.zeros((2, 24, 24, 13)), "x.npy")
