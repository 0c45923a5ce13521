"""Image resizing: the one implementation, as separable interpolation matrices.

Every resize of the library goes through `resize(images, size, method, ...)`: Scale-MAE's
targets, its scale augmentation and multi-scale kNN, GFM's crops and teacher input, the U-Net
decoder, the downstream-dataset loaders and their label maps. Each mode is linear and separable:
out = A_h @ image @ A_w^T per channel, with A an (out, in) matrix built here in float64 numpy
(`matrix`). Applying two small matrices is exact, cheap for the sizes involved (<= 448), and the
same code serves numpy (data workers) and jnp (in the step).

  method          options          rule
  area                             adaptive average pooling: output i averages inputs
                                   [floor(i*in/out), ceil((i+1)*in/out))  (torch "area")
  bilinear                         half-pixel centres, source index clamped to [0, in-1], no
                                   antialias (torch's default)
  bilinear        align_corners    source = i * (in-1)/(out-1)  (torch align_corners=True)
  bilinear        antialias        triangle kernel widened by the shrink factor when downsampling,
                                   half-pixel centres, weights renormalised at the edges
                                   (torch antialias=True; `jax.image.resize(method="linear")`)
  bicubic                          Keys cubic with a = -0.75 (torch's), half-pixel centres,
                                   indices clamped at borders, no antialias
  bicubic         align_corners    the same taps at source = i * (in-1)/(out-1) (torch
                                   align_corners=True: Scale-MAE's kornia 0.6.9 crop resize)
  nearest                          torch's legacy "nearest": source = floor(i * in / out)
  nearest-exact                    pixel centres: source = floor((i + 0.5) * in / out)

The nearest modes copy values (a gather: exact for any dtype, labels are never blended).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

METHODS = ("area", "bilinear", "bicubic", "nearest", "nearest-exact")
NEAREST = ("nearest", "nearest-exact")


@functools.lru_cache(maxsize=256)
def _matrix(method: str, size_in: int, size_out: int, align_corners: bool,
            antialias: bool) -> np.ndarray:
  a = np.zeros((size_out, size_in), np.float64)
  rows = np.arange(size_out)
  if method == "area":
    for i in range(size_out):
      lo = (i * size_in) // size_out
      hi = -(-((i + 1) * size_in) // size_out)  # ceil
      a[i, lo:hi] = 1.0 / (hi - lo)
    return a
  if method in NEAREST:
    a[rows, _nearest_index(method, size_in, size_out)] = 1.0
    return a
  if method == "bilinear" and antialias:
    scale = size_out / size_in
    centres = (rows + 0.5) / scale - 0.5
    radius = max(1.0, 1.0 / scale)
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(size_in)[None, :] - centres[:, None]) / radius)
    return w / w.sum(1, keepdims=True)
  if align_corners:  # bilinear or bicubic: the end pixels' centres map onto each other
    src = rows * ((size_in - 1) / (size_out - 1)) if size_out > 1 else np.zeros(1)
  else:
    src = (rows + 0.5) * (size_in / size_out) - 0.5
  if method == "bilinear":
    src = np.maximum(src, 0.0)  # torch clamps negative source coordinates (align_corners=False)
    i0 = np.minimum(np.floor(src).astype(int), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    w1 = src - i0
    np.add.at(a, (rows, i0), 1.0 - w1)
    np.add.at(a, (rows, i1), w1)
    return a
  i0 = np.floor(src).astype(int)  # bicubic
  t = src - i0
  for k, w in zip(range(-1, 3), _keys_weights(t)):
    np.add.at(a, (rows, np.clip(i0 + k, 0, size_in - 1)), w)
  return a


def _nearest_index(method: str, size_in: int, size_out: int) -> np.ndarray:
  """The source index of each output pixel of a nearest resize."""
  if method == "nearest":
    return np.minimum((np.arange(size_out) * size_in) // size_out, size_in - 1)
  return np.minimum(((np.arange(size_out) + 0.5) * size_in / size_out).astype(int), size_in - 1)


def _keys_weights(t: np.ndarray, a: float = -0.75) -> list[np.ndarray]:
  """Cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 from floor(src)."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _check(method: str, align_corners: bool, antialias: bool) -> None:
  if method not in METHODS:
    raise ValueError(f"resize method {method!r}; choose from {METHODS}")
  if align_corners and antialias:
    raise ValueError("resize: align_corners and antialias cannot be combined")
  if antialias and method != "bilinear":
    raise ValueError(f"resize: antialias is only implemented for method 'bilinear', not "
                     f"{method!r}")
  if align_corners and method not in ("bilinear", "bicubic"):
    raise ValueError(f"resize: align_corners is only implemented for methods 'bilinear' and "
                     f"'bicubic', not {method!r}")


