"""Depthwise 2-D convolution (stride 1, zero padding), the fastest exact formulation per backend.

ConvNeXt V2 blocks run a depthwise 7x7 conv. XLA:CPU lowers a grouped
`lax.conv_general_dilated(..., feature_group_count=C)` to a slow generic path (forward and,
worse, both gradients), so on CPU we compute it from its definition instead:

  "conv"             lax.conv_general_dilated, NHWC / HWIO, feature_group_count=C. The fast path
                     on GPU (cuDNN) and TPU; the reference every other impl is tested against.
  "shifts"           pad once, sum k*k shifted slices times kernel[i, j]; one XLA loop fusion.
                     Custom VJP: dx is the same shift-sum over the padded cotangent with the
                     flipped kernel; dkernel comes from a few variadic `lax.reduce`s over (H, W)
                     whose operands are the products xpad[shift i, j] * g, so XLA makes 2-3
                     passes over x and g instead of k*k; the batch axis is summed afterwards
                     (which also keeps f32 rounding small: sequential sums run over H*W terms).
  "shifts_autodiff"  the same forward, differentiated by XLA: its kernel gradient is k*k separate
                     reductions, each re-reading x and g (kept to show what the custom VJP buys).
  "auto"             "shifts" on CPU, "conv" on GPU/TPU.

Measured on XLA:CPU (2 cores, ConvNeXt V2 atto stage 1: 32x56x56x40, k=7, fwd+bwd): see
benchmarks/ops.py. A banded-matmul formulation (shift along W, H as a (H x H+k-1) banded matmul
per channel) was also tried: the band wastes (H+k-1)/k of the flops and the forward alone took
~0.2 s against ~0.015 s for "shifts", so it is not offered.

Kernel layout is (kh, kw, C). A Flax `nn.Conv(features=C, feature_group_count=C)` kernel of shape
(kh, kw, 1, C) maps to it by dropping axis 2 (`k[:, :, 0, :]`); a torch `nn.Conv2d(C, C, k,
groups=C)` weight of shape (C, 1, kh, kw) by `w[:, 0].permute(1, 2, 0)` (numpy: `transpose`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["depthwise_conv2d", "IMPLS"]

IMPLS = ("conv", "shifts", "shifts_autodiff")
_DK_GROUP = 24  # most kernel-gradient sums per variadic reduce (see _shifts_bwd)


def _acc_dtype(dtype) -> jnp.dtype:
  # Accumulate in at least f32 so bf16 inputs match a conv that accumulates in f32.
  return jnp.promote_types(dtype, jnp.float32)


def _shift_sum(xp: jax.Array, kernel: jax.Array, out_h: int, out_w: int) -> jax.Array:
  """sum_{i,j} xp[:, i:i+out_h, j:j+out_w] * kernel[i, j]; inputs already in the accumulator dtype."""
  kh, kw, _ = kernel.shape
  acc = None
  for i in range(kh):
    for j in range(kw):
      term = xp[:, i:i + out_h, j:j + out_w, :] * kernel[i, j]
      acc = term if acc is None else acc + term
  return acc


def _shifts_forward(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  kh, kw, _ = kernel.shape
  acc = _acc_dtype(x.dtype)
  xp = jnp.pad(x.astype(acc), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out_h, out_w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  return _shift_sum(xp, kernel.astype(acc), out_h, out_w).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shifts_cvjp(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  return _shifts_forward(x, kernel, padding)


def _shifts_fwd(x, kernel, padding):
  return _shifts_forward(x, kernel, padding), (x, kernel)


def _shifts_bwd(padding, res, g):
  x, kernel = res
  kh, kw, c = kernel.shape
  acc = _acc_dtype(x.dtype)
  g = g.astype(acc)
  h, w = x.shape[1], x.shape[2]
  out_h, out_w = g.shape[1], g.shape[2]

  # dx[a, b] = sum_{i,j} g[a + p - i, b + p - j] * k[i, j]: a shift-sum over g padded by k-1-p
  # (negative, i.e. a crop, if p > k-1) with the kernel flipped in both spatial axes.
  ph, pw = kh - 1 - padding, kw - 1 - padding
  gp = lax.pad(g, jnp.zeros((), acc), ((0, 0, 0), (ph, ph, 0), (pw, pw, 0), (0, 0, 0)))
  dx = _shift_sum(gp, kernel.astype(acc)[::-1, ::-1], h, w)

  # dk[i, j] = sum_{n,h,w} xpad[n, h+i, w+j] * g[n, h, w]. The k*k sums go into a few variadic
  # reduces over (H, W): XLA fuses each one's products into a single pass over x and g, where
  # k*k separate reductions would each re-read them. Groups of <= _DK_GROUP lags, because one
  # reduce carrying all 49 accumulators measured 10-25% slower (register spills, presumably).
  xp = jnp.pad(x.astype(acc), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  lags = [(i, j) for i in range(kh) for j in range(kw)]
  n_groups = -(-len(lags) // _DK_GROUP)
  size = -(-len(lags) // n_groups)
  sums = []
  for start in range(0, len(lags), size):
    prods = [xp[:, i:i + out_h, j:j + out_w, :] * g for i, j in lags[start:start + size]]
    zeros = [jnp.zeros((), acc)] * len(prods)
    sums += lax.reduce(prods, zeros, lambda a, b: [u + v for u, v in zip(a, b)], (1, 2))
  dk = jnp.stack(sums).sum(axis=1).reshape(kh, kw, c)  # (k*k, N, C) -> (kh, kw, C)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_shifts_cvjp.defvjp(_shifts_fwd, _shifts_bwd)


def _conv(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  c = x.shape[-1]
  return lax.conv_general_dilated(
      x, kernel[:, :, None, :], window_strides=(1, 1),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def _auto_impl() -> str:
  return "shifts" if jax.default_backend() == "cpu" else "conv"


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
                     padding: int, impl: str = "auto") -> jax.Array:
  """Depthwise conv, stride 1, `padding` zeros on each side: (N,H,W,C), (k,k,C) -> (N,H',W',C).

  H' = H + 2*padding - kh + 1 ('same' for padding=(k-1)//2 with odd k). `bias` (C,) is added
  after. x and kernel are promoted to a common dtype; sums run in at least f32.
  """
  if x.ndim != 4 or kernel.ndim != 3 or kernel.shape[-1] != x.shape[-1]:
    raise ValueError(f"expected x (N,H,W,C) and kernel (kh,kw,C); got {x.shape}, {kernel.shape}")
  if padding < 0:
    raise ValueError(f"padding must be >= 0, got {padding}")
  dtype = jnp.result_type(x, kernel)
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if impl == "auto":
    impl = _auto_impl()
  if impl == "conv":
    y = _conv(x, kernel, padding)
  elif impl == "shifts":
    y = _shifts_cvjp(x, kernel, padding)
  elif impl == "shifts_autodiff":
    y = _shifts_forward(x, kernel, padding)
  else:
    raise ValueError(f"impl must be 'auto' or one of {IMPLS}, got {impl!r}")
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y
