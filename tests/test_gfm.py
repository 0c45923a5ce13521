"""GFM: SimMIM masking in ConvNeXt V2 and ViT, the loss against a plain-torch statement of GFM's,
GFM's augmentation, and the trainer with a frozen teacher imported through `from-torch`: the
teacher stays bit-identical, is laid out like the student's encoder on an 8-device mesh, can
initialise the student, resumes from checkpoints, and a teacher that does not fit is named.

Models are a few thousand parameters at 32 px so that every compile takes seconds."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util

from mmearth_jax import cli, config_lib, metrics, pretrained, train
from mmearth_jax.data import scale_aug
from mmearth_jax.interop import compare, torch_io
from mmearth_jax.interop.torch_convnextv2 import ConvNeXtV2Official
from mmearth_jax.interop.torch_vit import TorchViT
from mmearth_jax.models import gfm as G
from mmearth_jax.models.convnextv2 import ConvNeXtV2
from mmearth_jax.models.vit import ViT
from mmearth_jax.objectives import gfm as O

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "gfm.py")
DEPTHS, DIMS = (1, 1, 1, 1), (8, 16, 16, 16)
VIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)

torch.set_num_threads(2)
# The resume run compiles the reference run's step again: loaded from the persistent cache.
pytestmark = pytest.mark.usefixtures("jax_compilation_cache")


def _images(n=2, size=32, seed=0):
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def _flat(tree) -> dict:
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _random_params(module, *args, seed=0) -> dict:
  """Params of `module`'s shapes filled with noise (no init compile); norm scales near 1 and
  GRN / biases non-zero, so that nothing hides behind an identity."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, s):
    x = rng.standard_normal(s.shape).astype(np.float32)
    name = path[-1].key
    if name == "kernel":
      return x / np.sqrt(np.prod(s.shape[:-1]))
    return 1.0 + 0.1 * x if name == "scale" else 0.1 * x

  return jax.tree_util.tree_map_with_path(fill, shapes)


# ------------------------------------------------------------------------------ SimMIM masking


def test_vit_simmim_replaces_exactly_the_masked_patch_embeddings():
  """With no blocks the output is LayerNorm(embedding + position) per token: masked tokens are
  the mask token's (whatever the pixels), visible ones the unmasked run's. A 2x2 mask grid over
  the 4x4 patch grid covers 2x2 patches per cell."""
  vit = ViT(**{**VIT, "depth": 0})
  x = _images()
  params = _random_params(vit, x)
  token = jnp.asarray(np.random.default_rng(1).standard_normal(32), jnp.float32)
  mask = jnp.asarray([[[1, 0], [0, 1]], [[0, 0], [1, 0]]], jnp.float32)
  run = jax.jit(lambda x, m: vit.apply({"params": params}, x, patch_mask=m, mask_token=token))
  plain = jax.jit(lambda x: vit.apply({"params": params}, x))(x)
  masked = run(x, mask)
  other = run(_images(seed=5), mask)  # other pixels everywhere
  cell = np.repeat(np.repeat(np.asarray(mask), 2, 1), 2, 2).reshape(2, 16).astype(bool)
  for i in range(2):
    m = cell[i]
    # Two programs (masked, plain) may fuse the LayerNorm differently: equal to float rounding.
    np.testing.assert_allclose(masked[i, 1:][~m], plain[i, 1:][~m], rtol=0, atol=2e-6)
    np.testing.assert_array_equal(masked[i, 1:][m], other[i, 1:][m])  # the pixels do not matter
    assert not np.allclose(masked[i, 1:][m], plain[i, 1:][m])
    assert not np.allclose(masked[i, 1:][~m], other[i, 1:][~m])


