"""Flax <-> PyTorch weight conversion for ConvNeXt V2 (official / MMEarth / timm layouts) and
MP-MAE.

Flax params are the plain nested dicts of `mmearth_jax.models.convnextv2.ConvNeXtV2` and
`mmearth_jax.models.mp_mae.MPMAE`; PyTorch state dicts use the layouts of
`mmearth_jax.interop.torch_convnextv2` (the official ConvNeXt V2 release, MMEarth's dense model,
timm's `convnextv2_*` models and MP-MAE pretraining keys). Every tensor is only transposed or
reshaped, so Flax -> torch -> Flax is bit-exact:

  conv HWIO -> OIHW (3, 2, 0, 1), which also maps a grouped Flax conv (k, k, 1, C) -> (C, 1, k, k);
  our depthwise kernel (k, k, C) -> (C, 1, k, k); Dense (in, out) -> Linear (out, in);
  a Dense used per position (proj, pixel heads) -> 1x1 conv (out, in, 1, 1);
  GRN gamma/beta (C,) -> (1, 1, 1, C); mask token (D,) -> (1, D, 1, 1); LayerNorm scale -> weight.

timm names the same tensors differently (`stem.*`, `stages.i.downsample.*`,
`stages.i.blocks.j.{conv_dw, norm, mlp.fc1, mlp.grn.weight/bias (C,), mlp.fc2}`, `head.norm`,
`head.fc`) and stores fc1/fc2 as 1x1 convs (out, in, 1, 1) in atto..nano but as Linears
(out, in) from tiny up; timm has only the official 4x4 stem.

Any missing, unexpected or mis-shaped entry raises one ValueError that names every offender.
Expected shapes come from the widths the weights themselves agree on (a majority vote), so a
single corrupted tensor is reported rather than silently redefining the model.
"""
from __future__ import annotations

import collections
import re
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
import torch

from mmearth_jax import modalities as M
from mmearth_jax.interop.torch_convnextv2 import PRETRAIN_ENCODER_CLASSES, head_width
from mmearth_jax.interop.trees import flatten as _flatten, unflatten as _unflatten
from mmearth_jax.interop.trees import to_numpy as _to_numpy, to_torch as _to_torch

LAYOUTS = ("official", "mmearth", "timm")

# Shape templates: an int is fixed; (symbol, factor) is factor * value(symbol).
Dim = Any
_Entry = tuple  # (torch_key, flax_path, kind, shape_template)

_TO_TORCH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda a: a,
    "conv": lambda a: a.transpose(3, 2, 0, 1),
    "dw": lambda a: a.transpose(2, 0, 1)[:, None],
    "dense": lambda a: a.T,
    "conv1x1": lambda a: a.T[:, :, None, None],
    "grn": lambda a: a.reshape(1, 1, 1, -1),
    "token": lambda a: a.reshape(1, -1, 1, 1),
}
_TO_FLAX: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda a: a,
    "conv": lambda a: a.transpose(2, 3, 1, 0),
    "dw": lambda a: a[:, 0].transpose(1, 2, 0),
    "dense": lambda a: a.T,
    "conv1x1": lambda a: a[:, :, 0, 0].T,
    "grn": lambda a: a.reshape(-1),
    "token": lambda a: a.reshape(-1),
}
# The Flax rank each kind expects (None: any, i.e. the same as torch).
_FLAX_NDIM = {"copy": None, "conv": 4, "dw": 3, "dense": 2, "conv1x1": 2, "grn": 1, "token": 1}


def _d(sym: str, factor: int = 1) -> Dim:
  return (sym, factor)


# ---------------------------------------------------------------------------------------------
# Key specs: which torch key holds which Flax leaf, how it is laid out, and its torch shape.


def _norm(tk: str, fp: tuple, dim: Dim) -> list[_Entry]:
  return [(f"{tk}.weight", fp + ("scale",), "copy", (dim,)),
          (f"{tk}.bias", fp + ("bias",), "copy", (dim,))]


def _conv(tk: str, fp: tuple, out: Dim, inp: Dim, k: Dim) -> list[_Entry]:
  return [(f"{tk}.weight", fp + ("kernel",), "conv", (out, inp, k, k)),
          (f"{tk}.bias", fp + ("bias",), "copy", (out,))]


