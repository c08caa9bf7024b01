"""Spectral and structured adapters: LoCA, FourierFT, SAID (Fastfood), Monarch — the
contract plus closed forms a wrong implementation fails."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jaxft import adapters
from jaxft.adapters import base, monarch_adapter as monarch, said, spectral
from jaxft.models import DecoderConfig, decoder
from adapter_testlib import perturb

CFG = DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=48)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 64)
L, D, F = CFG.n_layers, CFG.d_model, CFG.d_ff


@pytest.fixture(scope="module")
def params():
  return decoder.init(jax.random.PRNGKey(0), CFG)


_BASE = {}


def base_logits_of(params):
  if "logits" not in _BASE:
    _BASE["logits"] = jax.jit(lambda p: decoder.apply(p, TOKENS, CFG))(params)
  return _BASE["logits"]


def spec(name, **kw):
  return {**adapters.DEFAULTS[name], "name": name, **kw}


def run(adapter, frozen, trainable, s):
  fn = lambda f, t: decoder.apply(adapter.combine(f, t, s), TOKENS, CFG,
                                  linear=adapter.linear_hook(s))
  return jax.jit(fn)(frozen, trainable)


MEMBERS = [  # name, overrides, identity at init, trainable count
    ("fourierft", {"n_frequency": 20}, True, 2 * L * 20),
    ("loca", {"n_frequency": 20}, True, 2 * L * 20 * 3),
    ("said", {"dim": 30, "targets": ("attn/(q|v)/kernel$", "mlp_norm")}, True, 30 + 3 * L),
    ("said", {"dim": 30, "said": False, "targets": ("mlp/up/kernel$",)}, True, 30),
    ("monarch", {"blocks": 2, "keep_residual": True}, True,
     L * 3 * (D * 16 + 16 * F)),   # p, t = D/2, F/2 (or F/2, D/2): min(p, t) = 16
    ("monarch", {"blocks": 2}, False, L * 3 * (D * 16 + 16 * F)),
]


@pytest.mark.parametrize("name,kw,identity,count", MEMBERS)
def test_contract(name, kw, identity, count, params):
  adapter, s = adapters.ADAPTERS[name], spec(name, **kw)
  frozen, trainable = adapter.init(jax.random.PRNGKey(2), params, s)
  base_logits = base_logits_of(params)
  out = run(adapter, frozen, trainable, s)
  if identity:
    np.testing.assert_allclose(out, base_logits, rtol=1e-5, atol=1e-5)
  assert base.count_params(trainable) == count
  moved = perturb(trainable, jax.random.PRNGKey(3))
  unmerged = run(adapter, frozen, moved, s)
  assert not np.allclose(unmerged, base_logits, atol=1e-4)
  merged = jax.jit(lambda f, t: adapter.merge(f, t, s))(frozen, moved)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  np.testing.assert_allclose(decoder.apply(merged, TOKENS, CFG), unmerged, rtol=1e-5, atol=1e-5)
  f_axes, t_axes = adapter.logical_axes(decoder.logical_axes(CFG), trainable, s)
  is_axes = lambda x: isinstance(x, tuple)
  assert jax.tree.structure(f_axes, is_leaf=is_axes) == jax.tree.structure(frozen)
  for axes, leaf in zip(jax.tree.leaves(t_axes, is_leaf=is_axes), jax.tree.leaves(trainable)):
    assert len(axes) == leaf.ndim


# ------------------------------------------------------------------ LoCA


def dct_basis(n):
  """Orthonormal DCT-II matrix C (C x = DCT(x)), written out."""
  k, i = np.arange(n)[:, None], np.arange(n)[None, :]
  c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
  c[0] /= np.sqrt(2.0)
  return c


def test_loca_one_hot_spectrum_is_the_cosine_basis():
  d_in, d_out, r, c, alpha = 6, 10, 2, 7, 3.0
  delta = spectral.loca_delta(jnp.asarray([0.5]), jnp.zeros((1, 2)), jnp.asarray([r]),
                              jnp.asarray([c]), d_in, d_out, alpha, 0.0)
  expected = alpha * 0.5 * np.outer(dct_basis(d_in)[r], dct_basis(d_out)[c])
  np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-6)


def test_loca_norm_and_spectral_gradient():
  d_in, d_out, n, alpha = 8, 12, 5, 2.0
  rng = np.random.default_rng(0)
  flat = rng.choice(d_in * d_out, n, replace=False)
  rows, cols = jnp.asarray(flat // d_out), jnp.asarray(flat % d_out)
  z = jnp.asarray(rng.normal(size=n), jnp.float32)
  delta = lambda z, s: spectral.loca_delta(z, s, rows, cols, d_in, d_out, alpha, 10.0)
  zero = jnp.zeros((n, 2))
  # orthonormal: ||dW||_F = alpha ||Z||_F
  np.testing.assert_allclose(jnp.linalg.norm(delta(z, zero)), alpha * jnp.linalg.norm(z), rtol=1e-5)
  # dL/dz = alpha * DCT2(G) at the locations; dL/dshift = loc_scale * z * central difference
  g_w = jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)
  gz, gs = jax.jit(jax.grad(lambda z, s: jnp.sum(delta(z, s) * g_w), argnums=(0, 1)))(z, zero)
  spec_g = alpha * dct_basis(d_in) @ np.asarray(g_w) @ dct_basis(d_out).T
  np.testing.assert_allclose(gz, spec_g[rows, cols], rtol=1e-4, atol=1e-5)
  up, dn = np.minimum(rows + 1, d_in - 1), np.maximum(rows - 1, 0)
  expected_r = 10.0 * z * (spec_g[up, cols] - spec_g[dn, cols]) / (up - dn)
  np.testing.assert_allclose(gs[:, 0], expected_r, rtol=1e-4, atol=1e-5)


def test_loca_coefficient_hops_when_its_shift_crosses_half_a_cell():
  at = lambda shift: np.argwhere(np.asarray(spectral.loca_spectrum(
      jnp.asarray([1.0]), jnp.asarray([shift]), jnp.asarray([3]), jnp.asarray([4]), 10.0, 8, 8)))
  np.testing.assert_array_equal(at([0.04, 0.0]), [[3, 4]])
  np.testing.assert_array_equal(at([0.06, -0.06]), [[4, 3]])


# ------------------------------------------------------------------ FourierFT


def test_fourierft_delta_is_the_real_inverse_dft_at_shared_locations(params):
  s = spec("fourierft", n_frequency=20, targets=("attn/(q|o)$",))
  frozen, trainable = spectral.fourierft.init(jax.random.PRNGKey(2), params, s)
  idx = np.asarray(frozen["layers"]["attn"]["q"]["spectral_index"])
  # one seed: every layer and every same-shaped kernel shares the locations
  np.testing.assert_array_equal(idx[0], idx[1])
  np.testing.assert_array_equal(idx, frozen["layers"]["attn"]["o"]["spectral_index"])
  coef = np.random.default_rng(0).normal(size=20)
  dense = np.zeros(D * D)
  dense[idx[0]] = coef
  expected = 150.0 * np.real(np.fft.ifft2(dense.reshape(D, D)))
  got = spectral.fourier_delta(jnp.asarray(coef, jnp.float32), jnp.asarray(idx[0]), D, D, 150.0)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ SAID


def test_fastfood_equals_its_dense_matrix():
  d, m, blocks = 5, 8, 3
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  bits = jax.random.rademacher(k[0], (blocks, m), jnp.int8)
  gauss = jax.random.normal(k[1], (blocks, m))
  perm = jax.random.permutation(k[2], m)
  h = scipy.linalg.hadamard(m)
  pi = np.eye(m)[np.asarray(perm)]               # (Π y)[i] = y[perm[i]]
  dense = np.concatenate([
      h @ np.diag(gauss[j]) @ pi @ h @ np.diag(np.asarray(bits[j], np.float64))
      / np.sqrt(m * np.sum(np.square(gauss[j]))) for j in range(blocks)])[:, :d]
  theta = jax.random.normal(k[3], (d,))
  got = jax.jit(said.fastfood)(theta, bits, gauss, perm)
  np.testing.assert_allclose(got, dense @ np.asarray(theta), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(dense.reshape(blocks, m, d), axis=1), 1.0,
                             rtol=1e-5)  # every block has unit-norm columns
  np.testing.assert_allclose(jax.jit(said.fwht)(jnp.eye(m)), h)


def test_said_projection_regenerates_from_the_key_and_scales_per_layer(params):
  s = spec("said", dim=30, targets=("mlp/up/kernel$",))
  f1, t1 = said.init(jax.random.PRNGKey(5), params, s)
  f2, _ = said.init(jax.random.PRNGKey(5), params, s)
  for a, b in zip(jax.tree.leaves(f1[said.KEY]), jax.tree.leaves(f2[said.KEY])):
    np.testing.assert_array_equal(a, b)
  t = {said.KEY: {"theta": jnp.ones((30,)),
                  "scale": {"layers.mlp.up.kernel": jnp.asarray([2.0, 0.0])}}}
  up = said.combine(f1, t, s)["layers"]["mlp"]["up"]["kernel"]
  w0 = params["layers"]["mlp"]["up"]["kernel"]
  np.testing.assert_array_equal(up[1], w0[1])                    # lambda = 0: layer unchanged
  unit = said.combine(f1, {said.KEY: {"theta": jnp.ones((30,)), "scale": {
      "layers.mlp.up.kernel": jnp.ones((2,))}}}, s)["layers"]["mlp"]["up"]["kernel"]
  np.testing.assert_allclose(up[0] - w0[0], 2 * (unit[0] - w0[0]), rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(up[0] - w0[0]).max()) > 0


# ------------------------------------------------------------------ Monarch


def random_monarch(key, k, p, t, r, lead=()):
  k1, k2 = jax.random.split(key)
  return (jax.random.normal(k1, (*lead, k, p, k * r)), jax.random.normal(k2, (*lead, k, k * r, t)))


def test_monarch_projection_of_a_monarch_matrix_is_itself():
  l_, r_ = random_monarch(jax.random.PRNGKey(0), 4, 16, 8, 2, lead=(2,))   # 64 -> 32
  m = monarch.densify(l_, r_)
  lp, rp = monarch.project(m, 4)
  np.testing.assert_allclose(monarch.densify(lp, rp), m, rtol=1e-4, atol=1e-4)


def test_monarch_projection_is_the_nearest_monarch_matrix():
  w = jax.random.normal(jax.random.PRNGKey(1), (16, 16))
  lp, rp = monarch.project(w, 4)   # 4 blocks of 4: r = 1, the square rank-1 case
  best = float(jnp.linalg.norm(w - monarch.densify(lp, rp)))
  for i in range(20):  # random Monarch matrices and perturbations of the optimum are no closer
    k1, k2 = jax.random.split(jax.random.PRNGKey(100 + i))
    l_, r_ = random_monarch(k1, 4, 4, 4, 1)
    assert float(jnp.linalg.norm(w - monarch.densify(l_, r_))) >= best
    dl, dr = random_monarch(k2, 4, 4, 4, 1)
    near = monarch.densify(lp + 0.01 * dl, rp + 0.01 * dr)
    assert float(jnp.linalg.norm(w - near)) >= best - 1e-5


def test_monarch_matmul_equals_the_dense_product():
  l_, r_ = random_monarch(jax.random.PRNGKey(2), 2, 8, 12, 4)     # 16 -> 24
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 5, 16))
  np.testing.assert_allclose(monarch.monarch_matmul(x, l_, r_), x @ monarch.densify(l_, r_),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="blocks=3"):
    monarch.dims(16, 24, 3)
