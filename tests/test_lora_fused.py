"""The LoRA linear with a hand-written backward (adapter.kernel=fused), the 16-bit dropout,
and the cross entropy's shared max: each against the plain expression / its definition."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.adapters import fused, lora
from jaxft.models import DecoderConfig, decoder, layers
from jaxft.objectives import xent


def _reference(x, w, h, a, b, s):
  return jnp.einsum("...i,io->...o", x, w) + s * ((h @ a) @ b)


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_fused_value_and_all_gradients_match_autodiff(lead):
  k = iter(jax.random.split(jax.random.key(0), 6))
  d_in, d_out, r, s = 12, 10, 3, 1.7
  x = jax.random.normal(next(k), (*lead, d_in))
  h = x * (jax.random.uniform(next(k), x.shape) > 0.3) / 0.7
  w, a, b = (jax.random.normal(next(k), sh) for sh in ((d_in, d_out), (d_in, r), (r, d_out)))
  probe = jax.random.normal(next(k), (*lead, d_out))
  f = lambda fn: lambda *args: jnp.sum(fn(*args, s) * probe)
  np.testing.assert_allclose(fused.lora_linear(x, w, h, a, b, s), _reference(x, w, h, a, b, s),
                             rtol=1e-6, atol=1e-5)
  got = jax.grad(f(fused.lora_linear), argnums=range(5))(x, w, h, a, b)
  want = jax.grad(f(_reference), argnums=range(5))(x, w, h, a, b)
  for name, g, e in zip("x w h a b".split(), got, want):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=name)


def test_decoder_with_fused_hook_equals_reference_hook_loss_and_grads():
  cfg = DecoderConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8,
                      d_ff=24)
  params = decoder.init(jax.random.key(1), cfg)
  spec = {**lora.DEFAULTS, "rank": 4, "dropout": 0.2}
  frozen, trainable = lora.init(jax.random.key(2), params, spec)
  trainable = jax.tree.map(lambda t: t + 0.05, trainable)  # B != 0: the adapter path counts
  tokens = jax.random.randint(jax.random.key(3), (2, 7), 0, cfg.vocab_size)

  def loss(tr, kernel):
    hook = lora.linear_hook({**spec, "kernel": kernel})
    logits = decoder.apply(lora.combine(frozen, tr, spec), tokens, cfg, linear=hook,
                           rng=jax.random.key(4))
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  (l_f, g_f), (l_r, g_r) = (jax.value_and_grad(loss)(trainable, k) for k in ("fused", "reference"))
  np.testing.assert_allclose(l_f, l_r, rtol=1e-6)
  for gf, gr in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_r)):
    np.testing.assert_allclose(gf, gr, rtol=1e-4, atol=1e-6)


def test_unknown_kernel_names_the_choices():
  with pytest.raises(ValueError, match="cuda.*fused, pallas, reference"):
    lora.linear_hook({**lora.DEFAULTS, "kernel": "cuda"})


def test_dropout_keeps_one_minus_rate_and_preserves_the_mean():
  x = jnp.ones((64, 4097))  # odd width: the last random word feeds one entry
  y = layers.dropout(x, 0.1, jax.random.key(0))
  kept = np.asarray(y) > 0
  n = kept.size
  # rate' = round(0.1 * 2^16) / 2^16; 5 binomial standard deviations
  rate = round(0.1 * 65536) / 65536
  assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
  np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 65536 / (65536 - round(0.1 * 65536))],
                             rtol=1e-6)
  # different keys, different masks; the two halves of a word are not the same decision
  y2 = layers.dropout(x, 0.1, jax.random.key(1))
  assert (np.asarray(y2) > 0).mean() != kept.mean() or not np.array_equal(np.asarray(y2) > 0, kept)
  assert not np.array_equal(kept[:, 0::2], kept[:, 1::2][:, :kept[:, 0::2].shape[1]])
  assert layers.dropout(x, 0.0, jax.random.key(0)) is x
  assert layers.dropout(x, 0.3, None) is x
  assert not np.asarray(layers.dropout(x, 1.0, jax.random.key(0))).any()


def test_xent_accuracy_from_the_shared_max_equals_argmax_and_loss_equals_logsumexp():
  logits = jax.random.normal(jax.random.key(0), (3, 5, 11)) * 3  # continuous: no ties
  targets = jnp.argmax(logits, -1).at[:, ::2].set(4)
  batch = {"targets": targets, "loss_mask": jnp.ones((3, 5)).at[0, 1].set(0.0)}
  loss, m = xent.loss_fn(logits, batch)
  mask = np.asarray(batch["loss_mask"])
  want_acc = ((np.argmax(logits, -1) == np.asarray(targets)) * mask).sum() / mask.sum()
  np.testing.assert_allclose(m["accuracy"], want_acc, rtol=1e-6)

  def ref(z):
    nll = jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, targets[..., None], -1)[..., 0]
    return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])
  np.testing.assert_allclose(loss, ref(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda z: xent.loss_fn(z, batch)[0])(logits),
                             jax.grad(ref)(logits), rtol=1e-5, atol=1e-7)
