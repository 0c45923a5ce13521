"""mmearth_jax.ops: MAE token gather/scatter (jnp vs Pallas in interpret mode), depthwise conv
and the one resize (every mode against torch's `F.interpolate`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmearth_jax.ops import depthwise, masked_tokens as mt
from mmearth_jax.ops import resize as R
from mmearth_jax.ops.conv import conv2d
from mmearth_jax.ops.depthwise import depthwise_conv2d
from mmearth_jax.ops.masked_tokens import gather_tokens, random_masking, scatter_tokens

# (N, L, K, D): D values that are not multiples of 128 (or of 8), and the K=0 / K=L edges.
# Interpret-mode Pallas compiles are slow (~0.5 s per kernel), so every case runs in one jit and
# the dtype x kernel-variant product is spread over the shapes instead of multiplied by them.
TOKEN_CASES = [
    ((1, 4, 1, 8), jnp.float32, "tpu"),
    ((3, 16, 5, 40), jnp.float32, "tpu"),
    ((2, 49, 12, 130), jnp.float32, "tpu"),
    ((2, 9, 0, 3), jnp.float32, "tpu"),
    ((2, 7, 7, 12), jnp.float32, "tpu"),
    ((2, 49, 12, 130), jnp.bfloat16, "tpu"),
    ((3, 16, 5, 40), jnp.float32, "triton"),
    ((2, 49, 12, 130), jnp.bfloat16, "triton"),
]


def _data(shape, dtype, seed=0):
  """MAE-style ids (a per-row random permutation, as random_masking makes) and random rows.

  Built in numpy: eager JAX ops compile once per shape, which adds up here.
  """
  n, length, keep, d = shape
  rng = np.random.default_rng(seed)
  ids_shuffle = np.argsort(rng.random((n, length)), axis=1)
  ids_restore = np.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :keep]
  mask = (ids_restore >= keep).astype(np.float32)
  x, kept, fill = (jnp.asarray(rng.standard_normal(s), dtype)
                   for s in ((n, length, d), (n, keep, d), (d,)))
  w_gather, w_scatter = (rng.standard_normal(s).astype(np.float32)
                         for s in ((n, keep, d), (n, length, d)))
  return (jnp.asarray(ids_keep, jnp.int32), jnp.asarray(ids_restore, jnp.int32), mask, x, kept,
          fill, (w_gather, w_scatter))


def _ops(impl, variant, ids, length):
  """(gather, scatter) closures: the public jnp path, or the Pallas path with a chosen kernel."""
  if impl == "jnp":
    return (lambda x: gather_tokens(x, ids, impl="jnp"),
            lambda kp, f: scatter_tokens(kp, ids, length, f, impl="jnp"))
  return (lambda x: mt._gather_pallas(x, ids, x.shape[1], True, variant),
          lambda kp, f: mt._scatter_pallas(kp, ids, f, length, True, variant))


# ---------------------------------------------------------------------------------------------
# random_masking
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,length,keep", [(1, 1, 1), (4, 16, 4), (8, 196, 49), (3, 10, 0),
                                           (2, 10, 10)])
def test_random_masking_properties(n, length, keep):
  ids_keep, ids_restore, mask = jax.jit(random_masking, static_argnums=(1, 2, 3))(
      jax.random.key(3), n, length, keep)
  ids_keep, ids_restore, mask = map(np.asarray, (ids_keep, ids_restore, mask))
  assert ids_keep.shape == (n, keep) and ids_keep.dtype == np.int32
  assert ids_restore.shape == (n, length) and ids_restore.dtype == np.int32
  assert mask.shape == (n, length) and mask.dtype == np.float32
  for r in range(n):
    assert len(set(ids_keep[r].tolist())) == keep  # distinct
    assert sorted(ids_restore[r].tolist()) == list(range(length))  # a permutation
    # ids_restore inverts the shuffle, whose first K entries are ids_keep
    np.testing.assert_array_equal(ids_restore[r][ids_keep[r]], np.arange(keep))
    assert mask[r].sum() == length - keep
    expected = np.ones(length, np.float32)
    expected[ids_keep[r]] = 0
    np.testing.assert_array_equal(mask[r], expected)  # 1 exactly where not kept
  assert set(np.unique(mask).tolist()) <= {0.0, 1.0}


def test_random_masking_varies_per_sample_and_key():
  a, _, _ = random_masking(jax.random.key(0), 4, 50, 10)
  b, _, _ = random_masking(jax.random.key(1), 4, 50, 10)
  assert not np.array_equal(a, b)
  assert not all(np.array_equal(np.sort(a[0]), np.sort(a[r])) for r in range(1, 4))


# ---------------------------------------------------------------------------------------------
# gather / scatter: Pallas (interpret) vs jnp
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,dtype,variant", TOKEN_CASES)
def test_pallas_equals_jnp_forward_and_gradients(shape, dtype, variant):
  n, length, keep, d = shape
  ids_keep, _, mask, x, kept, fill, (wg, ws) = _data(shape, dtype)  # w*: random linear functionals

  @jax.jit
  def run(x, kept, fill, wg, ws):
    res = {}
    for impl in ("jnp", "pallas"):
      gather, scatter = _ops(impl, variant, ids_keep, length)
      dx = jax.grad(lambda x: (gather(x).astype(jnp.float32) * wg).sum())(x)
      dk, df = jax.grad(lambda kp, f: (scatter(kp, f).astype(jnp.float32) * ws).sum(),
                        argnums=(0, 1))(kept, fill)
      res[impl] = (gather(x), scatter(kept, fill), dx, dk, df)
    # the definitions: d gather/dx scatters wg into zeros, d scatter/dkept gathers ws
    res["defs"] = (scatter_tokens(wg, ids_keep, length, jnp.zeros(d), impl="jnp"),
                   gather_tokens(ws, ids_keep, impl="jnp"))
    return res

  res = run(x, kept, fill, wg, ws)
  f32 = lambda a: np.asarray(a, np.float32)
  (g_p, s_p, dx_p, dk_p, df_p), (g_j, s_j, dx_j, dk_j, df_j) = res["pallas"], res["jnp"]
  assert g_p.dtype == s_p.dtype == dx_p.dtype == dk_p.dtype == df_p.dtype == dtype
  assert g_p.shape == (n, keep, d) and s_p.shape == (n, length, d)
  # forward: pure copies, so exactly equal
  np.testing.assert_array_equal(f32(g_p), f32(g_j))
  np.testing.assert_array_equal(f32(s_p), f32(s_j))
  if dtype == jnp.float32:
    for a, b in ((dx_p, dx_j), (dk_p, dk_j), (df_p, df_j)):
      np.testing.assert_allclose(f32(a), f32(b), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(f32(dx_p), f32(res["defs"][0]))
    np.testing.assert_array_equal(f32(dk_p), f32(res["defs"][1]))
    # d scatter/dfill sums ws over the removed positions
    np.testing.assert_allclose(f32(df_p), (ws * mask[..., None]).sum((0, 1)), rtol=1e-5,
                               atol=1e-5)
  else:
    # row copies are exact in any dtype; the fill gradient is a bf16 sum, rounded differently
    np.testing.assert_array_equal(f32(dx_p), f32(dx_j))
    np.testing.assert_array_equal(f32(dk_p), f32(dk_j))
    np.testing.assert_allclose(f32(df_p), f32(df_j), rtol=2e-2, atol=2e-2 * np.sqrt(n * length))


def test_jit_and_public_dispatch():
  n, length, keep, d = 4, 32, 8, 24

  @jax.jit
  def step(key, x, fill):
    ids_keep, _, mask = random_masking(key, n, length, keep)
    outs = []
    for impl in ("auto", "jnp", "pallas"):
      enc = gather_tokens(x, ids_keep, impl=impl) * 2.0
      outs.append(scatter_tokens(enc, ids_keep, length, fill, impl=impl))
    return outs, mask

  x = jax.random.normal(jax.random.key(0), (n, length, d))
  fill = jnp.arange(d, dtype=jnp.float32)
  outs, mask = step(jax.random.key(1), x, fill)
  m = np.asarray(mask, bool)[..., None]
  for dec in outs:
    np.testing.assert_array_equal(dec, np.where(m, np.asarray(fill), 2.0 * np.asarray(x)))


def test_auto_is_jnp_on_cpu_and_bad_impl_raises():
  if jax.default_backend() == "cpu":
    assert mt._resolve("auto", None) == ("jnp", True)
    assert mt._resolve("pallas", None) == ("pallas", True)
  with pytest.raises(ValueError):
    gather_tokens(jnp.zeros((1, 2, 3)), jnp.zeros((1, 1), jnp.int32), impl="cuda")


def test_round_trip_and_mae_concat_equivalence():
  shape = (2, 49, 12, 130)
  n, length, keep, d = shape
  ids_keep, ids_restore, mask, x, kept, fill, _ = _data(shape, jnp.float32, seed=4)
  # MAE decoder input: concat(kept, mask tokens), un-shuffled with ids_restore
  mask_tokens = jnp.broadcast_to(fill, (n, length - keep, d))
  mae = jnp.take_along_axis(jnp.concatenate([kept, mask_tokens], axis=1),
                            ids_restore[..., None], axis=1)
  m = np.asarray(mask, bool)[..., None]

  @jax.jit
  def run(x, kept, fill):
    res = {}
    for impl in ("jnp", "pallas"):
      full = scatter_tokens(kept, ids_keep, length, fill, impl=impl)
      res[impl] = (full, gather_tokens(full, ids_keep, impl=impl),
                   scatter_tokens(gather_tokens(x, ids_keep, impl=impl), ids_keep, length, fill,
                                  impl=impl))
    return res

  for full, kept_again, back in run(x, kept, fill).values():
    np.testing.assert_array_equal(full, mae)  # scatter == MAE concat + restore-gather
    np.testing.assert_array_equal(kept_again, kept)  # scatter then gather: kept tokens back
    # gather then scatter: x at the kept positions, fill elsewhere
    np.testing.assert_array_equal(back, np.where(m, np.asarray(fill), np.asarray(x)))


@pytest.mark.parametrize("platform,variant", [("tpu", "tpu"), ("cuda", "triton")])
def test_pallas_kernels_lower_for_accelerators(platform, variant):
  # Compiling needs the device; lowering to Mosaic TPU / Triton IR runs here and catches
  # unsupported block shapes, non-power-of-two Triton tensors and the like.
  ids_keep, _, _, x, kept, fill, _ = _data((2, 49, 12, 130), jnp.float32)
  for dtype in (jnp.float32, jnp.bfloat16):
    xs, ks, fs = x.astype(dtype), kept.astype(dtype), fill.astype(dtype)
    try:
      jax.jit(jax.grad(lambda x: mt._gather_pallas(x, ids_keep, 49, False, variant).astype(
          jnp.float32).sum())).trace(xs).lower(lowering_platforms=(platform,))
      jax.jit(jax.grad(lambda k, f: mt._scatter_pallas(k, ids_keep, f, 49, False, variant).astype(
          jnp.float32).sum(), argnums=(0, 1))).trace(ks, fs).lower(lowering_platforms=(platform,))
    except (ImportError, ModuleNotFoundError) as e:  # a jaxlib built without that backend
      pytest.skip(f"no {platform} lowering here: {e}")


# ---------------------------------------------------------------------------------------------
# depthwise conv
# ---------------------------------------------------------------------------------------------

def _conv_inputs(k, c=12, h=13, w=11, n=2, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, h, w, c)), dtype)
  kern = jnp.asarray(rng.standard_normal((k, k, c)), dtype)
  bias = jnp.asarray(rng.standard_normal((c,)), dtype)
  return x, kern, bias


def _close(a, b, rel=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape
  scale = max(np.abs(b).max(), 1e-6)
  assert np.abs(a - b).max() <= rel * scale, (np.abs(a - b).max(), scale)


@pytest.mark.parametrize("k,padding", [(1, 0), (3, 0), (3, 1), (7, 0), (7, 3), (3, 3)])
def test_depthwise_matches_conv_forward_and_gradients(k, padding):
  x, kern, bias = _conv_inputs(k)
  out_shape = (2, 13 + 2 * padding - k + 1, 11 + 2 * padding - k + 1, 12)
  w = jnp.asarray(np.random.default_rng(9).standard_normal(out_shape), jnp.float32)

  @jax.jit
  def run(x, kern, bias):
    res = {}
    for impl in depthwise.IMPLS:
      f = lambda x, kk, b, impl=impl: depthwise_conv2d(x, kk, b, padding=padding, impl=impl)
      res[impl] = (f(x, kern, bias),
                   *jax.grad(lambda *a: (f(*a) * w).sum(), argnums=(0, 1, 2))(x, kern, bias))
    return res

  res = run(x, kern, bias)
  assert res["conv"][0].shape == out_shape
  for impl in depthwise.IMPLS:
    for a, b in zip(res[impl], res["conv"]):  # y, dx, dkernel, dbias
      _close(a, b)


def test_depthwise_without_bias_and_auto():
  x, kern, _ = _conv_inputs(5, c=7, h=9, w=10)
  ref = depthwise_conv2d(x, kern, padding=2, impl="conv")
  _close(depthwise_conv2d(x, kern, padding=2), ref)
  if jax.default_backend() == "cpu":
    assert depthwise._auto_impl() == "shifts"
  with pytest.raises(ValueError):
    depthwise_conv2d(x, kern, padding=2, impl="winograd")


def test_depthwise_bf16():
  x, kern, bias = _conv_inputs(7, c=10)
  xb, kb, bb = (a.astype(jnp.bfloat16) for a in (x, kern, bias))
  ref = depthwise_conv2d(*(a.astype(jnp.float32) for a in (xb, kb, bb)), padding=3, impl="conv")

  @jax.jit
  def run(x, kern, bias):
    res = {}
    for impl in depthwise.IMPLS:
      f = lambda x, kk, b, impl=impl: depthwise_conv2d(x, kk, b, padding=3, impl=impl)
      res[impl] = (f(x, kern, bias), jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(),
                                              argnums=(0, 1, 2))(x, kern, bias))
    return res

  for y, grads in run(xb, kb, bb).values():
    assert y.dtype == jnp.bfloat16
    _close(y, ref, rel=2e-2)
    assert all(g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g.astype(jnp.float32)).all())
               for g in grads)


def test_depthwise_kernel_layouts_of_flax_and_torch():
  # Flax depthwise kernels are (kh, kw, 1, C); torch's are (C, 1, kh, kw).
  import flax.linen as nn

  x, _, _ = _conv_inputs(7, c=6, h=8, w=9)
  conv = nn.Conv(features=6, kernel_size=(7, 7), padding=3, feature_group_count=6)
  params = conv.init(jax.random.key(0), x)
  y_flax = conv.apply(params, x)
  p = params["params"]
  _close(depthwise_conv2d(x, p["kernel"][:, :, 0, :], p["bias"], padding=3), y_flax)

  torch = pytest.importorskip("torch")
  tconv = torch.nn.Conv2d(6, 6, 7, padding=3, groups=6)
  with torch.no_grad():
    y_torch = tconv(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
  kern = tconv.weight.detach().numpy()[:, 0].transpose(1, 2, 0)
  _close(depthwise_conv2d(x, jnp.asarray(kern), jnp.asarray(tconv.bias.detach().numpy()),
                          padding=3), y_torch.numpy())


# --- ops.conv: convolutions as matrix products on the CPU --------------------------------------



@pytest.mark.parametrize("n,s,cin,cout,k,stride,pad,groups", [
    (2, 13, 5, 7, 3, 1, 0, 1),     # MMEarth's unpadded 3x3 stem conv, odd size
    (2, 12, 4, 6, 3, 1, 1, 1),     # padded
    (2, 11, 6, 6, 2, 2, 1, 6),     # MMEarth's depthwise patch stem (k = stride, padded)
    (2, 9, 6, 6, 1, 1, 0, 6),      # its 8 px patch form (k = 1)
    (2, 10, 4, 8, 2, 2, 0, 1),     # ConvNeXt downsampling (odd inputs crop, as torch)
    (1, 16, 3, 5, 4, 4, 0, 1),     # the official 4x4/4 stem
    (2, 8, 6, 4, 3, 2, 1, 2),      # grouped, strided: falls back to lax
])
def test_conv2d_matmul_equals_lax(n, s, cin, cout, k, stride, pad, groups):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, s + (k == 2 and not pad), s, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, cin // groups, cout)), jnp.float32)

  def run(impl):
    f = lambda x, w: conv2d(x, w, stride=stride, padding=pad, groups=groups, impl=impl)
    y = jax.jit(f)(x, w)
    ct = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    return y, jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) * ct), argnums=(0, 1)))(x, w)

  rng = np.random.default_rng(1)
  want = run("lax")
  rng = np.random.default_rng(1)
  got = run("matmul")
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    assert a.shape == b.shape
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))
  with pytest.raises(ValueError, match="unknown conv impl"):
    conv2d(x, w, impl="fft")


# ---------------------------------------------------------------------------------------------
# resize
# ---------------------------------------------------------------------------------------------

# (method, options, torch's interpolate arguments): every mode a call site uses.
RESIZE_MODES = [
    ("area", {}, dict(mode="area")),
    ("bilinear", {}, dict(mode="bilinear", align_corners=False)),
    ("bilinear", {"align_corners": True}, dict(mode="bilinear", align_corners=True)),
    ("bilinear", {"antialias": True}, dict(mode="bilinear", align_corners=False, antialias=True)),
    ("bicubic", {}, dict(mode="bicubic", align_corners=False)),
    ("bicubic", {"align_corners": True}, dict(mode="bicubic", align_corners=True)),
    ("nearest", {}, dict(mode="nearest")),
    ("nearest-exact", {}, dict(mode="nearest-exact")),
]


@pytest.mark.parametrize("method,options,torch_args", RESIZE_MODES)
def test_resize_matches_torch_interpolate(method, options, torch_args):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 13, 10, 3)).astype(np.float32)
  for size in [(26, 20), (7, 4), (13, 17), (1, 1)]:
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size,
                                           **torch_args).permute(0, 2, 3, 1).numpy()
    got = R.resize(x, size, method, **options)
    assert got.dtype == np.float32 and got.shape == want.shape
    if method.startswith("nearest"):
      np.testing.assert_array_equal(got, want)  # a copy of input pixels
    else:
      np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"{method} {options} {size}")
    # jnp in and out, the same numbers (one implementation for the data workers and the step)
    np.testing.assert_allclose(np.asarray(R.resize(jnp.asarray(x), size, method, **options)),
                               got, atol=2e-6)


def test_resize_bicubic_align_corners_by_hand():
  """[0 1 0] -> 5 samples at source 0, 1/2, 1, 3/2, 2 (the end centres aligned): integer sources
  copy, and at t = 1/2 the Keys (a = -0.75) taps are -3/32, 19/32, 19/32, -3/32 with the tap
  left of index 0 clamped onto it: 19/32. A 3 x 3 bump is separable: the outer product."""
  a = np.array([0.0, 1.0, 0.0])
  b = np.array([0.0, 19 / 32, 1.0, 19 / 32, 0.0])
  np.testing.assert_allclose(R.matrix("bicubic", 3, 5, align_corners=True) @ a, b, atol=1e-12)
  bump = np.outer(a, a).astype(np.float32)
  np.testing.assert_allclose(R.resize(bump, 5, "bicubic", align_corners=True), np.outer(b, b),
                             atol=1e-6)
  # A ramp 0..4 to 9 samples: the interior is the ramp, the ends are copied, and next to them
  # the clamped tap bends it: -3/32 * 0 + 19/32 * (0 + 1) - 3/32 * 2 = 13/32, not 1/2.
  got = R.matrix("bicubic", 5, 9, align_corners=True) @ np.arange(5.0)
  np.testing.assert_allclose(got, [0, 13 / 32, 1, 1.5, 2, 2.5, 3, 4 - 13 / 32, 4], atol=1e-12)


def test_resize_maps_labels_sizes_and_bad_options():
  rng = np.random.default_rng(0)
  y = rng.integers(-1, 5, (7, 9)).astype(np.int64)  # an (H, W) label map, -1 = no label
  z = R.resize(y, 16, "nearest-exact")
  assert z.dtype == np.int64 and z.shape == (16, 16) and set(np.unique(z)) <= set(np.unique(y))
  x = rng.standard_normal((7, 9)).astype(np.float32)  # an (H, W) plane equals one channel
  np.testing.assert_allclose(R.resize(x, (5, 4), "bilinear", antialias=True),
                             R.resize(x[..., None], (5, 4), "bilinear", antialias=True)[..., 0],
                             atol=1e-6)
  assert R.resize(x, (7, 9), "bicubic") is x  # same size: untouched
  np.testing.assert_allclose(R.matrix("area", 6, 3).sum(1), 1.0)
  with pytest.raises(ValueError, match="choose from"):
    R.resize(x, 4, "lanczos")
  with pytest.raises(ValueError, match="only implemented for method 'bilinear'"):
    R.resize(x, 4, "bicubic", antialias=True)
  with pytest.raises(ValueError, match="cannot be combined"):
    R.matrix("bilinear", 4, 2, align_corners=True, antialias=True)
  with pytest.raises(ValueError, match="must be positive"):
    R.matrix("area", 0, 2)