def _block(tk: str, fp: tuple, sym: str) -> list[_Entry]:
  d, d4 = _d(sym), _d(sym, 4)
  return [(f"{tk}.dwconv.weight", fp + ("dwconv", "kernel"), "dw", (d, 1, 7, 7)),
          (f"{tk}.dwconv.bias", fp + ("dwconv", "bias"), "copy", (d,)),
          *_norm(f"{tk}.norm", fp + ("norm",), d),
          (f"{tk}.pwconv1.weight", fp + ("pwconv1", "kernel"), "dense", (d4, d)),
          (f"{tk}.pwconv1.bias", fp + ("pwconv1", "bias"), "copy", (d4,)),
          (f"{tk}.grn.gamma", fp + ("grn", "gamma"), "grn", (1, 1, 1, d4)),
          (f"{tk}.grn.beta", fp + ("grn", "beta"), "grn", (1, 1, 1, d4)),
          (f"{tk}.pwconv2.weight", fp + ("pwconv2", "kernel"), "dense", (d, d4)),
          (f"{tk}.pwconv2.bias", fp + ("pwconv2", "bias"), "copy", (d,))]


def _timm_block(tk: str, fp: tuple, sym: str, conv_mlp: bool) -> list[_Entry]:
  d, d4 = _d(sym), _d(sym, 4)
  # atto..nano hold the pointwise layers as 1x1 convs, the larger models as Linears.
  kind = "conv1x1" if conv_mlp else "dense"
  tail = (1, 1) if conv_mlp else ()
  return [(f"{tk}.conv_dw.weight", fp + ("dwconv", "kernel"), "dw", (d, 1, 7, 7)),
          (f"{tk}.conv_dw.bias", fp + ("dwconv", "bias"), "copy", (d,)),
          *_norm(f"{tk}.norm", fp + ("norm",), d),
          (f"{tk}.mlp.fc1.weight", fp + ("pwconv1", "kernel"), kind, (d4, d) + tail),
          (f"{tk}.mlp.fc1.bias", fp + ("pwconv1", "bias"), "copy", (d4,)),
          (f"{tk}.mlp.grn.weight", fp + ("grn", "gamma"), "copy", (d4,)),
          (f"{tk}.mlp.grn.bias", fp + ("grn", "beta"), "copy", (d4,)),
          (f"{tk}.mlp.fc2.weight", fp + ("pwconv2", "kernel"), kind, (d, d4) + tail),
          (f"{tk}.mlp.fc2.bias", fp + ("pwconv2", "bias"), "copy", (d,))]


def _timm_spec(depths: Sequence[int], head: bool, conv_mlp: bool, tp: str = "",
               fp: tuple = ()) -> list[_Entry]:
  """timm's keys in its own state-dict order: stem, then per stage downsample and blocks."""
  dims = [_d(f"d{i}") for i in range(4)]
  out = _conv(f"{tp}stem.0", fp + ("stem_conv",), dims[0], _d("in"), 4)
  out += _norm(f"{tp}stem.1", fp + ("stem_norm",), dims[0])
  for i, depth in enumerate(depths):
    if i > 0:  # timm's stage 0 has no downsample: the stem already did it
      out += _norm(f"{tp}stages.{i}.downsample.0", fp + (f"downsample_{i}_norm",), dims[i - 1])
      out += _conv(f"{tp}stages.{i}.downsample.1", fp + (f"downsample_{i}_conv",), dims[i],
                   dims[i - 1], 2)
    for j in range(depth):
      out += _timm_block(f"{tp}stages.{i}.blocks.{j}", fp + (f"stage_{i}_block_{j}",), f"d{i}",
                         conv_mlp)
  out += _norm(f"{tp}head.norm", fp + ("norm",), dims[3])  # the LayerNorm after pooling
  if head:
    out += [(f"{tp}head.fc.weight", fp + ("head", "kernel"), "dense", (_d("nc"), dims[3])),
            (f"{tp}head.fc.bias", fp + ("head", "bias"), "copy", (_d("nc"),))]
  return out