def test_vit_return_blocks_gives_the_block_outputs():
  """Block 0 of a 2-block ViT, put through the final norm, is the output of the 1-block ViT
  holding the same weights; the tokens are those of a plain call."""
  vit2, vit1 = ViT(**VIT), ViT(**{**VIT, "depth": 1})
  x = _images()
  p2 = _random_params(vit2, x)
  p1 = {k: v for k, v in p2.items() if k != "blocks_1"}
  assert set(p2) == {"patch_embed", "cls_token", "blocks_0", "blocks_1", "norm"}

  @jax.jit
  def run(x):
    return (vit2.apply({"params": p2}, x, return_blocks=(-2,)), vit2.apply({"params": p2}, x),
            vit1.apply({"params": p1}, x))

  (final, (b0,)), plain, one_block = run(x)
  np.testing.assert_array_equal(final, plain)
  ln = (b0 - b0.mean(-1, keepdims=True)) / jnp.sqrt(b0.var(-1, keepdims=True) + 1e-6)
  ln = ln * p2["norm"]["scale"] + p2["norm"]["bias"]  # the final norm, by hand
  np.testing.assert_allclose(ln, one_block, atol=2e-5)
  with pytest.raises(ValueError, match="block 2 does not exist"):
    jax.eval_shape(lambda x: vit2.apply({"params": p2}, x, return_blocks=(2,)), x)


def test_convnext_simmim_masks_the_stem_output():
  """ConvNeXt V2 (official stem) with 8 px mask cells on 32 px: masked pixels cannot reach any
  stage; a visible pixel does; and the stages equal the dense network run on the stem output
  with the token put in at exactly the masked stem positions (2x2 per cell)."""
  enc = ConvNeXtV2(depths=DEPTHS, dims=DIMS, stem="official")
  x = _images()
  params = _random_params(enc, x)
  token = jnp.asarray(np.random.default_rng(2).standard_normal(8), jnp.float32)
  mask = (np.random.default_rng(3).random((2, 4, 4)) < 0.5).astype(np.float32)
  pixels = np.repeat(np.repeat(mask, 8, 1), 8, 2)[..., None] > 0
  noisy = np.where(pixels, _images(seed=9), x)  # other values at masked pixels only
  i, j = np.argwhere(~pixels[0, :, :, 0])[0]
  poked = x.copy()
  poked[0, i, j] += 1.0  # one visible pixel changed

  def by_hand(mod, x):
    stem = mod._stem(x)
    cells = np.repeat(np.repeat(mask, 2, 1), 2, 2)[..., None] > 0
    return mod._stages(jnp.where(cells, token, stem), [None] * 4, False, True)

  @jax.jit
  def run(x, noisy, poked):
    masked = lambda x: enc.apply({"params": params}, x, jnp.asarray(mask),  # noqa: E731
                                 return_stages=True, mask_token=token)
    return (masked(x), enc.apply({"params": params}, x, method=by_hand), masked(noisy),
            masked(poked))

  out, ref, out_noisy, out_poked = run(x, noisy, poked)
  for a, b, c in zip(out, ref, out_noisy):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(a, c)
  assert not np.allclose(out_poked[0][0], out[0][0])


# ---------------------------------------------------------------------- the loss against torch


def _torch_gfm_loss(x, x_rec, mask, zs, zt, mask_patch: int, alpha: float) -> torch.Tensor:
  """GFM's loss as its released code computes it, in NCHW: the mask is repeated to pixels, L1
  is summed over masked pixels and channels and divided by the masked pixel count (+1e-5) and
  the channels; then minus alpha times the mean cosine similarity to the detached teacher."""
  m = mask.repeat_interleave(mask_patch, 1).repeat_interleave(mask_patch, 2).unsqueeze(1)
  recon = (F.l1_loss(x, x_rec, reduction="none") * m).sum() / (m.sum() + 1e-5) / x.shape[1]
  return recon - F.cosine_similarity(zs, zt.detach(), dim=1).mean() * alpha


