"""KaSA: "KaSA: Knowledge-Aware Singular-Value Adaptation of Large Language Models" (Wang et al., 2024).

The base drops its r smallest singular components and the update carries learned
singular values (x W convention; METHODS.md's (d_out, d_in) form is B diag(d) A):

    T(W0) = W0 - Σ_{i > k-r} σ_i u_i v_iᵀ,     W_eff = T(W0) + s A diag(d) B,

A kaiming, B = 0, d ~ N(0, 1); A, d, B train. The loss adds

    (β Σ ‖d‖² + γ Σ (‖AᵀA - I_r‖²_F + ‖B Bᵀ - I_r‖²_F)) / #matrices

(β = 1e-4, γ = 1e-3; the r×r Gram form — the released code's full-size, unsquared
form is not implemented). `regularizer(frozen, trainable, spec)` returns it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.adapters import lora, lowrank

DEFAULTS = {**lowrank.COMMON, "beta": 1e-4, "gamma": 1e-3}


def init_matrix(key, w, spec, stats=None):
  rank = lowrank.check_rank(spec, w)
  u, s, vh = lowrank.top_or_bottom(*lowrank.svd(w), rank, "bottom")
  out = lora.init_matrix(key, w, spec, stats)
  out["kernel"] = w - (u * jnp.expand_dims(s, -2)) @ vh
  out["lora_d"] = jax.random.normal(jax.random.fold_in(key, 1), (*w.shape[:-2], rank), jnp.float32)
  return out


def orth_penalty(a, b):
  """‖AᵀA - I‖²_F + ‖B Bᵀ - I‖²_F summed over stacked matrices."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  ga = jnp.swapaxes(a, -1, -2) @ a
  gb = b @ jnp.swapaxes(b, -1, -2)
  eye = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=jnp.float32), ga.shape)
  return jnp.sum(jnp.square(ga - eye)) + jnp.sum(jnp.square(gb - eye))


def regularizer(frozen, trainable, spec):
  del frozen
  a_s = lowrank.factor_groups(trainable, "lora_a")
  b_s = lowrank.factor_groups(trainable, "lora_b")
  d_s = lowrank.factor_groups(trainable, "lora_d")
  n = max(lowrank.n_matrices(a_s, 2), 1)
  d_term = sum(jnp.sum(jnp.square(d.astype(jnp.float32))) for d in d_s) / n
  orth = sum(orth_penalty(a, b) for a, b in zip(a_s, b_s)) / n
  loss = float(spec["beta"]) * d_term + float(spec["gamma"]) * orth
  return loss, {"kasa_d_norm": d_term, "kasa_orth": orth}


MEMBER = lowrank.Member("kasa", __doc__, DEFAULTS, init_matrix,
                        leaves=("lora_a", "lora_b", "lora_d"),
                        trains=("lora_a", "lora_b", "lora_d"), regularizer=regularizer)
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
