"""Lion, Signum and signSGD against optax and the update formula written out."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import optimizers
from jaxft.optimizers import core


def params64():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"w": jax.random.normal(k1, (6, 4), jnp.float64), "b": jax.random.normal(k2, (4,), jnp.float64)}


def trajectory(tx, params, steps=100):
  """Parameters after `steps` updates on grads cos(3 p + t) (a fixed, non-trivial sequence)."""
  def body(carry, t):
    p, s = carry
    u, s = tx.update(jax.tree.map(lambda x: jnp.cos(3.0 * x + t), p), s, p)
    return (optax.apply_updates(p, u), s), None
  return jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), jnp.arange(steps, dtype=p["w"].dtype))[0][0])(params)


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def test_bit_exact_with_optax_in_float64(x64):
  del x64
  p = params64()
  pairs = [
      (optimizers.lion(1e-3, weight_decay=0.1), optax.lion(1e-3, weight_decay=0.1)),
      (optimizers.lion(1e-3, b1=0.9, b2=0.9, weight_decay=0.0), optax.signum(1e-3, 0.9)),
      (optimizers.signum(1e-3, b1=0.9), optax.signum(1e-3, 0.9)),
      (optimizers.lion(1e-3, b1=0.0, weight_decay=0.0), optax.sign_sgd(1e-3)),
      (optimizers.signsgd(1e-3), optax.sign_sgd(1e-3)),
  ]
  for ours, ref in pairs:
    jax.tree.map(np.testing.assert_array_equal, trajectory(ours, p), trajectory(ref, p))


def test_matches_optax_lion_float32_over_100_steps():
  p = jax.tree.map(lambda x: x.astype(jnp.float32), params64())
  got = trajectory(optimizers.lion(3e-3, weight_decay=0.3), p)
  want = trajectory(optax.lion(3e-3, weight_decay=0.3), p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), got, want)


def test_update_formula_written_out_and_unit_magnitude():
  lr, b1, b2, wd = 0.01, 0.8, 0.95, 0.5
  w, g1, g2 = jnp.array([1.0, -2.0, 3.0]), jnp.array([0.3, -0.1, 0.2]), jnp.array([-0.5, -0.2, 0.1])
  tx = optimizers.lion(lr, b1=b1, b2=b2, weight_decay=wd)
  s = tx.init(w)
  u1, s = tx.update(g1, s, w)
  w1 = w + u1
  u2, s = tx.update(g2, s, w1)
  m1 = (1 - b2) * g1
  np.testing.assert_allclose(u1, -lr * (np.sign((1 - b1) * g1) + wd * w), rtol=1e-6)
  np.testing.assert_allclose(u2, -lr * (np.sign(b1 * m1 + (1 - b1) * g2) + wd * w1), rtol=1e-6)
  no_decay = optimizers.lion(lr, weight_decay=0.0)
  u, _ = no_decay.update(g1, no_decay.init(w), w)
  np.testing.assert_allclose(np.abs(u), lr)          # |delta theta_i| = lr with wd = 0


def test_one_state_buffer_per_parameter_and_bf16_momentum():
  p = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
  params_count = sum(x.size for x in jax.tree.leaves(p))
  state = optimizers.lion(1e-3).init(p)
  assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == params_count
  assert sum(x.size for x in jax.tree.leaves(optimizers.signsgd(1e-3).init(p)) if x.ndim) == 0
  tx = optimizers.lion(1e-3, mu_dtype=jnp.bfloat16)
  s = tx.init(p)
  _, s = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, p), s, p)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(s[0].mu))


def test_decay_mask_skips_norm_gains_and_biases():
  p = {"attn_norm": {"scale": jnp.ones((2, 4))}, "q": {"kernel": jnp.ones((2, 4, 4)), "bias": jnp.ones((2, 4))}}
  assert core.matrix_mask(p) == {"attn_norm": {"scale": False}, "q": {"kernel": True, "bias": False}}
  spec = {**optimizers.DEFAULTS["lion"], "name": "lion", "weight_decay": 0.5, "clip_norm": 0.0,
          "schedule": "constant"}
  tx, _ = optimizers.build(spec, 10)
  zeros = jax.tree.map(jnp.zeros_like, p)
  u, _ = tx.update(zeros, tx.init(p), p)
  np.testing.assert_allclose(u["q"]["kernel"], -spec["lr"] * 0.5)
  np.testing.assert_allclose(u["attn_norm"]["scale"], 0.0)
  with pytest.raises(ValueError, match="matrices"):
    optimizers.build({**spec, "decay_mask": "weights"}, 10)
