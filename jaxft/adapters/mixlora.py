"""MixLoRA: "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA based Mixture of
Experts" (Li et al., 2024).

E LoRA experts share each layer's frozen FFN; a top-k router picks k per token
(x W convention, h the FFN input):

    p = softmax(h W_r),  (v, i) = top_k(h W_r, k),  g = softmax(v)      (g sums to 1)
    FFN_e(h) = down_e(act(gate_e(h)) ⊙ up_e(h)),  lin_e(h) = h W0 + s h A_e B_e
    y = Σ_{e ∈ i} g_e FFN_e(h),
    L_aux = a · E · Σ_e f_e P_e,   f_e = share of the k·T assignments, P_e = mean p_e,

(E = `experts` 8, k = `top_k` 2, a = `aux_weight` 0.01); L_aux is averaged over
layers and reported through `decoder.apply(..., return_aux=True)` as
'mixlora_aux'. Attention LoRA is configured independently: plain LoRA on
`targets` (default q, k, v, o). Experts run densely (every expert's LoRA delta
on every token, weighted by g — 0 off the top-k), which is exact and simple; the
base FFN matmuls run once. The routing is per token, so there is no merged
plain-weight form: `merge` raises, the model runs unmerged.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxft.adapters import base, lora, lowrank
from jaxft.models import layers

DEFAULTS = {**lowrank.COMMON, "targets": (r"attn/(q|k|v|o)$",), "experts": 8, "top_k": 2,
            "aux_weight": 0.01}
FFN = ("gate", "up", "down")


def _ffn_paths(params) -> list[str]:
  found = [p for p in base.linear_paths(params) if p.startswith("layers/mlp/")
           and p.rsplit("/", 1)[1] in FFN]
  if not found:
    raise base.TargetError("mixlora needs the FFN linears layers/mlp/{gate,up,down}")
  return found


def _check(spec):
  e, k = int(spec["experts"]), int(spec["top_k"])
  if e < 1 or not 1 <= k <= e:
    raise ValueError(f"adapter.experts={e} and adapter.top_k={k} need 1 <= top_k <= experts")
  return e, k


def init(key, frozen, spec, calib=None):
  """-> (frozen, {attention LoRA, per-FFN-linear moe_a/moe_b, layers/mlp/moe_router})."""
  e, _ = _check(spec)
  rank = lowrank.check_rank(spec)
  frozen, trainable = lora.MEMBER.init(jax.random.fold_in(key, 0), frozen, spec, calib)
  flat, out = base.flatten(frozen), base.flatten(trainable)
  for i, path in enumerate(_ffn_paths(frozen)):
    w = flat[path + "/kernel"]
    n_layers, d_in, d_out = w.shape
    bound = 1.0 / math.sqrt(d_in)
    out[path + "/moe_a"] = jax.random.uniform(jax.random.fold_in(key, i + 1),
                                              (n_layers, e, d_in, rank), w.dtype, -bound, bound)
    out[path + "/moe_b"] = jnp.zeros((n_layers, e, rank, d_out), w.dtype)
  w = flat["layers/mlp/up/kernel"]
  bound = 1.0 / math.sqrt(w.shape[1])
  out["layers/mlp/moe_router"] = jax.random.uniform(jax.random.fold_in(key, 99),
                                                    (w.shape[0], w.shape[1], e), w.dtype,
                                                    -bound, bound)
  return frozen, base.unflatten(out)


def logical_axes(model_axes, trainable, spec):
  attn = {p: v for p, v in base.flatten(trainable).items() if "/lora_" in p}
  frozen_axes, attn_axes = lora.MEMBER.logical_axes(model_axes, base.unflatten(attn), spec)
  flat_axes, out = base.flatten(model_axes), base.flatten(attn_axes)
  for path in base.flatten(trainable):
    linear, leaf = path.rsplit("/", 1)
    if leaf in ("moe_a", "moe_b"):
      lead_ax, ax_in, ax_out = flat_axes[linear + "/kernel"]
      out[path] = ((lead_ax, None, ax_in, "lora_rank") if leaf == "moe_a"
                   else (lead_ax, None, "lora_rank", ax_out))
  out["layers/mlp/moe_router"] = ("layers", "embed", None)
  return frozen_axes, base.unflatten(out)


def combine(frozen, trainable, spec):
  del spec
  return base.merge_trees(frozen, trainable)


def route(h, router, top_k: int):
  """(weights (…, E) — softmax over the top-k logits, 0 elsewhere; probs (…, E); dispatch (…, E))."""
  logits = jnp.einsum("...d,de->...e", h.astype(jnp.float32), router.astype(jnp.float32))
  probs = jax.nn.softmax(logits, axis=-1)
  top_v, top_i = jax.lax.top_k(logits, top_k)
  g = jax.nn.softmax(top_v, axis=-1)
  hot = jax.nn.one_hot(top_i, logits.shape[-1], dtype=jnp.float32)  # (…, k, E)
  weights = jnp.sum(hot * jnp.expand_dims(g, -1), axis=-2)
  return weights, probs, jnp.sum(hot, axis=-2)


def load_balance(probs, dispatch, top_k: int, weight: float):
  """a · E · Σ_e f_e P_e over all tokens (f sums to 1; == a for a uniform router)."""
  e = probs.shape[-1]
  f = jnp.mean(dispatch.reshape(-1, e), axis=0) / top_k
  p = jnp.mean(probs.reshape(-1, e), axis=0)
  return weight * e * jnp.sum(f * p)


def _expert_delta(p, hidden, s):
  """Every expert's own LoRA delta on its own input: (…, E, F) -> (…, E, D)."""
  a, b = p["moe_a"].astype(hidden.dtype), p["moe_b"].astype(hidden.dtype)
  return s * jnp.einsum("...er,ero->...eo", jnp.einsum("...ef,efr->...er", hidden, a), b)


