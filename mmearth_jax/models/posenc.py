"""Fixed 2-D sin-cos position embeddings (MAE), with the grid scaled per sample (Scale-MAE).

Layout, as MAE's `get_2d_sincos_pos_embed` builds it: the grid is `meshgrid(w, h)` ("xy"
indexing), so `grid[0]` holds each token's COLUMN index and `grid[1]` its ROW index. The first
D/2 dims embed `grid[0]` (MAE calls this half `emb_h`, but it is the column), the last D/2 embed
`grid[1]`. Each half is `[sin(pos * omega), cos(pos * omega)]` with
`omega_i = 1 / 10000^(i / (D/4))`, i < D/4. Tokens run row-major over the (grid_h, grid_w) grid,
the order of a flattened patch-embedding conv; with `cls_token` a zero row comes first.

Scale-MAE multiplies the grid coordinates by r = GSD / reference GSD; `scale` does that, either
one number for all samples or an (N,) array giving an (N, L, D) embedding.

`layout="interleave"` is the Scale-MAE paper's Eq. 1 as printed (Transformer style: sin at even,
cos at odd channels within each axis's half) instead of the released code's (and MAE's)
concatenated [sin | cos]. The two hold the same numbers in a different channel order: a network
learns the same thing from either, but weights trained with one do not fit the other.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _omega(embed_dim: int) -> np.ndarray:
  """Frequencies of one 1-D half: D/4 of them, in float64 as MAE's numpy code has them."""
  quarter = embed_dim // 4
  return 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)


def _grid(grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
  """(column, row) coordinate of every token, row-major: MAE's grid[0], grid[1] flattened."""
  cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float64),
                           np.arange(grid_h, dtype=np.float64))  # "xy": (grid_h, grid_w) each
  return cols.reshape(-1), rows.reshape(-1)


LAYOUTS = ("concat", "interleave")


def interleave_order(embed_dim: int) -> np.ndarray:
  """Channel order taking the concat layout to the interleaved one: out[..., j] = in[..., order[j]]."""
  q = embed_dim // 4
  half = np.stack([np.arange(q), q + np.arange(q)], axis=1).reshape(-1)  # sin0, cos0, sin1, ...
  return np.concatenate([half, 2 * q + half])


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int, *,
              scale: float | jnp.ndarray = 1.0, cls_token: bool = False,
              layout: str = "concat") -> jnp.ndarray:
  """MAE's 2-D sin-cos position embedding for a (grid_h, grid_w) patch grid, in float32.

  Returns (L, D) with L = grid_h * grid_w (+1 with `cls_token`, a leading zero row). A Python
  number `scale` is folded in at trace time (computed in float64 numpy, like MAE's code, then cast);
  an array `scale` of shape () or (N,) is traced (float32 jnp) and gives (L, D) or (N, L, D).
  """
  if embed_dim % 4:
    raise ValueError(f"embed_dim={embed_dim} must be divisible by 4 (sin and cos of two axes)")
  if layout not in LAYOUTS:
    raise ValueError(f"position-encoding layout {layout!r}; choose from {LAYOUTS}")
  omega = _omega(embed_dim)
  cols, rows = _grid(grid_h, grid_w)
  order = interleave_order(embed_dim) if layout == "interleave" else None

  if isinstance(scale, (int, float)):
    out = np.concatenate([_embed_1d(cols * scale, omega, np), _embed_1d(rows * scale, omega, np)],
                         axis=-1)
    if order is not None:
      out = out[..., order]
    if cls_token:
      out = np.concatenate([np.zeros((1, embed_dim)), out], axis=0)
    return jnp.asarray(out, jnp.float32)

  scale = jnp.asarray(scale, jnp.float32)
  if scale.ndim > 1:
    raise ValueError(f"scale must be a number, a scalar or an (N,) array; got shape {scale.shape}")
  omega32 = jnp.asarray(omega, jnp.float32)
  s = scale[..., None]  # (N, 1) or (1,): broadcasts against the L positions
  out = jnp.concatenate([_embed_1d(s * jnp.asarray(cols, jnp.float32), omega32, jnp),
                         _embed_1d(s * jnp.asarray(rows, jnp.float32), omega32, jnp)], axis=-1)
  if order is not None:
    out = out[..., order]
  if cls_token:
    zeros = jnp.zeros(out.shape[:-2] + (1, embed_dim), out.dtype)
    out = jnp.concatenate([zeros, out], axis=-2)
  return out


def _embed_1d(pos, omega, xp):
  """[sin(pos * omega), cos(pos * omega)] over the last axis; pos (..., L) -> (..., L, D/2)."""
  angle = pos[..., :, None] * omega
  return xp.concatenate([xp.sin(angle), xp.cos(angle)], axis=-1)
