"""The adapter contract, one shared suite for every member, plus LoRA's own properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import adapters
from jaxft.adapters import base
from jaxft.models import DecoderConfig, decoder
from adapter_testlib import perturb

CFG = DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=48)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 64)


def spec(name, **kw):
  return {**adapters.DEFAULTS[name], "name": name, **kw}


def logits(adapter, frozen, trainable, s, rng=None):
  params = adapter.combine(frozen, trainable, s)
  return decoder.apply(params, TOKENS, CFG, linear=adapter.linear_hook(s), rng=rng)


def closed_form_count(name, params, s):
  if name == "full" and s["targets"] == (".*",):
    return base.count_params(params)
  if name == "full":  # 'mlp/': gate, up, down kernels of every layer
    return 3 * CFG.n_layers * CFG.d_model * CFG.d_ff
  flat = base.flatten(params)
  r = s["rank"]
  return sum(int(np.prod(flat[p + "/kernel"].shape[:-2])) * r * sum(flat[p + "/kernel"].shape[-2:])
             for p in adapters.lora.targets(params, s))


MEMBERS = [("full", {}), ("full", {"targets": ("mlp/",)}), ("lora", {"dropout": 0.0}),
           ("lora", {"rank": 3, "targets": ("attn/q$",)})]


@pytest.fixture(scope="module")
def params():
  return decoder.init(jax.random.PRNGKey(0), CFG)


@pytest.mark.parametrize("name,kw", MEMBERS)
def test_contract(name, kw, params):
  adapter, s = adapters.ADAPTERS[name], spec(name, **kw)
  frozen, trainable = adapter.init(jax.random.PRNGKey(2), params, s)
  base_logits = decoder.apply(params, TOKENS, CFG)
  # At init the model is unchanged.
  np.testing.assert_allclose(logits(adapter, frozen, trainable, s), base_logits, rtol=1e-6, atol=1e-6)
  # Trainable count is the closed form.
  assert base.count_params(trainable) == closed_form_count(name, params, s)
  # After training moves the trainable params, merged == unmerged.
  moved = perturb(trainable, jax.random.PRNGKey(3))
  merged = adapter.merge(frozen, moved, s)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  np.testing.assert_allclose(decoder.apply(merged, TOKENS, CFG), logits(adapter, frozen, moved, s),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(decoder.apply(merged, TOKENS, CFG), base_logits, atol=1e-4)
  # Logical axes cover the trainable tree with matching ranks.
  f_axes, t_axes = adapter.logical_axes(decoder.logical_axes(CFG), trainable, s)
  for axes, leaf in zip(jax.tree.leaves(t_axes, is_leaf=lambda x: isinstance(x, tuple)),
                        jax.tree.leaves(trainable)):
    assert len(axes) == leaf.ndim
  assert jax.tree.structure(f_axes, is_leaf=lambda x: isinstance(x, tuple)) == \
      jax.tree.structure(frozen)


@pytest.mark.parametrize("name", sorted(adapters.ADAPTERS))
def test_target_matching_nothing_is_an_error(name, params):
  adapter = adapters.ADAPTERS[name]
  with pytest.raises(adapters.TargetError, match=r"(?s)'nope/\.\*'.*layers/attn/q"):
    adapter.init(jax.random.PRNGKey(0), params, spec(name, targets=("nope/.*",)))


@pytest.mark.parametrize("name,kw", MEMBERS)
def test_only_trainable_gets_gradients(name, kw, params):
  adapter, s = adapters.ADAPTERS[name], spec(name, **kw)
  frozen, trainable = adapter.init(jax.random.PRNGKey(2), params, s)
  loss = lambda t: jnp.mean(logits(adapter, frozen, t, s) ** 2)
  grads = jax.grad(loss)(trainable)
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  assert set(base.flatten(frozen)).isdisjoint(base.flatten(trainable))
  assert base.count_params(frozen) + base.count_params(trainable) >= base.count_params(params)


def test_lora_gradient_of_b_at_init(params):
  """dL/dB = s * (x A)^T dL/dy at init (B = 0): checks scale and factor order."""
  s = spec("lora", rank=4, alpha=8.0, dropout=0.0, targets=("layers/mlp/up$",))
  adapter = adapters.lora
  frozen, trainable = adapter.init(jax.random.PRNGKey(2), params, s)
  a = trainable["layers"]["mlp"]["up"]["lora_a"]
  loss = lambda t: jnp.sum(logits(adapter, frozen, t, s)[:, -1, :3])
  g_b = jax.grad(loss)(trainable)["layers"]["mlp"]["up"]["lora_b"]
  # Same gradient via a perturbation of the kernel: dL/dW = x^T dL/dy, so dL/dB = s A^T dL/dW.
  w_grad = jax.grad(lambda p: jnp.sum(decoder.apply(p, TOKENS, CFG)[:, -1, :3]))(params)
  g_w = w_grad["layers"]["mlp"]["up"]["kernel"]
  expected = 2.0 * jnp.einsum("lir,lio->lro", a, g_w)
  np.testing.assert_allclose(g_b, expected, rtol=1e-4, atol=1e-6)


def test_lora_scale_follows_alpha_over_rank():
  assert adapters.lora.scale({"alpha": 16.0, "rank": 4}) == 4.0
  assert adapters.lora.scale({"alpha": 16.0, "rank": 16}) == 1.0


def test_lora_dropout_only_in_training(params):
  s = spec("lora", dropout=0.5)
  frozen, trainable = adapters.lora.init(jax.random.PRNGKey(2), params, s)
  moved = perturb(trainable, jax.random.PRNGKey(3), 0.5)
  eval_logits = logits(adapters.lora, frozen, moved, s)
  np.testing.assert_allclose(eval_logits, decoder.apply(adapters.lora.merge(frozen, moved, s),
                                                        TOKENS, CFG), rtol=1e-5, atol=1e-5)
  train_logits = logits(adapters.lora, frozen, moved, s, rng=jax.random.PRNGKey(5))
  assert not np.allclose(train_logits, eval_logits, atol=1e-3)
