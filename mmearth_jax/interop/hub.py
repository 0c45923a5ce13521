"""One entry point for PyTorch checkpoints: import any supported layout, export to a chosen one.

`import_state_dict(state_dict, model=None) -> (spec, params, notes)` recognises, from keys and
shapes alone:

  sparse_mmearth  MMEarth MP-MAE pretraining (MinkowskiEngine encoder under `encoder.`,
                  `proj`, `mask_token`, `decoder_dict.<modality>.0.*`, `pred_dict.<modality>`,
                  `layer_norm_tmp`, `loss_fn.log_vars`)
  sparse_fcmae    ConvNeXt V2's FCMAE ImageNet pretraining (sparse encoder, dense 4x4 stem,
                  `proj`, `mask_token`, `decoder.*`, `pred`): the encoder is imported
  mp_mae          the dense MP-MAE reference layout (what `export_state_dict(.., "mmearth")` writes
                  for an MP-MAE, and MMEarth's FCMAE with sparse=False)
  fcmae           a dense FCMAE-style file (encoder under `encoder.` plus a decoder)
  mmearth         MMEarth's dense ConvNeXt V2 (`initial_conv`, `stem`, `downsample_layers.0..2`)
  official        the ConvNeXt V2 release (`downsample_layers.0` = 4x4 stem)
  timm            timm's `convnextv2_*` (`stem`, `stages.i.blocks.j`, `head.norm`, `head.fc`)
  vit / mae       timm / MAE ViT (MAE adds `decoder_*`, `mask_token`)
  scale_mae       Scale-MAE pretraining (the release's `MaskedAutoencoderViT`): a ViT encoder
                  under timm names plus its decoder and upsampler (`decoder_*`, `mask_token`,
                  `fpn.*`, `fcn_high.*` / `fcn_low.*` or a shared `fcn.*`); the full model is
                  imported (`interop.torch_scale_mae`), or its encoder with model 'vit' or when
                  the file's decoder is incomplete

`model` overrides what is built: "convnextv2", "mp_mae", "vit", "mae" or "scale_mae" (e.g.
"convnextv2" on an MP-MAE file takes the encoder only, "vit" on a Scale-MAE file its encoder),
optionally followed by options, "vit:num_heads=8", "mae:num_heads=8,decoder_num_heads=4",
"scale_mae:num_heads=8,decoder_num_heads=4", "convnextv2:patch_size=16", "vit:img_size=224",
"vit:drop_pos_embed=1" (accept a position table that is not the fixed sin-cos one). `model`
may also be only options (":num_heads=8").

Notes are human-readable lines, each starting with one of
  "layout: "   what the file was recognised as and how it was read,
  "dropped: "  tensors in the file that the imported model does not hold,
  "filled: "   tensors the model needs that the file lacks, and what they were set to,
  "assumed: "  architecture facts that the weights do not determine (and how to override them).

Specs (JSON-able) describe the architecture; see `mmearth_jax.pretrained`:
  convnextv2: arch, depths, dims, stem, patch_size, in_chans, num_classes, bands
  mp_mae:     the convnextv2 keys (num_classes 0) + decoder_dim, outputs {modality: [bands]}
  vit:        arch, patch_size, embed_dim, depth, num_heads, mlp_ratio, in_chans, img_size, bands
  mae:        the vit keys + decoder_embed_dim, decoder_depth, decoder_num_heads
  scale_mae:  the mae keys + fcn_dim, fcn_layers, independent_fcn_head, progressive, out_chans,
              pos_layout (img_size an int: the release's grids are square)
"""
from __future__ import annotations

import collections
import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import torch

from mmearth_jax import modalities as M
from mmearth_jax.interop import convert_convnextv2 as cv
from mmearth_jax.interop import torch_scale_mae as tsm
from mmearth_jax.interop import torch_vit as tv
from mmearth_jax.interop.torch_convnextv2 import head_width
from mmearth_jax.interop.trees import flatten, to_numpy

ARCHS = ("convnextv2", "mp_mae", "vit", "mae", "scale_mae")
# Attention heads of the standard ViT widths (Ti, S, B, L, H); the weights do not tell.
VIT_NUM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
MAE_DECODER_HEADS = 16  # every public MAE decoder, and Scale-MAE's (width 512)
DEFAULT_OFFICIAL_PATCH = 32  # FCMAE's mask patch for the 4x4 stem
DEFAULT_VIT_IMG = 224

_OPTIONS = {"num_heads": int, "decoder_num_heads": int, "patch_size": int, "img_size": int,
            "drop_pos_embed": lambda v: v.lower() in ("1", "true", "yes", "y")}
_SCALE_MAE_MARKERS = ("fpn.", "fcn.", "fcn_high.", "fcn_low.", "mask_token_decoder",
                      "pos_emb_projection.")
_TRIED = ("sparse_mmearth (encoder.*.kernel + pred_dict.*)",
          "sparse_fcmae (encoder.*.kernel + encoder.downsample_layers.0.0.weight)",
          "mp_mae (encoder.stages.* + pred_dict.*)",
          "fcmae (encoder.stages.* + decoder.* / pred.*)",
          "mmearth (initial_conv.0.weight + stages.0.0.dwconv.weight)",
          "official (downsample_layers.0.0.weight + stages.0.0.dwconv.weight)",
          "timm ConvNeXt V2 (stem.0.weight + stages.0.blocks.0.conv_dw.weight)",
          "vit / mae / scale_mae (patch_embed.proj.weight + blocks.0.attn.qkv.weight)")
