"""Meta-train a MEND editor ("Fast Model Editing at Scale") on synthetic edits.

  python experiments/mend_tiny.py --steps 300

Runs on CPU in 1-3 minutes. The edited model is `jaxft.optimizers.mend`'s tiny
residual LM (random init, vocab 32, d 16, 3 edited linears); an edit asks for a
random new token at the last position of a random 6-token prompt. Prints the
held-out edit NLL and locality KL of the untrained editor (= one SGD step) and of
the meta-trained one.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

from jaxft.optimizers import mend

V, D, L, T = 32, 16, 3, 6


def edits(key, n):
  k1, k2 = jax.random.split(key)
  tokens = jax.random.randint(k1, (n, 1, T), 0, V)
  targets = jnp.roll(tokens, -1, -1).at[..., -1].set(jax.random.randint(k2, (n, 1), 0, V))
  return {"tokens": tokens, "targets": targets, "loss_mask": jnp.zeros((n, 1, T)).at[..., -1].set(1.0)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--c_edit", type=float, default=1.0)
  ap.add_argument("--lr", type=float, default=3e-2)
  args = ap.parse_args()
  params = mend.lm_init(jax.random.PRNGKey(0), V, D, L)
  editor = mend.editor_init(jax.random.PRNGKey(2), D, D, L, lr=0.1)
  unrelated = jax.random.randint(jax.random.PRNGKey(3), (16, T), 0, V)
  held = edits(jax.random.PRNGKey(99), 64)
  tx = optax.adam(args.lr)

  @jax.jit
  def evaluate(ed):
    per = jax.vmap(lambda ex: mend.meta_loss(ed, params, ex, unrelated, args.c_edit)[1])(held)
    return jax.tree.map(jnp.mean, per)

  step = jax.jit(lambda ed, s, exs: mend.meta_train_step(ed, s, tx, params, exs, unrelated,
                                                          args.c_edit))
  print("untrained editor: edit NLL %.3f  locality KL %.3f" % tuple(float(x) for x in evaluate(editor)))
  state = tx.init(editor)
  for i in range(args.steps):
    editor, state, _ = step(editor, state, edits(jax.random.PRNGKey(1000 + i), 16))
  print("after %d meta steps: edit NLL %.3f  locality KL %.3f" % (args.steps, *(float(x) for x in evaluate(editor))))


if __name__ == "__main__":
  main()
