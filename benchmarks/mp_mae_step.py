"""Training steps on the CPU: our jitted JAX step vs the reference-style PyTorch step.

Two steps, each measured side by side on the same batch and machine:
- the ConvNeXt V2 encoder alone (MMEarth stem, classification head, cross-entropy, AdamW),
  the step the depthwise-convolution op (`ops/depthwise.py`) was written for;
- the full MP-MAE step.

The PyTorch side computes what the reference code computes: the plain-torch MP-MAE
(`interop.torch_convnextv2.MPMAETorch`) runs the shared decoder block once per output modality,
the same per-modality losses with uncertainty weighting, and AdamW. Ours runs the block once
(identical forward and gradient, see `models/mp_mae.py`). Same batch, same machine, run side by
side.

    python benchmarks/mp_mae_step.py [--variant atto] [--batch 32] [--size 112] [--patch 16]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

from mmearth_jax.data import modalities as M
from mmearth_jax.interop.torch_convnextv2 import ConvNeXtV2MMEarth, MPMAETorch
from mmearth_jax.models.convnextv2 import VARIANTS, convnextv2
from mmearth_jax.models.mp_mae import MPMAE, random_patch_mask
from mmearth_jax.objectives import mp_mae as L


def fake_batch(outputs, n, size, seed=0):
  rng = np.random.default_rng(seed)
  batch = {"image": rng.standard_normal((n, size, size, 12)).astype(np.float32),
           "targets": {}, "valid": {}}
  for name, bands in outputs.items():
    m = M.get(name)
    if m.level == M.PIXEL:
      shape = (n, size, size) if m.task == M.SEGMENTATION else (n, size, size, len(bands))
    else:
      shape = (n,) if m.task == M.CLASSIFICATION else (n, len(bands))
    if m.task in (M.SEGMENTATION, M.CLASSIFICATION):
      batch["targets"][name] = rng.integers(0, m.num_classes, shape).astype(np.int32)
    else:
      batch["targets"][name] = rng.standard_normal(shape).astype(np.float32)
    batch["valid"][name] = np.ones(shape, bool)
  return batch


def torch_losses(preds, batch, mask, p):
  """The reference's per-modality losses in torch (mask (N, L), 1 = masked)."""
  out = {}
  for name, pred in preds.items():
    m = M.get(name)
    t = torch.from_numpy(batch["targets"][name])
    if m.level == M.PIXEL:
      n, h, w = t.shape[:3]
      g = h // p
      if m.task == M.REGRESSION:
        tt = t.reshape(n, g, p, g, p, -1).permute(0, 1, 3, 2, 4, 5).reshape(n, g * g, -1)
        if name == "sentinel2":
          tt = (tt - tt.mean(-1, keepdim=True)) / (tt.var(-1, keepdim=True) + 1e-6) ** 0.5
        per_patch = ((pred - tt) ** 2).mean(-1)
        out[name] = (per_patch * mask).sum() / ((per_patch != 0) * mask).sum().clamp(min=1)
      else:
        lab = t.reshape(n, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(n, g * g, p * p).long()
        logits = pred.reshape(n, g * g, p * p, -1)
        lab = torch.where(mask[..., None] > 0, lab, torch.full_like(lab, -1))
        out[name] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1),
                                    ignore_index=-1)
    elif m.task == M.REGRESSION:
      out[name] = F.mse_loss(pred, t)
    else:
      out[name] = F.cross_entropy(pred, t.long(), ignore_index=-1)
  return out


