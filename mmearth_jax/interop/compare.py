"""The same embedding from JAX and from the plain-PyTorch reference on an exported file.

`mmearth-jax to-torch --check` and `make demo` use this to show an export is faithful: the file
is read back as a PyTorch user would (weights only), loaded strictly into the reference module
of its layout, and run on the same image as the Flax encoder.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from mmearth_jax.interop import torch_convnextv2 as tc
from mmearth_jax.interop import torch_vit as tv
from mmearth_jax.interop import torch_io


def torch_encoder(spec: Mapping[str, Any], layout: str, image_hw: tuple[int, int]
                  ) -> torch.nn.Module:
  """The reference encoder module whose state-dict layout is `layout`."""
  if spec["arch"] in ("convnextv2", "mp_mae"):
    common = dict(in_chans=int(spec["in_chans"]), depths=spec["depths"], dims=spec["dims"],
                  num_classes=int(spec.get("num_classes", 0)))
    if layout == "mmearth":
      return tc.ConvNeXtV2MMEarth(patch_size=int(spec["patch_size"]), **common)
    if layout == "official":
      return tc.ConvNeXtV2Official(patch_size=int(spec["patch_size"]), **common)
    if layout == "timm":
      return tc.ConvNeXtV2Timm(**common)
  elif spec["arch"] in ("vit", "mae", "scale_mae") and layout in ("timm", "mae", "scale_mae"):
    return tv.TorchViT(img_size=image_hw, patch_size=int(spec["patch_size"]),
                       in_chans=int(spec["in_chans"]), embed_dim=int(spec["embed_dim"]),
                       depth=int(spec["depth"]), num_heads=int(spec["num_heads"]),
                       mlp_ratio=float(spec.get("mlp_ratio", 4.0)))
  raise ValueError(f"no reference module for arch {spec['arch']!r} in layout {layout!r}")


def _tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
  return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def torch_features(spec: Mapping[str, Any], path: str, layout: str, images: np.ndarray
                   ) -> np.ndarray:
  """Embeddings of `images` (N, H, W, C) by the reference module loaded from the file `path`."""
  state = torch_io.load_state_dict(path)
  if spec["arch"] == "mp_mae" and layout == "mmearth":
    # The whole file loads strictly into the reference MP-MAE (upstream's key set); its encoder
    # gives the embedding.
    full = tc.MPMAETorch(spec["outputs"], in_chans=int(spec["in_chans"]), stem=spec["stem"],
                         patch_size=int(spec["patch_size"]), decoder_dim=int(spec["decoder_dim"]),
                         depths=spec["depths"], dims=spec["dims"])
    full.load_state_dict(_tensors(state), strict=True)
    model = full.encoder
  else:
    model = torch_encoder(spec, layout, images.shape[1:3])
    if spec["arch"] in ("vit", "mae", "scale_mae"):
      # The reference computes its own sin-cos table for this image size (Scale-MAE's at GSD 1,
      # the scale our `embed` uses by default); keep encoder keys only.
      own = set(model.state_dict())
      state = {k: v for k, v in state.items() if k in own and k != "pos_embed"}
      state["pos_embed"] = model.pos_embed.detach().numpy()
    model.load_state_dict(_tensors(state), strict=True)
  model.eval()
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32))
  with torch.no_grad():
    if spec["arch"] in ("vit", "mae", "scale_mae"):
      return model.forward_encoder(x)[:, 0].numpy()
    return model.forward_features(x).numpy()


def side_by_side(jax_vec: np.ndarray, torch_vec: np.ndarray, width: int = 8) -> str:
  """A short table of the first `width` embedding values and the largest relative difference."""
  rel = float(np.max(np.abs(jax_vec - torch_vec)) / (np.max(np.abs(torch_vec)) + 1e-12))
  rows = ["  dim      JAX (Flax)     PyTorch"]
  rows += [f"  {i:<4} {a:+13.6f} {b:+13.6f}" for i, (a, b) in
           enumerate(zip(jax_vec[:width], torch_vec[:width]))]
  rows.append(f"  ... {len(jax_vec)} dims; max |JAX - PyTorch| / max |PyTorch| = {rel:.2e}")
  return "\n".join(rows)
