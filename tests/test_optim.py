"""The recipe optimiser: schedule formula, decay mask, AdamW against torch, clipping, accumulation,
layer-wise lr decay."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from mmearth_jax import optim


def test_lr_scaling_and_mae_schedule_formula():
  assert optim.scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)  # MMEarth: effective batch 4096
  peak, warm, total, low = 2.4e-3, 40, 200, 1e-6
  sched = optim.warmup_cosine(peak, warm, total, low)
  for step in [0, 1, 20, 39, 40, 41, 120, 199, 200]:
    if step < warm:
      want = peak * step / warm
    else:
      want = low + (peak - low) * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
    assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step


def test_timm_cosine_is_simmims_schedule():
  """timm's CosineLRScheduler as GFM / SimMIM build it (warmup_t, warmup_lr_init, no warmup
  prefix): the cosine runs over the whole run's steps, warmup included."""
  peak, warm, total, low, init = 4e-4, 10, 100, 2e-5, 2e-6
  sched = optim.timm_cosine(peak, warm, total, low, init)
  for step in [0, 1, 5, 9, 10, 11, 50, 99, 100]:
    if step < warm:
      want = init + step * (peak - init) / warm
    else:
      want = low + 0.5 * (peak - low) * (1 + math.cos(math.pi * step / total))
    assert float(sched(step)) == pytest.approx(want, rel=1e-5), step
  # Differs from MAE's, whose cosine starts after the warmup at the peak.
  assert float(sched(warm)) < float(optim.warmup_cosine(peak, warm, total, low, init)(warm))


def test_decay_groups_are_the_upstreams():
  """timm's add_weight_decay as MMEarth and Scale-MAE call it: no decay on biases and tensors
  that are 1-D in the PyTorch model; GRN gamma / beta ((1, 1, 1, C) there), ConvNeXt's mask
  token ((1, D, 1, 1)) and ViT's (1, 1, D) tokens are decayed. SimMIM / GFM exempt the mask token."""
  params = dict(_params(), cls_token=jnp.ones((1, 1, 8)),
                decoder={"mask_token": jnp.ones((1, 1, 8))})
  timm = optim.decay_mask(params, "timm")
  blk = timm["encoder"]["stage_0_block_0"]
  assert blk["dwconv"]["kernel"] and blk["grn"]["gamma"] and blk["grn"]["beta"]
  assert timm["mask_token"] and timm["cls_token"] and timm["decoder"]["mask_token"]
  assert not any([blk["dwconv"]["bias"], blk["norm"]["scale"], blk["norm"]["bias"],
                  timm["log_vars"], timm["head"]["bias"]])
  simmim = optim.decay_mask(params, "simmim")
  assert simmim["encoder"]["stage_0_block_0"]["grn"]["gamma"] and simmim["cls_token"]
  assert not simmim["mask_token"] and not simmim["decoder"]["mask_token"]
  old = optim.decay_mask(params, "exempt_tokens")
  assert not old["cls_token"] and not old["encoder"]["stage_0_block_0"]["grn"]["gamma"]
  with pytest.raises(ValueError, match="decay_rule = 'adam'"):
    optim.decay_mask(params, "adam")


def test_each_recipe_uses_its_upstreams_decay_groups():
  from mmearth_jax import config_lib
  for spec, rule in (("mp_mae:atto", "timm"), ("scale_mae:vitl", "timm"), ("gfm:convnextv2_base", "simmim")):
    assert config_lib.load(spec).optimizer.decay_rule == rule, spec


def _params():
  return {"encoder": {"stage_0_block_0": {"dwconv": {"kernel": jnp.ones((7, 7, 4)), "bias": jnp.ones(4)},
                                          "norm": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
                                          "grn": {"gamma": jnp.ones(16), "beta": jnp.ones(16)},
                                          "pwconv1": {"kernel": jnp.ones((4, 16)), "bias": jnp.ones(16)}}},
          "mask_token": jnp.ones(8), "log_vars": jnp.zeros(3),
          "head": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}


def test_weight_decay_skips_norms_biases_grn_and_tokens():
  mask = optim.decay_mask(_params(), "exempt_tokens")
  blk = mask["encoder"]["stage_0_block_0"]
  assert blk["dwconv"]["kernel"] and blk["pwconv1"]["kernel"] and mask["head"]["kernel"]
  assert not any([blk["dwconv"]["bias"], blk["norm"]["scale"], blk["norm"]["bias"],
                  blk["grn"]["gamma"], blk["grn"]["beta"], mask["mask_token"], mask["log_vars"],
                  mask["head"]["bias"]])