_DESCRIBE = {
    "sparse_mmearth": "MMEarth MP-MAE pretraining with a sparse (MinkowskiEngine) encoder",
    "sparse_fcmae": "ConvNeXt V2 FCMAE pretraining with a sparse (MinkowskiEngine) encoder",
    "mp_mae": "MP-MAE (MMEarth) pretraining, dense reference layout",
    "fcmae": "FCMAE-style pretraining (dense encoder under encoder.)",
    "mmearth": "MMEarth dense ConvNeXt V2",
    "official": "official ConvNeXt V2",
    "timm": "timm ConvNeXt V2",
    "vit": "timm / MAE ViT encoder",
    "mae": "MAE (ViT encoder + decoder)",
    "scale_mae": "Scale-MAE pretraining",
}


# ---------------------------------------------------------------------------------------------
# Small helpers.


def bands_for(in_chans: int) -> list[str] | None:
  """Input band names implied by a channel count: 12 -> MMEarth's Sentinel-2 input, 13 -> all
  Sentinel-2 bands, 3 -> RGB (B4, B3, B2); else None (unknown)."""
  return {12: list(M.S2_INPUT_BANDS), 13: list(M.S2_BANDS), 3: list(M.RGB_BANDS)}.get(int(in_chans))


def parse_model(model: str | None) -> tuple[str | None, dict[str, Any]]:
  """"vit:num_heads=8,img_size=224" -> ("vit", {"num_heads": 8, "img_size": 224})."""
  if not model:
    return None, {}
  arch, _, rest = model.partition(":")
  arch = arch.strip() or None
  if arch is not None and arch not in ARCHS:
    raise ValueError(f"unknown model {arch!r}; choose from {', '.join(ARCHS)} (optionally with "
                     "options, e.g. 'vit:num_heads=8')")
  opts: dict[str, Any] = {}
  for item in filter(None, (s.strip() for s in rest.split(","))):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in _OPTIONS or not eq:
      raise ValueError(f"bad model option {item!r} in {model!r}; options are "
                       f"{', '.join(k + '=...' for k in _OPTIONS)}")
    try:
      opts[key] = _OPTIONS[key](value.strip())
    except ValueError as e:
      raise ValueError(f"bad value in model option {item!r}: {e}") from e
  return arch, opts


def _summarise(keys: Sequence[str]) -> str:
  """Keys by top-level module: large groups as `decoder_dict.* (120)`, small ones in full."""
  groups: dict[str, list[str]] = collections.OrderedDict()
  for k in keys:
    groups.setdefault(k.split(".")[0], []).append(k)
  parts = []
  for head, ks in groups.items():
    parts += [f"{head}.* ({len(ks)})"] if len(ks) > 3 else ks
  return ", ".join(parts)


def _shape(sd: Mapping[str, Any], key: str) -> tuple | None:
  return tuple(np.shape(sd[key])) if key in sd else None


def _has_prefix(keys, prefix: str) -> bool:
  return any(k.startswith(prefix) for k in keys)


def _int_sqrt(n: float) -> int | None:
  r = int(round(math.sqrt(n))) if n > 0 else 0
  return r if r > 0 and r * r == n else None


# ---------------------------------------------------------------------------------------------
# Layout detection.


def detect_layout(state_dict: Mapping[str, Any]) -> str:
  """The layout name of a state dict (see the module docstring); ValueError if none fits."""
  keys = list(state_dict)
  has = lambda p: _has_prefix(keys, p)  # noqa: E731
  ks = set(keys)
  mp_mae_heads = has("pred_dict.") or has("decoder_dict.")
  if cv.is_sparse(state_dict, "encoder."):
    if mp_mae_heads or has("encoder.initial_conv.") or has("encoder.stem_orig."):
      return "sparse_mmearth"
    if "encoder.downsample_layers.0.0.weight" in ks:
      return "sparse_fcmae"
  elif has("encoder.stages.0.0."):
    return "mp_mae" if mp_mae_heads else "fcmae"
  if "stages.0.0.dwconv.weight" in ks:
    if "initial_conv.0.weight" in ks:
      return "mmearth"
    if "downsample_layers.0.0.weight" in ks or "stem_orig.0.weight" in ks:
      return "official"
  if "stem.0.weight" in ks and has("stages.0.blocks.0.conv_dw."):
    return "timm"
  if "patch_embed.proj.weight" in ks and has("blocks.0.attn.qkv."):
    if any(has(m) for m in _SCALE_MAE_MARKERS) or (
        "decoder_embed.weight" in ks and "decoder_pred.weight" not in ks):
      return "scale_mae"
    return "mae" if "decoder_embed.weight" in ks else "vit"
  first = ", ".join(keys[:12]) + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "")
  raise ValueError("cannot tell the layout of this state dict; first keys: "
                   f"{first or '(none)'}.\nTried:\n  " + "\n  ".join(_TRIED))


# ---------------------------------------------------------------------------------------------
# Specs from Flax params.


