r"""MP-MAE (MMEarth, Nedungadi et al., ECCV 2024): ConvNeXt V2 FCMAE pretrained on Sentinel-2 with
one decoder head per pretext modality and uncertainty-weighted losses.

    mmearth-jax train --config configs/mp_mae.py:<variant> --workdir DIR [--config.key=value ...]

Variants: `<model><data>[_<ablation>]`
  model     atto | tiny  (ConvNeXt V2 with MMEarth's stem; 3.4M / 27.9M encoder parameters)
  data      ""     MMEarth (1.2M tiles, 128 px): 112 px crops, 16 px mask patches
            "64"   MMEarth64 (64 px centre crops): 56 px crops, 8 px patches (6x6 feature map)
            "100k" MMEarth100k (100k tiles, 128 px): 112 px crops, 16 px patches
  ablation  s2only (reconstruct S2 only: an FCMAE), rgb (reconstruct the RGB bands only),
            pixel (pixel-level modalities only), image (image-level modalities + S2),
            unweighted (plain sum of the losses instead of uncertainty weighting)
  demo      atto on the built-in sample (`make demo`), sized for a 2-core CPU

Examples (the paper's recipe: 200 epochs, 40 warmup, AdamW (0.9, 0.95), weight decay 0.05, base lr
1.5e-4 x 4096 / 256 = 2.4e-3, per-step half-cycle cosine to 0, mask ratio 0.6, norm_pix on, fp32):

    # MMEarth atto, 112/16, all 12 outputs, on a v4-64 pod (global batch 4096)
    mmearth-jax train --config configs/mp_mae.py:atto --workdir gs://B/mpmae_atto \
        --config.data.path=/data/mmearth/shards
    # MMEarth64 tiny, S2-only ablation, 8 GPUs x 512 with FSDP
    mmearth-jax train --config configs/mp_mae.py:tiny64_s2only --workdir runs/t64s2 \
        --config.data.path=/data/mmearth64/shards --config.mesh.fsdp=8
    # A smaller cluster: same effective batch by accumulation (lr follows the effective batch)
    ... --config.data.global_batch_size=1024 --config.optimizer.grad_accum_steps=4

What it reproduces: the paper's pretrained encoders. The paper evaluates them by fine-tuning and
linear probing on GEO-Bench; its reported gain of multi-modal (all outputs) over optical-only
(s2only) pretraining is about +4 points linear-probe accuracy on m-bigearthnet and +16 on
m-so2sat. Where the paper and the reference code differ, the code is the default:
`objective.valid_pixels = False` regresses missing pixels towards 0 as the code does, and
`model.weight_init = "fcmae"` is the code's FCMAE init ("trunc_normal_0.02": the earlier one), and
`model.masked_geometry = "sparse"` its MinkowskiEngine pretraining geometry ("dense": the
fine-tuning model's; measured +4.5 % loss at 56 px / 8 px, +0.7 % at 112 px / 16 px on a model
pretrained sparse, `benchmarks/pretrain_geometry.py`).
"""
import re

import ml_collections

from mmearth_jax import config_lib

# (data path suffix, crop, patch) per dataset.
DATASETS = {"": ("mmearth", 112, 16), "64": ("mmearth64", 56, 8), "100k": ("mmearth100k", 112, 16)}
ABLATIONS = {"s2only": ("outputs", "s2_only"), "rgb": ("outputs", "rgb_only"),
             "pixel": ("outputs", "pixel_only"), "image": ("outputs", "image_only"),
             "unweighted": ("aggregation", "unweighted")}


def get_config(variant: str = "atto") -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.method = "mp_mae"

  c.model = ml_collections.ConfigDict()
  c.model.variant = "atto"
  c.model.depths = ()  # () = the variant's; set for small test models
  c.model.dims = ()
  c.model.stem = "mmearth"
  c.model.patch_size = 16
  c.model.decoder_dim = 512
  c.model.drop_path_rate = 0.0
  c.model.dtype = "float32"  # compute dtype; "bfloat16" keeps float32 parameters
  c.model.remat = False  # recompute block activations in the backward pass
  c.model.weight_init = "fcmae"  # the reference's FCMAE init; or "trunc_normal_0.02"
  # The reference pretrains with its sparse (MinkowskiEngine) encoder: 3x3 stem conv over all
  # pixels, unpadded patch stem, all-zero pixels absent. "dense": its fine-tuning geometry.
  c.model.masked_geometry = "sparse"

  c.objective = ml_collections.ConfigDict()
  c.objective.mask_ratio = 0.6
  c.objective.norm_pix = True
  c.objective.aggregation = "uncertainty"  # or "unweighted"
  c.objective.valid_pixels = False  # True: the paper's NaN-aware loss on missing pixels

  c.data.input = "s2"
  c.data.outputs = "all"
  c.data.global_batch_size = 4096
  c.optimizer.base_lr = 1.5e-4
  c.optimizer.weight_decay = 0.05
  c.train.num_epochs = 200.0
  c.train.warmup_epochs = 40.0
  c.train.log_every = 100
  c.checkpoint.every_steps = 1000
  c.mesh.fsdp = 1  # ConvNeXt atto/tiny fit on any accelerator; FSDP pays off from base up

  if variant == "demo":
    return _demo(c)
  m = re.fullmatch(r"(atto|tiny)(|64|100k)(?:_(\w+))?", variant or "atto")
  if not m or (m.group(3) and m.group(3) not in ABLATIONS):
    raise KeyError(f"unknown variant {variant!r}; use demo or <atto|tiny>[64|100k][_<ablation>] "
                   f"with ablation in {sorted(ABLATIONS)}")
  model, data, ablation = m.groups()
  c.model.variant = model
  name, crop, patch = DATASETS[data]
  c.data.path = f"data/{name}/shards"
  c.data.crop = crop
  c.model.patch_size = patch
  if ablation:
    field, value = ABLATIONS[ablation]
    if field == "outputs":
      c.data.outputs = value
    else:
      c.objective.aggregation = value
  return c


def _demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """MP-MAE atto on the built-in 64 px sample (56 px crops, 8 px patches), all 12 outputs."""
  c.model.variant = "atto"
  c.model.patch_size = 8
  c.data.path = "data/demo/shards"
  c.data.crop = 56
  c.data.global_batch_size = 8
  c.optimizer.base_lr = 4e-2  # lr 1.25e-3 at batch 8: visible progress in a few hundred steps
  # The recipes' FCMAE init (std-1 depthwise and pointwise weights) needs longer than this
  # demo's 300 steps on 256 tiles: at 150 steps its kNN / least-squares probes had not moved
  # from the random encoder's. The demo starts from the small-weight init to show the gain.
  c.model.weight_init = "trunc_normal_0.02"
  c.train.num_steps = 300
  c.train.warmup_epochs = 0.0
  c.optimizer.warmup_steps = 20
  c.train.log_every = 25
  c.checkpoint.every_steps = 100
  # kNN and least-squares probes of dominant land cover on the sample, every 100 steps.
  c.eval.every_steps = 100
  c.eval.dataset = "mmearth:data/demo/shards"
  c.eval.knn_k = (10, 20)
  return c