def test_adamw_matches_torch_with_the_same_decay_groups():
  rng = np.random.default_rng(0)
  w0, b0 = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
  grads = [(rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32))
           for _ in range(3)]
  cfg = optim.default_config()
  cfg.base_lr, cfg.weight_decay = 0.1 * 256 / 64, 0.05
  params = {"kernel": jnp.asarray(w0), "bias": jnp.asarray(b0)}
  tx, _ = optim.make_optimizer(cfg, params, global_batch=64, total_steps=10**9)
  cfg_const = float(optim.scaled_lr(cfg.base_lr, 64))
  # A constant lr on both sides: no warmup, and a cosine so long it stays at its peak.
  state = tx.init(params)
  tw, tb = torch.nn.Parameter(torch.from_numpy(w0.copy())), torch.nn.Parameter(torch.from_numpy(b0.copy()))
  topt = torch.optim.AdamW([{"params": [tw], "weight_decay": 0.05}, {"params": [tb], "weight_decay": 0.0}],
                           lr=cfg_const, betas=(0.9, 0.95), eps=1e-8)
  for gw, gb in grads:
    updates, state = tx.update({"kernel": jnp.asarray(gw), "bias": jnp.asarray(gb)}, state, params)
    params = optax.apply_updates(params, updates)
    tw.grad, tb.grad = torch.from_numpy(gw), torch.from_numpy(gb)
    topt.step()
  np.testing.assert_allclose(params["kernel"], tw.detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(params["bias"], tb.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_clipping_and_accumulation():
  cfg = optim.default_config()
  cfg.weight_decay, cfg.clip_grad_norm = 0.0, 1.0
  params = {"kernel": jnp.zeros((2, 2))}
  tx, _ = optim.make_optimizer(cfg, params, global_batch=256, total_steps=10**9)
  big = {"kernel": jnp.full((2, 2), 100.0)}
  clipped = {"kernel": jnp.full((2, 2), 0.5)}  # global norm 1
  cfg2 = optim.default_config()
  cfg2.weight_decay = 0.0
  tx2, _ = optim.make_optimizer(cfg2, params, global_batch=256, total_steps=10**9)
  # Adam normalises the first step, so compare the second moment state instead.
  s_big = tx.update(big, tx.init(params), params)[1]
  s_ref = tx2.update(clipped, tx2.init(params), params)[1]
  nu = lambda st: optax.tree_utils.tree_get(st, "nu")["kernel"]  # noqa: E731
  np.testing.assert_allclose(nu(s_big), nu(s_ref), rtol=1e-6)
  assert float(nu(s_big)[0, 0]) == pytest.approx((1 - 0.95) * 0.25)  # the clipped gradient's
  cfg3 = optim.default_config()
  cfg3.weight_decay, cfg3.grad_accum_steps = 0.0, 2
  tx3, _ = optim.make_optimizer(cfg3, params, global_batch=256, total_steps=10**9)
  g1, g2 = {"kernel": jnp.full((2, 2), 1.0)}, {"kernel": jnp.full((2, 2), 3.0)}
  st = tx3.init(params)
  u1, st = tx3.update(g1, st, params)
  assert float(jnp.abs(u1["kernel"]).max()) == 0.0  # no update until k gradients are in
  u2, st = tx3.update(g2, st, params)
  mean_update, _ = tx2.update({"kernel": jnp.full((2, 2), 2.0)}, tx2.init(params), params)
  np.testing.assert_allclose(u2["kernel"], mean_update["kernel"], rtol=1e-6)


def test_layerwise_lr_decay_numbering_and_scales():
  cid = optim.convnextv2_layer_id
  assert cid(("encoder", "initial_conv", "kernel")) == 0 and cid(("stem_norm", "scale")) == 0
  assert cid(("stage_0_block_2", "dwconv", "kernel")) == 1
  assert cid(("downsample_1_conv", "kernel")) == 2 and cid(("stage_1_block_0", "grn", "gamma")) == 2
  assert cid(("stage_2_block_26", "pwconv1", "kernel")) == 3 + 26 // 3 == 11
  assert cid(("downsample_3_norm", "scale")) == 12 and cid(("stage_3_block_1", "norm", "bias")) == 12
  assert cid(("norm", "scale")) == 13 and cid(("head", "kernel")) == 13
  vid = lambda p: optim.vit_layer_id(p, 13)  # noqa: E731  (ViT-B: 12 blocks + 1)
  assert vid(("encoder", "patch_embed", "kernel")) == 0 and vid(("encoder", "cls_token")) == 0
  assert vid(("encoder", "blocks_11", "mlp", "fc1", "kernel")) == 12
  assert vid(("encoder", "norm", "scale")) == 14
  params = {"stage_0_block_0": {"dwconv": {"kernel": jnp.ones((7, 7, 2))}}, "head": {"kernel": jnp.ones((2, 2))}}
  scales = optim.layer_scales(params, 0.9, cid, 12)
  assert scales["head"]["kernel"] == 1.0
  assert scales["stage_0_block_0"]["dwconv"]["kernel"] == pytest.approx(0.9 ** 12)
  cfg = optim.default_config()
  cfg.layer_decay, cfg.weight_decay = 0.9, 0.0
  tx, _ = optim.make_optimizer(cfg, params, global_batch=256, total_steps=10**9, layer_id=cid)
  g = jax.tree.map(jnp.ones_like, params)
  u, _ = tx.update(g, tx.init(params), params)
  ratio = float(u["stage_0_block_0"]["dwconv"]["kernel"][0, 0, 0] / u["head"]["kernel"][0, 0])
  assert ratio == pytest.approx(0.9 ** 12, rel=1e-5)
  with pytest.raises(ValueError, match="layer_decay"):
    optim.make_optimizer(cfg, params, global_batch=256, total_steps=10)