def _nchw(a) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def test_loss_matches_torch_statement_of_gfm():
  rng = np.random.default_rng(0)
  x, rec = _images(3, 64, seed=1), _images(3, 64, seed=2)
  mask = O.simmim_mask(jax.random.key(0), 3, 2, 2, 0.6)  # 32 px cells: 3 of 4 masked
  zs = rng.standard_normal((3, 24)).astype(np.float32)
  zt = rng.standard_normal((3, 24)).astype(np.float32)
  zs[2] = 1e-10  # a near-zero vector: torch's eps rule
  for alpha in (1.0, 0.5):
    ours = O.reconstruction_loss(x, rec, mask) + O.distillation_loss(zs, zt, alpha)
    theirs = _torch_gfm_loss(_nchw(x), _nchw(rec), torch.from_numpy(np.array(mask)),
                             torch.from_numpy(zs), torch.from_numpy(zt), 32, alpha)
    np.testing.assert_allclose(float(ours), float(theirs), rtol=2e-6)
  # No gradient reaches the teacher's features.
  g = jax.grad(lambda t: O.distillation_loss(zs, t))(jnp.asarray(zt))
  assert not np.any(np.asarray(g))


def test_mask_counts_decoder_and_teacher_resize_match_simmim_and_torch():
  m = np.asarray(O.simmim_mask(jax.random.key(1), 64, 6, 6, 0.6))
  assert set(m.reshape(64, -1).sum(1)) == {22.0}  # ceil(36 * 0.6), every sample
  assert len({row.tobytes() for row in m}) > 50  # and a different subset per sample
  assert O.mask_count(10, 0.6) == 6 and O.mask_count(16, 0.6) == 10
  # The decoder: a 1x1 conv then PixelShuffle, channel order as torch's.
  y = np.random.default_rng(3).standard_normal((2, 3, 2, 4 * 4 * 3)).astype(np.float32)
  ours = np.asarray(G.pixel_shuffle(jnp.asarray(y), 4))
  theirs = torch.nn.PixelShuffle(4)(_nchw(y)).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(ours, theirs)
  # The teacher's input as GFM's code resizes it (bilinear, align_corners=True).
  x = _images(2, 24, seed=4)
  for size in (40, 16):
    ours = np.asarray(O.resize_align_corners(jnp.asarray(x), size))
    theirs = F.interpolate(_nchw(x), (size, size), mode="bilinear", align_corners=True)
    # torch computes the source coordinates in float32, here in float64: ~1e-6 apart.
    np.testing.assert_allclose(ours, theirs.numpy().transpose(0, 2, 3, 1), atol=2e-5)


# ---------------------------------------------------------------------------- augmentation


def test_resized_crop_follows_torchvision_rules(tmp_path):
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = scale_aug.random_resized_crop_box(60, 80, (0.67, 1.0), (3 / 4, 4 / 3), rng)
    assert 0 <= top <= 60 - h and 0 <= left <= 80 - w
    assert 0.67 * 4800 * 0.9 <= h * w <= 4800 and 0.7 <= w / h <= 1.4
  # No draw fits a 4 x 100 strip with aspect 1: torchvision's centre crop.
  assert scale_aug.random_resized_crop_box(4, 100, (0.9, 1.0), (1.0, 1.0), rng) == (0, 48, 4, 4)
  # An image folder: ImageNet-normalised RGB, the crop resized as PIL's bilinear (antialiased),
  # flipped half the time.
  from PIL import Image
  pixels = rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
  for i, p in enumerate(pixels):
    Image.fromarray(p).save(tmp_path / f"{i}.png")
  cfg = config_lib.load(f"{CONFIG}:demo", [f"data.images={tmp_path}", "data.global_batch_size=2",
                                           "data.resized_crop.size=16"]).data
  it, info = scale_aug.make_crop_dataset(cfg, process_index=0, process_count=1, return_box=True)
  assert info["channels"] == 3 and info["num_records"] == 2
  flips, batches = set(), iter(it)
  for batch in (next(batches) for _ in range(3)):
    assert set(batch) == {"image", "box"} and batch["image"].shape == (2, 16, 16, 3)
    for img, (top, left, h, w) in zip(batch["image"], batch["box"]):
      matches = []
      for p in pixels:
        norm = (p / 255.0 - np.asarray(cfg.mean)) / np.asarray(cfg.std)
        ref = scale_aug.R.resize(norm[top:top + h, left:left + w].astype(np.float32), (16, 16),
                                 "bilinear", antialias=True)
        matches += [np.allclose(img, ref, atol=1e-5), np.allclose(img, ref[:, ::-1], atol=1e-5)]
      assert sum(matches) == 1
      flips.add(matches.index(True) % 2)
  assert flips == {0, 1}


