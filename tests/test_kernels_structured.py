"""Monarch matmul (K5) + Monarch linear (M3), fast Walsh–Hadamard transform (K6) + HALO
linear (M4): against dense references, gradients, a mesh, TPU lowering, decoder hooks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxft.models import DecoderConfig, decoder, structured
from jaxft_kernels import common
from jaxft_kernels.hadamard import (hadamard_transform, hadamard_transform_reference,
                                    hadamard_transform_sharded)
from jaxft_kernels.hadamard.reference import sylvester
from jaxft_kernels.monarch import (default_shapes, monarch_dense, monarch_matmul,
                                   monarch_matmul_reference, monarch_matmul_sharded, project)

R = np.random.default_rng(0)
normal = lambda *s: jnp.asarray(R.normal(size=s), jnp.float32)


# ------------------------------------------------------------------ Hadamard


def test_sylvester_closed_form_and_orthogonality():
  h4 = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
  np.testing.assert_array_equal(sylvester(4), h4)
  h = sylvester(64)
  np.testing.assert_array_equal(h @ h.T, 64 * np.eye(64))


@pytest.mark.parametrize("m,n,block,base", [(13, 64, None, 8), (5, 48, 16, 4), (9, 32, 32, 32)])
def test_hadamard_kernel_equals_dense_matrix(m, n, block, base):
  x = normal(m, n)
  h = block or n
  dense = np.kron(np.eye(n // h), sylvester(h)) / np.sqrt(h)
  got = hadamard_transform(x, block, base=base, interpret=True)
  np.testing.assert_allclose(got, np.asarray(x) @ dense, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hadamard_transform(got, block, base=base, interpret=True), x,
                             rtol=1e-5, atol=1e-5)   # symmetric and orthonormal: an involution


def test_hadamard_bf16_gradient_and_bad_block():
  x = normal(3, 5, 32)
  got = hadamard_transform(x.astype(jnp.bfloat16), base=8, interpret=True)
  assert got.dtype == jnp.bfloat16
  assert common.rel_l2(got, hadamard_transform_reference(x)) <= 1e-2
  ct = normal(3, 5, 32)
  grad = jax.grad(lambda x: jnp.sum(ct * hadamard_transform(x, 8, base=4, interpret=True)))(x)
  np.testing.assert_allclose(grad, hadamard_transform_reference(ct, 8), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="block"):
    hadamard_transform(normal(2, 24), interpret=True)


# ------------------------------------------------------------------ Monarch


@pytest.mark.parametrize("m,n_in,n_out,nb,dtype", [(7, 16, 16, 4, jnp.float32),
                                                  (5, 24, 32, 2, jnp.float32),
                                                  (9, 16, 24, 4, jnp.bfloat16)])
def test_monarch_kernel_equals_dense_product_and_gradients(m, n_in, n_out, nb, dtype):
  s1, s2 = default_shapes(n_in, n_out, nb)
  x, w1, w2 = normal(m, n_in), normal(*s1), normal(*s2)
  # Dense form built independently: P2 · blockdiag(w2) · P1 · blockdiag(w1).
  k, q, p = s1
  l, s, r = s2
  bd1 = np.zeros((k * q, k * p))
  for i in range(k):
    bd1[i * q:(i + 1) * q, i * p:(i + 1) * p] = w1[i]
  perm1 = np.arange(k * q).reshape(r, l).T.reshape(-1)         # z[λ·r + ρ] = out1[ρ·l + λ]
  bd2 = np.zeros((l * s, l * r))
  for i in range(l):
    bd2[i * s:(i + 1) * s, i * r:(i + 1) * r] = w2[i]
  perm2 = np.arange(l * s).reshape(l, s).T.reshape(-1)         # y[σ·l + λ] = out2[λ·s + σ]
  m_dense = bd2[perm2] @ bd1[perm1]
  want = np.asarray(x) @ m_dense.T
  got = monarch_matmul(x.astype(dtype), w1.astype(dtype), w2.astype(dtype), interpret=True)
  assert got.dtype == dtype
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(monarch_dense(w1, w2), m_dense.T, rtol=1e-5, atol=1e-5)
    loss = lambda fn: (lambda *a: jnp.sum(jnp.sin(fn(*a))))
    kern = lambda *a: monarch_matmul(*a, interpret=True)
    for g, w in zip(jax.grad(loss(kern), (0, 1, 2))(x, w1, w2),
                    jax.grad(loss(monarch_matmul_reference), (0, 1, 2))(x, w1, w2)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  else:
    assert common.rel_l2(got, want) <= 1e-2


def test_projection_recovers_monarch_and_is_optimal():
  s1, s2 = default_shapes(16, 16, 2)        # block-pair rank t = q / l = 4
  w1, w2 = normal(*s1), normal(*s2)
  dense = np.asarray(monarch_dense(w1, w2), np.float64)
  p1, p2 = project(dense, s1, s2)
  np.testing.assert_allclose(monarch_dense(jnp.asarray(p1), jnp.asarray(p2)), dense, atol=1e-4)
  target = R.normal(size=(16, 16))
  p1, p2 = project(target, s1, s2)
  err = lambda a, b: np.linalg.norm(np.asarray(monarch_dense(jnp.asarray(a), jnp.asarray(b)),
                                               np.float64) - target)
  best = err(p1, p2)
  for _ in range(5):   # the closed form beats nearby Monarch matrices
    assert best <= err(p1 + 1e-2 * R.normal(size=s1), p2 + 1e-2 * R.normal(size=s2)) + 1e-9


def test_dft_is_monarch_up_to_reshape_permutations():
  with jax.enable_x64(True):
    for n, b in ((16, 4), (64, 8)):
      f = np.exp(-2j * np.pi * np.outer(np.arange(n), np.arange(n)) / n)
      tr = np.arange(n).reshape(b, b).T.reshape(-1)    # the reshape-transpose permutation
      s1, s2 = default_shapes(n, n, b)
      errs = []
      for pin in (np.arange(n), tr):
        for pout in (np.arange(n), tr):
          w = f[np.ix_(pout, pin)].T                   # jaxft layout (in, out)
          p1, p2 = project(w, s1, s2)
          approx = np.asarray(monarch_dense(jnp.asarray(p1), jnp.asarray(p2)))
          errs.append(np.abs(approx - w).max())
      assert min(errs) <= 1e-10 and max(errs) > 1e-3, errs


def test_monarch_hook_in_decoder_equals_densified_weights():
  cfg = DecoderConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2,
                      head_dim=8, d_ff=32)
  params = decoder.init(jax.random.PRNGKey(0), cfg)
  mparams = structured.monarchize(params, nblocks=2, targets=r"mlp/(up|gate)")
  assert "w1" in mparams["layers"]["mlp"]["up"] and "kernel" in mparams["layers"]["mlp"]["down"]
  dense = jax.tree.map(lambda x: x, params)
  for name in ("up", "gate"):
    lin = mparams["layers"]["mlp"][name]
    dense["layers"]["mlp"][name] = {"kernel": jax.vmap(monarch_dense)(lin["w1"], lin["w2"])}
  tokens = jnp.arange(12)[None] % cfg.vocab_size
  got = decoder.apply(mparams, tokens, cfg, linear=structured.monarch_hook(interpret=True))
  np.testing.assert_allclose(got, decoder.apply(dense, tokens, cfg), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="matched no linear"):
    structured.monarchize(params, nblocks=2, targets="nothing")


# ------------------------------------------------------------------ HALO


def test_halo_without_quantisation_is_the_plain_linear():
  x, w = normal(10, 48), normal(48, 24)
  f = lambda q: (lambda x, w: jnp.sum(jnp.sin(structured.halo_matmul(x, w, q, structured.GEMMS,
                                                                     8, True))))
  plain = lambda x, w: jnp.sum(jnp.sin(x @ w))
  np.testing.assert_allclose(f("none")(x, w), plain(x, w), rtol=1e-5)
  for g, want in zip(jax.grad(f("none"), (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)
  # Rotating the wgrad GEMM along d_in (not its inner token axis) is wrong: it must show.
  g = jnp.cos(x @ w)
  wrong = hadamard_transform_reference(x, 16).T @ g
  assert common.rel_l2(wrong, x.T @ g) > 0.5


def test_halo_int8_rotation_tames_outliers_and_fp8_gemm_is_exact():
  x = R.normal(size=(512, 576))
  x[:, [3, 100]] *= 50
  x, w = jnp.asarray(x, jnp.float32), normal(576, 64)
  want = x @ w
  err = lambda rot: float(jnp.linalg.norm(structured.halo_matmul(x, w, "int8", rot, 256, False)
                                          - want))
  assert err(()) >= 3 * err(("fwd",))
  a, b = normal(8, 32), normal(32, 4)
  qa, sa = structured.quantize(a, 1, "fp8")
  qb, sb = structured.quantize(b, 0, "fp8")
  assert qa.dtype == jnp.float8_e4m3fn
  deq = (qa.astype(jnp.float32) * sa) @ (qb.astype(jnp.float32) * sb)
  np.testing.assert_allclose(structured.qmatmul(a, b, "fp8"), deq, rtol=1e-6, atol=1e-6)


def test_halo_hook_trains_through_decoder():
  cfg = DecoderConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                      head_dim=8, d_ff=32)
  params = decoder.init(jax.random.PRNGKey(0), cfg)
  tokens = jnp.arange(16).reshape(2, 8) % cfg.vocab_size
  loss = lambda p, hook: jnp.mean(decoder.apply(p, tokens, cfg, linear=hook) ** 2)
  hook = structured.halo_hook("int8", use_kernel=False)
  g_halo = jax.grad(loss)(params, hook)
  g_ref = jax.grad(loss)(params, decoder.dense)
  for a, b in zip(jax.tree.leaves(g_halo), jax.tree.leaves(g_ref)):
    assert common.rel_l2(a, b) < 0.1
  with pytest.raises(ValueError, match="quant"):
    structured.halo_hook("int4")


# ------------------------------------------------------------------ mesh and TPU


def test_sharded_wrappers_equal_unsharded():
  mesh = common.cpu_mesh((8,), ("data",))
  x = normal(16, 32)
  got = jax.jit(lambda x: hadamard_transform_sharded(x, 16, mesh=mesh, base=4, interpret=True))(x)
  np.testing.assert_allclose(got, hadamard_transform_reference(x, 16), rtol=1e-5, atol=1e-5)
  s1, s2 = default_shapes(32, 16, 4)
  w1, w2 = normal(*s1), normal(*s2)
  got = jax.jit(lambda x: monarch_matmul_sharded(x, w1, w2, mesh=mesh, interpret=True))(x)
  np.testing.assert_allclose(got, monarch_matmul_reference(x, w1, w2), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not common.has_libtpu(), reason="needs libtpu (pip install 'jax[tpu]')")
def test_lower_for_tpu_through_mosaic():
  s1, s2 = default_shapes(512, 512, 4)
  args = [jax.ShapeDtypeStruct((64, 512), jnp.bfloat16), jax.ShapeDtypeStruct(s1, jnp.bfloat16),
          jax.ShapeDtypeStruct(s2, jnp.bfloat16)]
  mon = lambda x, w1, w2: monarch_matmul(x, w1, w2, interpret=False)
  c = common.tpu_aot_compile(mon, args, (P("data"), P(), P()), P("data"))
  assert "tpu_custom_call" in c.as_text()
  had = lambda x: jax.grad(lambda x: jnp.sum(hadamard_transform(x, 256, interpret=False)))(x)
  c = common.tpu_aot_compile(had, [jax.ShapeDtypeStruct((64, 1536), jnp.float32)],
                             (P("data"),), P("data"))
  assert "tpu_custom_call" in c.as_text()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_lowering_matches_reference():
  x = normal(256, 1024)
  np.testing.assert_allclose(hadamard_transform(x, interpret=False),
                             hadamard_transform_reference(x), rtol=1e-4, atol=1e-4)
  s1, s2 = default_shapes(1024, 1024, 4)
  w1, w2 = normal(*s1), normal(*s2)
  np.testing.assert_allclose(monarch_matmul(x, w1, w2, interpret=False),
                             monarch_matmul_reference(x, w1, w2), rtol=1e-3, atol=1e-2)


def test_halo_adapter_is_full_finetuning_through_halo_gemms():
  """`adapter.name=halo`: quant='none' is exactly `full`; int8 stays close and differs."""
  from jaxft import build, config as config_lib, train  # pylint: disable=g-import-not-at-top
  losses = {}
  for name, quant in (("full", None), ("halo", "none"), ("halo", "int8")):
    cfg = config_lib.load("tiny", [f"adapter.name={name}"] + ([f"adapter.quant={quant}"] if quant else []))
    model = build.load_model(cfg)
    task = build.build_task(cfg, model)
    params = model.module.init(jax.random.PRNGKey(0), model.cfg)
    frozen, trainable = task.adapter.init(jax.random.PRNGKey(1), params, task.adapter_spec, None)
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 32), 3, 200)
    batch = {"tokens": toks, "targets": jnp.roll(toks, -1, 1), "loss_mask": jnp.ones((2, 32))}
    fn = jax.jit(jax.value_and_grad(
        lambda t: train.loss_and_metrics(task, t, frozen, batch, None, jnp.float32)[0]))
    losses[(name, quant)] = fn(trainable)
  (l_full, g_full), (l_none, g_none), (l_int8, g_int8) = losses.values()
  np.testing.assert_allclose(l_none, l_full, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), g_none, g_full)
  assert 0 < abs(float(l_int8) - float(l_full)) < 0.02 * float(l_full)
