"""SM3 against optax.sm3 and its cover property; Fira / GaLore against optax.contrib.galore,
Adam, and the norm-growth limiter."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft.optimizers import fira, sm3


def run(tx, params, grads_fn, steps):
  def body(carry, t):
    p, s = carry
    u, s = tx.update(grads_fn(p, t), s, p)
    return (optax.apply_updates(p, u), s), None
  return jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), jnp.arange(steps, dtype=jnp.float32)))(params)[0]


def wavy(p, t):
  return jax.tree.map(lambda x: jnp.cos(3.0 * x + t) * (1.0 + 0.1 * t), p)


PARAMS = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 12)),
          "t": jax.random.normal(jax.random.PRNGKey(1), (2, 6, 5)),
          "b": jax.random.normal(jax.random.PRNGKey(2), (5,))}


def test_sm3_matches_optax():
  got, _ = run(sm3.sm3(0.05, b1=0.9), PARAMS, wavy, 50)
  want, _ = run(optax.sm3(0.05, momentum=0.9), PARAMS, wavy, 50)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), got, want)


def test_sm3_cover_bounds_the_sum_of_squares():
  tx = sm3.scale_by_sm3(b1=0.0)
  grads = [jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)) * (i % 3), PARAMS) for i in range(50)]
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  for g in grads:
    _, state = update(g, state, None)
  total = jax.tree.map(lambda *gs: sum(x ** 2 for x in gs), *grads)
  scores = sm3.regrowth_scores(state)
  jax.tree.map(lambda s, t: np.testing.assert_array_less(t - 1e-4 * (1 + t), s + 0 * t), scores, total)
  # O(m + n) accumulators (+ the momentum): the (8, 12) matrix keeps 8 + 12 numbers.
  assert [state.acc[i]["w"].shape for i in range(2)] == [(8, 1), (1, 12)]


def test_galore_matches_optax_contrib():
  params = {"w": PARAMS["w"], "tall": jax.random.normal(jax.random.PRNGKey(3), (12, 6)),
            "b": PARAMS["b"]}
  ours = fira.galore(0.01, rank=3, update_proj_gap=4, alpha=0.25)
  ref = optax.contrib.galore(0.01, rank=3, update_proj_gap=4, scale=0.25)
  got, _ = run(ours, params, wavy, 12)
  want, _ = run(ref, params, wavy, 12)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)


def test_full_rank_is_adam():
  got, _ = run(fira.fira(0.01, rank=8, update_proj_gap=3), PARAMS, wavy, 10)
  want, _ = run(optax.adam(0.01), PARAMS, wavy, 10)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)


def test_fira_update_written_out():
  g = jax.random.normal(jax.random.PRNGKey(4), (6, 10))
  tx = fira.scale_by_fira(rank=2, update_proj_gap=5, alpha=0.25, b1=0.9, b2=0.999, eps=1e-8)
  u, state = tx.update({"w": g}, tx.init({"w": g}), None)
  uu, _, vh = np.linalg.svd(np.asarray(g), full_matrices=False)
  p = vh[:2].T                                     # wide: right singular vectors (10, 2)
  r = np.asarray(g) @ p                            # (6, 2); Adam's first step: sign-like
  psi = r / (np.abs(r) + 1e-8)
  phi = np.linalg.norm(psi, axis=1, keepdims=True) / (np.linalg.norm(r, axis=1, keepdims=True) + 1e-8)
  want = 0.25 * psi @ p.T + phi * (np.asarray(g) - r @ p.T)
  np.testing.assert_allclose(u["w"], want, rtol=2e-4, atol=1e-5)
  assert state.mu["w"].shape == (2, 6)             # the low-rank state


def test_limiter_caps_residual_growth_after_a_spike():
  g = {"w": jax.random.normal(jax.random.PRNGKey(5), (6, 10))}
  def norms(limiter):
    # b1 = 0, b2 = 0.9 and a warm start: Adam's normalisation lets the spike through (~3x).
    tx = fira.scale_by_fira(rank=2, update_proj_gap=100, b1=0.0, b2=0.9, limiter=limiter)
    def body(s, scale):
      _, s = tx.update(jax.tree.map(lambda x: scale * x, g), s, None)
      return s, s.prev_norm["w"].squeeze()
    scales = jnp.concatenate([jnp.ones(60), jnp.array([100.0])])
    return jax.jit(lambda: jax.lax.scan(body, tx.init(g), scales)[1])()
  limited, free = norms(True), norms(False)
  assert float(free[-1]) > 2.0 * float(free[-2])            # the spike grows ||S|| unchecked
  assert float(limited[-1]) <= 1.01 * float(limited[-2]) * (1 + 1e-6)
