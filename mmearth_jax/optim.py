"""The optimiser of the paper recipes (MAE / ConvNeXt V2 / MMEarth), as one optax chain.

- AdamW, betas (0.9, 0.95) for pretraining; lr = base_lr * global_batch / 256.
- Per-step schedule: linear warmup from 0, then half-cycle cosine to `min_lr` (MAE's formula).
- Weight decay only on matrices and conv kernels: never on biases, norm scales, GRN gamma/beta,
  mask/cls tokens, position embeddings or the loss log-variances.
- Optional gradient clipping by global norm, gradient accumulation, and layer-wise lr decay for
  fine-tuning (the ConvNeXt V2 and BEiT/MAE layer numbering).
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import ml_collections
import optax
from flax import traverse_util

from mmearth_jax import config_lib

# Leaf names that never get weight decay, whatever their shape.
NO_DECAY = frozenset({"bias", "scale", "gamma", "beta", "mask_token", "cls_token", "log_vars",
                      "pos_embed", "decoder_pos_embed"})


def default_config() -> ml_collections.ConfigDict:
  """The optimiser section of a training config (MMEarth's pretraining recipe); its defaults
  live in `config_lib.optimizer_config`."""
  return config_lib.optimizer_config()


def scaled_lr(base_lr: float, global_batch: int) -> float:
  return base_lr * global_batch / 256


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int,
                  min_lr: float = 0.0) -> optax.Schedule:
  """lr(step): peak * step / warmup, then min + (peak - min) * (1 + cos(pi * t)) / 2."""
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, max(total_steps, 1),
                                            min_lr)


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: tensors of rank >= 2 not named in NO_DECAY."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: (v.ndim >= 2 and k[-1] not in NO_DECAY) for k, v in flat.items()})


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
  schedule = warmup_cosine(peak, cfg.warmup_steps, total_steps, cfg.min_lr)
  parts = []
  if cfg.clip_grad_norm:
    parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
  parts += [optax.scale_by_adam(cfg.b1, cfg.b2, eps=1e-8),
            optax.add_decayed_weights(cfg.weight_decay, decay_mask(params))]
  if cfg.layer_decay != 1.0:
    if layer_id is None:
      raise ValueError("config optimizer.layer_decay != 1 needs a layer numbering (layer_id)")
    parts.append(_scale_by_tree(layer_scales(params, cfg.layer_decay, layer_id, num_layers)))
  parts.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*parts)
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
  return tx, schedule
