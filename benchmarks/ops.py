"""Op timings: depthwise 7x7 conv impls vs PyTorch, and MAE token gather/scatter jnp vs Pallas.

Depthwise: the ConvNeXt V2 atto stage shapes (batch 32; 56x56x40, 28x28x80, 14x14x160, 7x7x320;
k=7, padding 3, bias), forward+backward (output and the gradients w.r.t. x, kernel and bias for
a fixed random cotangent) under jit, and the same layer as torch.nn.Conv2d(groups=C) in the
default (NCHW) and channels_last layouts. Median of several runs after warm-up; the runs of one
framework's impls are interleaved round by round, since load on a shared machine drifts.

Tokens: gather (encoder input) and scatter (decoder input) forward+backward for MAE-sized
inputs. On CPU Pallas only runs in interpret mode, which is a correctness tool, not a kernel:
its time says nothing about compiled Pallas speed, which needs a GPU/TPU.

    python benchmarks/ops.py [--reps 5] [--cases 56,28,14,7] [--no-torch] [--no-tokens]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmearth_jax.ops import depthwise, masked_tokens

STAGES = {56: (32, 56, 40), 28: (32, 28, 80), 14: (32, 14, 160), 7: (32, 7, 320)}
K, PAD = 7, 3


def _interleaved(fns: dict[str, Callable[[], object]], reps: int,
                 warmup: int = 2) -> dict[str, tuple[float, float]]:
  """(median, min) seconds of each blocking fn. After warm-up, `reps` rounds each time every fn
  once, so a change of load on a shared machine hits all of them alike."""
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def _jax_depthwise(impl: str, x, kern, bias, g):
  def fwd(x, kern, bias):
    return depthwise.depthwise_conv2d(x, kern, bias, padding=PAD, impl=impl)

  def fwd_bwd(x, kern, bias, g):
    y, vjp = jax.vjp(fwd, x, kern, bias)
    return y, vjp(g)

  f, fb = jax.jit(fwd), jax.jit(fwd_bwd)
  return (lambda: jax.block_until_ready(f(x, kern, bias)),
          lambda: jax.block_until_ready(fb(x, kern, bias, g)),
          np.asarray(f(x, kern, bias)))


def _torch_depthwise(x, kern, bias, g, channels_last: bool):
  import torch

  c = x.shape[-1]
  conv = torch.nn.Conv2d(c, c, K, padding=PAD, groups=c)
  with torch.no_grad():
    conv.weight.copy_(torch.from_numpy(np.array(kern)).permute(2, 0, 1)[:, None])
    conv.bias.copy_(torch.from_numpy(np.array(bias)))
  xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)
  gt = torch.from_numpy(np.array(g)).permute(0, 3, 1, 2)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  conv = conv.to(memory_format=fmt)
  xt = xt.contiguous(memory_format=fmt).requires_grad_(True)
  gt = gt.contiguous(memory_format=fmt)

  def fwd():
    with torch.no_grad():
      conv(xt)

  def fwd_bwd():
    xt.grad = None
    conv.zero_grad(set_to_none=True)
    conv(xt).backward(gt)

  with torch.no_grad():  # same numbers as ours, through the documented kernel layout mapping
    y = conv(xt).permute(0, 2, 3, 1).numpy()
  return fwd, fwd_bwd, y


def _rel_err(y, ref) -> float:
  return float(np.abs(y - ref).max() / np.abs(ref).max())


def bench_depthwise(cases: list[int], reps: int, with_torch: bool) -> list[dict]:
  rows = []
  for size in cases:
    n, hw, c = STAGES[size]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, hw, hw, c)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((K, K, c)) * 0.1, jnp.float32)
    bias = jnp.asarray(rng.standard_normal((c,)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((n, hw, hw, c)), jnp.float32)
    case = f"{n}x{hw}x{hw}x{c}"
    impls = {f"jax {impl}": _jax_depthwise(impl, x, kern, bias, g) for impl in depthwise.IMPLS}
    if with_torch:
      impls["torch channels_last"] = _torch_depthwise(x, kern, bias, g, True)
      impls["torch NCHW"] = _torch_depthwise(x, kern, bias, g, False)
    # Interleave within a framework only: torch's OpenMP workers fall asleep while JAX runs, and
    # waking them cost ~14 ms per call here, which a training loop full of torch ops never pays.
    t = {}
    for framework in ("jax", "torch"):
      fns = {}
      for name, (fwd, fwd_bwd, _) in impls.items():
        if name.startswith(framework):
          fns[(name, "fwd")], fns[(name, "fwd_bwd")] = fwd, fwd_bwd
      t.update(_interleaved(fns, reps) if fns else {})
    ref = impls["jax conv"][2]
    for name, (_, _, y) in impls.items():
      row = dict(case=case, impl=name, fwd=t[(name, "fwd")][0], fwd_bwd=t[(name, "fwd_bwd")][0],
                 fwd_bwd_min=t[(name, "fwd_bwd")][1], err=_rel_err(y, ref))
      rows.append(row)
      print(f"  {case} {name}: fwd {row['fwd'] * 1e3:.1f} ms, "
            f"fwd+bwd {row['fwd_bwd'] * 1e3:.1f} ms", flush=True)
  return rows


def bench_tokens(reps: int) -> list[dict]:
  rows = []
  # MAE-sized: 14x14 patches, mask ratio 0.75; encoder/decoder-like widths (one not 128-aligned).
  for n, length, keep, d in ((32, 196, 49, 320), (32, 196, 49, 512)):
    key = jax.random.key(0)
    ids_keep, _, _ = masked_tokens.random_masking(key, n, length, keep)
    x = jax.random.normal(jax.random.key(1), (n, length, d))
    kept = jax.random.normal(jax.random.key(2), (n, keep, d))
    fill = jax.random.normal(jax.random.key(3), (d,))
    w_g = jax.random.normal(jax.random.key(4), (n, keep, d))
    w_s = jax.random.normal(jax.random.key(5), (n, length, d))
    case = f"N={n} L={length} K={keep} D={d}"
    fns = {}
    for impl in ("jnp", "pallas"):
      # Everything is an argument: closed-over arrays become constants that XLA tries to fold.
      gather = jax.jit(jax.value_and_grad(
          lambda x, ids, w, impl=impl: (masked_tokens.gather_tokens(x, ids, impl=impl) * w).sum()))
      scatter = jax.jit(jax.value_and_grad(
          lambda kept, fill, ids, w, impl=impl: (masked_tokens.scatter_tokens(
              kept, ids, length, fill, impl=impl) * w).sum(),
          argnums=(0, 1)))
      fns[(impl, "gather")] = (lambda f=gather: jax.block_until_ready(f(x, ids_keep, w_g)))
      fns[(impl, "scatter")] = (
          lambda f=scatter: jax.block_until_ready(f(kept, fill, ids_keep, w_s)))
    t = _interleaved(fns, reps)
    for impl in ("jnp", "pallas"):
      label = impl if impl == "jnp" or jax.default_backend() != "cpu" else "pallas (interpret)"
      t_g, t_s = t[(impl, "gather")][0], t[(impl, "scatter")][0]
      rows.append(dict(case=case, impl=label, gather=t_g, scatter=t_s))
      print(f"  {case} {label}: gather {t_g * 1e3:.2f} ms, scatter {t_s * 1e3:.2f} ms", flush=True)
  return rows


def _depthwise_table(rows: list[dict]) -> str:
  out = ["| case (N x H x W x C) | impl | fwd ms | fwd+bwd ms (median) | fwd+bwd ms (min) "
         "| speedup vs jax conv | speedup vs torch channels_last | fwd max rel. diff vs conv |",
         "|---|---|---:|---:|---:|---:|---:|---:|"]
  for case in dict.fromkeys(r["case"] for r in rows):
    sub = [r for r in rows if r["case"] == case]
    base = {r["impl"]: r["fwd_bwd"] for r in sub}
    for r in sub:
      conv = base["jax conv"] / r["fwd_bwd"]
      tcl = base.get("torch channels_last")
      vs_t = f"{tcl / r['fwd_bwd']:.2f}x" if tcl else "-"
      out.append(f"| {case} | {r['impl']} | {r['fwd'] * 1e3:.1f} | {r['fwd_bwd'] * 1e3:.1f} "
                 f"| {r['fwd_bwd_min'] * 1e3:.1f} | {conv:.2f}x | {vs_t} | {r['err']:.1e} |")
  out.append("(speedups compare fwd+bwd medians; > 1 means faster than the reference)")
  return "\n".join(out)


def _token_table(rows: list[dict]) -> str:
  out = ["| case | impl | gather fwd+bwd ms | scatter fwd+bwd ms |", "|---|---|---:|---:|"]
  for r in rows:
    out.append(f"| {r['case']} | {r['impl']} | {r['gather'] * 1e3:.2f} | {r['scatter'] * 1e3:.2f} |")
  if jax.default_backend() == "cpu":
    out.append("(CPU: Pallas runs only in interpret mode, a correctness path; compiled Pallas "
               "timings need a GPU/TPU)")
  return "\n".join(out)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--cases", default="56,28,14,7", help="stage spatial sizes to run")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--no-tokens", action="store_true")
  args = ap.parse_args()

  versions = f"jax {jax.__version__}"
  try:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    versions += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
  except ImportError:
    args.no_torch = True
  print(f"# {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
        f"backend {jax.default_backend()}, {versions}")
  print(f"# load average at start: {os.getloadavg()[0]:.2f}")

  cases = [int(c) for c in args.cases.split(",") if c]
  dw = bench_depthwise(cases, args.reps, not args.no_torch)
  tok = [] if args.no_tokens else bench_tokens(args.reps)
  print(f"# load average at end: {os.getloadavg()[0]:.2f}")
  print()
  print("Depthwise conv 7x7, padding 3, with bias; forward and forward+backward (dx, dk, db):")
  print(_depthwise_table(dw))
  if tok:
    print()
    print("MAE token gather / scatter, forward+backward (f32):")
    print(_token_table(tok))


if __name__ == "__main__":
  main()
