"""CoDyRA's ℓ1 proximal step through the adapter optimizer contract.

"Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning
Vision-Language Models with Dynamic Rank-Selective LoRA": after each optimizer step
w <- sign(w) max(|w| - λ η_t, 0). The contract: an adapter module's
`optimizer_transform(spec, schedule)` is applied to every update after the optimizer.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import config, runner
from jaxft.adapters import codyra
from jaxft.optimizers import compose


def _soft(x, tau):
  return np.sign(x) * np.maximum(np.abs(x) - tau, 0.0)


def test_two_steps_by_hand_sgd_then_prox():
  """SGD + prox with a decaying lr: w1 = S(w0 - η0 g0, λη0), w2 = S(w1 - η1 g1, λη1)."""
  sched = lambda t: 0.5 / (1.0 + t)              # η0 = 0.5, η1 = 0.25
  lam = 0.4                                      # τ0 = 0.2, τ1 = 0.1
  params = {"q": {"lora_d": jnp.array([1.0, -0.3, 0.05, 0.6]), "lora_a": jnp.array([0.01, 2.0])}}
  grads = [{"q": {"lora_d": jnp.array([0.2, -0.2, 0.0, 1.0]), "lora_a": jnp.array([1.0, 1.0])}},
           {"q": {"lora_d": jnp.array([0.4, 0.1, -0.3, 0.2]), "lora_a": jnp.array([1.0, 1.0])}}]
  tx = compose.with_adapter(optax.sgd(sched), codyra, {"l1": lam}, sched)
  state, p = tx.init(params), params
  for g in grads:
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
  w0 = np.array([1.0, -0.3, 0.05, 0.6])
  w1 = _soft(w0 - 0.5 * np.array([0.2, -0.2, 0.0, 1.0]), 0.2)     # S([0.9, -0.2, 0.05, 0.1])
  np.testing.assert_allclose(w1, [0.7, 0.0, 0.0, 0.0], atol=1e-7)
  w2 = _soft(w1 - 0.25 * np.array([0.4, 0.1, -0.3, 0.2]), 0.1)
  np.testing.assert_allclose(w2, [0.5, 0.0, 0.0, 0.0], atol=1e-7)   # 0.025, 0.075 < τ1 stay 0
  np.testing.assert_allclose(p["q"]["lora_d"], w2, atol=1e-6)
  # Other leaves get the plain SGD step, no threshold.
  np.testing.assert_allclose(p["q"]["lora_a"], [0.01 - 0.75, 2.0 - 0.75], atol=1e-6)
  # The train-step form (fresh state, explicit step) gives the same second step.
  t = codyra.optimizer_transform({"l1": lam}, sched)
  u, _ = t.update(jax.tree.map(lambda x: -0.25 * x, grads[1]), t.init(params),
                  {"q": {"lora_d": jnp.asarray(w1), "lora_a": params["q"]["lora_a"]}}, step=1)
  np.testing.assert_allclose(w1 + u["q"]["lora_d"], w2, atol=1e-7)
  with pytest.raises(ValueError, match="l1"):
    codyra.optimizer_transform({"l1": -1.0}, sched)


def test_real_run_zeroes_ranks_and_they_stay_zero(tmp_path):
  """`jaxft train tiny --config.adapter.name=codyra` with a large λ: w hits exactly 0
  within the first steps (λη = 0.3 per step from w = 1) and is still exactly 0 after
  more steps (resumed run), although A and B keep training."""
  common = ["--config.adapter.name=codyra", "--config.adapter.l1=100.0", "--config.eval_every=0",
            "--config.checkpoint_every=4", "--config.optimizer.schedule=constant",
            "--config.optimizer.warmup_steps=0",
            "--config.log_every=100"]
  one = jax.devices()[:1]
  first = runner.run(config.load("tiny", common + ["--config.steps=4"]), str(tmp_path),
                     progress=False, devices=one)
  d4 = np.asarray(first["state"].trainable["layers"]["attn"]["q"]["lora_d"])
  zero4 = d4 == 0
  assert zero4.any(), d4                             # ranks pruned to exactly 0
  later = runner.run(config.load("tiny", common + ["--config.steps=8"]), str(tmp_path),
                     progress=False, devices=one)
  assert later["step"] == 8
  for lin in ("q", "k", "v", "o"):
    d = np.asarray(later["state"].trainable["layers"]["attn"][lin]["lora_d"])
    assert (d == 0).any()
  d8 = np.asarray(later["state"].trainable["layers"]["attn"]["q"]["lora_d"])
  assert (d8[zero4] == 0).all()                      # once exactly 0, stays 0
  assert codyra.active_ranks(later["state"].trainable) <= codyra.active_ranks(
      first["state"].trainable)
