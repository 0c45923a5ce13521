r"""Segmentation fine-tuning: a U-Net decoder on the four ConvNeXt V2 stages of a pretrained (or
randomly initialised) encoder, trained on a fraction of a dataset's labelled tiles and scored by
per-class IoU, mIoU and pixel accuracy on its test split (`mmearth_jax/eval/segmentation.py`).

    mmearth-jax segment [--config segment[:<variant>]] --config.dataset=DATASET \
        [--config.checkpoint=RUN_DIR] [--config.label_fraction=0.01] [--config.key=value ...]

`--config` defaults to `segment` (this file, its default variant); `configs/segment.py:<variant>`
names the same file, and a copy of your own is given by its path (`my_segment.py:<variant>`).
Every field below can be overridden with `--config.<field>=<value>` (a misspelt field fails,
naming it); the metrics are printed, and also written to the `json` file when it is set. With
`out` set, the fine-tuned segmenter is saved there as a model folder with its model card, and
`mmearth-jax segment-scene --model DIR --scene S2.tif --out classes.tif` maps a scene with it.

Variants
  mmearth  (the default, also ""): MMEarth's U-Net protocol. 200 epochs over the labelled tiles
           (a smaller label fraction trains for fewer steps), the encoder frozen for the first
           25 % of the steps (the paper's 50 of 200 epochs) and then trained with the decoder,
           AdamW with linear warmup and cosine decay, random horizontal / vertical flips.
           `dataset` must be set: mmearth:<shards folder> (land-cover maps) or
           geobench:<segmentation task folder> (m-cashew-plant, m-SA-crop-type, ...).
  demo     the same recipe on the built-in sample (`make demo` writes data/demo/shards): 1 % of
           the labels (2 tiles), 32 px crops, 50 steps from a random atto encoder; seconds on a
           2-core CPU. Fine-tune the demo's MP-MAE instead with
           --config.checkpoint=data/demo/run.

Examples:

    # GEO-Bench m-cashew-plant from an MP-MAE run, 1 % of the labels
    mmearth-jax segment --config.dataset=geobench:/data/m-cashew-plant \
        --config.checkpoint=runs/mpmae_atto --config.label_fraction=0.01
    # the demo, from random weights, metrics also written to a JSON file
    mmearth-jax segment --config segment:demo --config.json=seg.json

Not from MMEarth but this library's choices: peak lr 3e-3 (1e-2 diverged for atto from random
init), batch 8, 5 warmup steps, weight decay 0.05, the encoder's lr once unfrozen = the decoder's
(`encoder_lr_scale` 1). `checkpoint = "random"` fine-tunes a random ConvNeXt V2 of `variant`
(`depths`, `dims`, `stem`, `patch_size` override its shape); a checkpoint brings its own.
"""
import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = ""  # mmearth:<shards folder> or geobench:<segmentation task folder>
  c.data_dir = ""  # base folder for a relative dataset path
  c.partition = "default"  # GEO-Bench partition
  c.train_split = "train"  # split to fine-tune on
  c.test_split = "test"  # split to score (mIoU) on
  c.image_size = 0  # > 0: crop (mmearth) or resize (geobench) to this size
  c.max_examples = 0  # > 0: at most this many tiles per split
  c.label_fraction = 1.0  # fraction of the training tiles whose labels are used (seeded, >= 1)

  # Encoder: a training workdir, step folder or model folder of a ConvNeXt V2 / MP-MAE model,
  # or "random" for a random ConvNeXt V2 of the shape below.
  c.checkpoint = "random"
  c.variant = "atto"  # random init: ConvNeXt V2 variant
  c.depths = ()  # random init: blocks per stage, e.g. (1, 1, 1, 1); () = the variant's
  c.dims = ()  # random init: widths per stage; () = the variant's
  c.stem = "mmearth"  # random init: MMEarth's stem or "official" (4x4)
  c.patch_size = 8  # random init: the stem's patch size
  c.bands = ""  # input bands, comma separated; "" = the checkpoint's (random: the 12 MMEarth ones)

  # Fine-tuning. The budget is `epochs` passes over the labelled tiles; `steps` > 0 fixes the
  # number of steps instead, `max_steps` > 0 caps an epoch budget (a capped run says so).
  c.epochs = 200.0
  c.steps = 0
  c.max_steps = 0
  c.batch_size = 8
  c.lr = 3e-3  # peak lr of the decoder
  c.encoder_lr_scale = 1.0  # encoder peak lr = lr x this, once unfrozen
  c.weight_decay = 0.05  # AdamW
  c.warmup_steps = 5  # linear warmup of the decoder's lr, and of the encoder's once unfrozen
  c.freeze_fraction = 0.25  # encoder frozen for this fraction of the steps (MMEarth: 50 of 200)
  c.flips = True  # random horizontal and vertical flips
  c.decoder_dims = ()  # U-Net widths, deepest first, e.g. (64, 32, 16); () = the encoder's
  c.eval_batch_size = 32
  c.seed = 0  # label subset, decoder init, batch order, flips

  c.json = ""  # also write the metrics to this JSON file
  c.out = ""  # also save the fine-tuned segmenter here (a model folder `segment-scene` reads)

  if variant in ("", "mmearth"):
    return c
  if variant == "demo":
    c.dataset = "mmearth:data/demo/shards"
    c.image_size = 32
    c.label_fraction = 0.01
    c.max_steps = 300  # a cap for larger fractions on a CPU (1 % trains 50 steps)
    return c
  raise KeyError(f"unknown variant {variant!r}; choose mmearth (the default) or demo")
