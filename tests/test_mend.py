"""MEND ("Fast Model Editing at Scale"): rank-1 tap, identity editor, meta-training,
on the tiny LM and on jaxft.models.decoder."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft.models import DecoderConfig, decoder
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


# ------------------------------------------------------------------ jaxft.models.decoder

DCFG = DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8,
                     d_ff=48)
DV = DCFG.vocab_size


def decoder_edits(key, n, b=1):
  k1, k2 = jax.random.split(key)
  tokens = jax.random.randint(k1, (n, b, T), 0, DV)
  targets = jnp.roll(tokens, -1, -1).at[..., -1].set(jax.random.randint(k2, (n, b), 0, DV))
  mask = jnp.zeros((n, b, T)).at[..., -1].set(1.0)
  return {"tokens": tokens, "targets": targets, "loss_mask": mask}


def kernel_grad(params, cfg, ex, target):
  keys = target.split("/")
  def loss(k):
    p = {**params, "layers": {**params["layers"], keys[1]: {
        **params["layers"][keys[1]], keys[2]: {**params["layers"][keys[1]][keys[2]], "kernel": k}}}}
    return mend.nll(decoder.apply(p, ex["tokens"], cfg), ex["targets"], ex["loss_mask"])
  return jax.grad(loss)(params["layers"][keys[1]][keys[2]]["kernel"])


@pytest.mark.parametrize("target,cfg", [
    ("layers/mlp/down", DCFG), ("layers/mlp/up", DCFG), ("layers/attn/q", DCFG),
    ("layers/mlp/down", DecoderConfig(**{**DCFG.__dict__, "remat": "full", "mlp_bias": True}))])
def test_decoder_factors_sum_to_the_stacked_kernel_gradient(target, cfg):
  params = decoder.init(jax.random.PRNGKey(0), cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, DV)
  # Row 0's last 3 positions are masked: nothing after them is scored, so (causal model) their
  # delta is exactly 0; row 0's earlier positions still feed the scored ones through attention.
  mask = jnp.ones((2, T)).at[0, 3:].set(0.0)
  ex = {"tokens": tokens, "targets": jnp.roll(tokens, -1, -1), "loss_mask": mask}
  x, dl = mend.decoder_decompose(params, cfg, ex, target)
  w = params["layers"][target.split("/")[1]][target.split("/")[2]]["kernel"]
  n_layers, d_in, d_out = w.shape
  assert x.shape == (n_layers, 2 * T, d_in) and dl.shape == (n_layers, 2 * T, d_out)
  np.testing.assert_array_equal(dl.reshape(n_layers, 2, T, d_out)[:, 0, 3:], 0.0)
  g = kernel_grad(params, cfg, ex, target)
  np.testing.assert_allclose(jnp.einsum("lni,lno->lio", x, dl), g, atol=1e-5)
  assert all(float(jnp.abs(g[l]).max()) > 1e-5 for l in range(n_layers))
  assert float(jnp.abs(g[0] - g[1]).max()) > 0.1 * float(jnp.abs(g).max())   # a swapped layer fails


def test_decoder_probe_hook_is_dense_without_probes():
  params = decoder.init(jax.random.PRNGKey(0), DCFG)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, DV)
  np.testing.assert_array_equal(decoder.apply(params, tokens, DCFG, linear=mend.probe_linear),
                                decoder.apply(params, tokens, DCFG))
  with pytest.raises(ValueError, match="layers/mlp/down"):
    mend.decoder_decompose(params, DCFG, one(decoder_edits(jax.random.PRNGKey(1), 1), 0), "lm_head")


def test_decoder_untrained_editor_is_exactly_one_sgd_step():
  params = decoder.init(jax.random.PRNGKey(0), DCFG)
  editor = mend.editor_init(jax.random.PRNGKey(2), DCFG.d_ff, DCFG.d_model, DCFG.n_layers, lr=0.3)
  editor = {**editor, "lr": jnp.array([0.3, 0.7])}    # per-layer alpha
  ex = one(decoder_edits(jax.random.PRNGKey(1), 1, b=2), 0)
  g = kernel_grad(params, DCFG, ex, "layers/mlp/down")
  edited = mend.decoder_edit(params, DCFG, editor, ex)
  w = params["layers"]["mlp"]["down"]["kernel"]
  want = w - jnp.array([0.3, 0.7])[:, None, None] * g
  np.testing.assert_allclose(edited["layers"]["mlp"]["down"]["kernel"], want, atol=1e-6)
  assert float(jnp.abs(edited["layers"]["mlp"]["down"]["kernel"] - w).max()) > 1e-4
  flat_e, flat_p = jax.tree_util.tree_flatten_with_path(edited)[0], jax.tree.leaves(params)
  for (path, a), b in zip(flat_e, flat_p):            # nothing else moves, no probe leaves left
    if "down" not in jax.tree_util.keystr(path):
      np.testing.assert_array_equal(a, b)
  assert set(edited["layers"]["mlp"]["down"]) == set(params["layers"]["mlp"]["down"])


def test_decoder_meta_training_improves_held_out_edits():
  params = decoder.init(jax.random.PRNGKey(0), DCFG)
  editor = mend.editor_init(jax.random.PRNGKey(2), DCFG.d_ff, DCFG.d_model, DCFG.n_layers, lr=0.1)
  unrelated = jax.random.randint(jax.random.PRNGKey(3), (4, T), 0, DV)
  held = decoder_edits(jax.random.PRNGKey(99), 16)
  tx, c_edit = optax.adam(3e-2), 1.0

  @jax.jit
  def evaluate(ed):
    per = lambda ex: mend.decoder_meta_loss(ed, params, DCFG, ex, unrelated, c_edit)[1]
    return jax.tree.map(jnp.mean, jax.vmap(per)(held))

  step = jax.jit(lambda ed, s, exs: mend.decoder_meta_train_step(ed, s, tx, params, DCFG, exs,
                                                                 unrelated, c_edit))
  before, loc0 = evaluate(editor)
  state = tx.init(editor)
  for i in range(30):
    editor, state, _ = step(editor, state, decoder_edits(jax.random.PRNGKey(1000 + i), 8))
  after, loc = evaluate(editor)
  # measured: held-out edit NLL 4.23 -> 3.60, locality KL 3e-8 -> 0.018
  assert float(after) < 0.9 * float(before), (before, after)
  assert c_edit * float(after) + float(loc) < c_edit * float(before) + float(loc0)
  assert float(loc) < 0.2, loc
