"""PEGO: "Learn to Preserve and Diversify: Parameter-Efficient Group with Orthogonal
Regularization for Domain Generalization" (Hu et al., 2024).

A group of K LoRA modules per weight, summed — stored as one rank-K·r LoRA whose
column blocks are the members (x W convention, A = [A_1 … A_K], B = [B_1; …; B_K]):

    W_eff = W0 + s Σ_i A_i B_i,

plus an orthogonal regulariser (METHODS.md form [uncertain]; (d_out, d_in) A_i there
is A_iᵀ here):

    λ (Σ_i ‖A_iᵀ W0‖²_F  +  Σ_{i≠j} ‖A_iᵀ A_j‖²_F) / #matrices
       "preserve"            "diversify"

with switches `preserve_form` / `diversify_form` in {'frobenius', 'none'}. The
diversify term is 0 exactly when the members' column spaces are mutually orthogonal.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxft.adapters import base, lora, lowrank

DEFAULTS = {**lowrank.COMMON, "groups": 4, "pego_lambda": 1e-3, "preserve_form": "frobenius",
            "diversify_form": "frobenius"}
FORMS = ("frobenius", "none")


def init_matrix(key, w, spec, stats=None):
  groups = int(spec["groups"])
  if groups < 1:
    raise ValueError(f"adapter.groups must be >= 1, got {groups}")
  return lora.init_matrix(key, w, {**spec, "rank": groups * int(spec["rank"])}, stats)


def diversify(a, groups: int):
  """Σ_{i≠j} ‖A_iᵀ A_j‖²_F over the K column blocks of A (…, d_in, K·r)."""
  a = a.astype(jnp.float32)
  gram = jnp.swapaxes(a, -1, -2) @ a
  r = a.shape[-1] // groups
  blocks = gram.reshape(*gram.shape[:-2], groups, r, groups, r)
  same = jnp.sum(jnp.square(jnp.diagonal(blocks, axis1=-4, axis2=-2)))
  return jnp.sum(jnp.square(gram)) - same


def preserve(a, w0):
  """Σ_i ‖A_iᵀ W0‖²_F = ‖Aᵀ W0‖²_F."""
  return jnp.sum(jnp.square(jnp.swapaxes(a.astype(jnp.float32), -1, -2) @ w0.astype(jnp.float32)))


def regularizer(frozen, trainable, spec):
  for key in ("preserve_form", "diversify_form"):
    if spec[key] not in FORMS:
      raise ValueError(f"adapter.{key}={spec[key]!r} is invalid; valid choices: {FORMS}")
  flat_f = base.flatten(frozen)
  flat_t = base.flatten(trainable)
  paths = sorted(p.rsplit("/", 1)[0] for p in flat_t if p.endswith("/lora_a"))
  n = max(lowrank.n_matrices([flat_t[p + "/lora_a"] for p in paths], 2), 1)
  pres = div = jnp.zeros((), jnp.float32)
  for p in paths:
    a = flat_t[p + "/lora_a"]
    if spec["preserve_form"] == "frobenius":
      pres = pres + preserve(a, flat_f[p + "/kernel"])
    if spec["diversify_form"] == "frobenius":
      div = div + diversify(a, int(spec["groups"]))
  loss = float(spec["pego_lambda"]) * (pres + div) / n
  return loss, {"pego_preserve": pres / n, "pego_diversify": div / n}


def scale(spec):
  return lowrank.lora_scale(spec)  # alpha / r with r the per-member rank


MEMBER = lowrank.Member("pego", __doc__, DEFAULTS, init_matrix, regularizer=regularizer,
                        scale=scale, peft="lora")
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
