"""MEND ("Fast Model Editing at Scale"): rank-1 tap, identity editor, meta-training."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft.optimizers import mend

V, D, L, T = 32, 16, 3, 6


def edits(key, n):
  """n synthetic edits: random prompt, the last position's target replaced by a random token."""
  k1, k2 = jax.random.split(key)
  tokens = jax.random.randint(k1, (n, 1, T), 0, V)
  targets = jnp.roll(tokens, -1, -1).at[..., -1].set(jax.random.randint(k2, (n, 1), 0, V))
  mask = jnp.zeros((n, 1, T)).at[..., -1].set(1.0)
  return {"tokens": tokens, "targets": targets, "loss_mask": mask}


def one(exs, i):
  return jax.tree.map(lambda x: x[i], exs)


def test_rank1_factors_sum_to_the_weight_gradient():
  params = mend.lm_init(jax.random.PRNGKey(0), V, D, L)
  ex = one(edits(jax.random.PRNGKey(1), 1), 0)
  ex = {**ex, "loss_mask": jnp.ones((1, T))}   # every token contributes
  loss = lambda p: mend.nll(mend.lm_apply(p, ex["tokens"])[0], ex["targets"], ex["loss_mask"])
  grads = jax.grad(loss)(params)
  for (x, dl), g in zip(mend.decompose(params, ex), grads["layers"]):
    assert x.shape == (T, D)
    np.testing.assert_allclose(x.T @ dl, g["w"], atol=1e-6)
    assert float(jnp.abs(g["w"]).max()) > 1e-4


def test_untrained_editor_is_exactly_one_sgd_step():
  params = mend.lm_init(jax.random.PRNGKey(0), V, D, L)
  editor = mend.editor_init(jax.random.PRNGKey(2), D, D, L, lr=0.3)
  ex = one(edits(jax.random.PRNGKey(1), 1), 0)
  x, dl = mend.decompose(params, ex)[1]
  xt, dt = mend.editor_apply(editor, 1, x, dl)
  np.testing.assert_array_equal(xt, x)
  np.testing.assert_array_equal(dt, dl)
  loss = lambda p: mend.nll(mend.lm_apply(p, ex["tokens"])[0], ex["targets"], ex["loss_mask"])
  grads = jax.grad(loss)(params)
  edited = mend.edit(params, editor, ex)
  for a, p, g in zip(edited["layers"], params["layers"], grads["layers"]):
    np.testing.assert_allclose(a["w"], p["w"] - 0.3 * g["w"], atol=1e-6)
  np.testing.assert_array_equal(edited["embed"], params["embed"])   # only edited layers move


def test_meta_training_improves_held_out_edits():
  params = mend.lm_init(jax.random.PRNGKey(0), V, D, L)
  editor = mend.editor_init(jax.random.PRNGKey(2), D, D, L, lr=0.1)
  unrelated = jax.random.randint(jax.random.PRNGKey(3), (4, T), 0, V)
  held = edits(jax.random.PRNGKey(99), 16)
  tx = optax.adam(3e-2)

  @jax.jit
  def evaluate(ed):
    def per(ex):
      return mend.meta_loss(ed, params, ex, unrelated, c_edit)[1]
    l_edit, l_loc = jax.vmap(per)(held)
    return jnp.mean(l_edit), jnp.mean(l_loc)

  c_edit = 1.0   # the paper's 0.1 lets the KL term dominate on this random tiny model
  step = jax.jit(lambda ed, s, exs: mend.meta_train_step(ed, s, tx, params, exs, unrelated, c_edit))
  before, loc0 = evaluate(editor)
  state = tx.init(editor)
  for i in range(60):
    editor, state, _ = step(editor, state, edits(jax.random.PRNGKey(1000 + i), 8))
  after, loc = evaluate(editor)
  # measured: held-out edit NLL 2.16 -> 0.96, locality KL 0.04 -> 0.34
  assert float(after) < 0.6 * float(before), (before, after)
  assert c_edit * float(after) + float(loc) < c_edit * float(before) + float(loc0)   # the meta-loss
  assert float(loc) < 0.6, loc   # the locality term keeps unrelated predictions close