def matrix(method: str, size_in: int, size_out: int, *, align_corners: bool = False,
           antialias: bool = False) -> np.ndarray:
  """The (size_out, size_in) float64 matrix of a 1-D resize (see the module docstring)."""
  _check(method, align_corners, antialias)
  if size_in <= 0 or size_out <= 0:
    raise ValueError(f"resize sizes must be positive, got {size_in} -> {size_out}")
  return _matrix(method, int(size_in), int(size_out), bool(align_corners), bool(antialias))


def resize(images: Any, size: int | tuple[int, int], method: str, *, align_corners: bool = False,
           antialias: bool = False, xp: Any = None, precision: Any = None) -> Any:
  """(..., H, W, C) -> (..., h, w, C), or one (H, W) map -> (h, w), in the dtype of `images`
  (numpy or jax arrays). `size` is (h, w) or one int for a square.

  The interpolating modes contract in float32 (or the input's float dtype if wider); `xp` is the
  array module (numpy or jax.numpy), inferred from `images` when None; `precision` is the jnp
  matmul precision (None: JAX's default; numpy ignores it).
  """
  _check(method, align_corners, antialias)
  if xp is None:
    xp = np if isinstance(images, np.ndarray) else __import__("jax.numpy", fromlist=["_"])
  h, w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
  plane = images.ndim == 2  # one (H, W) map
  h_in, w_in = images.shape[:2] if plane else images.shape[-3:-1]
  if (h, w) == (h_in, w_in):
    return images
  if method in NEAREST:
    rows, cols = _nearest_index(method, h_in, h), _nearest_index(method, w_in, w)
    return xp.take(xp.take(images, rows, axis=-2 if plane else -3), cols,
                   axis=-1 if plane else -2)
  dtype = images.dtype
  work = np.float64 if dtype == np.float64 else np.float32
  ah = xp.asarray(matrix(method, h_in, h, align_corners=align_corners,
                         antialias=antialias).astype(work))
  aw = xp.asarray(matrix(method, w_in, w, align_corners=align_corners,
                         antialias=antialias).astype(work))
  x = images.astype(work)
  kw = {} if xp is np else {"precision": precision}
  if plane:
    return xp.matmul(xp.matmul(ah, x, **kw), aw.T, **kw).astype(dtype)
  if method == "bilinear" and (antialias or align_corners):
    # One einsum, not the two matmuls below: the contraction these modes always had, kept so
    # their results stay bit-identical (the two orders differ in the last bit).
    kw = {"optimize": True} if xp is np else kw
    return xp.einsum("oh,...hwc,pw->...opc", ah, x, aw, **kw).astype(dtype)
  # Two matmuls (BLAS in numpy: ~20 ms for 300 -> 448 bicubic, where np.einsum took 0.4 s).
  lead = x.shape[:-3]
  x = xp.matmul(ah, x.reshape(*lead, h_in, w_in * x.shape[-1]), **kw)  # rows: (..., h, W*C)
  x = xp.matmul(aw, x.reshape(*lead, h, w_in, x.shape[-1] // w_in), **kw)  # columns
  return x.astype(dtype)
