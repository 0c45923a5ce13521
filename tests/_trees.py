"""Tree comparisons shared by the weight-conversion tests."""
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
