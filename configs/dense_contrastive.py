r"""Dense contrastive pretraining ("Embedding Earth"): InfoNCE between the ConvNeXt V2 feature
cells of two augmented views of a Sentinel-2 tile at corresponding positions.

    mmearth-jax train --config configs/dense_contrastive.py:<variant> --workdir DIR \
        [--config.key=value ...]

Variants: `<model><data>` or `demo`
  model     atto | tiny  (ConvNeXt V2 with MMEarth's stem, as MP-MAE; encoder under `encoder`)
  data      ""     MMEarth (128 px tiles): 112 px views, stem patch 16 (7x7 cells at stage 4)
            "64"   MMEarth64 (64 px tiles): 56 px views, stem patch 8 (6x6 cells)
            "100k" MMEarth100k (128 px tiles): as ""
  demo      atto on the built-in sample (`make demo`), sized for a 2-core CPU

Only the Embedding Earth paper's abstract is public and no code or recipe was released: the
objective (objectives/dense_contrastive.py) and every number below are our choices, taken from
the dense contrastive methods it builds on and from this project's MP-MAE recipe:

  views       the pipeline hands over the WHOLE tile (data.crop = tile size); each view is a
              random square crop of 30-100 % of its area (our range, between DenseCL/MoCo v2's
              0.2 and a range that keeps two views overlapping: PixPro discards pairs without
              overlap, here non-overlapping cells simply are no pairs), horizontal and vertical
              flips with p = 0.5 (overhead imagery has no "up"), resampled to view_size;
              photometric jitter on the z-scored bands: gain std 0.1, offset std 0.1, noise
              std 0.02 (colour jitter / grayscale / blur of RGB recipes do not carry over to 12
              bands).
  loss        InfoNCE, temperature 0.2 (DenseCL's; PixPro's pixel contrast uses 0.3), on the
              last stage (feature_stage = 4), 2-layer 1x1 projector 2048 -> 128 (DenseCL's dense
              head); negatives: all cells of the other tiles in groups of 128 tiles plus the
              other cells of the same tile (group size bounds the logit matrix:
              (128 x 49)^2 per group).
  optimiser   AdamW (0.9, 0.95), weight decay 0.05, base lr 1.5e-4 x global batch / 256 (MP-MAE's
              and MoCo v3's), global batch 1024, 100 epochs with 10 warmup, cosine to 0.
              Contrastive runs see two views per tile, so an epoch costs about twice MP-MAE's
              encoder compute; 100 epochs is about MP-MAE's 200 in encoder passes.

Examples:

    # MMEarth atto on 8 GPUs
    mmearth-jax train --config configs/dense_contrastive.py:atto --workdir runs/dc_atto \
        --config.data.path=/data/mmearth/shards
    # MMEarth64 tiny, finer cells (stage 3: 13x13 at 56 px)
    mmearth-jax train --config configs/dense_contrastive.py:tiny64 --workdir runs/dc_t64 \
        --config.data.path=/data/mmearth64/shards --config.objective.feature_stage=3

The targets the pipeline produces are not used (`data.outputs = "s2_only"`, the cheapest preset;
the step reads only `image`).
"""
import re

import ml_collections

from mmearth_jax import config_lib

# (data path suffix, tile size, view size, stem patch) per dataset.
DATASETS = {"": ("mmearth", 128, 112, 16), "64": ("mmearth64", 64, 56, 8),
            "100k": ("mmearth100k", 128, 112, 16)}


def get_config(variant: str = "atto") -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.method = "dense_contrastive"

  c.model = ml_collections.ConfigDict()
  c.model.variant = "atto"
  c.model.depths = ()  # () = the variant's; set for small test models
  c.model.dims = ()
  c.model.stem = "mmearth"  # or "official" (4x4/4 patchify stem)
  c.model.patch_size = 16  # MMEarth's stem: its first stride is patch_size / 8
  c.model.drop_path_rate = 0.0
  c.model.dtype = "float32"  # compute dtype; "bfloat16" keeps float32 parameters
  c.model.remat = False  # recompute block activations in the backward pass

  c.objective = ml_collections.ConfigDict()
  c.objective.temperature = 0.2
  c.objective.feature_stage = 4  # ConvNeXt V2 stage (1..4) whose cells are contrasted
  c.objective.projector_hidden_dim = 2048
  c.objective.projector_dim = 128
  c.objective.projector_layers = 2  # 1x1 convs; 1 = a linear projection
  c.objective.view_size = 112  # px of each view
  c.objective.crop_scale = (0.3, 1.0)  # area fraction of the tile each view crops
  c.objective.flip_prob = 0.5  # horizontal
  c.objective.vflip_prob = 0.5  # vertical
  c.objective.gain_std = 0.1  # per-band gain 1 + N(0, std^2), z-scored units
  c.objective.offset_std = 0.1  # per-band offset N(0, std^2)
  c.objective.noise_std = 0.02  # per-pixel Gaussian noise
  c.objective.negatives_group = 128  # tiles whose cells are each other's negatives; 0 = batch

  c.data.input = "s2"
  c.data.outputs = "s2_only"  # unused by the objective; the cheapest valid preset
  c.data.global_batch_size = 1024
  c.optimizer.base_lr = 1.5e-4
  c.optimizer.weight_decay = 0.05
  # No upstream code to follow: this method keeps the library's own groups (no decay on norms,
  # GRN, tokens), with which its documented results were measured.
  c.optimizer.decay_rule = "exempt_tokens"
  c.train.num_epochs = 100.0
  c.train.warmup_epochs = 10.0
  c.train.log_every = 100
  c.checkpoint.every_steps = 1000
  c.mesh.fsdp = 1

  if variant == "demo":
    return _demo(c)
  m = re.fullmatch(r"(atto|tiny)(|64|100k)", variant or "atto")
  if not m:
    raise KeyError(f"unknown variant {variant!r}; use demo or <atto|tiny>[64|100k]")
  model, data = m.groups()
  c.model.variant = model
  name, tile, view, patch = DATASETS[data]
  c.data.path = f"data/{name}/shards"
  c.data.crop = tile  # the whole tile: the views do the cropping
  c.objective.view_size = view
  c.model.patch_size = patch
  return c


def _demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Atto on the built-in 64 px sample: 56 px views of the whole tile, stem patch 8, 6x6 cells
  at the last stage (the stage the evaluation pools: an earlier feature_stage leaves the later
  stages untrained)."""
  c.model.variant = "atto"
  c.model.patch_size = 8
  c.data.path = "data/demo/shards"
  c.data.crop = 64
  c.objective.view_size = 56
  c.objective.projector_hidden_dim = 256
  c.objective.projector_dim = 64
  c.objective.negatives_group = 0  # the whole batch of 8 tiles
  c.data.global_batch_size = 8
  c.optimizer.base_lr = 4e-2  # lr 1.25e-3 at batch 8, as the MP-MAE demo
  c.train.num_steps = 300
  c.train.warmup_epochs = 0.0
  c.train.num_epochs = 0.0
  c.optimizer.warmup_steps = 20
  c.train.log_every = 25
  c.checkpoint.every_steps = 100
  # kNN and least-squares probes of dominant land cover on the sample, every 100 steps.
  c.eval.every_steps = 100
  c.eval.dataset = "mmearth:data/demo/shards"
  c.eval.knn_k = (10, 20)
  return c
