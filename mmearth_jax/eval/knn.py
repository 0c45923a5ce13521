"""Weighted k-nearest-neighbour classification of frozen features (the DINO protocol).

Features are L2-normalised; similarity is the cosine (a matrix product); the k most similar
training samples vote for their label with weight exp(sim / T), T = 0.07. Single-label tasks
report top-1 and top-5 accuracy; multi-label tasks (BigEarthNet) report micro-F1 of the labels
whose weighted vote share exceeds one half. All k are scored from one top-k search.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


def normalize(x: np.ndarray | jnp.ndarray) -> jnp.ndarray:
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _vote_share(sim: jnp.ndarray, idx: jnp.ndarray, train_targets: jnp.ndarray, k: int,
                temperature: float) -> jnp.ndarray:
  """(Q, C) share of the k nearest neighbours' vote weight per class (sim/idx sorted, most
  similar first). Dividing by the total weight, not the votes' sum, keeps multi-label shares."""
  # exp((s - s_max) / T): the same shares without overflow for T = 0.07.
  w = jnp.exp((sim[:, :k] - sim[:, :1]) / temperature)
  return jnp.einsum("qk,qkc->qc", w, train_targets[idx[:, :k]]) / jnp.sum(w, -1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("ks", "kmax", "temperature"))
def _chunk_scores(train, targets, q, ks, kmax, temperature):
  sim, idx = jax.lax.top_k(normalize(q) @ train.T, kmax)
  return [_vote_share(sim, idx, targets, min(k, kmax), temperature) for k in ks]


def knn_scores(train_features, train_targets, test_features, ks: Sequence[int],
               temperature: float = TEMPERATURE, chunk: int = 1024) -> dict[int, np.ndarray]:
  """{k: (Q, C) vote share per class} for every k; `train_targets` (N, C) one- or multi-hot."""
  ks = tuple(int(k) for k in ks)
  train = normalize(train_features)
  targets = jnp.asarray(train_targets, jnp.float32)
  kmax = min(max(ks), train.shape[0])
  test = np.asarray(test_features, np.float32)
  parts = [_chunk_scores(train, targets, test[i:i + chunk], ks, kmax, float(temperature))
           for i in range(0, len(test), chunk)]
  return {k: np.concatenate([np.asarray(p[j]) for p in parts]) for j, k in enumerate(ks)}


def accuracy(scores: np.ndarray, labels: np.ndarray, top: int) -> float:
  """Share of rows whose label is among the `top` highest scores (ties broken by index)."""
  top = min(top, scores.shape[1])
  best = np.argsort(-scores, axis=1, kind="stable")[:, :top]
  return float(np.mean(np.any(best == np.asarray(labels)[:, None], axis=1)))


def micro_f1(pred: np.ndarray, truth: np.ndarray) -> float:
  pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
  tp = np.sum(pred & truth)
  denom = 2 * tp + np.sum(pred & ~truth) + np.sum(~pred & truth)
  return float(2 * tp / denom) if denom else 1.0


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  return np.eye(num_classes, dtype=np.float32)[np.asarray(labels, np.int64)]


def knn_evaluate(train_features, train_labels, test_features, test_labels, num_classes: int, *,
                 multilabel: bool = False, ks: Sequence[int] = DEFAULT_KS,
                 temperature: float = TEMPERATURE) -> dict[str, float]:
  """{"knn_top1_k20": ..., "knn_top5_k20": ..., ...} or {"knn_f1_k20": ...} when multi-label."""
  ks = tuple(int(k) for k in ks)
  if len(train_features) == 0 or len(test_features) == 0:
    raise ValueError("kNN needs at least one training and one test sample")
  targets = (np.asarray(train_labels, np.float32) if multilabel
             else one_hot(train_labels, num_classes))
  scores = knn_scores(train_features, targets, test_features, ks, temperature)
  out = {}
  for k in ks:
    if multilabel:
      out[f"knn_f1_k{k}"] = micro_f1(scores[k] > 0.5, test_labels)
    else:
      out[f"knn_top1_k{k}"] = accuracy(scores[k], test_labels, 1)
      out[f"knn_top5_k{k}"] = accuracy(scores[k], test_labels, 5)
  return out