def _convnext_spec(flat: Mapping[tuple, Any], patch_size: int | None, bands) -> dict:
  depths = cv.depths_from_flax(flat)
  dims = [int(np.shape(flat[(f"stage_{i}_block_0", "dwconv", "kernel")])[-1]) for i in range(4)]
  mmearth = ("initial_conv", "kernel") in flat
  first = flat[("initial_conv", "kernel")] if mmearth else flat[("stem_conv", "kernel")]
  in_chans = int(np.shape(first)[2])
  if mmearth:
    stem_patch = 8 * int(np.shape(flat[("stem_conv", "kernel")])[0])
    if patch_size is not None and int(patch_size) != stem_patch:
      raise ValueError(f"patch_size {patch_size} contradicts the MMEarth stem, whose "
                       f"{stem_patch // 8}x{stem_patch // 8} conv means patch size {stem_patch}")
    patch_size = stem_patch
  head = flat.get(("head", "kernel"))
  return {"arch": "convnextv2", "depths": [int(d) for d in depths], "dims": dims,
          "stem": "mmearth" if mmearth else "official",
          "patch_size": int(patch_size or DEFAULT_OFFICIAL_PATCH), "in_chans": in_chans,
          "num_classes": int(np.shape(head)[-1]) if head is not None else 0,
          "bands": list(bands) if bands is not None else bands_for(in_chans)}


def _vit_spec(flat: Mapping[tuple, Any], img_size, num_heads: int | None, bands) -> dict:
  pe = np.shape(flat[("patch_embed", "kernel")])  # (p, p, C, D)
  dim = int(pe[-1])
  depth = len({p[0] for p in flat if re.fullmatch(r"blocks_\d+", p[0])})
  hidden = int(np.shape(flat[("blocks_0", "mlp", "fc1", "kernel")])[-1]) if depth else 4 * dim
  if num_heads is None:
    num_heads = _vit_heads(dim)
  h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
  return {"arch": "vit", "patch_size": int(pe[0]), "embed_dim": dim, "depth": depth,
          "num_heads": int(num_heads), "mlp_ratio": hidden / dim, "in_chans": int(pe[2]),
          "img_size": [int(h), int(w)],
          "bands": list(bands) if bands is not None else bands_for(int(pe[2]))}


def _scale_mae_spec(params: Mapping, img_size, num_heads: int | None,
                    decoder_num_heads: int | None, bands, pos_layout: str) -> dict:
  """A Scale-MAE spec (keys as `pretrained._scale_mae_spec`) read off ScaleMAE params."""
  spec = _vit_spec(flatten(params["encoder"]), img_size, num_heads, bands)
  dd = int(np.shape(params["decoder_embed"]["kernel"])[-1])
  independent = "fcn_high" in params
  head = params["fcn_high" if independent else "fcn"]
  if decoder_num_heads is None:
    if dd % MAE_DECODER_HEADS:
      raise ValueError(f"cannot tell the decoder's attention heads (width {dd}); give them as "
                       "model 'scale_mae:decoder_num_heads=N'")
    decoder_num_heads = MAE_DECODER_HEADS
  h, w = spec["img_size"]
  spec.update(
      arch="scale_mae", img_size=int(h) if h == w else [int(h), int(w)],
      decoder_embed_dim=dd,
      decoder_depth=len([k for k in params if re.fullmatch(r"decoder_blocks_\d+", k)]),
      decoder_num_heads=int(decoder_num_heads),
      fcn_dim=int(np.shape(head["proj"]["kernel"])[-1]),
      fcn_layers=len([k for k in head if re.fullmatch(r"conv_blocks_\d+", k)]),
      independent_fcn_head=independent, progressive="fpn1_2" in params["fpn"],
      out_chans=int(np.shape(head["pred_7"]["kernel"])[-1]), pos_layout=pos_layout)
  return spec


def _vit_heads(dim: int, what: str = "num_heads", arch: str = "vit") -> int:
  if dim in VIT_NUM_HEADS:
    return VIT_NUM_HEADS[dim]
  known = ", ".join(f"{d}:{h}" for d, h in VIT_NUM_HEADS.items())
  raise ValueError(f"cannot tell the number of attention heads of a ViT of width {dim} from its "
                   f"weights (standard widths: {known}); give it as model '{arch}:{what}=N' "
                   f"(CLI: --model {arch}:{what}=N)")