# ------------------------------------------------------------------------ config and trainer


def test_configs_hold_the_gfm_recipe():
  for variant, arch in (("convnextv2_base", "convnextv2"), ("convnextv2_tiny", "convnextv2"),
                        ("vitb", "vit")):
    c = config_lib.load(f"{CONFIG}:{variant}")
    assert c.method == "gfm" and c.model.arch == arch
    assert (c.train.num_epochs, c.train.warmup_epochs) == (100, 10)
    # GFM's pretraining yaml on its README's 8 GPUs x 128: BASE_LR 2e-4, WARMUP_LR 1e-6 and
    # MIN_LR 1e-5, each x batch / 512 as its main_teacher.py scales them; timm's cosine, AMP.
    assert c.data.global_batch_size == 1024
    lr = train.optim.scaled_lr(c.optimizer.base_lr, c.data.global_batch_size)
    assert lr == pytest.approx(4e-4)
    assert (c.optimizer.min_lr, c.optimizer.warmup_init_lr) == pytest.approx((2e-5, 2e-6))
    assert (c.optimizer.b1, c.optimizer.b2) == (0.9, 0.999)
    assert (c.optimizer.schedule, c.optimizer.decay_rule) == ("timm_cosine", "simmim")
    assert c.model.dtype == "bfloat16"
    assert (c.optimizer.weight_decay, c.optimizer.clip_grad_norm) == (0.05, 5.0)
    rc = c.data.resized_crop
    assert (rc.size, rc.scale_min, rc.scale_max, rc.flip) == (192, 0.67, 1.0, True)
    assert (rc.ratio_min, rc.ratio_max) == pytest.approx((3 / 4, 4 / 3))
    assert (c.objective.mask_patch, c.objective.mask_ratio, c.objective.alpha) == (32, 0.6, 1.0)
    assert c.objective.distill_layer == -2 and c.teacher.init_student == "random"
  with pytest.raises(config_lib.ConfigError, match="unknown variant .convnextv2_giant"):
    config_lib.load(f"{CONFIG}:convnextv2_giant")


def _import_teacher(state_dict, folder, *model) -> str:
  """A torch state dict -> a model folder through `mmearth-jax from-torch`."""
  pth = str(folder) + ".pth"
  torch_io.save_state_dict(state_dict, pth)
  assert cli.main(["from-torch", "--checkpoint", pth, "--out", str(folder), *model]) == 0
  return str(folder)


@pytest.fixture(scope="module")
def convnext_teacher(tmp_path_factory):
  torch.manual_seed(0)
  model = ConvNeXtV2Official(3, DEPTHS, DIMS, num_classes=5)  # an ImageNet file has a head
  return _import_teacher(model.state_dict(), tmp_path_factory.mktemp("t") / "convnext")


@pytest.fixture(scope="module")
def vit_teacher(tmp_path_factory):
  torch.manual_seed(0)
  model = TorchViT(img_size=32, in_chans=3, **VIT)
  return _import_teacher(model.state_dict(), tmp_path_factory.mktemp("t") / "vit", "--model",
                         "vit:num_heads=2")


