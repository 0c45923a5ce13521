"""Vision Transformer encoder and the MAE (He et al. 2022) pretraining model, in Flax Linen.

The layout follows the timm / MAE ViT that checkpoints are published in (`interop/torch_vit.py`
holds the PyTorch reference and the weight conversion): a p x p patch-embedding conv, a CLS token,
a FIXED 2-D sin-cos position embedding (not a parameter: it is recomputed for the grid of each
input, so any input size that is a multiple of the patch works, and Scale-MAE can rescale it per
sample), pre-norm blocks (LayerNorm eps 1e-6, qkv with bias, exact-erf GELU MLP, optional drop
path) and a final LayerNorm.

MAE masking keeps a static number K of patch tokens per sample, so every shape is static and one
compilation serves every mask: the encoder gathers the kept tokens (`ops.gather_tokens`), the
decoder scatters them back among mask tokens (`ops.scatter_tokens`, MAE's concat + unshuffle).
SimMIM masking (GFM's student, `models/gfm.py`) instead keeps every token and replaces the patch
embeddings of masked patches by a mask token the caller owns (`patch_mask` + `mask_token`), and
`return_blocks` hands out intermediate block outputs (GFM distils the next-to-last one).

Parameter trees (plain nested dicts) mirror the PyTorch names: `patch_embed`, `cls_token`
(1, 1, D), `blocks_<i>/{norm1, attn/{qkv, proj}, norm2, mlp/{fc1, fc2}}`, `norm`; the MAE nests
the encoder under `encoder` and adds `mask_token` (1, 1, Dd), `decoder_embed`,
`decoder_blocks_<i>`, `decoder_norm`, `decoder_pred`. Params are float32; `dtype` is the compute
dtype (e.g. bfloat16). Attention softmax and LayerNorm statistics run in float32 regardless.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmearth_jax.models.variants import VIT
from mmearth_jax.models.posenc import sincos_2d
from mmearth_jax.ops.masked_tokens import gather_tokens, random_masking, scatter_tokens

Dtype = Any

# (embed_dim, depth, num_heads); mlp ratio 4 for all.
VIT_VARIANTS = VIT

LN_EPS = 1e-6
# MAE's init: xavier-uniform Linears with zero bias, N(0, 0.02) tokens, and the patch conv
# initialised as a Linear over its flattened (p * p * C) input, i.e. fan_in = p*p*C, fan_out = D.
_xavier = nn.initializers.xavier_uniform()
_patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2),
                                               out_axis=-1)
token_init = nn.initializers.normal(0.02)


def gelu(x: jnp.ndarray) -> jnp.ndarray:
  return nn.gelu(x, approximate=False)  # torch's nn.GELU default is the exact erf form


def layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


def dense(features: int, name: str, dtype: Dtype) -> nn.Dense:
  return nn.Dense(features, kernel_init=_xavier, bias_init=nn.initializers.zeros, dtype=dtype,
                  param_dtype=jnp.float32, name=name)


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
  """(grid_h, grid_w) of patches; the input must tile exactly."""
  if height % patch_size or width % patch_size:
    raise ValueError(f"input {height}x{width} is not a multiple of the patch size {patch_size}")
  return height // patch_size, width // patch_size


def patch_mask(ids_keep: jnp.ndarray, length: int) -> jnp.ndarray:
  """(N, L) float32 mask from the kept ids: 1 = removed (MAE's convention), 0 = kept."""
  n = ids_keep.shape[0]
  rows = jnp.arange(n)[:, None]
  return jnp.ones((n, length), jnp.float32).at[rows, ids_keep].set(0.0)


def patchify(images: jnp.ndarray, patch_size: int) -> jnp.ndarray:
  """(N, H, W, C) -> (N, L, p*p*C); within a patch the order is (row, column, channel) as in MAE."""
  n, h, w, c = images.shape
  gh, gw = patch_grid(h, w, patch_size)
  p = patch_size
  x = images.reshape(n, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, gh * gw, p * p * c)


def unpatchify(patches: jnp.ndarray, patch_size: int, grid_h: int, grid_w: int) -> jnp.ndarray:
  """Inverse of `patchify`: (N, L, p*p*C) -> (N, grid_h*p, grid_w*p, C)."""
  n, _, pd = patches.shape
  p = patch_size
  c = pd // (p * p)
  x = patches.reshape(n, grid_h, grid_w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, grid_h * p, grid_w * p, c)


def mae_loss(images: jnp.ndarray, pred: jnp.ndarray, mask: jnp.ndarray,
             norm_pix_loss: bool = False) -> jnp.ndarray:
  """MAE reconstruction loss: per-patch MSE averaged over the REMOVED patches (mask == 1).

  images (N, H, W, C); pred (N, L, p*p*C) (the patch size is read off pred's width); mask (N, L).
  With `norm_pix_loss` each target patch is normalised by its own mean and UNBIASED variance
  (torch's `var` default, as in MAE's code and MMEarth's Sentinel-2 target) plus eps 1e-6.
  Computed in float32.
  """
  n, h, w, c = images.shape
  p = int(round((pred.shape[-1] // c) ** 0.5))
  if p * p * c != pred.shape[-1]:
    raise ValueError(f"pred width {pred.shape[-1]} is not p*p*C for C={c}")
  target = patchify(images.astype(jnp.float32), p)
  if norm_pix_loss:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


class DropPath(nn.Module):
  """Stochastic depth: drop the whole residual branch per sample with probability `rate`."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, deterministic: bool) -> jnp.ndarray:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    alive = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(alive, x / keep, jnp.zeros_like(x))


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection laid out [3][heads][head_dim]."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    n, t, d = x.shape
    h = self.num_heads
    if d % h:
      raise ValueError(f"width {d} is not divisible by {h} heads")
    qkv = dense(3 * d, "qkv", self.dtype)(x).reshape(n, t, 3, h, d // h)
    # (N, heads, T, head_dim) each: heads-major batched matmuls run ~1.7x faster on XLA:CPU than
    # jax.nn.dot_product_attention's (N, T, heads, head_dim) einsums, and the same elsewhere.
    q, k, v = (jnp.swapaxes(qkv[:, :, i], 1, 2) for i in range(3))
    logits = (q @ jnp.swapaxes(k, -1, -2)) * jnp.asarray((d // h) ** -0.5, q.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)  # f32 softmax
    out = jnp.swapaxes(probs @ v, 1, 2)
    return dense(d, "proj", self.dtype)(out.reshape(n, t, d))


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = gelu(dense(self.hidden, "fc1", self.dtype)(x))
    return dense(x.shape[-1], "fc2", self.dtype)(y)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    d = x.shape[-1]
    drop = DropPath(self.drop_path)
    y = Attention(self.num_heads, self.dtype, name="attn")(layer_norm("norm1", self.dtype)(x))
    x = x + drop(y, deterministic=not train)
    y = Mlp(int(d * self.mlp_ratio), self.dtype, name="mlp")(layer_norm("norm2", self.dtype)(x))
    return x + drop(y, deterministic=not train)


def block_class(remat: bool) -> type[nn.Module]:
  """Block, or Block whose activations are recomputed in the backward pass (`train` static)."""
  return nn.remat(Block, static_argnums=(2,)) if remat else Block


class ViT(nn.Module):
  """ViT encoder with a CLS token and fixed sin-cos position embedding (MAE / timm layout).

  `drop_path_rate` rises linearly from 0 at the first block to the rate at the last (timm);
  it needs a "dropout" rng when `train=True`.
  """
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  token_impl: str = "auto"  # gather implementation, see ops.masked_tokens
  remat: bool = False  # recompute block activations in the backward pass (saves memory)
  pos_layout: str = "concat"  # sin-cos channel order, see models.posenc

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, ids_keep: jnp.ndarray | None = None,
               train: bool = False, pos_scale: jnp.ndarray | None = None,
               patch_mask: jnp.ndarray | None = None, mask_token: jnp.ndarray | None = None,
               return_blocks: Sequence[int] = ()
               ) -> jnp.ndarray | tuple[jnp.ndarray, list[jnp.ndarray]]:
    """images (N, H, W, C) -> tokens (N, 1 + K, D), CLS first.

    K = L (all patches) without `ids_keep`, else the (N, K) kept patch ids (row-major over the
    grid); only those tokens enter the blocks. `pos_scale` (N,) multiplies the position-grid
    coordinates per sample (Scale-MAE's GSD ratio); None means the plain MAE embedding.

    `mask_token` (D,) with `patch_mask` (N, mh, mw), 1 = masked: SimMIM masking. The patch
    embedding of every masked patch is replaced by the token before the position embedding is
    added (as SimMIM's ViT), and all L tokens enter the blocks. The mask grid may be coarser than
    the patch grid (SimMIM masks 32 px cells over 16 px patches): each mask cell then covers
    (gh / mh) x (gw / mw) patches.

    `return_blocks` (block indices, negative counting from the end, e.g. (-2,) for the output of
    block depth - 2): returns (tokens, [those blocks' outputs (N, 1 + K, D), before the final
    norm]) instead of the tokens alone.
    """
    n, h, w, _ = images.shape
    gh, gw = patch_grid(h, w, self.patch_size)
    d, p = self.embed_dim, self.patch_size
    wanted = [_block_index(b, self.depth) for b in return_blocks]

    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", kernel_init=_patch_init,
                dtype=self.dtype, param_dtype=jnp.float32, name="patch_embed")(images)
    x = x.reshape(n, gh * gw, d)  # row-major patches, as torch's flatten(2).transpose(1, 2)
    if mask_token is not None:
      if patch_mask is None:
        raise ValueError("mask_token (SimMIM masking) needs a patch_mask")
      if ids_keep is not None:
        raise ValueError("ids_keep (MAE masking) and mask_token (SimMIM masking) exclude each "
                         "other")
      masked = token_mask(patch_mask, gh, gw)[..., None]  # (N, L, 1)
      x = jnp.where(masked, mask_token.astype(x.dtype), x)
    elif patch_mask is not None:
      raise ValueError("patch_mask needs a mask_token (SimMIM masking); MAE masking takes "
                       "ids_keep")

    pos = sincos_2d(d, gh, gw, scale=1.0 if pos_scale is None else pos_scale, cls_token=True,
                    layout=self.pos_layout)
    pos = pos.astype(self.dtype)
    x = x + pos[..., 1:, :]  # before the gather, so each kept token keeps its own position
    if ids_keep is not None:
      x = gather_tokens(x, ids_keep, impl=self.token_impl)

    cls = self.param("cls_token", token_init, (1, 1, d), jnp.float32).astype(self.dtype)
    cls = jnp.broadcast_to(cls + pos[..., :1, :], (n, 1, d))
    x = jnp.concatenate([cls, x], axis=1)

    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    outs = {}
    for i in range(self.depth):
      x = block_class(self.remat)(self.num_heads, self.mlp_ratio, float(rates[i]), self.dtype,
                                  name=f"blocks_{i}")(x, train)
      if i in wanted:
        outs[i] = x
    x = layer_norm("norm", self.dtype)(x)
    if return_blocks:
      return x, [outs[i] for i in wanted]
    return x


def _block_index(index: int, depth: int) -> int:
  """A block index (negative from the end) as 0..depth-1; a clear error when out of range."""
  if not -depth <= int(index) < depth:
    raise ValueError(f"block {index} does not exist in a ViT of depth {depth} (valid: "
                     f"{-depth}..{depth - 1})")
  return int(index) % depth


def token_mask(patch_mask: jnp.ndarray, grid_h: int, grid_w: int) -> jnp.ndarray:
  """(N, mh, mw) mask (1 = masked) on a grid that divides the (grid_h, grid_w) patch grid ->
  (N, grid_h * grid_w) bool per patch token, row-major (each mask cell repeated over its
  patches, SimMIM's MaskGenerator `repeat`)."""
  n, mh, mw = patch_mask.shape
  if grid_h % mh or grid_w % mw:
    raise ValueError(f"the {mh}x{mw} mask grid does not divide the {grid_h}x{grid_w} patch grid: "
                     "the mask patch must be a multiple of the ViT patch size")
  m = jnp.repeat(jnp.repeat(patch_mask, grid_h // mh, axis=1), grid_w // mw, axis=2)
  return m.reshape(n, grid_h * grid_w) > 0


class MAE(nn.Module):
  """Masked autoencoder: ViT encoder on the kept patches + a light transformer decoder.

  Defaults are ViT-B/16 with MAE's decoder (8 blocks, width 512, 16 heads) and mask ratio 0.75;
  K = int(L * (1 - mask_ratio)) patches are kept, as in MAE's code. Without `ids_keep` the mask is
  drawn from the "masking" rng.
  """
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  mask_ratio: float = 0.75
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  token_impl: str = "auto"
  remat: bool = False

  def keep_count(self, length: int) -> int:
    """Number of patch tokens the encoder sees out of `length`."""
    return int(length * (1 - self.mask_ratio))

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, ids_keep: jnp.ndarray | None = None,
               train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """images (N, H, W, C) -> (pred (N, L, p*p*C) in patchify order, mask (N, L), 1 = removed)."""
    n, h, w, c = images.shape
    gh, gw = patch_grid(h, w, self.patch_size)
    length = gh * gw
    if ids_keep is None:
      ids_keep, _, _ = random_masking(self.make_rng("masking"), n, length,
                                      self.keep_count(length))

    latent = ViT(self.patch_size, self.embed_dim, self.depth, self.num_heads, self.mlp_ratio,
                 self.drop_path_rate, self.dtype, self.token_impl, self.remat, name="encoder")(
                     images, ids_keep=ids_keep, train=train)

    dd = self.decoder_embed_dim
    x = dense(dd, "decoder_embed", self.dtype)(latent)
    mask_token = self.param("mask_token", token_init, (1, 1, dd), jnp.float32)
    # Kept tokens back to their grid slots, the mask token everywhere else.
    tokens = scatter_tokens(x[:, 1:], ids_keep, length, mask_token.reshape(dd).astype(x.dtype),
                            impl=self.token_impl)
    x = jnp.concatenate([x[:, :1], tokens], axis=1)
    x = x + sincos_2d(dd, gh, gw, cls_token=True).astype(self.dtype)
    for i in range(self.decoder_depth):
      x = block_class(self.remat)(self.decoder_num_heads, self.mlp_ratio, 0.0, self.dtype,
                                  name=f"decoder_blocks_{i}")(x, train)
    x = layer_norm("decoder_norm", self.dtype)(x)
    pred = dense(self.patch_size ** 2 * c, "decoder_pred", self.dtype)(x)
    return pred[:, 1:], patch_mask(ids_keep, length)


def make_vit(variant: str, *, patch_size: int = 16, **kwargs: Any) -> ViT:
  """ViT-S/B/L/H encoder, e.g. make_vit("B", patch_size=16, dtype=jnp.bfloat16)."""
  return ViT(patch_size=patch_size, **VIT_VARIANTS[variant], **kwargs)


def make_mae(variant: str, *, patch_size: int = 16, **kwargs: Any) -> MAE:
  """MAE with a ViT-S/B/L/H encoder and MAE's default decoder unless overridden."""
  return MAE(patch_size=patch_size, **VIT_VARIANTS[variant], **kwargs)
