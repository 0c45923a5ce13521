"""Scale-MAE training step: our jitted JAX step vs the plain-PyTorch reference, side by side.

Both sides train the same model from the same weights on the same batch: a ViT encoder (default
ViT-B/16) with Scale-MAE's released pretraining decoder (width 512, 3 blocks, 16 heads; FPN;
independent FCN heads, fcn_dim 512, 2 HFFB layers), mask ratio 0.75, a per-sample GSD scale, the
Laplacian loss (band_config (7, 56), L2 high band) against a target at twice the input size, and
AdamW (b1 0.9, b2 0.95, weight decay 0.05).

  ours     `models.scale_mae.ScaleMAE` + `objectives.scale_mae.scale_mae_loss` + optax.adamw under
           one jax.jit (params float32; `--dtype` is the compute dtype), params and optimizer
           state donated
  PyTorch  `interop.torch_scale_mae.ScaleMAETorch` (the release's forward and `forward_loss` in
           plain torch, float32) + torch.optim.AdamW, loaded with our initial weights

Each side: `--warmup` untimed steps (ours after compiling ahead of time), then the median of
`--steps` timed steps, each with a fresh random mask.

    python benchmarks/scale_mae_step.py [--variant B] [--input 224] [--batch 8] [--steps 3]
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from mmearth_jax import metrics
from mmearth_jax.interop.torch_scale_mae import ScaleMAETorch, flax_to_torch_scale_mae
from mmearth_jax.models.scale_mae import make_scale_mae
from mmearth_jax.models.vit import VIT_VARIANTS
from mmearth_jax.objectives.scale_mae import scale_mae_loss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import describe_machine, median_time  # noqa: E402  the house helpers

PATCH = 16
BAND_CONFIG = (7, 56)
LR = 1e-4


def _timed(fn, steps: int, warmup: int) -> float:
  for i in range(max(warmup - 1, 0)):  # median_time runs the last warm-up step itself
    fn(-1 - i)
  return median_time(fn, steps)


def fake_batch(n: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"image": rng.standard_normal((n, size, size, 3)).astype(np.float32),
          "target": rng.standard_normal((n, 2 * size, 2 * size, 3)).astype(np.float32),
          "gsd": rng.uniform(0.5, 3.0, n).astype(np.float32)}


def bench_jax(model, params, batch, args) -> tuple[float, float, float]:
  """(median s/step, compile s, FLOPs per step) of our jitted step."""
  tx = optax.adamw(LR, b1=0.9, b2=0.95, weight_decay=0.05)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt, batch, key):
    def loss(p):
      return scale_mae_loss(model, p, batch, key, band_config=BAND_CONFIG, high_loss="l2")[0]
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, value

  jb = jax.tree.map(jnp.asarray, batch)
  state = [params, tx.init(params)]
  t0 = time.perf_counter()
  compiled = step.lower(state[0], state[1], jb, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t0
  flops = metrics.compiled_flops(compiled)

  def jax_step(i):
    state[0], state[1], v = compiled(state[0], state[1], jb, jax.random.key(i + 1000))
    jax.block_until_ready(v)

  return _timed(jax_step, args.steps, args.warmup), compile_s, flops


def bench_torch(model, params, batch, args) -> float:
  """Median s/step of the plain-PyTorch reference step."""
  torch.set_num_threads(os.cpu_count())
  size = batch["image"].shape[1]
  size_spec = VIT_VARIANTS[args.variant]
  tm = ScaleMAETorch(img_size=size, patch_size=PATCH, in_chans=3, **size_spec,
                     decoder_embed_dim=model.decoder_embed_dim,
                     decoder_depth=model.decoder_depth,
                     decoder_num_heads=model.decoder_num_heads, fcn_dim=model.fcn_dim,
                     fcn_layers=model.fcn_layers, independent_fcn_head=model.independent_fcn_head,
                     progressive=model.progressive, out_chans=3, band_config=BAND_CONFIG)
  tm.load_state_dict(flax_to_torch_scale_mae(params, img_size=size), strict=True)
  tm.train()
  opt = torch.optim.AdamW([p for p in tm.parameters() if p.requires_grad], lr=LR,
                          betas=(0.9, 0.95), weight_decay=0.05)
  x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous()
  t = torch.from_numpy(batch["target"]).permute(0, 3, 1, 2).contiguous()
  gsd = torch.from_numpy(batch["gsd"])
  n = x.shape[0]
  length = (size // PATCH) ** 2
  keep = model.keep_count(length)

  def torch_step(i):
    noise = torch.rand(n, length, generator=torch.Generator().manual_seed(i + 1000))
    ids_shuffle = torch.argsort(noise, dim=1)  # MAE's random_masking
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    loss = tm(x, gsd, ids_shuffle[:, :keep], ids_restore, t)[0]
    opt.zero_grad()
    loss.backward()
    opt.step()

  return _timed(torch_step, args.steps, args.warmup)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="B", choices=tuple(VIT_VARIANTS), help="ViT encoder size")
  p.add_argument("--input", type=int, default=224, help="input px (the target is twice that)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=3, help="timed steps per framework (median)")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed steps per framework before timing (at least 1)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="our compute dtype (params float32; PyTorch runs float32)")
  p.add_argument("--no-torch", action="store_true", help="ours only (e.g. a GPU without torch)")
  args = p.parse_args()
  args.warmup = max(args.warmup, 1)

  peak = describe_machine(args.dtype)

  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  model = make_scale_mae(args.variant, patch_size=PATCH, dtype=dtype)
  batch = fake_batch(args.batch, args.input)
  init_model = make_scale_mae(args.variant, patch_size=PATCH)  # float32 init either way
  x1 = jnp.asarray(batch["image"][:1])
  params = jax.jit(lambda k: init_model.init({"params": k, "masking": k}, x1,
                                             jnp.ones((1,))))(jax.random.key(0))["params"]
  params = jax.tree.map(np.asarray, params)  # host copies: the JAX step donates its buffers

  ours, compile_s, flops = bench_jax(model, params, batch, args)
  ref = None if args.no_torch else bench_torch(model, params, batch, args)

  n = args.batch
  print(f"\nScale-MAE ViT-{args.variant}/{PATCH}, batch {n}, {args.input} px input / "
        f"{2 * args.input} px target, mask {model.mask_ratio}, band_config {BAND_CONFIG}, L2, "
        f"AdamW; {flops / n / 1e9:.1f} GFLOP per image (XLA count, training step)")
  print(f"{'implementation':<38}{'images/s':>10}{'s/step':>9}{'ratio':>7}{'MFU':>7}")
  if ref is not None:
    print(f"{'PyTorch reference (plain torch)':<38}{n / ref:>10.2f}{ref:>9.2f}{1.0:>7.2f}"
          f"{'':>7}")
  mfu = f"{flops / ours / peak:>7.1%}" if peak else f"{'n/a':>7}"
  ratio = f"{ref / ours:>7.2f}" if ref is not None else f"{'':>7}"
  print(f"{'mmearth_jax (jit, ' + args.dtype + ')':<38}{n / ours:>10.2f}{ours:>9.2f}{ratio}{mfu}")
  print(f"(our compile: {compile_s:.1f} s, not in s/step; ratio = PyTorch s/step / ours)")


if __name__ == "__main__":
  main()
