"""MEND: a learned editor of rank-1 gradient factors.

Paper: "Fast Model Editing at Scale". For an edited linear layer y = x W the
weight gradient of an edit example is rank-1 per token:

    dL/dW = sum_t x_t^T delta_t,     delta_t = dL/dy_t

An editor g (one small low-rank residual MLP shared by layers of one shape, with
per-layer scale s_l and shift o_l) maps each token's factors

    z = [x_t, delta_t] -> z + s_l * (relu(z U + b) V) + o_l = [x~_t, delta~_t]

and the edit is W_l <- W_l - alpha_l sum_t x~_t^T delta~_t. V = 0, o = 0 at
init, so an untrained editor is exactly one SGD step with lr alpha_l.

Meta-training (paper Eq. 4): L = c_edit * L_edit + L_loc, where L_edit is the
NLL of the edit target under the edited model and L_loc = KL(p_base || p_edited)
on unrelated inputs; only the editor (U, b, V, s, o, alpha) is trained.

This is a learned transform with its own parameters, not an optax
`GradientTransformation` of the train step, so it is not in the optimizer
registry: use `jaxft.optimizers.mend` directly (docs/mend.md). The model here is
a small residual tanh LM whose edited linears take an additive probe (the tap:
d loss / d probe = delta); hooking `jaxft.models.decoder` is future work.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


# ------------------------------------------------------------------ the edited model

def lm_init(key, vocab: int = 32, d: int = 16, layers: int = 3) -> dict[str, Any]:
  """A residual tanh LM: h += tanh(h W_l); its `layers` W_l (d, d) are the edited linears."""
  k = jax.random.split(key, layers + 2)
  return {"embed": jax.random.normal(k[0], (vocab, d)),
          "layers": [{"w": jax.random.normal(k[1 + i], (d, d)) / d ** 0.5} for i in range(layers)],
          "head": jax.random.normal(k[-1], (d, vocab)) / d ** 0.5}


def lm_apply(params, tokens_BxL, probes=None):
  """(logits_BxLxV, [x_l (B, L, d)]): y_l = x_l W_l + probe_l, so d loss / d probe_l = delta_l."""
  h = params["embed"][tokens_BxL]
  xs = []
  for i, layer in enumerate(params["layers"]):
    xs.append(h)
    y = h @ layer["w"]
    if probes is not None:
      y = y + probes[i]
    h = h + jnp.tanh(y)
  return h @ params["head"], xs


def nll(logits_BxLxV, targets_BxL, mask_BxL):
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32))
  picked = jnp.take_along_axis(logp, targets_BxL[..., None], -1)[..., 0]
  return -jnp.sum(picked * mask_BxL) / jnp.maximum(jnp.sum(mask_BxL), 1.0)


def decompose(params, example):
  """Per edited layer, the rank-1 factors (x (N, d), delta (N, d)) of dL/dW = x^T delta."""
  tokens, targets, mask = example["tokens"], example["targets"], example["loss_mask"]
  probes = [jnp.zeros(tokens.shape + (l["w"].shape[1],)) for l in params["layers"]]
  loss = lambda pr: nll(lm_apply(params, tokens, pr)[0], targets, mask)
  deltas = jax.grad(loss)(probes)
  xs = lm_apply(params, tokens)[1]
  return [(x.reshape(-1, x.shape[-1]), dl.reshape(-1, dl.shape[-1])) for x, dl in zip(xs, deltas)]


# ------------------------------------------------------------------ the editor

def editor_init(key, d_in: int, d_out: int, layers: int, rank: int = 8, lr: float = 0.1):
  """Identity-at-init editor for `layers` linears of shape (d_in, d_out) (V = 0, shift = 0)."""
  dz = d_in + d_out
  return {"U": jax.random.normal(key, (dz, rank)) / dz ** 0.5, "b": jnp.zeros((rank,)),
          "V": jnp.zeros((rank, dz)), "scale": jnp.ones((layers, dz)),
          "shift": jnp.zeros((layers, dz)), "lr": jnp.full((layers,), lr)}


def editor_apply(editor, layer: int, x_Nxi, delta_Nxo):
  """(x~, delta~) = split(z + s_l * relu(z U + b) V + o_l), z = [x, delta]."""
  z = jnp.concatenate([x_Nxi, delta_Nxo], -1)
  h = jax.nn.relu(z @ editor["U"] + editor["b"][None]) @ editor["V"]
  out = z + editor["scale"][layer][None] * h + editor["shift"][layer][None]
  return out[:, :x_Nxi.shape[-1]], out[:, x_Nxi.shape[-1]:]


def edit(params, editor, example):
  """params with every edited W_l <- W_l - alpha_l sum_t x~_t^T delta~_t."""
  factors = decompose(params, example)
  layers = []
  for i, (layer, (x, dl)) in enumerate(zip(params["layers"], factors)):
    xt, dt = editor_apply(editor, i, x, dl)
    layers.append({**layer, "w": layer["w"] - editor["lr"][i] * (xt.T @ dt)})
  return {**params, "layers": layers}


# ------------------------------------------------------------------ meta-training

def kl_locality(base_params, edited_params, tokens_BxL):
  """Mean over positions of KL(p_base || p_edited)."""
  lp = jax.nn.log_softmax(lm_apply(base_params, tokens_BxL)[0])
  lq = jax.nn.log_softmax(lm_apply(edited_params, tokens_BxL)[0])
  return jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1))


def meta_loss(editor, params, example, unrelated_tokens, c_edit: float = 0.1):
  """(c_edit * L_edit + L_loc, (L_edit, L_loc)) for one edit (paper Eq. 4)."""
  edited = edit(params, editor, example)
  l_edit = nll(lm_apply(edited, example["tokens"])[0], example["targets"], example["loss_mask"])
  l_loc = kl_locality(params, edited, unrelated_tokens)
  return c_edit * l_edit + l_loc, (l_edit, l_loc)


def meta_train_step(editor, opt_state, tx: optax.GradientTransformation, params, examples,
                    unrelated_tokens, c_edit: float = 0.1):
  """One optimizer step on the editor, averaging the meta-loss over a batch of edits.

  `examples` holds a leading edit axis on every leaf (vmapped).
  """
  def batch_loss(ed):
    losses, aux = jax.vmap(lambda ex: meta_loss(ed, params, ex, unrelated_tokens, c_edit))(examples)
    return jnp.mean(losses), jax.tree.map(jnp.mean, aux)
  (loss, aux), grads = jax.value_and_grad(batch_loss, has_aux=True)(editor)
  updates, opt_state = tx.update(grads, opt_state, editor)
  return optax.apply_updates(editor, updates), opt_state, (loss, *aux)
