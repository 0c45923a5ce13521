r"""GFM (Mendieta et al., ICCV 2023, "Towards Geospatial Foundation Models via Continual
Pretraining"): a SimMIM student distilled from a frozen ImageNet-22k teacher of the same
architecture, on ConvNeXt V2 and ViT encoders (the paper's backbone is Swin-B).

    mmearth-jax train --config configs/gfm.py:<variant> --workdir DIR \
        --config.teacher.checkpoint=TEACHER [--config.key=value ...]

Variants
  convnextv2_<size>  ConvNeXt V2 (atto ... huge; ImageNet-22k checkpoints exist for nano, tiny,
                     base, large, huge) student and teacher, e.g. convnextv2_base (89M
                     parameters, the size of the paper's Swin-B)
  vitb               ViT-B/16 student and teacher
  demo               a small ConvNeXt V2 on the built-in sample (RGB, 32 px crops), 2-core CPU

The recipe: GFM's released pretraining config
(`configs/simmim_pretrain__swin_base__img192_window6__100ep.yaml`, launched by its README on 8
GPUs x batch 128 = 1024, with `main_teacher.py`'s defaults): 100 epochs, 10 warmup, AdamW (0.9,
0.999) with weight decay 0.05 (SimMIM's groups: no decay on biases, 1-D tensors and the mask
token), base lr 2e-4, warmup lr 1e-6 and min lr 1e-5, each x batch / 512 (at 1024: peak 4e-4,
warmup from 2e-6, min 2e-5; `optimizer.base_lr = 1e-4` here, as `optim.scaled_lr` multiplies by
batch / 256; `warmup_init_lr` and `min_lr` are absolute values: change them with the batch),
timm's cosine schedule without a warmup prefix (`optimizer.schedule = "timm_cosine"`), gradient
clipping at 5, mixed precision (apex O1, float16 with loss scaling, on V100s; here bfloat16, which
needs no loss scaling), random resized crop 192 (scale 0.67-1, aspect 3/4-4/3) + horizontal flip,
ImageNet mean / std; SimMIM masking with 32 px mask patches at ratio 0.6, a 1x1 conv + pixel-shuffle decoder, L1
on masked pixels; distillation on the next-to-last stage, average pooled, through a Linear
projector, loss -cosine x alpha (alpha 1); the student starts from random weights
(`teacher.init_student = "teacher"` starts it as the teacher instead). The teacher sees the
unmasked image resized to 224 px (bilinear, align_corners=True) as the released code feeds its
224 px Swin teacher (`teacher.image_size`; 0 = the student's input as it is).

The teacher, from PyTorch (official ConvNeXt V2 ImageNet-22k weights, e.g.
https://dl.fbaipublicfiles.com/convnext/convnextv2/im22k/convnextv2_base_22k_224_ema.pt; the
classifier is left out; timm's `convnextv2_*.fcmae_ft_in22k*` files import the same way):

    mmearth-jax from-torch --checkpoint convnextv2_base_22k_224_ema.pt --out teachers/cnv2_base_22k
    mmearth-jax train --config configs/gfm.py:convnextv2_base --workdir runs/gfm_cnv2_base \
        --config.data.images=/data/GeoPile --config.teacher.checkpoint=teachers/cnv2_base_22k
    # the MMEarth shards (RGB bands, z-scored) instead of an image folder:
    ... --config.data.images= --config.data.path=/data/mmearth/shards --config.data.input=rgb

A ViT teacher must have the fixed sin-cos position table this ViT uses (MAE-style checkpoints:
`mmearth-jax from-torch --checkpoint mae_pretrain_vit_base.pth --model vit`); timm's ImageNet-22k
ViTs learn their position table, which this encoder does not hold (`vit:drop_pos_embed=1` imports
the rest, so the teacher then sees other positions than it was trained with).

What it reproduces: GFM's objective and recipe on these encoders. The paper (Swin-B on GeoPile,
about 600k RGB images) reports better downstream results than both ImageNet-22k initialisation
and 800-epoch in-domain MIM at about a third of the latter's cost (93 V100-hours for 100 epochs);
it evaluates by fine-tuning, which this library does not run.

The demo (no download: its teacher is a seeded random ConvNeXt V2 in the official PyTorch
layout, imported through the same from-torch path):

    make demo   # once: the built-in sample in data/demo/shards
    python configs/gfm.py demo-teacher data/demo/gfm_teacher.pth
    mmearth-jax from-torch --checkpoint data/demo/gfm_teacher.pth --out data/demo/gfm_teacher
    mmearth-jax train --config configs/gfm.py:demo --workdir data/demo/gfm_run \
        --config.teacher.checkpoint=data/demo/gfm_teacher

It trains 300 steps (batch 16, 32 px RGB crops, 8 px mask patches; about a minute on 2 CPU
cores) and measures kNN on the sample's dominant land cover at steps 0, 150 and 300. Single
batches vary a lot, so compare windows in metrics.jsonl: over steps 1-25 / 201-300 the logged
L1 (loss/recon) went 0.42 -> 0.31, the cosine to the teacher 0.63 -> 0.94 and the total -0.21 ->
-0.63. kNN top-1 (k = 10) went 64.4 -> 71.1 % on 45 test tiles, a few tiles: a random teacher and
300 steps show the mechanics, not GFM's gains, which need an ImageNet-22k teacher and GeoPile.
"""
import sys

