"""Encoder + dense projector for dense contrastive pretraining ("Embedding Earth").

Only the Embedding Earth paper's abstract is public and no code was released, so this is our
design in the spirit of DenseCL (Wang et al. 2021), PixPro (Xie et al. 2021) and VADeR
(Pinheiro et al. 2020): a ConvNeXt V2 encoder (parameters under `encoder`, exactly a
`ConvNeXtV2`'s, so evaluation, export and `init_from` read them as for MP-MAE) whose feature map
at `feature_stage` goes through a projector of 1 x 1 convolutions (DenseCL's dense head) giving
one embedding per feature cell. The loss is in `objectives/dense_contrastive.py`.

The projector's hidden layers are 1x1 conv -> LayerNorm -> GELU. DenseCL's head has no norm and
PixPro's uses BatchNorm; LayerNorm keeps the state free of batch statistics (the trainer has no
mutable collections) and matches ConvNeXt's own normalisation.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmearth_jax.models.convnextv2 import VARIANTS, ConvNeXtV2, LayerNorm, gelu, stage_geometries

_init = nn.initializers.truncated_normal(0.02)


class DenseProjector(nn.Module):
  """`num_layers` 1x1 convolutions (hidden: conv -> LayerNorm -> GELU), applied per cell."""
  hidden_dim: int = 2048
  out_dim: int = 128
  num_layers: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    n, h, w, c = x.shape
    y = x.reshape(n * h * w, c)  # a 2-D matmul: XLA:CPU runs 4-D Dense markedly slower
    for i in range(self.num_layers - 1):
      y = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=_init, name=f"conv_{i}")(y)
      y = gelu(LayerNorm(dtype=self.dtype, name=f"norm_{i}")(y))
    y = nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=_init,
                 name=f"conv_{self.num_layers - 1}")(y)
    return y.reshape(n, h, w, self.out_dim)


class DenseContrastive(nn.Module):
  """ConvNeXt V2 encoder + dense projector. `__call__` maps images (N, H, W, C) to projected,
  unnormalised embeddings (N, h, w, projector_dim) of the cells of stage `feature_stage`
  (1..4; strides 4/8/16/32 with the official stem, 1/2/4/8 x patch_size/8 with MMEarth's)."""
  variant: str = "atto"
  depths: Sequence[int] | None = None  # override the variant's (small test models)
  dims: Sequence[int] | None = None
  stem: str = "mmearth"
  patch_size: int = 16
  drop_path_rate: float = 0.0
  feature_stage: int = 4
  projector_hidden_dim: int = 2048
  projector_dim: int = 128
  projector_layers: int = 2
  dwconv_impl: str = "auto"
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    depths, dims = VARIANTS[self.variant]
    self.encoder = ConvNeXtV2(self.depths or depths, self.dims or dims, self.stem,
                              self.patch_size, self.drop_path_rate, dwconv_impl=self.dwconv_impl,
                              dtype=self.dtype, remat=self.remat)
    self.projector = DenseProjector(self.projector_hidden_dim, self.projector_dim,
                                    self.projector_layers, self.dtype)

  def __call__(self, images: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    stages = self.encoder(images, train=train, return_stages=True)
    return self.projector(stages[self.feature_stage - 1]).astype(jnp.float32)

  def cell_centres(self, image_size: int) -> tuple[np.ndarray, float, int]:
    """(centres (size,), stride, size) of the feature cells along one axis of a square input, in
    its continuous pixel coordinates (pixel q covers [q, q + 1)), from the stem's geometry."""
    g = stage_geometries(image_size, self.stem, self.patch_size)[self.feature_stage - 1]
    return g.a + g.b * np.arange(g.size, dtype=np.float64), float(g.b), int(g.size)


def init_params(model: DenseContrastive, rng: jax.Array, images: jnp.ndarray) -> Any:
  """Parameters of `model` from one example of `images` (N, H, W, C); the network is fully
  convolutional, so they do not depend on the size. The encoder's pooled-feature norm is created
  too (`ConvNeXtV2` makes it at init), so `params["encoder"]` is a complete encoder."""
  x = jnp.zeros((1, *images.shape[1:]), jnp.float32)
  return model.init({"params": rng}, x, train=False)["params"]