def _encoder_spec(layout: str, depths: Sequence[int], head: bool, tp: str = "",
                  fp: tuple = (), conv_mlp: bool = False) -> list[_Entry]:
  """Entries of an encoder; `tp` / `fp` prefix the torch keys / Flax paths. `conv_mlp` only
  matters for the timm layout (1x1-conv pointwise layers)."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
  if layout == "timm":
    return _timm_spec(depths, head, conv_mlp, tp, fp)
  dims = [_d(f"d{i}") for i in range(4)]
  out: list[_Entry] = []
  if layout == "official":
    out += _conv(f"{tp}downsample_layers.0.0", fp + ("stem_conv",), dims[0], _d("in"), 4)
    out += _norm(f"{tp}downsample_layers.0.1", fp + ("stem_norm",), dims[0])
    transition = lambda i: f"{tp}downsample_layers.{i}"  # noqa: E731
  else:
    out += _conv(f"{tp}initial_conv.0", fp + ("initial_conv",), dims[0], _d("in"), 3)
    out += _norm(f"{tp}initial_conv.1", fp + ("initial_norm",), dims[0])
    out += _conv(f"{tp}stem.0", fp + ("stem_conv",), dims[0], 1, _d("k"))  # depthwise
    out += _norm(f"{tp}stem.1", fp + ("stem_norm",), dims[0])
    transition = lambda i: f"{tp}downsample_layers.{i - 1}"  # noqa: E731
  for i in range(1, 4):
    out += _norm(f"{transition(i)}.0", fp + (f"downsample_{i}_norm",), dims[i - 1])
    out += _conv(f"{transition(i)}.1", fp + (f"downsample_{i}_conv",), dims[i], dims[i - 1], 2)
  for i, depth in enumerate(depths):
    for j in range(depth):
      out += _block(f"{tp}stages.{i}.{j}", fp + (f"stage_{i}_block_{j}",), f"d{i}")
  out += _norm(f"{tp}norm", fp + ("norm",), dims[3])
  if head:
    out += [(f"{tp}head.weight", fp + ("head", "kernel"), "dense", (_d("nc"), dims[3])),
            (f"{tp}head.bias", fp + ("head", "bias"), "copy", (_d("nc"),))]
  return out


def _mp_mae_spec(layout: str, depths: Sequence[int], outputs: Mapping[str, Sequence[str]],
                 patch_size: int) -> list[_Entry]:
  out = _encoder_spec(layout, depths, False, "encoder.", ("encoder",))
  dd = _d("D")
  out += [("proj.weight", ("proj", "kernel"), "conv1x1", (dd, _d("d3"), 1, 1)),
          ("proj.bias", ("proj", "bias"), "copy", (dd,)),
          ("mask_token", ("mask_token",), "token", (1, dd, 1, 1))]
  image_level = False
  for name, bands in outputs.items():
    # The reference's decoder_dict repeats the one shared block under every modality.
    out += _block(f"decoder_dict.{name}.0", ("decoder",), "D")
    fp = (f"head_{name}",)
    w = head_width(name, bands, patch_size)
    if M.get(name).level == M.PIXEL:
      out += [(f"pred_dict.{name}.weight", fp + ("kernel",), "conv1x1", (w, dd, 1, 1))]
    else:
      image_level = True
      out += [(f"pred_dict.{name}.weight", fp + ("kernel",), "dense", (w, dd))]
    out += [(f"pred_dict.{name}.bias", fp + ("bias",), "copy", (w,))]
  if image_level:
    out += _norm("layer_norm_tmp", ("image_norm",), dd)
  out += [("loss_fn.log_vars", ("log_vars",), "copy", (len(outputs),))]
  return out


# ---------------------------------------------------------------------------------------------
# Shapes: infer the widths by majority vote, then check every tensor against them.


def _infer(shapes: Mapping[str, tuple], spec: Sequence[_Entry]) -> dict[str, int]:
  votes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for tk, _, _, tmpl in spec:
    shape = shapes.get(tk)
    if shape is None or len(shape) != len(tmpl):
      continue
    for t, s in zip(tmpl, shape):
      if isinstance(t, tuple) and s % t[1] == 0:
        votes[t[0]][s // t[1]] += 1
  return {sym: c.most_common(1)[0][0] for sym, c in votes.items()}


def _resolve(tmpl: tuple, sizes: Mapping[str, int]) -> tuple | None:
  out = []
  for t in tmpl:
    if isinstance(t, tuple):
      if t[0] not in sizes:
        return None
      out.append(t[1] * sizes[t[0]])
    else:
      out.append(t)
  return tuple(out)


def raise_problems(what: str, problems: Sequence[str]) -> None:
  """Raises one ValueError listing every problem, if there are any."""
  if problems:
    lines = "\n  ".join(problems)
    raise ValueError(f"{what}: {len(problems)} problem(s):\n  {lines}")


def _path(p: tuple) -> str:
  return "/".join(p)


def _unwrap_params(params: Mapping) -> Mapping:
  if set(params) == {"params"}:
    return params["params"]
  return params


def _unwrap_state_dict(state_dict: Mapping) -> Mapping:
  if "model" in state_dict and isinstance(state_dict["model"], Mapping):
    return state_dict["model"]  # checkpoint files wrap the state dict under "model"
  return state_dict


def _flax_to_torch(flat: Mapping[tuple, Any], spec: Sequence[_Entry], what: str
                   ) -> dict[str, torch.Tensor]:
  problems = []
  wanted = {fp for _, fp, _, _ in spec}
  problems += [f"unexpected: {_path(p)}" for p in flat if p not in wanted]
  converted: dict[str, np.ndarray] = {}
  for tk, fp, kind, _ in spec:
    if fp not in flat:
      problems.append(f"missing: {_path(fp)} (-> {tk})")
      continue
    a = _to_numpy(flat[fp])
    nd = _FLAX_NDIM[kind]
    if nd is not None and a.ndim != nd:
      problems.append(f"mis-shaped: {_path(fp)} (-> {tk}) has shape {a.shape}, needs rank {nd}")
      continue
    converted[tk] = _TO_TORCH[kind](a)
  sizes = _infer({k: v.shape for k, v in converted.items()}, spec)
  reported = set()
  for tk, fp, _, tmpl in spec:
    if tk in converted and fp not in reported:
      want = _resolve(tmpl, sizes)
      if want is not None and converted[tk].shape != want:
        reported.add(fp)  # an aliased leaf (the shared decoder) is named once
        problems.append(f"mis-shaped: {_path(fp)} (-> {tk}) gives torch shape "
                        f"{tuple(converted[tk].shape)}, expected {want}")
  raise_problems(what, problems)
  return {tk: _to_torch(a) for tk, a in converted.items()}


def _torch_to_flax(state_dict: Mapping[str, Any], spec: Sequence[_Entry], what: str) -> dict:
  problems = []
  wanted = {tk for tk, _, _, _ in spec}
  problems += [f"unexpected: {k}" for k in state_dict if k not in wanted]
  problems += [f"missing: {tk} (-> {_path(fp)})" for tk, fp, _, _ in spec if tk not in state_dict]
  arrays = {k: _to_numpy(v) for k, v in state_dict.items() if k in wanted}
  sizes = _infer({k: a.shape for k, a in arrays.items()}, spec)
  ok = {}
  for tk, fp, kind, tmpl in spec:
    if tk not in arrays:
      continue
    want = _resolve(tmpl, sizes)
    a = arrays[tk]
    if (want is not None and a.shape != want) or a.ndim != len(tmpl):
      problems.append(f"mis-shaped: {tk} has shape {tuple(a.shape)}, expected "
                      f"{want if want is not None else f'rank {len(tmpl)}'}")
      continue
    b = _TO_FLAX[kind](a)
    if fp in ok and not np.array_equal(ok[fp][1], b):
      # Aliases of one Flax leaf (the shared decoder block) must hold the same weights.
      problems.append(f"differs: {tk} != {ok[fp][0]} (both are {_path(fp)})")
      continue
    ok.setdefault(fp, (tk, b))
  raise_problems(what, problems)
  return _unflatten({fp: jnp.asarray(b) for fp, (_, b) in ok.items()})


def depths_from_flax(flat: Mapping[tuple, Any], prefix: tuple = ()) -> list[int]:
  """The 4 stage depths of the ConvNeXt V2 in flat Flax params (under `prefix`)."""
  depths = [0] * 4
  pat = re.compile(r"stage_(\d)_block_(\d+)$")
  for p in flat:
    if len(p) > len(prefix) and p[:len(prefix)] == prefix:
      m = pat.match(p[len(prefix)])
      if m and int(m.group(1)) < 4:
        depths[int(m.group(1))] = max(depths[int(m.group(1))], int(m.group(2)) + 1)
  return depths


def _depths_from_torch(keys: Sequence[str], prefix: str = "", timm: bool = False) -> list[int]:
  depths = [0] * 4
  pat = re.compile(re.escape(prefix) + (r"stages\.(\d)\.blocks\.(\d+)\." if timm
                                        else r"stages\.(\d)\.(\d+)\."))
  for k in keys:
    m = pat.match(k)
    if m and int(m.group(1)) < 4:
      depths[int(m.group(1))] = max(depths[int(m.group(1))], int(m.group(2)) + 1)
  return depths


# ---------------------------------------------------------------------------------------------
# Public API.


def timm_conv_mlp_default(dims: Sequence[int]) -> bool:
  """timm's choice for `convnextv2_*`: 1x1-conv pointwise layers for atto..nano (dims[0] <= 80),
  Linears from tiny up."""
  return int(dims[0]) <= 80


def flax_to_torch(params: Mapping, layout: str, *, conv_mlp: bool | None = None
                  ) -> dict[str, torch.Tensor]:
  """ConvNeXt V2 encoder params (Flax) -> a PyTorch state dict in `layout` ("official" for the
  4x4 stem, "mmearth" for MMEarth's stem, "timm" for timm's names; timm has only the 4x4 stem).
  A `{"params": ...}` wrapper is accepted.

  `conv_mlp` (timm only): write fc1/fc2 as 1x1 convs (out, in, 1, 1) rather than Linears;
  default as timm's models of this width (`timm_conv_mlp_default`).
  """
  flat = _flatten(_unwrap_params(params))
  if layout == "timm":
    if ("initial_conv", "kernel") in flat:
      raise ValueError("layout 'timm' has only the official 4x4 stem, but this model uses "
                       "MMEarth's stem (initial_conv + depthwise stem conv); export it with "
                       "layout 'mmearth' instead")
    if conv_mlp is None:
      stem = flat.get(("stem_conv", "kernel"))
      conv_mlp = timm_conv_mlp_default([np.shape(stem)[-1]]) if stem is not None else False
  spec = _encoder_spec(layout, depths_from_flax(flat), ("head", "kernel") in flat,
                       conv_mlp=bool(conv_mlp))
  return _flax_to_torch(flat, spec, f"flax_to_torch(layout={layout!r})")


def _timm_conv_mlp_of(sd: Mapping[str, Any], prefix: str = "") -> bool:
  """Whether a timm state dict holds its pointwise layers as 1x1 convs (rank-4 fc1)."""
  pat = re.compile(re.escape(prefix) + r"stages\.\d\.blocks\.\d+\.mlp\.fc1\.weight$")
  for k, v in sd.items():
    if pat.match(k):
      return len(np.shape(v)) == 4
  return False


def torch_to_flax(state_dict: Mapping[str, Any], layout: str) -> dict:
  """A PyTorch ConvNeXt V2 state dict in `layout` -> Flax params (a plain nested dict). A
  checkpoint's `{"model": state_dict}` wrapper is accepted; the timm layout takes fc1/fc2 as
  Linears or as 1x1 convs."""
  sd = _unwrap_state_dict(state_dict)
  if layout == "timm":
    spec = _encoder_spec(layout, _depths_from_torch(list(sd), timm=True), "head.fc.weight" in sd,
                         conv_mlp=_timm_conv_mlp_of(sd))
  else:
    spec = _encoder_spec(layout, _depths_from_torch(list(sd)), "head.weight" in sd)
  return _torch_to_flax(sd, spec, f"torch_to_flax(layout={layout!r})")


def _stem_layout(has_initial_conv: bool) -> str:
  return "mmearth" if has_initial_conv else "official"


def patch_size_from(outputs: Mapping[str, Sequence[str]], widths: Mapping[str, int]) -> int:
  """The patch size implied by the first pixel head's width (p*p*C)."""
  for name, bands in outputs.items():
    if M.get(name).level == M.PIXEL and name in widths:
      return int(round((widths[name] / head_width(name, bands, 1)) ** 0.5))
  return 1  # no pixel head: the patch size does not enter any shape


