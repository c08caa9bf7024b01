"""Meta-train a MEND editor ("Fast Model Editing at Scale") on synthetic edits.

  python experiments/mend_tiny.py --steps 300
  python experiments/mend_tiny.py --decoder --steps 300 [--target layers/mlp/up]

Runs on CPU in 1-3 minutes. The edited model is `jaxft.optimizers.mend`'s tiny
residual LM (random init, vocab 32, d 16, 3 edited linears); an edit asks for a
random new token at the last position of a random 6-token prompt. Prints the
held-out edit NLL and locality KL of the untrained editor (= one SGD step) and of
the meta-trained one. With `--decoder` the edited model is instead a small random
`jaxft.models.decoder` (vocab 64, d_model 32, 2 layers, d_ff 48, SwiGLU) and the
editor edits its stacked kernel `--target` (default layers/mlp/down).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

from jaxft.models import DecoderConfig, decoder
from jaxft.optimizers import mend

V, D, L, T = 32, 16, 3, 6
DCFG = DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8,
                     d_ff=48)


def edits(key, n, V=V):
  k1, k2 = jax.random.split(key)
  tokens = jax.random.randint(k1, (n, 1, T), 0, V)
  targets = jnp.roll(tokens, -1, -1).at[..., -1].set(jax.random.randint(k2, (n, 1), 0, V))
  return {"tokens": tokens, "targets": targets, "loss_mask": jnp.zeros((n, 1, T)).at[..., -1].set(1.0)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--c_edit", type=float, default=1.0)
  ap.add_argument("--lr", type=float, default=3e-2)
  ap.add_argument("--decoder", action="store_true", help="edit a small jaxft.models.decoder")
  ap.add_argument("--target", default="layers/mlp/down", help="the decoder's edited kernel stack")
  ap.add_argument("--init_std", type=float, default=DCFG.init_std, help="the decoder's init std")
  args = ap.parse_args()
  tx = optax.adam(args.lr)
  if args.decoder:
    vocab = DCFG.vocab_size
    cfg = DecoderConfig(**{**DCFG.__dict__, "init_std": args.init_std})
    params = decoder.init(jax.random.PRNGKey(0), cfg)
    _, grp, name = args.target.split("/")
    _, d_in, d_out = params["layers"][grp][name]["kernel"].shape
    editor = mend.editor_init(jax.random.PRNGKey(2), d_in, d_out, cfg.n_layers, lr=0.1)
    loss_fn = lambda ed, p, ex, un, c: mend.decoder_meta_loss(ed, p, cfg, ex, un, c, args.target)
  else:
    vocab = V
    params = mend.lm_init(jax.random.PRNGKey(0), V, D, L)
    editor = mend.editor_init(jax.random.PRNGKey(2), D, D, L, lr=0.1)
    loss_fn = mend.meta_loss
  unrelated = jax.random.randint(jax.random.PRNGKey(3), (16, T), 0, vocab)
  held = edits(jax.random.PRNGKey(99), 64, vocab)

  @jax.jit
  def evaluate(ed):
    per = jax.vmap(lambda ex: loss_fn(ed, params, ex, unrelated, args.c_edit)[1])(held)
    return jax.tree.map(jnp.mean, per)

  step = jax.jit(lambda ed, s, exs: mend.meta_train_step(ed, s, tx, params, exs, unrelated,
                                                          args.c_edit, loss_fn=loss_fn))
  print("untrained editor: edit NLL %.3f  locality KL %.3f" % tuple(float(x) for x in evaluate(editor)))
  state = tx.init(editor)
  for i in range(args.steps):
    editor, state, _ = step(editor, state, edits(jax.random.PRNGKey(1000 + i), 16, vocab))
  print("after %d meta steps: edit NLL %.3f  locality KL %.3f" % (args.steps, *(float(x) for x in evaluate(editor))))


if __name__ == "__main__":
  main()
