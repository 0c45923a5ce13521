"""Training steps: our jitted JAX step vs a plain-PyTorch step of the same model, side by side.

- MP-MAE (ConvNeXt V2 atto and tiny, all 12 outputs, 112 px, 16 px patches, AdamW): ours is the
  trainer's own step (`train.make_train_step`: loss, gradients, clipping-ready AdamW chain, the
  non-finite guard); the PyTorch side computes what the reference code computes: the plain-torch
  MP-MAE (`interop.torch_convnextv2.MPMAETorch`) runs the shared decoder block once per output
  modality, the same per-modality losses with uncertainty weighting, and AdamW.
- ViT-B/16 MAE (224 px, mask ratio 0.75, AdamW) vs the plain-torch MAE (`interop.torch_vit`).
- The ConvNeXt V2 encoder alone (classification head, cross-entropy), to show where time goes.
- FSDP: per-device bytes of parameters + optimizer state for 1, 2, 4, 8 devices, read from the
  compiled step's memory analysis (8 simulated CPU devices in a subprocess).
- MFU where the device's peak is known (GPU/TPU; not on CPUs).

    python benchmarks/train_step.py [--models atto,tiny,vit_b] [--batch 32] [--steps 3]
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

from mmearth_jax import methods, metrics, optim, train
from mmearth_jax import modalities as M
from mmearth_jax.interop.torch_convnextv2 import ConvNeXtV2MMEarth, MPMAETorch
from mmearth_jax.models.convnextv2 import VARIANTS, convnextv2
from mmearth_jax.models.mp_mae import random_patch_mask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def bench_torch(outputs, batch, args, variant, steps):
  torch.set_num_threads(os.cpu_count())
  model = MPMAETorch(outputs, in_chans=12, variant=variant, stem="mmearth",
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

  return median_time(step, steps)


def config_for(variant: str, size: int, patch: int, batch: int, dtype: str = "float32"):
  from mmearth_jax import config_lib
  return config_lib.load(os.path.join(REPO, "configs", "mp_mae.py") + ":atto",
                         [f"model.variant={variant}", f"model.patch_size={patch}",
                          f"data.crop={size}", f"data.global_batch_size={batch}",
                          f"model.dtype={dtype}"])


def trainer_step(config, outputs, batch_example, total_steps=1000):
  """The trainer's jitted step and initial state (single device)."""
  task = methods.get("mp_mae").task(config, methods.DataInfo(0, None, outputs))
  params = jax.jit(task.init)(jax.random.key(0), batch_example)
  tx, schedule = optim.make_optimizer(config.optimizer, params, global_batch=config.data.global_batch_size,
                                      total_steps=total_steps)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
           "rng": jax.random.key_data(jax.random.key(1))}
  step = jax.jit(train.make_train_step(task, tx, schedule, 1), donate_argnums=0)
  return step, state, tx


def bench_jax(outputs, batch, args, variant, steps):
  config = config_for(variant, args.size, args.patch, args.batch, args.dtype)
  jb = jax.tree.map(jnp.asarray, batch)
  step, state, _ = trainer_step(config, outputs, jb)
  t0 = time.perf_counter()
  state, m = step(state, jb)
  jax.block_until_ready(m["loss"])
  compile_s = time.perf_counter() - t0
  flops = metrics.compiled_flops(step.lower(state, jb).compile())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step(state, jb)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), compile_s, flops


