"""SST (Sparse Spectral Training): METHODS.md A11's tests plus a `tiny` training run."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import adapters, config, runner, train
from jaxft.adapters import base, sst
from jaxft.models import DecoderConfig, decoder

CFG = DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=48)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 64)


def spec(**kw):
  return {**adapters.DEFAULTS["sst"], "name": "sst", "rank": 4, **kw}


@pytest.fixture(scope="module")
def params():
  return decoder.init(jax.random.PRNGKey(0), CFG)


@pytest.fixture(scope="module")
def init(params):
  return jax.jit(lambda p: sst.init(jax.random.PRNGKey(2), p, spec()))(params)


def logits(frozen, trainable, s):
  return decoder.apply(sst.combine(frozen, trainable, s), TOKENS, CFG, linear=sst.linear_hook(s))


def test_init_unchanged_merge_exact_and_axes(params, init):
  s = spec()
  frozen, trainable = init
  assert "kernel" not in frozen["layers"]["mlp"]["up"]
  np.testing.assert_allclose(logits(frozen, trainable, s), decoder.apply(params, TOKENS, CFG),
                             rtol=1e-4, atol=1e-4)
  moved = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(3), x.shape),
                       trainable)
  merged = sst.merge(frozen, moved, s)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  np.testing.assert_allclose(decoder.apply(merged, TOKENS, CFG), logits(frozen, moved, s),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(decoder.apply(merged, TOKENS, CFG), decoder.apply(params, TOKENS, CFG),
                         atol=1e-3)
  f_axes, t_axes = sst.logical_axes(decoder.logical_axes(CFG), trainable, s)
  is_t = lambda x: isinstance(x, tuple)
  assert jax.tree.structure(f_axes, is_leaf=is_t) == jax.tree.structure(frozen)
  for axes, leaf in zip(jax.tree.leaves(t_axes, is_leaf=is_t), jax.tree.leaves(trainable)):
    assert len(axes) == leaf.ndim
  with pytest.raises(ValueError, match="adapter.rank=99"):
    sst.init(jax.random.PRNGKey(2), params, spec(rank=99))


def _adam_steps(frozen, trainable, s, n=3):
  tx = optax.adam(1e-2)
  opt = tx.init(trainable)
  loss = lambda t: jnp.mean(logits(frozen, t, s) ** 2)

  @jax.jit
  def step(trainable, opt):
    upd, opt = tx.update(jax.grad(loss)(trainable), opt, trainable)
    return optax.apply_updates(trainable, upd), opt

  for _ in range(n):
    trainable, opt = step(trainable, opt)
  return trainable, opt


def test_unsampled_vectors_bit_identical_within_a_round(init):
  s = spec()
  frozen, trainable = init
  trained, _ = _adam_steps(frozen, trainable, s)
  f, t0, t1 = base.flatten(frozen), base.flatten(trainable), base.flatten(trained)
  for path in {p.rsplit("/", 1)[0] for p in t0}:
    u0, s0, v0 = sst._parts(f, t0, path)
    u1, s1, v1 = sst._parts(f, t1, path)
    idx = np.asarray(f[path + "/" + sst.IDX])
    for l in range(idx.shape[0]):
      other = np.setdiff1d(np.arange(u0.shape[-1]), idx[l])
      np.testing.assert_array_equal(np.asarray(u1[l][:, other]), np.asarray(u0[l][:, other]))
      np.testing.assert_array_equal(np.asarray(v1[l][other]), np.asarray(v0[l][other]))
      assert not np.array_equal(np.asarray(u1[l][:, idx[l]]), np.asarray(u0[l][:, idx[l]]))
    assert not np.array_equal(np.asarray(s1), np.asarray(s0))  # all of Σ trains


def test_enhanced_grad_divides_vector_gradient_by_sigma(init):
  frozen, trainable = init
  path = "layers/mlp/down"
  fl, tr = base.flatten(frozen), base.flatten(trainable)
  fixed = {k: fl[f"{path}/{k}"][0] for k in (sst.U, sst.VH, sst.IDX)}  # layer 0
  x = jax.random.normal(jax.random.PRNGKey(4), (3, fixed[sst.U].shape[0]))

  def grads(enhanced):
    hook = sst.linear_hook(spec(enhanced_grad=enhanced))
    loss = lambda t: jnp.sum(jnp.sin(hook({**fixed, **t}, x, "down", None)))
    return jax.grad(loss)({k: tr[f"{path}/{k}"][0] for k in (sst.S, sst.U_SEL, sst.VH_SEL)})

  on, off = grads(True), grads(False)
  sel = np.abs(np.asarray(tr[f"{path}/{sst.S}"][0])[np.asarray(fixed[sst.IDX])])  # (r,)
  np.testing.assert_allclose(on[sst.U_SEL] * sel[None, :], off[sst.U_SEL], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(on[sst.VH_SEL] * sel[:, None], off[sst.VH_SEL], rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(on[sst.S], off[sst.S])
  assert not np.allclose(on[sst.U_SEL], off[sst.U_SEL])


def test_round_end_resvd_keeps_weight_and_zeroes_moments(init):
  s = spec()
  frozen, trainable = init
  trained, opt = _adam_steps(frozen, trainable, s)
  before = sst.merge(frozen, trained, s)
  f2, t2, o2 = sst.new_round(jax.random.PRNGKey(7), frozen, trained, opt, s)
  after = sst.merge(f2, t2, s)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), (frozen, trained)) == \
      jax.tree.map(lambda x: (x.shape, x.dtype), (f2, t2))
  for u in (x for p, x in base.flatten(f2).items() if p.endswith(sst.U)):  # orthonormal again
    eye = np.eye(u.shape[-1])
    np.testing.assert_allclose(np.einsum("lim,lin->lmn", u, u), np.broadcast_to(eye, (
        u.shape[0], *eye.shape)), atol=1e-5)
  mu = o2[0].mu
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(mu))
  assert int(o2[0].count) == 3


def test_sampling_frequencies_match_sigma_chi2():
  sigma = jnp.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.15, 0.1])
  n = 10_000
  draws = jax.vmap(lambda k: sst.sample(k, sigma, 1)[0])(
      jax.random.split(jax.random.PRNGKey(0), n))
  counts = np.bincount(np.asarray(draws), minlength=sigma.size)
  expected = n * np.asarray(sigma) / float(jnp.sum(sigma))
  chi2 = float(np.sum((counts - expected) ** 2 / expected))
  assert chi2 < 24.32, (chi2, counts, expected)  # chi^2, 7 dof, p = 0.001
  # Without replacement: r distinct indices per draw.
  many = sst.sample(jax.random.PRNGKey(1), jnp.broadcast_to(sigma, (100, 8)), 5)
  assert all(len(set(row)) == 5 for row in np.asarray(many).tolist())


def test_train_tiny_with_rounds(tmp_path, monkeypatch):
  seen = []
  real = sst.update

  def spy(key, state, step, task, batch):
    new = real(key, state, step, task, batch)
    seen.append((np.asarray(jax.device_get(state.frozen["layers"]["attn"]["q"][sst.IDX])),
                 np.asarray(jax.device_get(new.frozen["layers"]["attn"]["q"][sst.IDX]))))
    return new

  monkeypatch.setattr(sst, "update", spy)
  cfg = config.load("tiny", ["adapter.name=sst", "adapter.rank=4", "adapter.round_steps=3",
                             "steps=6", "eval_every=0", "log_every=1"])
  out = runner.run(cfg, str(tmp_path / "sst"), progress=False, devices=jax.devices()[:1])
  assert out["step"] == 6 and len(seen) == 2
  assert any(not np.array_equal(a, b) for a, b in seen)  # a new η was drawn
  assert np.isfinite(out["final"]["loss"])
  assert isinstance(out["state"], train.TrainState)