def mp_mae_flax_to_torch(params: Mapping, outputs: Mapping[str, Sequence[str]]
                         ) -> dict[str, torch.Tensor]:
  """Full MP-MAE params (Flax `MPMAE`) -> the reference's PyTorch state dict (`MPMAETorch`).

  `outputs`: {modality: bands} as given to `MPMAE`; its order is the order of
  `loss_fn.log_vars`. The shared decoder block is written under every
  `decoder_dict.<modality>.0.*`, as the reference's checkpoints hold it. The encoder's unused
  classifier `encoder.head.*` (PRETRAIN_ENCODER_CLASSES x width) is written as zeros, so that the
  file loads with `strict=True` into upstream's FCMAE.
  """
  flat = _flatten(_unwrap_params(params))
  layout = _stem_layout(("encoder", "initial_conv", "kernel") in flat)
  widths = {n: np.shape(flat[(f"head_{n}", "kernel")])[-1] for n in outputs
            if (f"head_{n}", "kernel") in flat}
  spec = _mp_mae_spec(layout, depths_from_flax(flat, ("encoder",)), outputs,
                      patch_size_from(outputs, widths))
  converted = _flax_to_torch(flat, spec, "mp_mae_flax_to_torch")
  out: dict[str, torch.Tensor] = {}
  for key, value in converted.items():
    out[key] = value
    if key == "encoder.norm.bias":  # upstream's order: the head follows the final norm
      width = value.shape[0]
      out["encoder.head.weight"] = torch.zeros(PRETRAIN_ENCODER_CLASSES, width, dtype=value.dtype)
      out["encoder.head.bias"] = torch.zeros(PRETRAIN_ENCODER_CLASSES, dtype=value.dtype)
  return out