def spec_from_params(arch: str, params: Mapping, *, patch_size: int | None = None,
                     bands: Sequence[str] | None = None,
                     outputs: Mapping[str, Sequence[str]] | None = None,
                     img_size: int | Sequence[int] = DEFAULT_VIT_IMG,
                     num_heads: int | None = None, decoder_num_heads: int | None = None,
                     pos_layout: str = "concat") -> dict:
  """The spec of Flax params of `arch`, reading depths, widths, stem and channels off the
  shapes. What shapes do not fix comes from the arguments: `patch_size` (official stem; default
  32), `outputs` (mp_mae, required), `img_size` and `num_heads` (ViT; heads default to the
  standard table), `decoder_num_heads` (MAE, Scale-MAE; default 16), `pos_layout` (Scale-MAE's
  sin-cos channel order). `bands` default from the channels."""
  if set(params) == {"params"}:
    params = params["params"]
  if arch == "convnextv2":
    return _convnext_spec(flatten(params), patch_size, bands)
  if arch == "mp_mae":
    if outputs is None:
      raise ValueError("spec_from_params('mp_mae', ...) needs outputs={modality: bands}")
    flat = flatten(params)
    if patch_size is None and ("encoder", "initial_conv", "kernel") not in flat:
      widths = {n: int(np.shape(flat[(f"head_{n}", "kernel")])[-1]) for n in outputs
                if (f"head_{n}", "kernel") in flat and M.get(n).level == M.PIXEL}
      if widths:  # only pixel heads carry the patch size (p*p*C)
        patch_size = cv.patch_size_from(outputs, widths)
    spec = _convnext_spec(flatten(params["encoder"]), patch_size, bands)
    spec.update(arch="mp_mae", num_classes=0,
                decoder_dim=int(np.shape(params["proj"]["kernel"])[-1]),
                outputs={k: list(v) for k, v in outputs.items()})
    return spec
  if arch == "vit":
    return _vit_spec(flatten(params), img_size, num_heads, bands)
  if arch == "mae":
    spec = _vit_spec(flatten(params["encoder"]), img_size, num_heads, bands)
    dd = int(np.shape(params["decoder_embed"]["kernel"])[-1])
    depth = len([k for k in params if re.fullmatch(r"decoder_blocks_\d+", k)])
    if decoder_num_heads is None:
      decoder_num_heads = MAE_DECODER_HEADS
    spec.update(arch="mae", decoder_embed_dim=dd, decoder_depth=depth,
                decoder_num_heads=int(decoder_num_heads))
    return spec
  if arch == "scale_mae":
    return _scale_mae_spec(params, img_size, num_heads, decoder_num_heads, bands, pos_layout)
  raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


# ---------------------------------------------------------------------------------------------
# ConvNeXt V2 / MP-MAE import.


def _identity_norm(sd: dict, key: str, like: Any, notes: list[str], why: str) -> None:
  a = to_numpy(like)
  width = a.shape[0]
  sd[f"{key}.weight"] = np.ones(width, a.dtype)
  sd[f"{key}.bias"] = np.zeros(width, a.dtype)
  notes.append(f"filled: {key} (the LayerNorm after global pooling) with the identity "
               f"(weight 1, bias 0): {why}")


def _last_width(enc: Mapping[str, Any], timm: bool) -> Any | None:
  """A tensor whose first axis is the last stage's width (to build a missing final norm)."""
  for pat in ((r"stages\.3\.blocks\.\d+\.conv_dw\.bias$",) if timm else
              (r"stages\.3\.\d+\.dwconv\.bias$", r"downsample_layers\.3\.1\.bias$",
               r"downsample_layers\.2\.1\.bias$")):
    for k in enc:
      if re.match(pat, k):
        return enc[k]
  return None


def _output_bands(name: str, channels: int | None, input_bands: Sequence[str],
                  preset: Mapping[str, Sequence[str]]) -> list[str] | None:
  if name == "sentinel2":
    # The MAE target: the input bands (all presets but rgb_only, which predicts RGB).
    for cand in (list(input_bands), list(M.S2_INPUT_BANDS), list(M.S2_BANDS),
                 list(M.RGB_BANDS)):
      if channels is None or len(cand) == channels:
        return cand
    return None
  return list(preset[name])


def _infer_outputs(rest: Mapping[str, Any], in_chans: int, stem_patch: int | None,
                   opt_patch: int | None) -> tuple[dict[str, list[str]], int | None]:
  """{modality: bands} from the `pred_dict.<modality>` heads, in the file's order (the order of
  `loss_fn.log_vars`), and the patch size their widths imply."""
  names = list(dict.fromkeys(k.split(".")[1] for k in rest
                             if k.startswith("pred_dict.") and k.count(".") == 2))
  unknown = [n for n in names if n not in M.ALL_OUTPUTS]
  if unknown:
    raise ValueError(f"pred_dict holds heads for {unknown}, which are not MMEarth pretext "
                     f"modalities ({', '.join(M.ALL_OUTPUTS)}); import the encoder alone with "
                     "model 'convnextv2'")
  input_bands = bands_for(in_chans) or list(M.S2_INPUT_BANDS)
  preset = M.output_preset("all", input_bands)
  widths = {n: int(np.shape(rest[f"pred_dict.{n}.weight"])[0]) for n in names
            if f"pred_dict.{n}.weight" in rest}
  pixel = [n for n in names if M.get(n).level == M.PIXEL and n in widths]
  # The patch size: the stem fixes it (MMEarth's k = patch/8), else a pixel head of fixed width.
  patch = stem_patch or opt_patch
  if patch is None:
    for n in sorted(pixel, key=lambda n: n == "sentinel2"):  # fixed channel counts first
      bands = _output_bands(n, None, input_bands, preset)
      p = _int_sqrt(widths[n] / head_width(n, bands, 1))
      if p:
        patch = p
        break
  if pixel and patch is None:
    raise ValueError("cannot infer the patch size from the pixel heads' widths "
                     f"{ {n: widths[n] for n in pixel} }; give it as model 'mp_mae:patch_size=N'")
  outputs, problems = {}, []
  for n in names:
    level_pixel = M.get(n).level == M.PIXEL
    w = widths.get(n)
    channels = None
    if w is not None and level_pixel and patch:
      channels = w // (patch * patch) if w % (patch * patch) == 0 else -1
    elif w is not None and not level_pixel:
      channels = w
    bands = _output_bands(n, channels, input_bands, preset)
    if bands is None:
      problems.append(f"pred_dict.{n}: width {w} = {patch}x{patch} x {channels} channels, but "
                      "Sentinel-2 targets have 12 (input bands), 13 or 3 (RGB) bands")
      continue
    if w is not None and head_width(n, bands, patch or 1) != w:
      problems.append(f"pred_dict.{n}: width {w}, but {n} with {len(bands)} bands/classes at patch "
                      f"size {patch} needs {head_width(n, bands, patch or 1)}")
      continue
    outputs[n] = bands
  cv.raise_problems("the MP-MAE heads do not match the MMEarth modalities (output_preset('all')); "
                    "import the encoder alone with model 'convnextv2'", problems)
  return outputs, patch