def tiny(shards, teacher, *extra) -> list[str]:
  return [f"data.path={shards}", f"teacher.checkpoint={teacher}", f"model.depths={DEPTHS}",
          f"model.dims={DIMS}", "data.global_batch_size=8", "data.read_threads=2",
          "train.num_steps=3", "train.log_every=1", "checkpoint.every_steps=1",
          "mesh.fsdp_min_size=64", "optimizer.warmup_steps=1", "eval.every_steps=0",
          "train.progress=off", *extra]


def _state(workdir, step, keys=("params", "teacher")) -> dict:
  """Saved state items of one step (host arrays) and their partition specs."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  tree = pretrained._as_dict(ocp.StandardCheckpointer().metadata(path).item_metadata.tree)
  target = {k: pretrained._single_device_target(tree[k]) for k in keys}
  values = pretrained._restore(path, target, partial=True)
  specs = jax.tree.map(lambda m: tuple(m.sharding.partition_spec), {k: tree[k] for k in keys})
  return {k: _flat(values[k]) for k in keys}, {k: traverse_util.flatten_dict(specs[k])
                                               for k in keys}


@pytest.fixture(scope="module")
def convnext_run(shards64, convnext_teacher, tmp_path_factory):
  """3 steps on an 8-device FSDP mesh, the student starting as the teacher; lr 0 at step 0
  (warmup from 0), so checkpoint 1 still holds the initial student."""
  workdir = tmp_path_factory.mktemp("gfm_run")
  cfg = config_lib.load(f"{CONFIG}:demo", tiny(shards64, convnext_teacher, "mesh.fsdp=8",
                                                "teacher.init_student=teacher"))
  lines = []
  train.train(cfg, str(workdir), log=lines.append)
  return workdir, cfg, lines


def test_teacher_is_frozen_sharded_like_the_student_and_initialises_it(convnext_run,
                                                                       convnext_teacher):
  workdir, _, lines = convnext_run
  teacher = _flat({"encoder": pretrained.load(convnext_teacher).params})
  assert any("encoder/head/kernel" == k for k in teacher)
  teacher = {k: v for k, v in teacher.items() if "/head/" not in k}  # left out: unused
  (first, _), (last, specs) = _state(workdir, 1), _state(workdir, 3)
  assert set(last["teacher"]) == set(teacher)
  for k, v in teacher.items():  # bit-identical after 3 real steps
    np.testing.assert_array_equal(last["teacher"][k], v, err_msg=k)
    np.testing.assert_array_equal(first["params"][k], v, err_msg=k)  # init_student="teacher"
  changed = [k for k in teacher if not np.array_equal(last["params"][k], teacher[k])]
  assert len(changed) > len(teacher) // 2  # the student trained
  # Laid out like the student's encoder, and really sharded over the 8-device fsdp axis.
  sharded = 0
  for k, spec in specs["teacher"].items():
    assert spec == specs["params"][k], k
    sharded += "fsdp" in spec
  assert sharded >= 10
  # The optimizer never saw it: its moments mirror the params only.
  chain = ocp.StandardCheckpointer().metadata(
      os.path.join(workdir, "checkpoints", "3", "state")).item_metadata.tree["opt_state"]
  adam = [s for s in chain if isinstance(s, dict) and "mu" in s]
  assert len(adam) == 1 and set(adam[0]["mu"]) == {"encoder", "mask_token", "decoder",
                                                    "projector"}
  assert any("student's copies of them start as the teacher" in line for line in lines)
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert all(np.isfinite(rows[s][k]) for s in (1, 2, 3)
             for k in ("loss", "loss/recon", "loss/distill"))


def test_resume_restores_the_teacher_and_repeats_the_run(convnext_run, shards64, tmp_path):
  workdir, cfg, _ = convnext_run
  for step in (1, 2):
    shutil.copytree(os.path.join(workdir, "checkpoints", str(step)),
                    os.path.join(tmp_path, "checkpoints", str(step)))
  lines = []
  train.train(cfg, str(tmp_path), log=lines.append)
  assert any("resumed from" in line for line in lines)
  (ref, _), (got, _) = _state(workdir, 3), _state(tmp_path, 3)
  for part in ("params", "teacher"):
    for k, v in ref[part].items():
      np.testing.assert_array_equal(got[part][k], v, err_msg=f"{part}/{k}")
  # The run loads as a GFM model whose encoder embeds images.
  model = pretrained.load(str(tmp_path))
  assert model.spec["arch"] == "gfm" and model.spec["encoder"]["dims"] == list(DIMS)
  shapes = jax.eval_shape(lambda: pretrained.build(model.spec).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 4, 4))))["params"]
  assert set(_flat(shapes)) == set(_flat(model.params))
  feats = pretrained.features_fn(model.spec)(pretrained.encoder_params(model.spec, model.params),
                                             jnp.zeros((2, 64, 64, 3)))
  assert feats.shape == (2, DIMS[-1])
  # `to-torch` writes the student's encoder in the official layout: the torch reference with
  # those weights embeds like ours.
  out = tmp_path / "student.pth"
  assert cli.main(["to-torch", "--checkpoint", str(tmp_path), "--layout", "official",
                   "--out", str(out)]) == 0
  theirs = compare.torch_features(pretrained.encoder_spec(model.spec), str(out), "official",
                                  np.asarray(_images(2, 64)))
  np.testing.assert_allclose(theirs, np.asarray(pretrained.features_fn(model.spec)(
      pretrained.encoder_params(model.spec, model.params), _images(2, 64))), atol=2e-5, rtol=1e-4)


def test_vit_student_trains_a_step(shards64, vit_teacher, tmp_path):
  cfg = config_lib.load(f"{CONFIG}:demo", tiny(
      shards64, vit_teacher, "model.arch=vit", "model.variant=S", "model.patch_size=8",
      "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "objective.mask_patch=16",
      "train.num_steps=2", "checkpoint.every_steps=2", "mesh.num_devices=1"))
  out = train.train(cfg, str(tmp_path), log=lambda m: None)
  assert out["step"] == 2 and np.isfinite(out["loss/recon"]) and np.isfinite(out["loss/distill"])
  (state, _) = _state(tmp_path, 2)
  teacher = _flat({"encoder": pretrained.load(vit_teacher).params})
  for k, v in teacher.items():
    np.testing.assert_array_equal(state["teacher"][k], v, err_msg=k)
  assert not np.array_equal(state["params"]["encoder/blocks_0/attn/qkv/kernel"],
                            teacher["encoder/blocks_0/attn/qkv/kernel"])


def test_a_teacher_that_does_not_fit_is_named(shards64, vit_teacher, tmp_path):
  torch.manual_seed(1)
  wide = _import_teacher(ConvNeXtV2Official(3, DEPTHS, (8, 16, 16, 24)).state_dict(),
                         tmp_path / "wide")
  cases = [(wide, r"config teacher.checkpoint = '.*wide' does not fit the student \(config "
                  r"model.\*\): encoder/\S+ is \(.*\) in the teacher but \(.*\) in the student"),
           (vit_teacher, r"teacher.checkpoint = .* holds a vit encoder but config model.arch"),
           ("", r"config teacher.checkpoint is empty"),
           (str(tmp_path / "nowhere"), r"config teacher.checkpoint = .*nowhere.*no such")]
  for teacher, message in cases:
    cfg = config_lib.load(f"{CONFIG}:demo", tiny(shards64, teacher, "mesh.num_devices=1"))
    with pytest.raises(train.TrainingError, match=message):
      train.train(cfg, str(tmp_path / "run"), log=lambda m: None)
  cfg = config_lib.load(f"{CONFIG}:demo", tiny(shards64, wide, "teacher.init_student=ImageNet"))
  with pytest.raises(train.TrainingError, match="teacher.init_student = 'ImageNet'"):
    train.train(cfg, str(tmp_path / "run"), log=lambda m: None)
