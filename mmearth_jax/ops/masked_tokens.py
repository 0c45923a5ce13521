"""MAE masked-token bookkeeping: random masking, and gathering / scattering token rows.

The encoder sees only the kept tokens `x[n, ids_keep[n]]` (`gather_tokens`); the decoder needs the
full length back with a learned mask token in every removed slot (`scatter_tokens`). MAE writes
the latter as `concat(kept, mask_tokens)` followed by a gather with `ids_restore`; scattering the
kept rows into a mask-token-filled buffer is the same thing without materialising the concat.

Two implementations, selected by `impl`:
  "jnp"     take_along_axis / .at[].set; XLA's own gather and scatter, differentiated by XLA.
  "pallas"  one row-copy kernel (below) with a custom VJP whose backward is the other op.
  "auto"    "pallas" on GPU/TPU, "jnp" on CPU (Pallas only interprets there, which is slow).

Both ops are a single kernel, a row gather with a default row:
  out[n, r] = table[n, src[n, r]]  if src[n, r] >= 0  else fill
gather is src = ids_keep (never negative); scatter is src = the inverse of ids_keep over the L
positions (-1 where not kept), so every output row is written exactly once, by one program, and
no two programs race on a row. The inverse is an (N, L) int32 scatter done in jnp; it is tiny
next to the (N, L, D) data.

Backends of the Pallas kernel (see `_row_gather`):
  TPU (Mosaic) and interpret mode: grid over the batch; per program the whole (T, D) table and
    (R, D) output sit in VMEM and a loop copies rows with dynamic sublane slices; the ids of the
    batch row arrive in SMEM as a (1, R) block. Assumes T*D and R*D fit VMEM (true for MAE token
    counts: 196 x 1024 f32 is 0.8 MiB) and that Mosaic compiles a dynamic one-row sublane slice
    for the dtype. Lowering to Mosaic for f32 and bf16 is tested on CPU; compiling it (where a
    packed bf16 row at a dynamic offset is the likeliest thing to be refused) needs a TPU.
  GPU (Triton, chosen explicitly through its CompilerParams since Pallas now defaults to Mosaic
    GPU, which wants warpgroup-aligned copies): grid over (batch, D blocks); Triton only handles
    power-of-two tensors, so each program moves rows of a power-of-two block of D with masked
    loads/stores. Lowering to Triton IR is tested on CPU; compiling it needs a GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl

__all__ = ["random_masking", "gather_tokens", "scatter_tokens"]


# ----------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------

def random_masking(key: jax.Array, batch: int, length: int,
                   keep: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """MAE per-sample random masking with a static number of kept tokens.

  Returns (ids_keep (N, K) int32, ids_restore (N, L) int32, mask (N, L) float32, 1 = removed).
  `ids_restore` is the inverse permutation of the shuffle, whose first K entries are `ids_keep`.
  """
  if not 0 <= keep <= length:
    raise ValueError(f"keep={keep} must lie in [0, length={length}]")
  noise = jax.random.uniform(key, (batch, length))
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  ids_keep = ids_shuffle[:, :keep]
  # A position is removed iff its rank in the shuffle is >= K.
  mask = (ids_restore >= keep).astype(jnp.float32)
  return ids_keep, ids_restore, mask


# ----------------------------------------------------------------------------------------------
# Dispatch helpers
# ----------------------------------------------------------------------------------------------

def _resolve(impl: str, interpret: bool | None) -> tuple[str, bool]:
  backend = jax.default_backend()
  if impl == "auto":
    impl = "jnp" if backend == "cpu" else "pallas"
  if impl not in ("jnp", "pallas"):
    raise ValueError(f"impl must be 'auto', 'jnp' or 'pallas', got {impl!r}")
  if interpret is None:
    interpret = backend == "cpu"
  return impl, bool(interpret)


def _variant(interpret: bool) -> str:
  # Interpret mode runs the TPU-shaped kernel: it is the simpler one, and it means the exact
  # pallas_call that TPU compiles is the one the CPU tests check.
  if interpret:
    return "tpu"
  return "triton" if jax.default_backend() in ("gpu", "cuda", "rocm") else "tpu"


def _inverse_ids(ids: jax.Array, length: int) -> jax.Array:
  """inv[n, ids[n, k]] = k, -1 elsewhere: which kept row lands on each of the L positions."""
  n, k = ids.shape
  rows = jnp.arange(n, dtype=jnp.int32)[:, None]
  inv = jnp.full((n, length), -1, jnp.int32)
  return inv.at[rows, ids].set(jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (n, k)),
                               unique_indices=True)


# ----------------------------------------------------------------------------------------------
# Pallas row-gather kernel
# ----------------------------------------------------------------------------------------------

def _kernel_tpu(src_ref, table_ref, fill_ref, out_ref):
  # src_ref (1, R) in SMEM; table_ref (T, D); fill_ref (1, D); out_ref (R, D).
  def body(r, carry):
    s = src_ref[0, r]
    row = table_ref[pl.ds(jnp.maximum(s, 0), 1), :]
    out_ref[pl.ds(r, 1), :] = jnp.where(s >= 0, row, fill_ref[...])
    return carry

  lax.fori_loop(0, out_ref.shape[0], body, 0)


def _kernel_triton(src_ref, table_ref, fill_ref, out_ref, *, d_block: int):
  # src_ref (N, R), whole; table_ref (T, D); fill_ref (D,); out_ref (R, D); all in global memory.
  # Triton needs power-of-two tensors, so move a d_block slice of each row, masked at the edge.
  from jax.experimental.pallas import triton as pltriton

  n = pl.program_id(0)
  d = out_ref.shape[1]
  start = pl.program_id(1) * d_block
  cols = pl.ds(start, d_block)
  in_bounds = start + lax.broadcasted_iota(jnp.int32, (d_block,), 0) < d
  fill = pltriton.load(fill_ref.at[cols], mask=in_bounds, other=0)

  def body(r, carry):
    s = src_ref[n, r]
    row = pltriton.load(table_ref.at[jnp.maximum(s, 0), cols], mask=in_bounds, other=0)
    pltriton.store(out_ref.at[r, cols], jnp.where(s >= 0, row, fill), mask=in_bounds)
    return carry

  lax.fori_loop(0, out_ref.shape[0], body, 0)


def _row_gather(table: jax.Array, src: jax.Array, fill: jax.Array, *, interpret: bool,
                variant: str | None = None) -> jax.Array:
  """out[n, r] = table[n, src[n, r]] if src[n, r] >= 0 else fill; (N,T,D), (N,R), (D,) -> (N,R,D)."""
  n, t, d = table.shape
  r = src.shape[1]
  variant = variant or _variant(interpret)
  src = src.astype(jnp.int32)
  fill = fill.astype(table.dtype)
  out_shape = jax.ShapeDtypeStruct((n, r, d), table.dtype)
  if min(n, r, d) == 0 or t == 0:
    # Nothing to copy (K = 0, say), and zero-size blocks do not lower: every row is fill.
    return jnp.broadcast_to(fill, (n, r, d))

  if variant == "tpu":
    from jax.experimental.pallas import tpu as pltpu

    return pl.pallas_call(
        _kernel_tpu,
        out_shape=out_shape,
        grid=(n,),
        in_specs=[
            pl.BlockSpec((None, 1, r), lambda i: (i, 0, 0), memory_space=pltpu.SMEM),
            pl.BlockSpec((None, t, d), lambda i: (i, 0, 0)),
            pl.BlockSpec((1, d), lambda i: (0, 0)),
        ],
        out_specs=pl.BlockSpec((None, r, d), lambda i: (i, 0, 0)),
        interpret=interpret,
        name="row_gather",
    )(src[:, None, :], table, fill.reshape(1, d))  # (N, 1, R): its last two dims are whole

  if variant == "triton":
    from jax.experimental.pallas import triton as pltriton

    d_block = min(pl.next_power_of_2(d), 1024)
    return pl.pallas_call(
        functools.partial(_kernel_triton, d_block=d_block),
        out_shape=out_shape,
        grid=(n, pl.cdiv(d, d_block)),
        in_specs=[
            pl.BlockSpec((n, r), lambda i, j: (0, 0)),
            pl.BlockSpec((None, t, d), lambda i, j: (i, 0, 0)),
            pl.BlockSpec((d,), lambda i, j: (0,)),
        ],
        out_specs=pl.BlockSpec((None, r, d), lambda i, j: (i, 0, 0)),
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=max(1, min(4, d_block // 128))),
        name="row_gather",
    )(src, table, fill)

  raise ValueError(f"unknown kernel variant {variant!r}")


# Custom VJPs: the backward of each op is the other op (ids are unique within a row, so the
# scatter-add that transposes a gather is a plain scatter into zeros).

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _gather_pallas(x: jax.Array, ids: jax.Array, length: int, interpret: bool,
                   variant: str) -> jax.Array:
  # `length` (= x.shape[1]) is static so the backward can size its scatter.
  zero = jnp.zeros((x.shape[-1],), x.dtype)
  return _row_gather(x, ids, zero, interpret=interpret, variant=variant)


def _gather_fwd(x, ids, length, interpret, variant):
  return _gather_pallas(x, ids, length, interpret, variant), ids


def _gather_bwd(length, interpret, variant, ids, g):
  zero = jnp.zeros((g.shape[-1],), g.dtype)
  dx = _row_gather(g, _inverse_ids(ids, length), zero, interpret=interpret, variant=variant)
  return dx, None


_gather_pallas.defvjp(_gather_fwd, _gather_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _scatter_pallas(kept: jax.Array, ids: jax.Array, fill: jax.Array, length: int,
                    interpret: bool, variant: str) -> jax.Array:
  return _row_gather(kept, _inverse_ids(ids, length), fill, interpret=interpret, variant=variant)


def _scatter_fwd(kept, ids, fill, length, interpret, variant):
  inv = _inverse_ids(ids, length)
  out = _row_gather(kept, inv, fill, interpret=interpret, variant=variant)
  return out, (ids, inv)


def _scatter_bwd(length, interpret, variant, res, g):
  ids, inv = res
  zero = jnp.zeros((g.shape[-1],), g.dtype)
  dkept = _row_gather(g, ids, zero, interpret=interpret, variant=variant)
  # Every unkept position holds a copy of fill, so its cotangent is the sum of theirs.
  dfill = jnp.where((inv < 0)[..., None], g, 0).sum((0, 1), dtype=jnp.float32).astype(g.dtype)
  return dkept, None, dfill


_scatter_pallas.defvjp(_scatter_fwd, _scatter_bwd)


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------

def gather_tokens(x: jax.Array, ids_keep: jax.Array, *, impl: str = "auto",
                  interpret: bool | None = None) -> jax.Array:
  """Kept tokens: out[n, k] = x[n, ids_keep[n, k]]; (N, L, D), (N, K) -> (N, K, D).

  `ids_keep` must hold distinct ids per row (as `random_masking` gives); the Pallas backward
  relies on it. `interpret=None` interprets the kernel on CPU and compiles it elsewhere.
  """
  impl, interpret = _resolve(impl, interpret)
  ids_keep = ids_keep.astype(jnp.int32)
  if impl == "jnp":
    return jnp.take_along_axis(x, ids_keep[..., None], axis=1)
  return _gather_pallas(x, ids_keep, x.shape[1], interpret, _variant(interpret))


def scatter_tokens(kept: jax.Array, ids_keep: jax.Array, length: int, fill: jax.Array, *,
                   impl: str = "auto", interpret: bool | None = None) -> jax.Array:
  """Full-length tokens: out[n, ids_keep[n, k]] = kept[n, k], `fill` everywhere else.

  (N, K, D), (N, K), L, (D,) -> (N, L, D). Equal to MAE's concat(kept, mask tokens) gathered
  with ids_restore. `fill` is cast to kept's dtype; ids must be distinct per row.
  """
  impl, interpret = _resolve(impl, interpret)
  ids_keep = ids_keep.astype(jnp.int32)
  fill = fill.astype(kept.dtype)
  if impl == "jnp":
    n, _, d = kept.shape
    rows = jnp.arange(n, dtype=jnp.int32)[:, None]
    base = jnp.broadcast_to(fill, (n, length, d))
    return base.at[rows, ids_keep].set(kept, unique_indices=True)
  return _scatter_pallas(kept, ids_keep, fill, length, interpret, _variant(interpret))