def mp_mae_torch_to_flax(state_dict: Mapping[str, Any], outputs: Mapping[str, Sequence[str]]
                         ) -> dict:
  """The reference's MP-MAE state dict -> Flax `MPMAE` params; the repeated decoder blocks
  must be identical (they are one shared block). `encoder.head.*` (unused) is dropped."""
  sd = _unwrap_state_dict(state_dict)
  # The encoder's classifier is never trained in pretraining; the Flax MPMAE has none.
  sd = {k: v for k, v in sd.items() if not k.startswith("encoder.head.")}
  layout = _stem_layout("encoder.initial_conv.0.weight" in sd)
  widths = {n: int(np.shape(sd[f"pred_dict.{n}.weight"])[0]) for n in outputs
            if f"pred_dict.{n}.weight" in sd}
  spec = _mp_mae_spec(layout, _depths_from_torch(list(sd), "encoder."), outputs,
                      patch_size_from(outputs, widths))
  return _torch_to_flax(sd, spec, "mp_mae_torch_to_flax")


# ---------------------------------------------------------------------------------------------
# Sparse (MinkowskiEngine) pretraining checkpoints -> the dense layouts.
#
# FCMAE pretraining (ConvNeXt V2's ImageNet FCMAE files, MMEarth's MP-MAE files) runs the encoder
# with MinkowskiEngine sparse layers, whose parameters are stored differently from the dense
# model's:
#   MinkowskiConvolution           `<m>.kernel` (k*k, in, out), `<m>.bias` (1, out)
#   MinkowskiDepthwiseConvolution  `<m>.kernel` (k*k, C),       `<m>.bias` (1, C)
#   MinkowskiLayerNorm / Linear    an inner `nn.LayerNorm` / `nn.Linear`: `<m>.ln.*`, `<m>.linear.*`
#   MinkowskiGRN                   `gamma` / `beta` (1, C)
# The kernel-offset index runs over the first spatial axis fastest: dense weight[o, i, h, w] =
# kernel[w * k + h, i, o]. Source: the ConvNeXt V2 authors' `remap_checkpoint_keys` (utils.py of
# facebookresearch/ConvNeXt-V2), which fine-tuning uses to load FCMAE weights into the dense model:
# kernel.permute(2, 1, 0).reshape(out, in, k, k).transpose(3, 2); MMEarth's helpers.py holds the
# same function. (MinkowskiEngine itself is not needed here; the test suite checks the rule
# against a direct evaluation of the sparse conv sum.)