def _import_convnext(sd: Mapping[str, Any], layout: str, arch: str | None,
                     opts: Mapping[str, Any], notes: list[str]) -> tuple[dict, dict]:
  if arch in ("vit", "mae", "scale_mae"):
    raise ValueError(f"this is a ConvNeXt V2 checkpoint ({_DESCRIBE[layout]}); model {arch!r} "
                     "does not fit it: use 'convnextv2' or 'mp_mae'")
  prefixed = layout in ("sparse_mmearth", "sparse_fcmae", "mp_mae", "fcmae")
  sd = dict(sd)
  if layout.startswith("sparse_"):
    sd = cv.sparse_to_dense(sd, "encoder.")
    notes.append("layout: sparse encoder kernels (k*k, in, out) / (k*k, C) rewritten as dense "
                 "(out, in, k, k) / (C, 1, k, k) (offset index w*k + h, as the ConvNeXt V2 "
                 "authors' remap_checkpoint_keys), .ln./.linear. dropped from names, (1, C) "
                 "biases flattened, GRN (1, C) -> (1, 1, 1, C)")
  prefix = "encoder." if prefixed else ""
  if f"{prefix}stem_orig.0.weight" in sd:
    sd = cv.orig_stem_to_official(sd, prefix)
    notes.append(f"layout: MMEarth's use_orig_stem encoder ({prefix}stem_orig.*) read as the "
                 "official 4x4 stem")
  enc = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  rest = {k: v for k, v in sd.items() if not k.startswith(prefix)} if prefixed else {}
  is_mp_mae = any(k.startswith("pred_dict.") for k in rest)
  if arch == "mp_mae" and not is_mp_mae:
    raise ValueError(f"this is not an MP-MAE checkpoint ({_DESCRIBE[layout]}, no pred_dict.* "
                     "heads); import it with model 'convnextv2'")
  arch = arch or ("mp_mae" if is_mp_mae else "convnextv2")

  timm = layout == "timm"
  stem = "mmearth" if "initial_conv.0.weight" in enc else "official"
  torch_layout = "timm" if timm else stem
  if prefixed:
    # A pretraining encoder's classifier (MMEarth's dense FCMAE builds one) is never trained.
    head = [k for k in enc if k.startswith("head.")]
    if head:
      notes.append(f"dropped: encoder classifier {', '.join('encoder.' + k for k in head)} "
                   "(unused in pretraining)")
      enc = {k: v for k, v in enc.items() if not k.startswith("head.")}
  norm_key = "head.norm" if timm else "norm"
  if f"{norm_key}.weight" not in enc and f"{norm_key}.bias" not in enc:
    like = _last_width(enc, timm)
    if like is not None:
      _identity_norm(enc, norm_key, like, notes,
                     "pretraining encoders have none; fine-tuning starts it fresh")
      if prefixed:
        notes[-1] = notes[-1].replace(f"filled: {norm_key}", f"filled: encoder.{norm_key}")

  in_key = "initial_conv.0.weight" if stem == "mmearth" else (
      "stem.0.weight" if timm else "downsample_layers.0.0.weight")
  in_chans = int(_shape(enc, in_key)[1]) if in_key in enc else 0
  stem_patch = None
  if stem == "mmearth" and "stem.0.weight" in enc:
    stem_patch = 8 * int(_shape(enc, "stem.0.weight")[-1])
    if opts.get("patch_size") and opts["patch_size"] != stem_patch:
      raise ValueError(f"patch_size={opts['patch_size']} contradicts the MMEarth stem conv "
                       f"({stem_patch // 8}x{stem_patch // 8}, i.e. patch size {stem_patch})")

  if arch == "mp_mae":
    outputs, patch = _infer_outputs(rest, in_chans, stem_patch, opts.get("patch_size"))
    if "loss_fn.log_vars" not in rest:
      rest["loss_fn.log_vars"] = np.zeros(len(outputs), np.float32)
      notes.append("filled: loss_fn.log_vars (uncertainty weights) with zeros: not in the file")
    full = {**{f"encoder.{k}": v for k, v in enc.items()}, **rest}
    params = cv.mp_mae_torch_to_flax(full, outputs)
    if patch is None:
      patch = opts.get("patch_size") or DEFAULT_OFFICIAL_PATCH
      notes.append(f"assumed: patch_size {patch} (no pixel head fixes it); override with "
                   "model 'mp_mae:patch_size=N'")
    notes.append(f"layout: outputs {list(outputs)} in the file's pred_dict order (the order of "
                 "loss_fn.log_vars); bands from output_preset('all')")
    spec = spec_from_params("mp_mae", params, patch_size=patch, outputs=outputs)
    return spec, params

  if rest:
    what = "FCMAE decoder" if layout in ("sparse_fcmae", "fcmae") else "MP-MAE decoder and heads"
    notes.append(f"dropped: {len(rest)} {what} tensors, not part of the encoder: "
                 f"{_summarise(list(rest))}")
  params = cv.torch_to_flax(enc, torch_layout)
  patch = opts.get("patch_size")
  if stem == "official" and patch is None:
    pred = _shape(rest, "pred.weight")
    if pred is not None and in_chans:
      patch = _int_sqrt(pred[0] / in_chans)  # FCMAE's head predicts p*p*C per patch
    elif is_mp_mae:
      patch = _infer_outputs(rest, in_chans, None, None)[1]
    if patch is None:
      patch = DEFAULT_OFFICIAL_PATCH
      notes.append(f"assumed: patch_size {patch} (FCMAE's mask patch; it only matters for masked "
                   "pretraining); override with model 'convnextv2:patch_size=N'")
  return spec_from_params("convnextv2", params, patch_size=patch), params


