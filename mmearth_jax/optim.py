"""The optimiser of the paper recipes (MAE / ConvNeXt V2 / MMEarth), as one optax chain.

- AdamW, betas (0.9, 0.95) for pretraining; lr = base_lr * global_batch / 256.
- Per-step schedule (`schedule`): "mae", linear warmup from `warmup_init_lr`, then a half-cycle
  cosine to `min_lr` over the steps after the warmup (MAE's formula); "timm_cosine", timm's
  CosineLRScheduler without a warmup prefix as SimMIM / GFM run it: the same warmup, then the
  cosine of step / total_steps, so it starts from where the whole run's cosine already is.
- Weight decay groups (`decay_rule`), as each upstream builds them:
  "timm"           timm's `add_weight_decay` (MAE, ConvNeXt V2 FCMAE, MMEarth, Scale-MAE): every
                   tensor except biases and tensors that are 1-D in the PyTorch model (norm
                   scales, the loss log-variances). GRN gamma/beta and ConvNeXt's mask token are
                   (1, 1, 1, C) / (1, D, 1, 1) there, so they are decayed, as are ViT tokens.
  "simmim"         SimMIM / GFM: timm's rule, and the mask token is exempt (`no_weight_decay`).
  "exempt_tokens"  also exempts GRN gamma/beta, mask/cls tokens and position tables (an earlier
                   default of this library, kept for comparison).
- Optional gradient clipping by global norm, gradient accumulation, and layer-wise lr decay for
  fine-tuning (the ConvNeXt V2 and BEiT/MAE layer numbering).
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from mmearth_jax import config_lib

# Leaf names exempt from weight decay under "exempt_tokens", whatever their shape.
NO_DECAY = frozenset({"bias", "scale", "gamma", "beta", "mask_token", "cls_token", "log_vars",
                      "pos_embed", "decoder_pos_embed"})
# Leaves stored 1-D here that are multi-dimensional in the upstream PyTorch models (GRN's
# (1, 1, 1, C) gamma / beta, ConvNeXt FCMAE's (1, D, 1, 1) mask token): timm decays them.
TORCH_MULTI_DIM = frozenset({"gamma", "beta", "mask_token"})
DECAY_RULES = ("timm", "simmim", "exempt_tokens")
SCHEDULES = ("mae", "timm_cosine")


def default_config() -> ml_collections.ConfigDict:
  """The optimiser section of a training config (MMEarth's pretraining recipe); its defaults
  live in `config_lib.optimizer_config`."""
  return config_lib.optimizer_config()


def scaled_lr(base_lr: float, global_batch: int) -> float:
  return base_lr * global_batch / 256


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int,
                  min_lr: float = 0.0, init_lr: float = 0.0) -> optax.Schedule:
  """lr(step): init + (peak - init) * step / warmup, then min + (peak - min) * (1 + cos(pi * t)) / 2
  with t = (step - warmup) / (total - warmup)."""
  return optax.warmup_cosine_decay_schedule(init_lr, peak_lr, warmup_steps, max(total_steps, 1),
                                            min_lr)


def timm_cosine(peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0,
                init_lr: float = 0.0) -> optax.Schedule:
  """timm's CosineLRScheduler (t_in_epochs=False, no warmup prefix, one cycle): lr(step) =
  init + (peak - init) * step / warmup during the warmup, then
  min + (peak - min) * (1 + cos(pi * step / total)) / 2."""
  total = max(total_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    cosine = min_lr + (peak_lr - min_lr) * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(step, total)
                                                              / total))
    if warmup_steps <= 0:
      return cosine
    warm = init_lr + (peak_lr - init_lr) * step / warmup_steps
    return jnp.where(step < warmup_steps, warm, cosine)
  return schedule


def decay_mask(params: Any, rule: str = "exempt_tokens") -> Any:
  """True where weight decay applies, by `rule` (see DECAY_RULES and the module docstring)."""
  if rule not in DECAY_RULES:
    raise ValueError(f"config optimizer.decay_rule = {rule!r}; choose from {list(DECAY_RULES)}")
  flat = traverse_util.flatten_dict(params)
  if rule == "exempt_tokens":
    decayed = {k: (v.ndim >= 2 and k[-1] not in NO_DECAY) for k, v in flat.items()}
  else:
    exempt = {"bias", "log_vars"} | ({"mask_token"} if rule == "simmim" else set())
    decayed = {k: k[-1] not in exempt and (v.ndim >= 2 or k[-1] in TORCH_MULTI_DIM)
               for k, v in flat.items()}
  return traverse_util.unflatten_dict(decayed)


def convnextv2_layer_id(path: tuple[str, ...], num_layers: int = 12) -> int:
  """ConvNeXt V2's fine-tuning layer numbering (stem 0 ... last stage 12, head 13)."""
  name = "/".join(path)
  if re.search(r"(^|/)(stem_|initial_)", name) or path[-1] in ("mask_token", "cls_token"):
    return 0
  m = re.search(r"downsample_(\d)_", name)
  if m:
    stage = int(m.group(1))
    return num_layers if stage == 3 else stage + 1
  m = re.search(r"stage_(\d)_block_(\d+)", name)
  if m:
    stage, block = int(m.group(1)), int(m.group(2))
    if stage < 2:
      return stage + 1
    return 3 + block // 3 if stage == 2 else num_layers
  return num_layers + 1


def vit_layer_id(path: tuple[str, ...], num_layers: int) -> int:
  """BEiT/MAE numbering: embeddings 0, block i -> i + 1, the rest num_layers + 1."""
  name = "/".join(path)
  if re.search(r"(^|/)(patch_embed|cls_token|pos_embed)", name):
    return 0
  m = re.search(r"(^|/)blocks_(\d+)/", name)
  return int(m.group(2)) + 1 if m else num_layers + 1


def layer_scales(params: Any, decay: float, layer_id: Callable[[tuple[str, ...]], int],
                 num_layers: int) -> Any:
  """Per-parameter lr multipliers decay ** (num_layers + 1 - layer_id)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: decay ** (num_layers + 1 - layer_id(k)) for k in flat})


def _scale_by_tree(scales: Any) -> optax.GradientTransformation:
  return optax.stateless(lambda updates, params=None: jax.tree.map(lambda u, s: u * s, updates,
                                                                    scales))


def make_optimizer(cfg: ml_collections.ConfigDict, params: Any, *, global_batch: int,
                   total_steps: int, layer_id: Callable[[tuple[str, ...]], int] | None = None,
                   num_layers: int = 12) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, lr schedule) for `params`; `total_steps` counts optimizer updates."""
  peak = scaled_lr(cfg.base_lr, global_batch)
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"config optimizer.schedule = {cfg.schedule!r}; choose from {list(SCHEDULES)}")
  make = warmup_cosine if cfg.schedule == "mae" else timm_cosine
  schedule = make(peak, cfg.warmup_steps, total_steps, cfg.min_lr, cfg.warmup_init_lr)
  parts = []
  if cfg.clip_grad_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
  parts += [optax.scale_by_adam(cfg.b1, cfg.b2, eps=1e-8),
            optax.add_decayed_weights(cfg.weight_decay, decay_mask(params, cfg.decay_rule))]
  if cfg.layer_decay != 1.0:
    if layer_id is None:
      raise ValueError("config optimizer.layer_decay != 1 needs a layer numbering (layer_id)")
    parts.append(_scale_by_tree(layer_scales(params, cfg.layer_decay, layer_id, num_layers)))
  parts.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*parts)
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
  return tx, schedule