import ml_collections

from mmearth_jax import config_lib
from mmearth_jax.models.variants import CONVNEXTV2 as CONVNEXTV2_VARIANTS

DEMO_DEPTHS = (1, 1, 2, 1)
DEMO_DIMS = (24, 48, 96, 192)


def get_config(variant: str = "convnextv2_base") -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.method = "gfm"

  c.model = ml_collections.ConfigDict()
  c.model.arch = "convnextv2"  # or "vit"
  c.model.variant = "base"  # ConvNeXt V2 atto ... huge, or ViT S/B/L/H
  c.model.depths = ()  # ConvNeXt V2: () = the variant's; set for small models
  c.model.dims = ()
  c.model.patch_size = 16  # ViT only
  c.model.embed_dim = 0  # ViT only: 0 = the variant's
  c.model.depth = 0
  c.model.num_heads = 0
  c.model.drop_path_rate = 0.0  # SimMIM's Swin-B recipe
  c.model.dtype = "bfloat16"  # GFM trains in mixed precision (apex O1)
  c.model.remat = False

  c.objective = ml_collections.ConfigDict()
  c.objective.mask_patch = 32  # SimMIM's mask cells, in input pixels
  c.objective.mask_ratio = 0.6
  c.objective.alpha = 1.0  # weight of the distillation loss
  # Stage (ConvNeXt V2, of 4) or block (ViT) whose pooled output is distilled; -2 = the
  # next-to-last (ViT: block depth - 2).
  c.objective.distill_layer = -2

  c.teacher = ml_collections.ConfigDict()
  c.teacher.checkpoint = ""  # a model folder (`mmearth-jax from-torch`), workdir or step folder
  c.teacher.init_student = "random"  # GFM's; or "teacher": the student starts as the teacher
  c.teacher.image_size = 224  # the teacher's input is resized to this (GFM's code); 0 = as is

  # GFM's augmentation (see mmearth_jax.data.scale_aug.ResizedCrop).
  c.data.images = ""  # an image folder (GeoPile) or tfds:<name>; empty = the shards at data.path
  c.data.input = "rgb"  # MMEarth bands when reading shards
  c.data.outputs = "none"
  c.data.resized_crop = ml_collections.ConfigDict()
  c.data.resized_crop.size = 192
  c.data.resized_crop.scale_min = 0.67
  c.data.resized_crop.scale_max = 1.0
  c.data.resized_crop.ratio_min = 3 / 4
  c.data.resized_crop.ratio_max = 4 / 3
  c.data.resized_crop.flip = True
  c.data.resized_crop.antialias = True  # PIL's bilinear (the reference's); False = none (torch)
  c.data.resized_crop.pre_crop = 0  # image folders: a random square crop first; 0 = off
  c.data.mean = (0.485, 0.456, 0.406)  # image folders: ImageNet's, as the teacher was trained
  c.data.std = (0.229, 0.224, 0.225)
  c.data.global_batch_size = 1024  # 8 GPUs x 128
  c.optimizer.base_lr = 1e-4  # x batch / 256 = GFM's 2e-4 x batch / 512: 4e-4
  c.optimizer.min_lr = 2e-5  # 1e-5 x 1024 / 512
  c.optimizer.warmup_init_lr = 2e-6  # 1e-6 x 1024 / 512
  c.optimizer.schedule = "timm_cosine"
  c.optimizer.decay_rule = "simmim"
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_grad_norm = 5.0
  c.train.num_epochs = 100.0
  c.train.warmup_epochs = 10.0
  c.train.log_every = 100
  c.checkpoint.every_steps = 2000
  c.mesh.fsdp = 1

  if variant == "demo":
    return _demo(c)
  if variant == "vitb":
    c.model.arch = "vit"
    c.model.variant = "B"
    c.model.patch_size = 16
    c.model.drop_path_rate = 0.1  # SimMIM's ViT-B recipe
    return c
  size = variant.removeprefix("convnextv2_")
  if not variant.startswith("convnextv2_") or size not in CONVNEXTV2_VARIANTS:
    raise KeyError(f"unknown variant {variant!r}; choose convnextv2_<size> (size in "
                   f"{list(CONVNEXTV2_VARIANTS)}), vitb or demo")
  c.model.variant = size
  return c