# ---------------------------------------------------------------------------------------------
# ViT / MAE / Scale-MAE import.

_VIT_ENCODER = re.compile(r"(cls_token|pos_embed|patch_embed\..*|blocks\.\d+\..*|norm\..*)$")


def _import_vit(sd: Mapping[str, Any], layout: str, arch: str | None,
                opts: Mapping[str, Any], notes: list[str]) -> tuple[dict, dict]:
  if arch in ("convnextv2", "mp_mae"):
    raise ValueError(f"this is a ViT checkpoint ({_DESCRIBE[layout]}); model {arch!r} does not "
                     "fit it: use 'vit' or 'mae'")
  if layout == "scale_mae" and arch == "mae":
    raise ValueError("Scale-MAE's decoder (FPN upsampler, fcn_high / fcn_low heads) has no "
                     "counterpart in MAE; import the whole model with model 'scale_mae' or its "
                     "encoder with model 'vit'")
  if layout in ("vit", "mae") and arch == "scale_mae":
    raise ValueError(f"this is a {_DESCRIBE[layout]} checkpoint without Scale-MAE's decoder "
                     f"(fpn.*, fcn_high.* / fcn.*); import it with model '{layout}'")
  if layout == "vit" and arch == "mae":
    raise ValueError("this ViT checkpoint has no MAE decoder (decoder_embed / decoder_pred); "
                     "import it with model 'vit'")
  arch = arch or ("mae" if layout == "mae" else "vit")
  sd = dict(sd)
  check_pos = not opts.get("drop_pos_embed", False)

  if layout == "vit":
    head = [k for k in sd if k.startswith("head.") or k.startswith("head_dist.")]
    if head:
      notes.append(f"dropped: classifier {', '.join(head)} (the imported ViT is an encoder)")
      for k in head:
        del sd[k]
    fc_norm = [k for k in sd if k.startswith("fc_norm.")]
    if fc_norm and "norm.weight" in sd:
      notes.append(f"dropped: {', '.join(fc_norm)} (the pooled-feature norm of a global-pool "
                   "classifier; the imported encoder ends with `norm`)")
      for k in fc_norm:
        del sd[k]
    elif fc_norm:
      for k in fc_norm:
        sd["norm." + k.split(".", 1)[1]] = sd.pop(k)
      notes.append("layout: fc_norm (applied after average pooling in this global-pool model) "
                   "loaded as the final `norm`, which here normalises every token before any "
                   "pooling: pooled features differ from the original's")
  if layout == "scale_mae" or (layout == "mae" and arch == "vit"):
    dropped = [k for k in sd if not _VIT_ENCODER.match(k)]
    what = "Scale-MAE decoder / upsampler" if layout == "scale_mae" else "MAE decoder"
    if dropped:
      notes.append(f"dropped: {len(dropped)} {what} tensors: {_summarise(dropped)}")
    sd = {k: v for k, v in sd.items() if _VIT_ENCODER.match(k)}
  if layout == "scale_mae":
    check_pos = False  # Scale-MAE recomputes a GSD-scaled sin-cos table every forward

  pe = _shape(sd, "patch_embed.proj.weight")
  p = int(pe[-1]) if pe else 1
  grid = None
  if opts.get("img_size"):
    grid = (opts["img_size"] // p, opts["img_size"] // p)
  pos = _shape(sd, "pos_embed")
  if pos is not None and grid is None:
    side = _int_sqrt(pos[1] - 1) if len(pos) == 3 else None
    grid = (side, side) if side else None
  if grid is None:
    grid = (DEFAULT_VIT_IMG // p, DEFAULT_VIT_IMG // p)
    notes.append(f"assumed: img_size {DEFAULT_VIT_IMG} (the file has no square position table "
                 "to read it from); override with model 'vit:img_size=N'")
  if "cls_token" in sd and "pos_embed" not in sd:
    # The Flax ViT keeps no table (it recomputes sin-cos per input): a placeholder passes through.
    sd["pos_embed"] = tv.sincos_2d_torch(int(np.shape(sd["cls_token"])[-1]), *grid, True)[None]
    notes.append("layout: no pos_embed in the file; none is needed (the sin-cos table is "
                 "recomputed for each input size)")
  elif layout == "scale_mae":
    notes.append("dropped: pos_embed (Scale-MAE recomputes its GSD-scaled sin-cos table every "
                 "forward; the stored one is not used)")
  elif not check_pos:
    notes.append("dropped: pos_embed / decoder_pos_embed without checking them (drop_pos_embed)")
  else:
    notes.append("dropped: pos_embed" + (" / decoder_pos_embed" if arch == "mae" else "") +
                 " after checking it is the fixed sin-cos table (recomputed per input size)")
  try:
    params = tv.torch_to_flax_vit(sd, check_pos_embed=check_pos, grid=grid)
  except ValueError as e:
    if "sin-cos" in str(e):
      raise ValueError(f"{e}. The model recomputes a fixed sin-cos position table; to import the "
                       f"rest anyway, give model '{arch}:drop_pos_embed=1'") from e
    raise

  enc = params["encoder"] if arch == "mae" else params
  dim = int(np.shape(enc["patch_embed"]["kernel"])[-1])
  heads = opts.get("num_heads") or _vit_heads(dim, "num_heads", arch)
  img = [grid[0] * p, grid[1] * p]
  if arch == "mae":
    dd = int(np.shape(params["decoder_embed"]["kernel"])[-1])
    dec_heads = opts.get("decoder_num_heads")
    if dec_heads is None:
      if dd % MAE_DECODER_HEADS:
        raise ValueError(f"cannot tell the decoder's attention heads (width {dd}); give them as "
                         "model 'mae:decoder_num_heads=N'")
      dec_heads = MAE_DECODER_HEADS
      notes.append(f"assumed: decoder_num_heads {dec_heads} (every public MAE decoder); override "
                   "with model 'mae:decoder_num_heads=N'")
    spec = spec_from_params("mae", params, img_size=img, num_heads=heads,
                            decoder_num_heads=dec_heads)
    if "decoder_blocks_0" in params:
      ratio = np.shape(params["decoder_blocks_0"]["mlp"]["fc1"]["kernel"])[-1] / dd
      if ratio != spec["mlp_ratio"]:
        raise ValueError(f"the decoder's MLP ratio {ratio} differs from the encoder's "
                         f"{spec['mlp_ratio']}; the MAE model here shares one ratio")
  else:
    spec = spec_from_params("vit", params, img_size=img, num_heads=heads)
  if dim % spec["num_heads"]:
    raise ValueError(f"width {dim} is not divisible by num_heads={spec['num_heads']}")
  return spec, params


def _decoder_problems(sd: Mapping[str, Any]) -> list[str]:
  """Missing / unexpected keys of a Scale-MAE file against the release layout its keys imply
  (the droppable fixed tables and an unused pos_emb_projection are not problems)."""
  want = tsm.expected_keys(**tsm.structure(sd))
  have = {k for k in sd if not k.startswith("pos_emb_projection.")}
  problems = [f"missing: {k}" for k in want if k not in have and k not in tsm.FILLED]
  problems += [f"unexpected: {k}" for k in sorted(have - set(want))]
  return problems


def _import_scale_mae(sd: Mapping[str, Any], arch: str | None, opts: Mapping[str, Any],
                      notes: list[str]) -> tuple[dict, dict]:
  """The whole Scale-MAE (arch "scale_mae"); with no `model` given, a file whose decoder does not
  form the release's layout falls back to its encoder (arch "vit"), saying why in the notes."""
  sd = dict(sd)
  problems = _decoder_problems(sd)
  if problems and arch is None:
    shown = "; ".join(problems[:4]) + (f"; ... ({len(problems)} in all)" if len(problems) > 4
                                       else "")
    notes.append(f"layout: the Scale-MAE decoder in this file is incomplete ({shown}): only the "
                 "encoder is imported (model 'scale_mae' raises on it instead)")
    return _import_vit(sd, "scale_mae", None, opts, notes)
  if problems:
    raise ValueError(f"not the released Scale-MAE layout: {len(problems)} problem(s):\n  " +
                     "\n  ".join(problems) + "\n(import the encoder alone with model 'vit')")

  pe = _shape(sd, "patch_embed.proj.weight")  # (D, C, p, p)
  p = int(pe[-1])
  grid = None
  if opts.get("img_size"):
    grid = (opts["img_size"] // p,) * 2
  for name in ("pos_embed", "decoder_pos_embed"):
    shape = _shape(sd, name)
    if grid is None and shape is not None and len(shape) == 3:
      side = _int_sqrt(shape[1] - 1)
      grid = (side, side) if side else None
  if grid is None:
    grid = (DEFAULT_VIT_IMG // p,) * 2
    notes.append(f"assumed: img_size {DEFAULT_VIT_IMG} (no square position table to read it "
                 "from; it only sets the tables written on export); override with model "
                 "'scale_mae:img_size=N'")
  missing = [k for k in tsm.FILLED if k not in sd]
  if missing:
    notes.append(f"layout: no {', '.join(missing)} in the file; none is needed (the model holds "
                 "no position table and no mask_token_decoder)")

  head = "fcn_high" if "fcn_high.proj.weight" in sd else "fcn"
  up1 = _shape(sd, f"{head}.pred.1.weight")[-1]
  if up1 != p // 4:
    raise ValueError(f"{head}.pred.1 upsamples by {up1}, but with patch size {p} the model here "
                     f"upsamples by p/4 = {p // 4} (the release hard-codes 4, i.e. patch 16)")
  dim, dd = int(pe[0]), int(_shape(sd, "decoder_embed.weight")[0])
  enc_fc1 = _shape(sd, "blocks.0.mlp.fc1.weight")
  dec_fc1 = _shape(sd, "decoder_blocks.0.mlp.fc1.weight")
  if enc_fc1 and dec_fc1 and dec_fc1[0] / dd != enc_fc1[0] / dim:
    raise ValueError(f"the decoder's MLP ratio {dec_fc1[0] / dd} differs from the encoder's "
                     f"{enc_fc1[0] / dim}; the model here shares one ratio")
  params = tsm.torch_to_flax_scale_mae(sd, notes=notes)

  heads = opts.get("num_heads") or _vit_heads(dim, "num_heads", "scale_mae")
  dec_heads = opts.get("decoder_num_heads")
  if dec_heads is None and dd % MAE_DECODER_HEADS == 0:
    notes.append(f"assumed: decoder_num_heads {MAE_DECODER_HEADS} (the release's); override with "
                 "model 'scale_mae:decoder_num_heads=N'")
  spec = spec_from_params("scale_mae", params, img_size=[grid[0] * p, grid[1] * p],
                          num_heads=heads, decoder_num_heads=dec_heads)
  for what, width, h in (("num_heads", dim, spec["num_heads"]),
                         ("decoder_num_heads", dd, spec["decoder_num_heads"])):
    if width % h:
      raise ValueError(f"width {width} is not divisible by {what}={h}")
  _check_shapes(spec, params)
  notes.append("layout: Scale-MAE position encodings in the released code's channel order "
               "(pos_layout 'concat')")
  return spec, params


def _check_shapes(spec: Mapping[str, Any], params: Mapping) -> None:
  """Every imported tensor has the shape the model of `spec` expects (one error naming all)."""
  from mmearth_jax import pretrained  # here: it pulls in orbax, which most imports never need
  model = pretrained.build(spec)
  size = spec["img_size"] if isinstance(spec["img_size"], int) else spec["img_size"][0]
  images = jax.ShapeDtypeStruct((1, size, size, int(spec["in_chans"])), np.float32)
  gsd = jax.ShapeDtypeStruct((1,), np.float32)
  rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
  want = flatten(jax.eval_shape(lambda x, g: model.init(rngs, x, g), images, gsd)["params"])
  have = flatten(params)
  problems = [f"missing: {'/'.join(k)}" for k in want if k not in have]
  problems += [f"unexpected: {'/'.join(k)}" for k in have if k not in want]
  problems += [f"mis-shaped: {'/'.join(k)} {tuple(np.shape(have[k]))}, expected "
               f"{tuple(want[k].shape)}" for k in want
               if k in have and tuple(np.shape(have[k])) != tuple(want[k].shape)]
  if problems:
    raise ValueError(f"the Scale-MAE weights do not fit the model {dict(spec)}: "
                     f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------
# Public API.


def import_state_dict(state_dict: Mapping[str, np.ndarray], model: str | None = None
                      ) -> tuple[dict, dict, list[str]]:
  """A PyTorch state dict of any supported layout -> (spec, Flax params, notes).

  The layout and architecture come from the keys and shapes (`detect_layout`); `model` (see the
  module docstring) chooses what to build and supplies what shapes cannot tell. Any mismatch
  raises one ValueError naming every missing, unexpected and mis-shaped key.
  """
  arch, opts = parse_model(model)
  sd = {str(k): v for k, v in state_dict.items()}
  notes: list[str] = []
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}  # a DistributedDataParallel wrapper
    notes.append("layout: the 'module.' prefix (DistributedDataParallel) removed")
  layout = detect_layout(sd)
  notes.insert(0, f"layout: {layout} ({_DESCRIBE[layout]})")
  if layout == "scale_mae" and arch in (None, "scale_mae"):
    spec, params = _import_scale_mae(sd, arch, opts, notes)
  elif layout in ("vit", "mae", "scale_mae"):
    spec, params = _import_vit(sd, layout, arch, opts, notes)
  else:
    spec, params = _import_convnext(sd, layout, arch, opts, notes)
  return spec, params, notes


def export_state_dict(spec: Mapping[str, Any], params: Mapping, layout: str, *,
                      conv_mlp: bool | None = None) -> dict[str, torch.Tensor]:
  """Flax params described by `spec` -> a PyTorch state dict in `layout`.

  ConvNeXt V2 / MP-MAE: "mmearth" (MMEarth's stem; for an MP-MAE the full pretraining model in the
  reference's keys), "official" (4x4 stem), "timm" (4x4 stem; `conv_mlp` forces fc1/fc2 as 1x1
  convs or Linears, default timm's choice for the width). "official" / "timm" of an MP-MAE write
  its encoder. ViT / MAE: "timm" (the encoder), "mae" (an MAE's encoder and decoder; the encoder
  of a ViT). Scale-MAE: "scale_mae" (the release's full `MaskedAutoencoderViT`, loadable with
  strict=True; `mask_token_decoder` written as zeros), "timm" (its encoder); "scale_mae" of a ViT
  writes the encoder. The sin-cos position tables are written for spec["img_size"].
  """
  from mmearth_jax import methods  # here: most imports of this module only read torch files
  arch = methods.arch(spec)
  if layout not in arch.export_layouts:
    raise ValueError(f"layout {layout!r} does not fit a {arch.name} model; choose from "
                     f"{', '.join(arch.export_layouts) or 'none (export its encoder)'}")
  if set(params) == {"params"}:
    params = params["params"]
  return arch.export(spec, params, layout, conv_mlp=conv_mlp)
