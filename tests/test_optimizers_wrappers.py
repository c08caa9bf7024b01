"""Sculpting Subspaces, the composable wrappers, sparsity and continual pre-training schedules."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import names
from jaxft.optimizers import compose, param_groups, subspace as osub
from jaxft.optimizers import schedules, sparsity as ps, wrappers


def run(tx, loss, params, steps):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(steps):
    updates, state = update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def stacked():
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"embed": {"embedding": jax.random.normal(keys[0], (10, 6))},
            "layers": {"attn": {"q": {"kernel": jax.random.normal(keys[1], (3, 6, 8))}}},
            "head": {"kernel": jax.random.normal(keys[2], (6, 10))}}
  target = jax.tree.map(lambda p: jax.random.normal(keys[3], p.shape), params)
  loss = lambda p: sum(jnp.sum((a - b) ** 2 * (1 + a ** 2)) for a, b in
                       zip(jax.tree.leaves(p), jax.tree.leaves(target)))
  return params, loss


# ------------------------------------------------------------------ Sculpting Subspaces

@pytest.mark.parametrize("reproject", [True, False])
def test_orthogonal_subspace_keeps_updates_off_the_frozen_subspace(reproject):
  params, loss = stacked()
  tx = osub.orthogonal_subspace(3e-2, mrr=0.3, trr=0.7, importance="depth",
                                reproject_params=reproject, targets=(r"attn/q/kernel$",))
  state = tx.init(params)
  u, vt = state.u["layers"]["attn"]["q"]["kernel"], state.vt["layers"]["attn"]["q"]["kernel"]
  ks = osub.kept_ranks((3, 6, 8), "layers/attn/q/kernel", 0.3, 0.7, "depth")
  assert ks == [1, 3, 4] and u.shape == vt.shape == (3, 6, 8)  # padded to the param's shape
  u, vt = u[..., :4], vt[:, :4, :]
  for l, k in enumerate(ks):  # orthonormal kept bases, zero padding past each layer's k
    np.testing.assert_allclose(u[l, :, :k].T @ u[l, :, :k], np.eye(k), atol=1e-5)
    assert float(jnp.abs(u[l, :, k:]).max(initial=0.0)) == 0.0
  w0 = params["layers"]["attn"]["q"]["kernel"]
  new, _ = run(tx, loss, params, 50)
  dw = new["layers"]["attn"]["q"]["kernel"] - w0
  left = jnp.linalg.norm(jnp.einsum("lmk,lmn->lkn", u, dw)) / jnp.linalg.norm(dw)
  right = jnp.linalg.norm(jnp.einsum("lmn,lkn->lmk", dw, vt)) / jnp.linalg.norm(dw)
  if reproject:
    assert float(left) < 1e-5 and float(right) < 1e-5
  else:  # Adam's elementwise scaling leaks into the frozen subspace without the re-projection
    assert float(left) > 1e-3
  assert not np.allclose(new["embed"]["embedding"], params["embed"]["embedding"])  # untargeted


def test_orthogonal_projection_is_idempotent_and_removes_the_kept_part():
  w = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 7))
  u, vt = osub._bases(w, "layers/x/kernel", 0.4, 0.4, "uniform")  # pylint: disable=protected-access
  u, vt = u[..., :2], vt[:, :2, :]
  g = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 7))
  once = osub.project(g, u, vt)
  np.testing.assert_allclose(osub.project(once, u, vt), once, atol=1e-5)
  np.testing.assert_allclose(osub.project(w, u, vt) + jnp.einsum(
      "lmk,lkn->lmn", u, jnp.einsum("lmk,lmn,lqn->lkq", u, w, vt) @ vt), w, atol=1e-5)


# ------------------------------------------------------------------ momentum reset / refactorise

def test_momentum_reset_zeroes_mu_only():
  params, loss = stacked()
  plain, _ = run(optax.adam(1e-2), loss, params, 3), None
  _, s_plain = plain[0], plain[1]
  _, s_reset = run(wrappers.momentum_reset(optax.adam(1e-2), every=3), loss, params, 3)
  inner, ref = s_reset.inner[0], s_plain[0]
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(inner.mu))
  assert any(float(jnp.abs(x).max()) > 0.0 for x in jax.tree.leaves(ref.mu))
  for a, b in zip(jax.tree.leaves((inner.nu, inner.count)), jax.tree.leaves((ref.nu, ref.count))):
    np.testing.assert_array_equal(a, b)
  _, s2 = run(wrappers.momentum_reset(optax.adam(1e-2), every=4), loss, params, 3)
  np.testing.assert_array_equal(s2.inner[0].mu["head"]["kernel"], ref.mu["head"]["kernel"])


def test_refactorize_keeps_the_product_and_balances_the_factors():
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  params = {"q": {"lora_a": jax.random.normal(keys[0], (2, 8, 3)),
                  "lora_b": 5.0 * jax.random.normal(keys[1], (2, 3, 6))}}
  tx = wrappers.refactorize(optax.sgd(0.0), every=2)
  s = tx.init(params)
  p = params
  for step in range(2):
    u, s = tx.update(jax.tree.map(jnp.zeros_like, p), s, p)
    p = optax.apply_updates(p, u)
    if step == 0:
      assert p is not params and np.array_equal(p["q"]["lora_a"], params["q"]["lora_a"])
  a, b = p["q"]["lora_a"], p["q"]["lora_b"]
  np.testing.assert_allclose(a @ b, params["q"]["lora_a"] @ params["q"]["lora_b"], atol=1e-4)
  np.testing.assert_allclose(jnp.linalg.norm(a, axis=(1, 2)), jnp.linalg.norm(b, axis=(1, 2)),
                             rtol=1e-5)


# ------------------------------------------------------------------ Reptile

def test_reptile_eps_one_is_plain_training_bit_exact():
  params, loss = stacked()
  inner = optax.adam(1e-2)
  a, _ = run(wrappers.reptile(inner, k=3, eps=1.0), loss, params, 5)
  b, _ = run(inner, loss, params, 5)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_reptile_k1_sgd_is_sgd_at_lr_times_eps_and_k3_matches_hand_formula():
  params, loss = stacked()
  a, _ = run(wrappers.reptile(optax.sgd(1e-2), k=1, eps=0.5), loss, params, 4)
  b, _ = run(optax.sgd(5e-3), loss, params, 4)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
  got, _ = run(wrappers.reptile(optax.sgd(1e-2), k=3, eps=0.25), loss, params, 3)
  inner, _ = run(optax.sgd(1e-2), loss, params, 3)
  want = jax.tree.map(lambda t0, tk: t0 + 0.25 * (tk - t0), params, inner)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ layer-wise LR decay

def test_layerwise_lr_decay_scales_adam_updates_per_layer():
  params, loss = stacked()
  xi = 0.8
  g = jax.grad(loss)(params)
  plain, _ = optax.adam(1e-2).update(g, optax.adam(1e-2).init(params), params)
  tx = param_groups.layerwise_lr_decay(optax.adam(1e-2), xi)
  dec, _ = tx.update(g, tx.init(params), params)
  q, q0 = dec["layers"]["attn"]["q"]["kernel"], plain["layers"]["attn"]["q"]["kernel"]
  for l in range(3):  # layer l (0-based) of L = 3 gets xi^(L - 1 - l)
    np.testing.assert_allclose(q[l], xi ** (2 - l) * q0[l], rtol=1e-6)
  np.testing.assert_allclose(dec["embed"]["embedding"], xi ** 3 * plain["embed"]["embedding"],
                             rtol=1e-6)
  np.testing.assert_array_equal(dec["head"]["kernel"], plain["head"]["kernel"])


# ------------------------------------------------------------------ SPDF / gradual pruning

def test_spdf_mask_stays_exactly_zero_then_dense_fine_tuning_releases_it():
  params, loss = stacked()
  tx = ps.prune_schedule(optax.adam(1e-2), "spdf", sparsity=0.5, dense_from=6)
  p, s = params, tx.init(params)
  update = jax.jit(tx.update)
  for step in range(1, 9):
    u, s = update(jax.grad(loss)(p), s, p)
    p = optax.apply_updates(p, u)
    q = p["layers"]["attn"]["q"]["kernel"].reshape(3, -1)
    zeros = np.sum(np.asarray(q) == 0.0, axis=1)
    if step == 1:
      mask = np.asarray(q) == 0.0
    if step < 6:
      assert list(zeros) == [24, 24, 24]  # exactly half of each layer's 48 weights
      assert np.array_equal(np.asarray(q) == 0.0, mask)  # the same static mask
    else:
      assert zeros.sum() == 0
  assert np.all(np.asarray(p["embed"]["embedding"]) != 0)  # untargeted leaves stay dense


def test_gradual_pruning_follows_the_cubic_and_ends_at_the_final_sparsity():
  params, loss = stacked()
  tx = ps.prune_schedule(optax.adam(1e-2), "gradual", sparsity=0.75, initial_sparsity=0.0,
                         start=2, end=6)
  p, s = params, tx.init(params)
  update = jax.jit(tx.update)
  for step in range(1, 10):
    u, s = update(jax.grad(loss)(p), s, p)
    p = optax.apply_updates(p, u)
    head = np.asarray(p["head"]["kernel"])
    want = int(np.floor(float(ps.sparsity_at(step, 0.0, 0.75, 2, 6)) * head.size + 1e-6))
    assert np.sum(head == 0.0) == want
  assert np.sum(head == 0.0) == int(0.75 * head.size)
  np.testing.assert_allclose(float(ps.sparsity_at(4, 0.0, 0.75, 2, 6)), 0.75 - 0.75 / 8)


def test_mean_param_count_matches_the_integral():
  n, s_i, s_f, t0, t1, total = 1000.0, 0.1, 0.8, 250.0, 750.0, 1000.0
  t = (np.arange(200_000) + 0.5) * total / 200_000
  numeric = np.mean(n * (1 - np.asarray(ps.sparsity_at(t, s_i, s_f, t0, t1))))
  np.testing.assert_allclose(ps.mean_param_count(n, s_i, s_f, t0, t1, total), numeric, rtol=1e-5)


# ------------------------------------------------------------------ schedules

def test_rewarm_values_at_the_phase_boundaries():
  sched = schedules.rewarm(1.0, 1000, min_ratio=0.1)  # 1% warmup = 10 steps
  assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.5)
  assert float(sched(10)) == pytest.approx(1.0)
  assert float(sched(505)) == pytest.approx(0.55, abs=1e-6)
  assert float(sched(1000)) == pytest.approx(0.1)


@pytest.mark.parametrize("anneal_start", [100, 137, 250])
def test_infinite_lr_phases_and_anneal_end(anneal_start):
  sched = schedules.infinite_lr(1.0, 300, warmup=10, cooldown=40, const_ratio=0.25, anneal=30,
                                anneal_start=anneal_start, min_ratio=0.01)
  assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
  assert float(sched(30)) == pytest.approx(0.625)
  assert all(float(sched(t)) == pytest.approx(0.25) for t in range(50, anneal_start + 1))
  assert float(sched(anneal_start + 30)) == pytest.approx(0.01)
  assert float(sched(anneal_start + 15)) == pytest.approx(0.13)


def test_schedules_and_wrappers_by_name():
  spec = {"schedule": "infinite_lr", "lr": 2.0, "warmup_steps": 0, "min_lr_ratio": 0.0,
          "schedule_args": {"anneal_steps": 10}}
  sched = schedules.make(spec, 100)
  assert float(sched(50)) == pytest.approx(0.5) and float(sched(100)) == 0.0
  assert schedules.make({**spec, "schedule": "cosine"}, 100) is None
  assert compose.wrapper_names("reptile, momentum_reset") == ("reptile", "momentum_reset")
  params, loss = stacked()
  tx = compose.wrap(optax.adam(1e-2), {"wrappers": ("layerwise_lr_decay", "reptile"),
                                       "wrapper_args": {"reptile_k": 2}}, 10)
  new, _ = run(tx, loss, params, 3)
  assert float(loss(new)) < float(loss(params))
  with pytest.raises(names.UnknownNameError, match="reptile"):
    compose.wrap(optax.adam(1e-2), {"wrappers": ("reptlie",)}, 10)