def _demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A small ConvNeXt V2 (official stem) on the built-in 64 px sample: RGB, 32 px crops."""
  c.model.variant = "atto"
  c.model.depths = DEMO_DEPTHS
  c.model.dims = DEMO_DIMS
  c.objective.mask_patch = 8  # a 4 x 4 mask grid on 32 px crops
  c.teacher.image_size = 0
  c.data.path = "data/demo/shards"
  c.data.resized_crop.size = 32
  c.data.global_batch_size = 16
  c.optimizer.base_lr = 2e-2  # lr 1.25e-3 at batch 16
  c.model.dtype = "float32"  # bfloat16 is slower than float32 on a CPU
  c.optimizer.min_lr = 0.0
  c.optimizer.warmup_init_lr = 0.0
  c.optimizer.warmup_steps = 20
  c.train.num_steps = 300
  c.train.warmup_epochs = 0.0
  c.train.log_every = 25
  c.checkpoint.every_steps = 100
  c.eval.every_steps = 150
  c.eval.dataset = "mmearth:data/demo/shards"
  c.eval.evaluators = "knn"
  c.eval.knn_k = (10, 20)
  return c


def demo_teacher_state_dict(seed: int = 0) -> dict:
  """A seeded ConvNeXt V2 of the demo's size in the official PyTorch layout (RGB input): what
  an ImageNet-22k checkpoint looks like, for the demo and tests, where nothing is downloaded."""
  import torch

  from mmearth_jax.interop.torch_convnextv2 import ConvNeXtV2Official
  torch.manual_seed(seed)
  model = ConvNeXtV2Official(3, DEMO_DEPTHS, DEMO_DIMS)
  with torch.no_grad():  # GRN starts as the identity (zeros); a trained one is not
    for name, p in model.named_parameters():
      if name.endswith(("grn.gamma", "grn.beta")):
        p.normal_(0.0, 0.1)
  return model.state_dict()


if __name__ == "__main__":
  if len(sys.argv) != 3 or sys.argv[1] != "demo-teacher":
    sys.exit("usage: python configs/gfm.py demo-teacher OUT.pth")
  from mmearth_jax.interop import torch_io
  torch_io.save_state_dict(demo_teacher_state_dict(), sys.argv[2])
  print(f"wrote a seeded ConvNeXt V2 {list(DEMO_DEPTHS)} x {list(DEMO_DIMS)} teacher (official "
        f"layout) to {sys.argv[2]}")