def _sparse_kernel_to_dense(kernel: np.ndarray, key: str) -> np.ndarray:
  kk = kernel.shape[0]
  k = int(round(kk ** 0.5))
  if k * k != kk:
    raise ValueError(f"{key}: {kk} kernel offsets is not a square k*k kernel")
  if kernel.ndim == 3:  # (k*k, in, out): offset index w*k + h
    return kernel.reshape(k, k, *kernel.shape[1:]).transpose(3, 2, 1, 0)  # -> (out, in, h, w)
  if kernel.ndim == 2:  # depthwise (k*k, C) -> (C, 1, h, w)
    return kernel.reshape(k, k, kernel.shape[1]).transpose(2, 1, 0)[:, None]
  raise ValueError(f"{key}: a sparse kernel has rank 2 or 3, got shape {kernel.shape}")


def is_sparse(state_dict: Mapping[str, Any], prefix: str = "encoder.") -> bool:
  """Whether `state_dict` holds a MinkowskiEngine (sparse) encoder under `prefix`."""
  return any(k.startswith(prefix) and k.endswith(".kernel") for k in state_dict)


def sparse_to_dense(state_dict: Mapping[str, Any], prefix: str = "encoder.") -> dict[str, Any]:
  """The keys under `prefix` of a sparse-conv pretraining state dict renamed and reshaped to the
  dense model's layout (official ConvNeXt V2 / MMEarth); other keys are passed through. Dense
  layers in the sparse encoder (FCMAE's stem) are left as they are."""
  out: dict[str, Any] = {}
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      out[key] = value
      continue
    a = _to_numpy(value)
    parts = key.split(".")
    if parts[-1] == "kernel":
      out[".".join(parts[:-1] + ["weight"])] = _sparse_kernel_to_dense(a, key)
      continue
    if len(parts) >= 3 and parts[-2] in ("ln", "linear"):
      parts = parts[:-2] + parts[-1:]  # the Minkowski wrapper's inner module
    name = ".".join(parts)
    if ".grn." in name and a.ndim == 2:
      a = a.reshape(1, 1, 1, -1)  # (1, C) -> the dense GRN's (1, 1, 1, C)
    elif parts[-1] == "bias" and a.ndim == 2 and a.shape[0] == 1:
      a = a.reshape(-1)  # Minkowski conv biases are (1, C)
    out[name] = a
  return out


def orig_stem_to_official(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """MMEarth's `use_orig_stem` variant (`stem_orig.{0 conv, 1 LayerNorm}` then transitions
  `downsample_layers.{0,1,2}`) renamed to the official layout (stem `downsample_layers.0`,
  transitions 1..3). Only a 4x4 stem (patch size 32) exists in the official model."""
  conv = state_dict.get(f"{prefix}stem_orig.0.weight")
  if conv is None:
    return dict(state_dict)
  k = np.shape(conv)[-1]
  if k != 4:
    raise ValueError(f"{prefix}stem_orig.0.weight is a {k}x{k} stem (MMEarth use_orig_stem with "
                     f"patch size {8 * k}); only the 4x4 official stem (patch size 32) is "
                     "supported")
  out = {}
  pat = re.compile(re.escape(prefix) + r"downsample_layers\.(\d)\.(.*)$")
  for key, v in state_dict.items():
    if key.startswith(f"{prefix}stem_orig."):
      key = f"{prefix}downsample_layers.0." + key[len(f"{prefix}stem_orig."):]
    elif (m := pat.match(key)):
      key = f"{prefix}downsample_layers.{int(m.group(1)) + 1}.{m.group(2)}"
    out[key] = v
  return out
