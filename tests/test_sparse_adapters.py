"""Sparse and masked-delta adapters: SpIEL, HFT, PaCA, S²FT, LT-SFT — the contract (identity
at init, merge = unmerged, trainable count) plus properties a wrong implementation fails,
and compiled-step checks that frozen weights get no full weight-gradient GEMM."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxft_kernels import common

from jaxft import adapters, objectives
from jaxft.adapters import base, calibrate, hft, lt_sft, s2ft, spiel
from jaxft.adapters import sparse_delta as sd
from jaxft.models import DecoderConfig, decoder
from adapter_testlib import perturb

CFG = DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8,
                    d_ff=48)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 64)
L, D, F = CFG.n_layers, CFG.d_model, CFG.d_ff
KERNEL_SHAPES = {(D, D), (D, F), (F, D)}


@pytest.fixture(scope="module")
def params():
  return decoder.init(jax.random.PRNGKey(0), CFG)


def _apply(p, t, **kw):
  return decoder.apply(p, t, CFG, **kw)


@pytest.fixture(scope="module")
def calib():
  tok = jax.random.randint(jax.random.PRNGKey(3), (1, 2, 13), 0, 8)
  batches = {"tokens": tok[..., :-1], "targets": tok[..., 1:],
             "loss_mask": jnp.ones((1, 2, 12), jnp.float32)}
  return calibrate.Calibration(_apply, objectives.xent.loss_fn, objectives.xent.DEFAULTS, batches)


def spec(name, **kw):
  return {**adapters.DEFAULTS[name], "name": name, **kw}


def logits_fn(adapter, s):
  return jax.jit(lambda f, t: _apply(adapter.combine(f, t, s), TOKENS,
                                     linear=adapter.linear_hook(s)))


def k_of(density, n):
  return max(1, round(density * n))


N_ELEM = L * (4 * k_of(0.05, D * D) + 2 * k_of(0.05, D * F) + k_of(0.05, F * D))
# name, overrides, closed-form trainable count
MEMBERS = [
    ("spiel", {"density": 0.05}, N_ELEM),
    ("lt_sft", {"density": 0.05}, N_ELEM),
    ("paca", {"rank": 4}, L * 4 * (4 * D + 2 * F + D)),
    ("s2ft", {"heads": 1, "head_dim": 8, "channel_fraction": 0.1}, L * (8 * D + 5 * D)),
    ("hft", {}, L * (4 * D * D + 3 * D * F)),
]


@pytest.mark.parametrize("name,kw,n_train", MEMBERS, ids=[m[0] for m in MEMBERS])
def test_contract(params, calib, name, kw, n_train):
  """Identity at init (S²FT: after co-permutation), merge == unmerged, trainable count."""
  adapter, s = adapters.ADAPTERS[name], spec(name, **kw)
  frozen, trainable = adapter.init(jax.random.PRNGKey(5), params, s, calib)
  assert adapters.count_params(trainable) == n_train
  base_logits = jax.jit(lambda p: _apply(p, TOKENS))(params)
  fn = logits_fn(adapter, s)
  np.testing.assert_allclose(fn(frozen, trainable), base_logits, atol=2e-5)
  trainable = perturb(trainable, jax.random.PRNGKey(6))
  out = fn(frozen, trainable)
  assert float(jnp.max(jnp.abs(out - base_logits))) > 1e-3
  merged = jax.jit(lambda f, t: adapter.merge(f, t, s))(frozen, trainable)
  assert set(base.flatten(merged)) == set(base.flatten(params))
  np.testing.assert_allclose(jax.jit(lambda p: _apply(p, TOKENS))(merged), out, atol=2e-5)
  fa, ta = adapter.logical_axes(decoder.logical_axes(CFG), trainable, s)
  assert set(base.flatten(fa)) == set(base.flatten(frozen))
  assert set(base.flatten(ta)) == set(base.flatten(trainable))


# ------------------------------------------------------------------ the ops
X = jax.random.normal(jax.random.PRNGKey(10), (3, 5, 24))
W = jax.random.normal(jax.random.PRNGKey(11), (24, 40))
G = jax.random.normal(jax.random.PRNGKey(12), (3, 5, 40))


def test_element_delta_changes_exactly_selected_and_grads_match_reference():
  idx = sd.random_indices(jax.random.PRNGKey(0), W.shape, 30)
  phi = jax.random.normal(jax.random.PRNGKey(1), (30,))
  change = sd.scatter(W, idx, phi) - W
  mask = np.zeros(W.size, bool)
  mask[np.asarray(idx)] = True
  assert np.all(np.asarray(change).reshape(-1)[~mask] == 0)
  assert np.all(np.asarray(change).reshape(-1)[mask] != 0)
  ref = lambda x, p: jnp.sum(G * (x @ W.reshape(-1).at[idx].add(p).reshape(W.shape)))
  ours = lambda x, p: jnp.sum(G * sd.element_matmul(x, W, idx, p))
  np.testing.assert_allclose(ours(X, phi), ref(X, phi), rtol=1e-5)
  for a, b in zip(jax.grad(ours, (0, 1))(X, phi), jax.grad(ref, (0, 1))(X, phi)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_row_delta_gradient_is_that_slice_of_full_gradient_and_saves_only_the_slice():
  rows = jnp.array([2, 7, 11, 20])
  delta = jax.random.normal(jax.random.PRNGKey(2), (4, 40))
  full = jax.grad(lambda w: jnp.sum(G * (X @ w)))(sd.scatter_rows(W, rows, delta))
  for op, r in ((lambda x, d: sd.row_matmul(x, W, rows, d), rows),
                (lambda x, d: sd.prefix_matmul(x, W, d), jnp.arange(4))):
    dx, dd = jax.grad(lambda x, d: jnp.sum(G * op(x, d)), (0, 1))(X, delta)
    np.testing.assert_allclose(dd, full[r], rtol=1e-4, atol=1e-4)
    w_eff = sd.scatter_rows(W, r, delta)
    np.testing.assert_allclose(dx, G @ w_eff.T, rtol=1e-4, atol=1e-4)
    _, vjp = jax.vjp(op, X, delta)
    saved = [tuple(a.shape) for a in jax.tree.leaves(vjp)]
    assert (3, 5, 4) in saved and (3, 5, 24) not in saved  # x[..., S] kept, not x (PaCA)


# ------------------------------------------------------------------ no full weight gradient
def _loss(adapter, s):
  def loss(t, f):
    y = _apply(adapter.combine(f, t, s), TOKENS, linear=adapter.linear_hook(s))
    return jnp.mean(y ** 2)
  return loss


def _weight_grad_dots(jaxpr, skip=()):
  """Rank-2 (d_in, d_out) dot outputs, not descending into primitives named in `skip`."""
  import jax.extend
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and tuple(eqn.outvars[0].aval.shape) in KERNEL_SHAPES:
      out.append(tuple(eqn.outvars[0].aval.shape))
    if eqn.primitive.name in skip:
      continue
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _weight_grad_dots(sub, skip)
  return out


@pytest.mark.parametrize("name,kw", [("spiel", {"density": 0.05}), ("paca", {"rank": 4}),
                                     ("s2ft", {"heads": 1, "head_dim": 8}), ("full", {}),
                                     ("lt_sft", {"density": 0.05, "grad_impl": "dense"})])
def test_frozen_weights_get_no_weight_gradient_gemm(params, name, kw):
  adapter, s = adapters.ADAPTERS[name], spec(name, **kw)
  if name == "lt_sft":  # its mask needs calibration; the dense-gradient switch is the control
    frozen, trainable = adapters.ADAPTERS["spiel"].init(jax.random.PRNGKey(5), params, s, None)
  else:
    frozen, trainable = adapter.init(jax.random.PRNGKey(5), params, s, None)
  jaxpr = jax.make_jaxpr(jax.grad(_loss(adapter, s)))(trainable, frozen).jaxpr
  dots = _weight_grad_dots(jaxpr)
  positive = name in ("full", "lt_sft")
  assert (len(dots) > 0) == positive, dots  # the check sees dW GEMMs when they exist
  assert common.dot_output_shapes(jaxpr)


def test_hft_half_of_matrices_reproducible_and_dw_only_in_taken_branch(params):
  m = hft.masks(jax.random.PRNGKey(0), 30, stage=0)
  on = np.stack([np.asarray(v) for v in m.values()])  # (7, 30)
  assert on[:4].sum(0).tolist() == [2] * 30            # 2 of 4 attention matrices per layer
  assert sorted(on[4:].sum(0).tolist()) == [1] * 15 + [2] * 15
  assert on.sum() == (4 * 30 + 3 * 30) // 2
  again = hft.masks(jax.random.PRNGKey(0), 30, stage=0)
  assert all(np.array_equal(m[k], again[k]) for k in m)
  other = hft.masks(jax.random.PRNGKey(0), 30, stage=1)
  assert not all(np.array_equal(m[k], other[k]) for k in m)
  s = spec("hft")
  frozen, trainable = hft.init(jax.random.PRNGKey(5), params, s)
  grads = jax.jit(jax.grad(_loss(hft, s)))(trainable, frozen)
  ff = base.flatten(frozen)
  for path, g in base.flatten(grads).items():
    flag = np.asarray(ff[path.rsplit("/", 1)[0] + "/" + hft.ON])
    g = np.asarray(g)
    assert np.all(g[flag == 0] == 0) and np.all(np.abs(g[flag == 1]).sum((1, 2)) > 0)
  assert hft.active_params(frozen, trainable) * 2 == adapters.count_params(trainable)
  jaxpr = jax.make_jaxpr(jax.grad(_loss(hft, s)))(trainable, frozen).jaxpr
  assert not _weight_grad_dots(jaxpr, skip=("cond",))  # dW GEMMs exist only inside the cond
  assert _weight_grad_dots(jaxpr)
  # restage: the function is kept (Δ folded into W0), Δ = 0, new flags
  trainable = jax.tree.map(lambda d, f: d * f[:, None, None],
                           perturb(trainable, jax.random.PRNGKey(1)),
                           _flags_like(frozen, trainable))
  fn = logits_fn(hft, s)
  before = fn(frozen, trainable)
  opt = {"mu": trainable, "count": jnp.array(3)}
  f2, t2, o2 = hft.restage(jax.random.PRNGKey(5), frozen, trainable, opt, stage=1)
  np.testing.assert_allclose(fn(f2, t2), before, atol=2e-5)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves((t2, o2["mu"])))
  assert int(o2["count"]) == 3


def _flags_like(frozen, trainable):
  ff = base.flatten(frozen)
  return base.unflatten({p: ff[p.rsplit("/", 1)[0] + "/" + hft.ON].astype(jnp.float32)
                         for p in base.flatten(trainable)})


# ------------------------------------------------------------------ member properties
def test_spiel_reselect_prunes_smallest_regrows_top_scores_and_zeroes_state(params):
  s = spec("spiel", density=0.05, targets=("mlp/down$",), reselect_fraction=0.25)
  frozen, trainable = spiel.init(jax.random.PRNGKey(0), params, s)
  trainable = perturb(trainable, jax.random.PRNGKey(1), 1.0)
  scores = {"layers/mlp/down": jax.random.uniform(jax.random.PRNGKey(2), (L, F, D))}
  opt = {"mu": trainable, "nu": jax.tree.map(jnp.abs, trainable), "count": jnp.array(7)}
  f2, t2, o2 = spiel.reselect(frozen, trainable, opt, scores, step=0, spec=s)
  idx, phi = frozen["layers"]["mlp"]["down"][sd.IDX], trainable["layers"]["mlp"]["down"][sd.DELTA]
  idx2, phi2 = f2["layers"]["mlp"]["down"][sd.IDX], t2["layers"]["mlp"]["down"][sd.DELTA]
  k = idx.shape[-1]
  n = int(np.ceil(0.25 * k))
  for layer in range(L):
    i, p, i2, p2 = map(lambda a: np.asarray(a[layer]), (idx, phi, idx2, phi2))
    assert len(set(i2.tolist())) == k                            # active count constant, distinct
    dropped = np.argsort(np.abs(p))[:n]
    kept = np.setdiff1d(np.arange(k), dropped)
    assert np.array_equal(i2[kept], i[kept]) and np.array_equal(p2[kept], p[kept])
    assert np.all(p2[dropped] == 0)
    sc = np.array(scores["layers/mlp/down"][layer]).reshape(-1)
    sc[i[kept]] = -np.inf
    assert set(i2[dropped].tolist()) == set(np.argsort(-sc)[:n].tolist())  # top-score regrowth
    mu2 = np.asarray(o2["mu"]["layers"]["mlp"]["down"][sd.DELTA][layer])
    assert np.all(mu2[dropped] == 0) and np.array_equal(mu2[kept], p[kept])
  assert int(o2["count"]) == 7
  assert spiel.fraction(100, {**s, "total_steps": 100}) == 0.0


def test_spiel_sm3_scores_bound_the_second_moment():
  g = jax.random.normal(jax.random.PRNGKey(0), (6, 5))
  stats = spiel.sm3_update(spiel.sm3_update({}, {"w": g}), {"w": 2 * g})
  est = spiel.sm3_scores(stats)["w"]
  assert np.all(np.asarray(est) >= np.asarray(5 * g ** 2) - 1e-5)  # SM3 upper-bounds Σ g²


def test_lt_sft_mask_is_top_changed_entries_and_diffs_compose_by_addition(params):
  s = spec("lt_sft", density=0.1, targets=("mlp/up$",))
  theta1 = perturb(params, jax.random.PRNGKey(4))
  frozen, trainable = lt_sft.init_from_finetuned(params, theta1, s)
  idx = np.asarray(frozen["layers"]["mlp"]["up"][sd.IDX])
  change = np.abs(np.asarray(theta1["layers"]["mlp"]["up"]["kernel"] -
                             params["layers"]["mlp"]["up"]["kernel"])).reshape(L, -1)
  k = k_of(0.1, D * F)
  assert idx.shape == (L, k)
  for layer in range(L):
    assert set(idx[layer].tolist()) == set(np.argsort(-change[layer])[:k].tolist())
  # two diffs with disjoint supports: exact addition, order irrelevant
  w = params["layers"]["mlp"]["up"]["kernel"]
  d1 = {"layers/mlp/up": (jnp.asarray(idx), jnp.ones((L, k)))}
  other = np.stack([np.setdiff1d(np.arange(D * F), idx[i])[:k] for i in range(L)])
  d2 = {"layers/mlp/up": (jnp.asarray(other, jnp.int32), 2 * jnp.ones((L, k)))}
  a = lt_sft.compose(params, d1, d2)["layers"]["mlp"]["up"]["kernel"]
  b = lt_sft.compose(params, d2, d1)["layers"]["mlp"]["up"]["kernel"]
  np.testing.assert_array_equal(a, b)
  dense = sum(sd.dense_delta(w.shape, *d["layers/mlp/up"]) for d in (d1, d2))
  np.testing.assert_allclose(a, w + dense, atol=1e-6)
  assert int(np.count_nonzero(np.asarray(dense)[0])) == 2 * k


def test_s2ft_permuted_model_is_the_same_function(params):
  ch = jax.vmap(lambda k: jax.random.permutation(k, F))(jax.random.split(jax.random.PRNGKey(0), L))
  hd = jax.vmap(lambda k: jax.random.permutation(k, 4))(jax.random.split(jax.random.PRNGKey(1), L))
  permuted = s2ft.permute(params, ch, hd, head_dim=8)
  assert not np.allclose(permuted["layers"]["mlp"]["down"]["kernel"],
                         params["layers"]["mlp"]["down"]["kernel"])
  fn = jax.jit(lambda p: _apply(p, TOKENS))
  np.testing.assert_allclose(fn(permuted), fn(params), atol=2e-5)
  # the selection lands in front: the trained slice is the selected channels' rows
  s = spec("s2ft", channel_fraction=0.1)
  frozen, _ = s2ft.init(jax.random.PRNGKey(5), params, s)
  sel = s2ft._select(jax.random.split(jax.random.PRNGKey(5))[0], (L,), F, 5)
  np.testing.assert_array_equal(frozen["layers"]["mlp"]["down"]["kernel"][:, :5],
                                jnp.take_along_axis(params["layers"]["mlp"]["down"]["kernel"],
                                                    sel[..., None], axis=1))
