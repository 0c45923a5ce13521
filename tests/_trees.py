"""Tree helpers shared by the tests: comparisons and noisy parameters."""
import jax
import numpy as np


def flat(tree) -> dict:
  """{path string: numpy leaf} of a pytree."""
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_bit_exact(a, b) -> None:
  """Same paths, dtypes and values, bit for bit."""
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys(), sorted(set(fa) ^ set(fb))
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


def noisy_params(model, *args, seed=1, scale=0.1):
  """Noisy weights for every leaf (GRN gamma/beta, biases, norms, tokens), so no masking point
  or transpose can hide behind a zero: `scale` x N(0, 1), plus 1 for norm scales. Built from
  shapes only: an eager `init` compiles a random initialiser per shape, and a jitted one the
  whole model, either of which costs more than the test that uses them."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return (base + scale * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, shapes)
