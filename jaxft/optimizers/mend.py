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
registry: use `jaxft.optimizers.mend` directly (docs/mend.md). Two edited
models: a small residual tanh LM (`lm_init` / `lm_apply`, whose edited linears
take an additive probe: d loss / d probe = delta), and `jaxft.models.decoder`
(`decoder_decompose` / `decoder_edit` / `decoder_meta_loss`), whose stacked
kernel `layers/<linear>` is tapped through the decoder's `linear` hook.
"""
from __future__ import annotations

from typing import Any

import functools

import jax
import jax.numpy as jnp
import optax

from jaxft.models import decoder as decoder_lib
from jaxft.models import layers as layers_lib


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
          "shift": jnp.zeros((layers, dz)), "lr": jnp.full((layers,), lr, jnp.float32)}


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

def _lm_logits(params, tokens_BxL):
  return lm_apply(params, tokens_BxL)[0]


def kl_locality(base_params, edited_params, tokens_BxL, logits_fn=_lm_logits):
  """Mean over positions of KL(p_base || p_edited); `logits_fn(params, tokens)` is the model."""
  lp = jax.nn.log_softmax(logits_fn(base_params, tokens_BxL).astype(jnp.float32))
  lq = jax.nn.log_softmax(logits_fn(edited_params, tokens_BxL).astype(jnp.float32))
  return jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1))


def meta_loss(editor, params, example, unrelated_tokens, c_edit: float = 0.1, *,
              logits_fn=_lm_logits, edit_fn=edit):
  """(c_edit * L_edit + L_loc, (L_edit, L_loc)) for one edit (paper Eq. 4).

  `logits_fn(params, tokens)` and `edit_fn(params, editor, example)` default to the
  tiny LM; `decoder_meta_loss` passes the decoder's.
  """
  edited = edit_fn(params, editor, example)
  l_edit = nll(logits_fn(edited, example["tokens"]), example["targets"], example["loss_mask"])
  l_loc = kl_locality(params, edited, unrelated_tokens, logits_fn)
  return c_edit * l_edit + l_loc, (l_edit, l_loc)


def meta_train_step(editor, opt_state, tx: optax.GradientTransformation, params, examples,
                    unrelated_tokens, c_edit: float = 0.1, *, loss_fn=meta_loss):
  """One optimizer step on the editor, averaging the meta-loss over a batch of edits.

  `examples` holds a leading edit axis on every leaf (vmapped). `loss_fn(editor,
  params, example, unrelated_tokens, c_edit)` is `meta_loss` (tiny LM) by default.
  """
  def batch_loss(ed):
    losses, aux = jax.vmap(lambda ex: loss_fn(ed, params, ex, unrelated_tokens, c_edit))(examples)
    return jnp.mean(losses), jax.tree.map(jnp.mean, aux)
  (loss, aux), grads = jax.value_and_grad(batch_loss, has_aux=True)(editor)
  updates, opt_state = tx.update(grads, opt_state, editor)
  return optax.apply_updates(editor, updates), opt_state, (loss, *aux)


# ------------------------------------------------------------------ jaxft.models.decoder

DELTA_PROBE, X_PROBE = "mend_delta", "mend_x"


@jax.custom_vjp
def _tap_input(y, x, probe):
  """Returns y unchanged; the cotangent of `probe` is x itself (whatever y's cotangent).

  Not a linear map's transpose: it only serves `decoder_decompose`'s one `jax.grad`,
  which thereby reads the target linear's per-layer input out of the scan.
  """
  del x, probe
  return y


def _tap_fwd(y, x, probe):
  del probe
  return y, x


def _tap_bwd(x, g):
  return g, jnp.zeros_like(x), x


_tap_input.defvjp(_tap_fwd, _tap_bwd)


def probe_linear(p, x, name, rng):
  """`layers.dense`, plus, where the linear's dict holds the MEND probes, the taps:

  y = x W (+ b) + p['mend_delta'] (so d loss / d mend_delta = delta), and the
  cotangent of p['mend_x'] is x. Linears without probes are exactly `layers.dense`.
  """
  y = layers_lib.dense(p, x, name, rng)
  if DELTA_PROBE not in p:
    return y
  y = y + p[DELTA_PROBE].astype(y.dtype)
  return _tap_input(y, x, p[X_PROBE])


def _target_path(params, target: str) -> tuple[str, ...]:
  keys = tuple(target.split("/"))
  if len(keys) != 3 or keys[0] != "layers" or "/".join(keys[1:]) not in layers_lib.LINEAR_INDEX:
    raise ValueError(f"mend target={target!r} must name a layer linear: "
                     + ", ".join("layers/" + n for n in layers_lib.LINEAR_INDEX))
  node = params
  for k in keys:
    if k not in node:
      raise ValueError(f"mend target={target!r}: the params have no {k!r} "
                       "(e.g. 'layers/mlp/gate' needs a gated MLP)")
    node = node[k]
  return keys


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def _set(tree, keys, value):
  if not keys:
    return value
  return {**tree, keys[0]: _set(tree[keys[0]], keys[1:], value)}


def _decoder_logits(cfg, params, tokens_BxT, linear=layers_lib.dense):
  return decoder_lib.apply(params, tokens_BxT, cfg, linear=linear)


def decoder_decompose(params, cfg, example, target: str = "layers/mlp/down"):
  """Per-layer rank-1 factors of the gradient of the example's masked NLL w.r.t.
  the decoder's stacked kernel `target` (L, d_in, d_out).

  Returns (x (L, N, d_in), delta (L, N, d_out)), N = B*T tokens, with
  einsum('lni,lno->lio', x, delta) == jax.grad(nll)(kernel). One `jax.grad` over
  two zero probes in the target linear's dict (scanned with the layers): an
  additive one on its output (gradient = delta) and a `_tap_input` one
  (gradient = the linear's input x). Masked positions have delta = 0.
  """
  keys = _target_path(params, target)
  lin = _get(params, keys)
  n_layers, d_in, d_out = lin["kernel"].shape
  tokens, targets, mask = example["tokens"], example["targets"], example["loss_mask"]
  b, t = tokens.shape
  dtype = lin["kernel"].dtype
  probes = {DELTA_PROBE: jnp.zeros((n_layers, b, t, d_out), dtype),
            X_PROBE: jnp.zeros((n_layers, b, t, d_in), dtype)}

  def loss(pr):
    p = _set(params, keys, {**lin, **pr})
    logits = _decoder_logits(cfg, p, tokens, linear=probe_linear)
    return nll(logits, targets, mask)

  g = jax.grad(loss)(probes)
  x = g[X_PROBE].reshape(n_layers, b * t, d_in)
  delta = g[DELTA_PROBE].reshape(n_layers, b * t, d_out)
  return jax.lax.stop_gradient(x), jax.lax.stop_gradient(delta)


def decoder_edit(params, cfg, editor, example, target: str = "layers/mlp/down"):
  """params with the stacked kernel `target` edited per layer:
  W_l <- W_l - alpha_l sum_t x~_t^T delta~_t (editor from `editor_init(key, d_in,
  d_out, layers=L)`; one editor for the stack, per-layer s, o, alpha)."""
  keys = _target_path(params, target)
  lin = _get(params, keys)
  x, delta = decoder_decompose(params, cfg, example, target)
  xt, dt = jax.vmap(lambda l, a, b: editor_apply(editor, l, a, b))(
      jnp.arange(x.shape[0]), x, delta)
  step = jnp.einsum("lni,lno->lio", xt, dt) * editor["lr"][:, None, None]
  kernel = (lin["kernel"] - step.astype(lin["kernel"].dtype))
  return _set(params, keys, {**lin, "kernel": kernel})


def decoder_meta_loss(editor, params, cfg, example, unrelated_tokens, c_edit: float = 0.1,
                      target: str = "layers/mlp/down"):
  """`meta_loss` (c_edit * edit NLL + locality KL) with the decoder as the edited model."""
  return meta_loss(editor, params, example, unrelated_tokens, c_edit,
                   logits_fn=functools.partial(_decoder_logits, cfg),
                   edit_fn=lambda p, ed, ex: decoder_edit(p, cfg, ed, ex, target))


def decoder_meta_train_step(editor, opt_state, tx: optax.GradientTransformation, params, cfg,
                            examples, unrelated_tokens, c_edit: float = 0.1,
                            target: str = "layers/mlp/down"):
  """`meta_train_step` over a batch of decoder edits (leading edit axis on `examples`)."""
  loss_fn = lambda ed, p, ex, un, c: decoder_meta_loss(ed, p, cfg, ex, un, c, target)
  return meta_train_step(editor, opt_state, tx, params, examples, unrelated_tokens, c_edit,
                         loss_fn=loss_fn)
