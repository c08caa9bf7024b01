"""EPT: "Efficient Prompt Tuning by Multi-Space Projection and Prompt Fusion" (Lan et al., 2024).

Prompt tuning (see `prompt`) with the long soft prompt decomposed into a short
prompt P_s ∈ R^{n×D} and two low-rank matrices A ∈ R^{S×r}, B ∈ R^{r×D}:

    input update     E'(x)_i = E(x_i) + (A B)_i              (i < S = `max_len`; DePT-style)
    prompt fusion    P_f = P_s + softmax(P_s (A B)ᵀ / √D) (A B)
    multi-space      P_k = P_f + P_f U_k V_k,   k = 1..K      (U_k (D, q), V_k (q, D))
    gating           g_i = softmax(P_f[i] W_g + b_g) ∈ R^K    (per prompt token)
    soft prompt      P = Σ_k g_{i,k} P_k[i]                   prepended as in prompt tuning

B = 0 and V_k = 0 at init, so EPT starts as prompt tuning with P_s (A B = 0, every
P_k = P_s). The fusion form (attention of the short prompt over the rows of A B)
and the residual low-rank subspace projections are this file's reading of the
abstract: `fusion='none'` and `input_update=False` switch those parts off; with
`num_spaces=1` and both off EPT is prompt tuning with P = P_s + P_s U V. The
decoder adds `params['prompt']['input_delta']` = A B row i to the i-th real
token's embedding (positions ≥ S get none). Not mergeable (extra tokens).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.adapters import featurewise, prompt

DEFAULTS = {"targets": (r"embed/embedding$",), "num_tokens": 5, "init": "vocab", "rank": 2,
            "max_len": 256, "num_spaces": 2, "space_rank": 2, "fusion": "attention",
            "input_update": True}
MERGEABLE = False
FUSIONS = ("attention", "none")


def _check(spec) -> tuple[int, int, int, int]:
  if spec["fusion"] not in FUSIONS:
    raise ValueError(f"adapter.fusion={spec['fusion']!r} is invalid; valid choices: "
                     f"{', '.join(FUSIONS)}")
  sizes = {k: int(spec[k]) for k in ("rank", "max_len", "num_spaces", "space_rank")}
  for what, v in sizes.items():
    if v < 1:
      raise ValueError(f"adapter.{what} must be >= 1, got {v}")
  return tuple(sizes.values())


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """-> (frozen unchanged, {'ept': short prompt, A, B, subspace U/V, gate})."""
  r, s, k, q = _check(spec)
  k_prompt, k_a, k_u = jax.random.split(key, 3)
  _, soft = prompt.prompt_init(k_prompt, frozen, spec, calib)
  p_s = soft["prompt"]["embedding"]
  d, dtype = p_s.shape[1], p_s.dtype
  return frozen, {"ept": {
      "prompt": p_s,
      "lr_a": featurewise.kaiming_uniform(k_a, (s, r), r, dtype),
      "lr_b": jnp.zeros((r, d), dtype),
      "space_u": featurewise.kaiming_uniform(k_u, (k, d, q), d, dtype),
      "space_v": jnp.zeros((k, q, d), dtype),
      "gate_w": jnp.zeros((d, k), dtype),
      "gate_b": jnp.zeros((k,), dtype)}}


def soft_prompt(ept, spec) -> jax.Array:
  """P (n, D): fusion, multi-space projection and gating of the short prompt."""
  p_s = ept["prompt"]
  p_f = p_s
  if spec["fusion"] == "attention":
    m_SxD = ept["lr_a"] @ ept["lr_b"]
    att_NxS = jax.nn.softmax((p_s @ m_SxD.T) / jnp.sqrt(jnp.asarray(p_s.shape[1], p_s.dtype)), -1)
    p_f = p_s + att_NxS @ m_SxD
  spaces_KxNxD = p_f[None] + jnp.einsum("nd,kdq,kqe->kne", p_f, ept["space_u"], ept["space_v"])
  g_NxK = jax.nn.softmax(p_f @ ept["gate_w"] + ept["gate_b"][None], -1)
  return jnp.einsum("nk,knd->nd", g_NxK, spaces_KxNxD)


def combine(frozen, trainable, spec):
  """Model params with params['prompt'] = {'embedding': P[, 'input_delta': A B]}."""
  ept = trainable["ept"]
  soft = {"embedding": soft_prompt(ept, spec)}
  if spec["input_update"]:
    soft["input_delta"] = ept["lr_a"] @ ept["lr_b"]
  return {**frozen, "prompt": soft}


def logical_axes(model_axes, trainable, spec):
  del spec
  return model_axes, jax.tree.map(lambda x: (None,) * x.ndim, trainable)


def linear_hook(spec):
  _check(spec)
  return prompt.linear_hook(spec)


materialize = combine
merge = featurewise.not_mergeable("ept", "the soft prompt is extra input tokens")