def bench_torch(outputs, batch, args, steps):
  torch.set_num_threads(os.cpu_count())
  model = MPMAETorch(outputs, in_chans=12, variant=args.variant, stem="mmearth",
                     patch_size=args.patch)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
  x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
  g = args.size // args.patch
  log_vars = model.loss_fn.log_vars

  def step(seed):
    mask = torch.from_numpy(np.asarray(random_patch_mask(jax.random.key(seed), x.shape[0], g, 0.6)))
    preds = model(x, mask)
    losses = torch_losses(preds, batch, mask.reshape(x.shape[0], -1), args.patch)
    vals = torch.stack(list(losses.values()))
    total = (torch.exp(-log_vars) * vals + log_vars)[vals != 0].sum()
    opt.zero_grad()
    total.backward()
    opt.step()
    return float(total)

  step(0)
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    step(i + 1)
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def bench_jax(outputs, batch, args, steps):
  model = MPMAE(outputs, variant=args.variant, patch_size=args.patch)
  jb = jax.tree.map(jnp.asarray, batch)
  g = args.size // args.patch
  params = jax.jit(model.init)(jax.random.key(0), jb["image"],
                               jnp.zeros((args.batch, g, g)))["params"]
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.05)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch, key):
    (total, _), grads = jax.value_and_grad(
        lambda p: L.mp_mae_loss(model, p, batch, key), has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, total

  t0 = time.perf_counter()
  params, opt, total = step(params, opt, jb, jax.random.key(0))
  jax.block_until_ready(total)
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    params, opt, total = step(params, opt, jb, jax.random.key(i + 1))
    jax.block_until_ready(total)
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), compile_s


def _median_time(fn, steps):
  fn(0)  # warm-up (compiles the JAX step)
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    fn(i + 1)
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def bench_encoder(args, steps, classes=10):
  """ConvNeXt V2 classification training step, JAX vs torch."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.batch, args.size, args.size, 12)).astype(np.float32)
  y = rng.integers(0, classes, args.batch)
  model = convnextv2(args.variant, stem="mmearth", patch_size=args.patch, num_classes=classes)
  params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(x))["params"]
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.05)
  state = [params, tx.init(params)]

  @jax.jit
  def step(params, opt, x, y):
    def loss(p):
      logits = model.apply({"params": p}, x, method=model.classify)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value

  xj, yj = jnp.asarray(x), jnp.asarray(y)

  def jax_step(_):
    state[0], state[1], v = step(state[0], state[1], xj, yj)
    jax.block_until_ready(v)

  ours = _median_time(jax_step, steps)
  depths, dims = VARIANTS[args.variant]
  tm = ConvNeXtV2MMEarth(12, depths, dims, args.patch, num_classes=classes)
  topt = torch.optim.AdamW(tm.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  yt = torch.from_numpy(y)

  def torch_step(_):
    loss = F.cross_entropy(tm(xt), yt)
    topt.zero_grad()
    loss.backward()
    topt.step()

  return ours, _median_time(torch_step, steps)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="atto")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--size", type=int, default=112)
  p.add_argument("--patch", type=int, default=16)
  p.add_argument("--steps", type=int, default=3, help="timed steps per framework (median)")
  args = p.parse_args()
  torch.set_num_threads(os.cpu_count())
  enc_ours, enc_ref = bench_encoder(args, args.steps)
  outputs = M.output_preset("all")
  batch = fake_batch(outputs, args.batch, args.size)
  ours, compile_s = bench_jax(outputs, batch, args, args.steps)
  ref = bench_torch(outputs, batch, args, args.steps)
  print(f"\nConvNeXt V2 {args.variant}, batch {args.batch}, {args.size} px, 12 bands, AdamW; "
        f"{platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__}")
  print(f"{'step':<52}{'s/step':>8}{'images/s':>10}{'ratio':>7}")
  print(f"{'encoder + head, PyTorch reference':<52}{enc_ref:>8.2f}{args.batch / enc_ref:>10.1f}"
        f"{1.0:>7.2f}")
  print(f"{'encoder + head, mmearth_jax':<52}{enc_ours:>8.2f}{args.batch / enc_ours:>10.1f}"
        f"{enc_ref / enc_ours:>7.2f}")
  print(f"MP-MAE, {len(outputs)} outputs, {args.patch} px patches, mask ratio 0.6")
  print(f"{'PyTorch reference (decoder block per modality)':<52}{ref:>8.2f}"
        f"{args.batch / ref:>10.1f}{1.0:>7.2f}")
  print(f"{'mmearth_jax (jit, block once)':<52}{ours:>8.2f}{args.batch / ours:>10.1f}"
        f"{ref / ours:>7.2f}")
  print(f"(our first step, compile included: {compile_s:.1f} s)")


if __name__ == "__main__":
  main()