def linear_hook(spec):
  """LoRA on the attention targets; `.mlp` replaces each FFN with the routed experts."""
  _, top_k = _check(spec)
  s, rate, a = lora.scale(spec), float(spec["dropout"]), float(spec["aux_weight"])
  attn_linear = lora.MEMBER.linear_hook(spec)

  def linear(p, x, name, rng):
    return attn_linear(p, x, name, rng)

  def mlp(p, h, cfg, *, rng, linear):
    del linear
    weights, probs, dispatch = route(h, p["moe_router"], top_k)
    x = layers.dropout(h, rate, rng)
    up = _ffn_in(p["up"], h, x, s)
    act = (lambda z: jax.nn.gelu(z, approximate=cfg.gelu_approximate))
    if cfg.mlp == "gelu":
      hidden = act(up)
    else:
      hidden = (jax.nn.silu if cfg.mlp == "swiglu" else act)(_ffn_in(p["gate"], h, x, s)) * up
    hidden = hidden * jnp.expand_dims(weights.astype(hidden.dtype), -1)  # (…, E, F)
    out = layers.dense(p["down"], jnp.sum(hidden, axis=-2), "", None)
    out = out + jnp.sum(_expert_delta(p["down"], hidden, s), axis=-2)
    aux = load_balance(probs, dispatch, top_k, a) / cfg.n_layers
    return out.astype(h.dtype), {"mixlora_aux": aux}

  linear.mlp = mlp
  return linear


def _ffn_in(p, h, x, s):
  """Expert e's gate/up projection (…, E, F): h W0 (+ bias) + s dropout(h) A_e B_e."""
  delta = jnp.einsum("...er,ero->...eo",
                     jnp.einsum("...d,edr->...er", x, p["moe_a"].astype(x.dtype)),
                     p["moe_b"].astype(x.dtype))
  return jnp.expand_dims(layers.dense(p, h, "", None), -2) + s * delta


def materialize(frozen, trainable, spec):
  raise ValueError("adapter 'mixlora' routes each token to its own experts: it has no merged "
                   "plain-weight form (run it unmerged, with its linear hook)")


merge = materialize
