"""Linear probes on frozen features.

`linear_probe`: logistic regression (softmax cross-entropy, or per-label sigmoid for multi-label
tasks) with an L2 penalty, trained full-batch with optax's L-BFGS on standardised features, the
usual frozen-encoder protocol. `least_squares`: big_vision's closed-form few-shot probe, a ridge
regression onto +-1 targets solved exactly; cheap enough to run inside training.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmearth_jax.eval.knn import accuracy, micro_f1, one_hot


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  # Statistics of the training features only: the test split stays unseen.
  train, test = jnp.asarray(train, jnp.float32), jnp.asarray(test, jnp.float32)
  mean, std = train.mean(0), train.std(0) + 1e-6
  return (train - mean) / std, (test - mean) / std


def _metrics(logits: np.ndarray, labels: np.ndarray, multilabel: bool, prefix: str) -> dict:
  if multilabel:
    return {f"{prefix}_f1": micro_f1(logits > 0, labels)}
  return {f"{prefix}_top1": accuracy(logits, labels, 1), f"{prefix}_top5": accuracy(logits, labels, 5)}


@functools.partial(jax.jit, static_argnames=("multilabel", "steps"))
def _fit_logistic(x, y, l2, multilabel: bool, steps: int):
  """Full-batch L-BFGS on the L2-penalised cross-entropy; one compile per shape."""
  def loss_fn(p):
    logits = x @ p["w"] + p["b"]
    if multilabel:
      data = optax.sigmoid_binary_cross_entropy(logits, y).sum(-1).mean()
    else:
      data = optax.softmax_cross_entropy(logits, y).mean()
    return data + 0.5 * l2 * jnp.sum(p["w"] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  def step(carry, _):
    p, s = carry
    value, grad = value_and_grad(p, state=s)
    updates, s = opt.update(grad, s, p, value=value, grad=grad, value_fn=loss_fn)
    return (optax.apply_updates(p, updates), s), value

  p = {"w": jnp.zeros((x.shape[1], y.shape[1])), "b": jnp.zeros((y.shape[1],))}
  (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
  return p


def linear_probe(train_features, train_labels, test_features, test_labels, num_classes: int, *,
                 multilabel: bool = False, l2: float = 1e-3, steps: int = 300) -> dict[str, float]:
  """Logistic regression on frozen features -> {"probe_top1", "probe_top5"} or {"probe_f1"}."""
  x, xt = _standardize(train_features, test_features)
  y = (jnp.asarray(train_labels, jnp.float32) if multilabel
       else jnp.asarray(one_hot(train_labels, num_classes)))
  params = _fit_logistic(x, y, jnp.float32(l2), multilabel, steps)
  logits = np.asarray(xt @ params["w"] + params["b"])
  return _metrics(logits, test_labels, multilabel, "probe")


def least_squares(train_features, train_labels, test_features, test_labels, num_classes: int, *,
                  multilabel: bool = False, l2: float = 1.0) -> dict[str, float]:
  """Closed-form ridge regression onto 2 * onehot - 1 (big_vision's few-shot linear probe)."""
  x, xt = _standardize(train_features, test_features)
  x = jnp.concatenate([x, jnp.ones((x.shape[0], 1))], axis=1)  # bias column
  xt = jnp.concatenate([xt, jnp.ones((xt.shape[0], 1))], axis=1)
  y = (np.asarray(train_labels, np.float32) if multilabel
       else one_hot(train_labels, num_classes))
  y = 2.0 * jnp.asarray(y) - 1.0
  reg = l2 * jnp.eye(x.shape[1]).at[-1, -1].set(0.0)  # the bias is not penalised
  w = jnp.linalg.solve(x.T @ x + reg, x.T @ y)
  return _metrics(np.asarray(xt @ w), test_labels, multilabel, "lsq")