def bench_vit(args, steps):
  """ViT-B/16 MAE step (mask 0.75, AdamW), ours vs plain torch; (ours s, torch s, flops)."""
  from mmearth_jax.interop.torch_vit import TorchMAE
  from mmearth_jax.models.vit import make_mae, mae_loss
  from mmearth_jax.ops.masked_tokens import random_masking
  n, size = args.vit_batch, 224
  x = np.random.default_rng(0).standard_normal((n, size, size, 3)).astype(np.float32)
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  model = make_mae("B", patch_size=16, dtype=dtype)
  xj = jnp.asarray(x)
  params = jax.jit(lambda k: model.init({"params": k, "masking": k}, xj[:1]))(jax.random.key(0))["params"]
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.05)
  length, keep = 196, model.keep_count(196)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt, x, key):
    ids_keep, _, _ = random_masking(key, x.shape[0], length, keep)
    def loss(p):
      pred, mask = model.apply({"params": p}, x, ids_keep=ids_keep, train=True)
      return mae_loss(x, pred, mask, norm_pix_loss=True)
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value

  state = [params, tx.init(params)]
  flops = metrics.compiled_flops(step.lower(state[0], state[1], xj, jax.random.key(0)).compile())

  def jax_step(i):
    state[0], state[1], v = step(state[0], state[1], xj, jax.random.key(i))
    jax.block_until_ready(v)

  ours = median_time(jax_step, steps)
  tm = TorchMAE(img_size=size, patch_size=16, in_chans=3)
  topt = torch.optim.AdamW(tm.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

  def torch_step(i):
    noise = torch.rand(n, length, generator=torch.Generator().manual_seed(i))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    loss, _, _ = tm(xt, ids_shuffle[:, :keep], ids_restore, norm_pix_loss=True)
    topt.zero_grad()
    loss.backward()
    topt.step()

  return ours, median_time(torch_step, steps), flops


def describe_machine(dtype: str) -> float:
  """Prints the device, host and library versions; returns the chip's peak FLOP/s (0 unknown)."""
  torch.set_num_threads(os.cpu_count())
  device = jax.devices()[0]
  print(f"{device.device_kind} ({jax.default_backend()}), {os.cpu_count()} host cores, "
        f"{platform.machine()}; jax {jax.__version__}, torch {torch.__version__}; "
        f"our dtype {dtype}")
  return metrics.peak_flops(device.device_kind)


def median_time(fn, steps: int) -> float:
  """Median seconds of `steps` calls fn(1..steps), after a warm-up call fn(0)."""
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
  model = convnextv2("atto", stem="mmearth", patch_size=args.patch, num_classes=classes)
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

  ours = median_time(jax_step, steps)
  depths, dims = VARIANTS["atto"]
  tm = ConvNeXtV2MMEarth(12, depths, dims, args.patch, num_classes=classes)
  topt = torch.optim.AdamW(tm.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  yt = torch.from_numpy(y)

  def torch_step(_):
    loss = F.cross_entropy(tm(xt), yt)
    topt.zero_grad()
    loss.backward()
    topt.step()

  return ours, median_time(torch_step, steps)


def fsdp_memory(variant: str, size: int, patch: int, batch: int) -> None:
  """Print per-device bytes of state for fsdp = 1, 2, 4, 8 (run with 8 simulated devices)."""
  from mmearth_jax.parallel import mesh as mesh_lib
  config = config_for(variant, size, patch, batch)
  outputs = M.output_preset("all")
  example = jax.tree.map(jnp.asarray, fake_batch(outputs, 1, size))
  task = methods.get("mp_mae").task(config, methods.DataInfo(0, None, outputs))
  abstract_params = jax.eval_shape(task.init, jax.random.key(0), example)
  tx, schedule = optim.make_optimizer(config.optimizer, abstract_params, global_batch=batch,
                                      total_steps=1000)
  abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
                    "opt_state": jax.eval_shape(tx.init, abstract_params),
                    "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
  rows = []
  for fsdp in (1, 2, 4, 8):
    mcfg = mesh_lib.default_config()
    mcfg.fsdp = fsdp
    mesh = mesh_lib.make_mesh(mcfg)
    sh = train.state_shardings(abstract_state, tx, mesh, mcfg.rules, mcfg.fsdp_min_size)
    bsh = mesh_lib.batch_sharding(mesh)
    ab = jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch, *x.shape[1:]), x.dtype, sharding=bsh),
                      example)
    ast = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract_state, sh)
    compiled = jax.jit(train.make_train_step(task, tx, schedule, 1), in_shardings=(sh, bsh),
                       out_shardings=(sh, mesh_lib.replicated(mesh)),
                       donate_argnums=0).lower(ast, ab).compile()
    mem = compiled.memory_analysis()
    batch_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(ab)) // 8
    state_dev = sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                    for a, s in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(sh)))
    rows.append((fsdp, 8 // fsdp, state_dev, mem.argument_size_in_bytes - batch_bytes,
                 mem.temp_size_in_bytes))
  print(f"FSDP, MP-MAE {variant} ({total / 2**20:.1f} MiB params + AdamW state), batch {batch}, "
        f"8 devices (data x fsdp)")
  print(f"{'fsdp':>5}{'data':>5}{'state/device MiB':>18}{'compiled args-batch MiB':>25}"
        f"{'temp MiB':>10}")
  for fsdp, data, state_dev, args_dev, temp in rows:
    print(f"{fsdp:>5}{data:>5}{state_dev / 2**20:>18.1f}{args_dev / 2**20:>25.1f}"
          f"{temp / 2**20:>10.1f}")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="atto,tiny,vit_b,encoder",
                 help="comma list of atto, tiny (MP-MAE), vit_b (MAE), encoder (atto encoder only)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--vit-batch", type=int, default=32)
  p.add_argument("--size", type=int, default=112)
  p.add_argument("--patch", type=int, default=16)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="our compute dtype (PyTorch runs float32)")
  p.add_argument("--steps", type=int, default=3, help="timed steps per framework (median)")
  p.add_argument("--no-torch", action="store_true", help="ours only (e.g. a GPU without torch)")
  p.add_argument("--memory", default="tiny", help="variant for the FSDP memory table ('' = skip)")
  p.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.memory_only:
    fsdp_memory(args.memory, args.size, args.patch, args.batch)
    return
  peak = describe_machine(args.dtype)
  header = f"{'step':<50}{'s/step':>8}{'images/s':>10}{'ratio':>7}{'MFU':>7}"
  models = args.models.split(",")
  outputs = M.output_preset("all")
  for variant in [m for m in models if m in ("atto", "tiny")]:
    batch = fake_batch(outputs, args.batch, args.size)
    ours, compile_s, flops = bench_jax(outputs, batch, args, variant, args.steps)
    ref = None if args.no_torch else bench_torch(outputs, batch, args, variant, args.steps)
    print(f"\nMP-MAE {variant}, 12 outputs, batch {args.batch}, {args.size} px / {args.patch} px "
          f"patches, mask 0.6, AdamW; {flops / args.batch / 1e9:.2f} GFLOP per image")
    print(header)
    if ref:
      print(f"{'PyTorch reference (decoder block per modality)':<50}{ref:>8.2f}"
            f"{args.batch / ref:>10.2f}{1.0:>7.2f}{'':>7}")
    mfu = f"{flops / ours / peak:>7.1%}" if peak else f"{'n/a':>7}"
    print(f"{'mmearth_jax trainer step':<50}{ours:>8.2f}{args.batch / ours:>10.2f}"
          f"{(ref / ours if ref else float('nan')):>7.2f}{mfu}")
    print(f"(our first step, compile included: {compile_s:.1f} s)")
  if "vit_b" in models:
    ours, ref, flops = bench_vit(args, args.steps)
    n = args.vit_batch
    print(f"\nViT-B/16 MAE, batch {n}, 224 px, mask 0.75, norm_pix, AdamW; "
          f"{flops / n / 1e9:.2f} GFLOP per image")
    print(header)
    print(f"{'PyTorch (plain torch MAE)':<50}{ref:>8.2f}{n / ref:>10.2f}{1.0:>7.2f}{'':>7}")
    mfu = f"{flops / ours / peak:>7.1%}" if peak else f"{'n/a':>7}"
    print(f"{'mmearth_jax':<50}{ours:>8.2f}{n / ours:>10.2f}{ref / ours:>7.2f}{mfu}")
  if "encoder" in models:
    enc_ours, enc_ref = bench_encoder(args, args.steps)
    print(f"\nConvNeXt V2 atto encoder + head only, batch {args.batch}, {args.size} px")
    print(header)
    print(f"{'PyTorch':<50}{enc_ref:>8.2f}{args.batch / enc_ref:>10.2f}{1.0:>7.2f}")
    print(f"{'mmearth_jax':<50}{enc_ours:>8.2f}{args.batch / enc_ours:>10.2f}"
          f"{enc_ref / enc_ours:>7.2f}")
  if args.memory:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    print()
    sys.stdout.flush()
    subprocess.run([sys.executable, __file__, "--memory-only", "--memory", args.memory,
                    "--batch", str(args.batch), "--size", str(args.size), "--patch",
                    str(args.patch)], env=env, check=True)


if __name__ == "__main__":
  main()
