"""FFT convolution kernel (FlashFFTConv, K4) against its references: values, gradients,
partial and frequency-sparse variants, a mesh, TPU lowering (AOT) and GPU (when present)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxft_kernels import common
from jaxft_kernels.fft_conv import (direct_conv_reference, fft_conv, fft_conv_monarch,
                                    fft_conv_reference, fft_conv_sharded)
from jaxft_kernels.fft_conv import reference as ref

# (B, H, L, Lk, n2): power-of-two, ragged L (not a multiple of n2), partial filters.
SHAPES = [(2, 3, 16, 16, None), (1, 2, 37, 9, 4)]


def _data(b, h, l, lk, dtype=np.float64, seed=0):
  r = np.random.default_rng(seed)
  mk = lambda *s: jnp.asarray(r.normal(size=s), dtype)
  return mk(b, h, l), mk(h, lk), mk(b, h, l), mk(b, h, l)


def _np_direct(u, k, pre, post):
  """Independent float64 NumPy causal convolution."""
  u, k, pre, post = (np.asarray(a, np.float64) for a in (u, k, pre, post))
  z = u * pre
  out = np.zeros_like(z)
  for t in range(z.shape[-1]):
    for j in range(min(k.shape[1], t + 1)):
      out[..., t] += k[None, :, j] * z[..., t - j]
  return out * post


@pytest.mark.parametrize("b,h,l,lk,n2", SHAPES)
def test_fp64_kernel_matches_direct_convolution(b, h, l, lk, n2):
  with jax.enable_x64(True):
    u, k, pre, post = _data(b, h, l, lk)
    want = _np_direct(u, k, pre, post)
    got = fft_conv(u, k, pre, post, n2=n2, block_h=2, interpret=True)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-10, rtol=0)
    for fn in (fft_conv_reference, fft_conv_monarch):
      np.testing.assert_allclose(np.asarray(fn(u, k, pre, post)), want, atol=1e-10, rtol=0)
    np.testing.assert_allclose(np.asarray(direct_conv_reference(u, k, pre, post)), want, atol=1e-10)


def test_bf16_within_tolerance_and_factorisations_agree():
  u, k, pre, post = _data(2, 4, 48, 48, np.float32, seed=1)
  want = _np_direct(u, k, pre, post)
  got = fft_conv(u.astype(jnp.bfloat16), k.astype(jnp.bfloat16), pre.astype(jnp.bfloat16),
                 post.astype(jnp.bfloat16), interpret=True)
  assert got.dtype == jnp.bfloat16
  assert common.rel_l2(got, want) <= 1e-2
  outs = [fft_conv(u, k, n2=n2, interpret=True) for n2 in (4, 16)]
  for o in outs[1:]:
    np.testing.assert_allclose(o, outs[0], rtol=1e-5, atol=1e-4)


def test_partial_conv_equals_zeroed_filter():
  u, k, _, _ = _data(2, 3, 32, 32, np.float32, seed=2)
  short = fft_conv(u, k[:, :8], n2=8, interpret=True)        # skips F_N1 columns
  zeroed = fft_conv(u, k.at[:, 8:].set(0.0), n2=8, interpret=True)
  np.testing.assert_allclose(short, zeroed, rtol=1e-5, atol=1e-5)


def test_frequency_sparse_equals_masked_reference():
  u, k, pre, post = _data(2, 3, 32, 32, np.float32, seed=3)
  plan = ref.make_plan(32, 8, 0.5)
  assert len(plan.cols) == 4 and ref.freq_mask(plan).sum() == 64 // 2
  got = fft_conv(u, k, pre, post, n2=8, freq_keep=0.5, interpret=True)
  want = fft_conv_reference(u, k, pre, post, n2=8, freq_keep=0.5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  dense = fft_conv_reference(u, k, pre, post)
  assert common.rel_l2(got, dense) > 0.05   # the sparsity really removed something


@pytest.mark.parametrize("gates,freq_keep,lk", [(True, 1.0, 20), (False, 1.0, 20), (True, 0.5, 7)])
def test_gradients_match_reference_autodiff(gates, freq_keep, lk):
  with jax.enable_x64(True):
    u, k, pre, post = _data(2, 3, 20, lk, seed=4)
    g = (pre, post) if gates else (None, None)
    ct = jnp.asarray(np.random.default_rng(5).normal(size=u.shape))
    loss = lambda fn: (lambda u, k, *gg: jnp.sum(ct * fn(u, k, *gg, n2=4, freq_keep=freq_keep)))
    kern = lambda *a, **kw: fft_conv(*a, **kw, block_h=2, interpret=True)
    argn = (0, 1, 2, 3) if gates else (0, 1)
    args = (u, k, *g) if gates else (u, k)
    got = jax.grad(loss(kern), argnums=argn)(*args)
    want = jax.grad(loss(fft_conv_reference), argnums=argn)(*args)
    for a, w in zip(got, want):
      np.testing.assert_allclose(a, w, rtol=1e-9, atol=1e-9)


def test_public_namespace_and_bad_input():
  from jaxft import kernels  # pylint: disable=g-import-not-at-top
  assert kernels.fft_conv is fft_conv
  u, k, _, _ = _data(1, 2, 8, 8, np.float32)
  with pytest.raises(ValueError, match="exceeds the sequence length"):
    fft_conv(u, jnp.zeros((2, 9)), interpret=True)
  with pytest.raises(ValueError, match="freq_keep"):
    fft_conv(u, k, freq_keep=0.0, interpret=True)


def test_sharded_on_a_mesh_equals_unsharded():
  mesh = common.cpu_mesh((4, 2), ("data", "tensor"))
  u, k, _, post = _data(4, 4, 16, 16, np.float32, seed=6)
  got = jax.jit(lambda u, k, post: fft_conv_sharded(u, k, None, post, mesh=mesh, interpret=True))(
      u, k, post)
  np.testing.assert_allclose(got, fft_conv_reference(u, k, None, post), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not common.has_libtpu(), reason="needs libtpu (pip install 'jax[tpu]')")
def test_lowers_for_tpu_through_mosaic():
  def fwd_and_grad(u, k, post):
    f = lambda u, k, post: jnp.sum(fft_conv(u, k, None, post, freq_keep=0.5, interpret=False))
    return jax.grad(f, argnums=(0, 1))(u, k, post)[0]
  args = [jax.ShapeDtypeStruct((8, 4, 64), jnp.float32), jax.ShapeDtypeStruct((4, 32), jnp.float32),
          jax.ShapeDtypeStruct((8, 4, 64), jnp.bfloat16)]
  compiled = common.tpu_aot_compile(fwd_and_grad, args, (P("data"), P(), P("data")), P("data"))
  assert "tpu_custom_call" in compiled.as_text()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_lowering_matches_reference():
  u, k, pre, post = _data(4, 8, 1024, 1024, np.float32, seed=7)
  got = fft_conv(u, k, pre, post, interpret=False)
  np.testing.assert_allclose(got, fft_conv_reference(u, k, pre, post), rtol=1e-3, atol=1e-3)


def test_kernelized_attention_with_rpe_through_fft_conv():
  from jaxft.models import kernel_attention as ka  # pylint: disable=g-import-not-at-top
  r = np.random.default_rng(8)
  b, l, n, d, dv, m = 2, 12, 2, 4, 3, 5
  q, k = (jnp.asarray(r.normal(size=(b, l, n, d)), jnp.float32) for _ in range(2))
  v = jnp.asarray(r.normal(size=(b, l, n, dv)), jnp.float32)
  feats = ka.random_features(jax.random.PRNGKey(0), m, d)
  bias = jnp.asarray(r.normal(size=(n, l)), jnp.float32)
  got = ka.kernel_rpe_attention(q, k, v, feats, bias, conv_impl="pallas")
  np.testing.assert_allclose(got, ka.kernel_rpe_attention_reference(q, k, v, feats, bias),
                             rtol=1e-4, atol=1e-5)
  # c ≡ 1: plain causal kernelized (linear) attention, written with prefix sums.
  pq = ka.feature_map(q, feats, (-1,))
  pk = ka.feature_map(k, feats, (1, 3))
  s = jnp.cumsum(pk[..., None] * v[..., None, :], axis=1)
  z = jnp.cumsum(pk, axis=1)
  plain = jnp.einsum("blnm,blnme->blne", pq, s) / jnp.einsum("blnm,blnm->bln", pq, z)[..., None]
  np.testing.assert_allclose(ka.kernel_rpe_attention(q, k, v, feats, jnp.zeros((n, l)),
                                                     conv_impl="jnp_fft"), plain, rtol=1e-4, atol=1e-5)
  assert common.rel_l2(got, plain) > 1e-2    # the RPE changes the output
