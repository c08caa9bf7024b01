"""Grafting: "Task-Specific Skill Localization in Fine-tuned Language Models" (Panigrahi et al., 2023).

Skill localization: a sparse mask γ over the parameters such that the grafted model

    θ(γ) = γ ⊙ θ_ft + (1 − γ) ⊙ θ0 = θ0 + γ ⊙ τ,     τ = θ_ft − θ0,

keeps the fine-tuned model's performance. γ = sigmoid(S), S initialised from the
top-s |τ| (S = +`init_logit` there, −`init_logit` elsewhere), optimised on a few
examples with θ_ft, θ0 fixed, then binarised to its top-s entries: no re-training.

Here per targeted matrix (each layer's, s = round(density · n)): the candidates η are
the top `candidates`·s |τ| entries; frozen `sd_idx` = η and `gr_tau` = τ_η, trainable
logits `gr_logit` S (…, c·s); φ = sigmoid(S) ⊙ τ_η is `sparse_delta`'s element form
(`jaxft.adapters.selection`). Entries outside η have γ = 0 (the paper's S there starts
at −`init_logit` and its sigmoid ≈ 0.05 is dropped: a documented simplification).

Post-hoc: `localize(θ0, θ_ft, spec)` -> (frozen, trainable) to optimise S (any jaxft
optimizer on `combine`/`linear_hook`, or none: the top-s |τ| mask); `binarize(frozen,
trainable, spec)` -> {path: (idx, τ at the top-s S)}; `graft(θ0, diff)` = θ0 + γ ⊙ τ
(exact scatter). `jaxft train` (source='grad', no θ_ft) uses the stand-in
τ = −`tau_step` · G / max|G| of the calibration batches (one full-FT step, its largest
entry `tau_step`).
`merge` is the soft graft θ0 + sigmoid(S) ⊙ τ_η (equal to the unmerged model).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.adapters import base, calibrate, featurewise, selection, sparse_delta as sd

DEFAULTS = {"targets": featurewise.LINEARS, "density": 0.01, "candidates": 4,
            "init_logit": 3.0, "tau_step": 1e-3, "grad_impl": "sddmm", "source": "grad",
            **calibrate.CALIB_DEFAULTS}
TAU, LOGIT = "gr_tau", "gr_logit"
MERGEABLE = True
CALIBRATION = True


def _s(spec, w) -> int:
  return selection.element_count(spec, w)


def _build(spec, taus):
  """`element_init` builder: η = the top c·s |τ| (largest first), S = ±init_logit."""
  c = int(spec["candidates"])
  if c < 1:
    raise ValueError(f"adapter.candidates={c!r} is invalid; valid: an integer >= 1")

  def build(path, w):
    s = _s(spec, w)
    k = min(c * s, w.shape[-2] * w.shape[-1])
    tau = taus[path]
    flat = tau.reshape(*tau.shape[:-2], -1)
    _, idx = jax.lax.top_k(jnp.abs(flat), k)            # by |τ|, largest first
    logit = jnp.where(jnp.arange(k) < s, 1.0, -1.0) * float(spec["init_logit"])
    logit = jnp.broadcast_to(logit, idx.shape)          # + on the top-s, − on the other candidates
    values = jnp.take_along_axis(flat, idx, axis=-1)
    return idx, {TAU: values.astype(w.dtype)}, {LOGIT: logit.astype(w.dtype)}

  return build


def localize(pre, ft, spec: Mapping[str, Any]):
  """(frozen, trainable) for skill localization of θ_ft over θ0 (S from the top-s |τ|)."""
  taus = selection.task_vectors(pre, ft, featurewise.linear_targets(pre, spec))
  return selection.element_init(pre, list(taus), _build(spec, taus))


from_finetuned = localize


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """S over the candidates of the stand-in task vector −tau_step · G / max|G| (per matrix)."""
  del key
  taus = selection.grad_task_vectors(frozen, spec, calib, "grafting")
  peak = lambda g: jnp.max(jnp.abs(g), axis=(-2, -1), keepdims=True) + 1e-30
  taus = {p: float(spec["tau_step"]) * g / peak(g) for p, g in taus.items()}
  return selection.element_init(frozen, list(taus), _build(spec, taus))


def binarize(frozen, trainable, spec: Mapping[str, Any]):
  """{linear path: (idx, τ)} of the hard mask γ: the top-s logits S of each matrix."""
  flat, out = base.flatten(frozen), {}
  for path, logit in base.flatten(trainable).items():
    linear = path.rsplit("/", 1)[0]
    s = _s(spec, flat[linear + "/kernel"])
    _, top = jax.lax.top_k(logit.astype(jnp.float32), s)
    top = jnp.sort(top, axis=-1)
    out[linear] = (jnp.take_along_axis(flat[f"{linear}/{sd.IDX}"], top, axis=-1),
                   jnp.take_along_axis(flat[f"{linear}/{TAU}"], top, axis=-1))
  return out


graft = sd.compose  # θ0 + γ ⊙ τ for binarized diffs, exact


def _phi(leaves):
  return jax.nn.sigmoid(leaves[LOGIT].astype(jnp.float32)) * leaves[TAU].astype(jnp.float32)


combine, logical_axes, materialize = selection.element_member(
    (TAU,), {LOGIT: featurewise.replicated(1)}, _phi)
merge = materialize
linear_hook = sd.linear_hook
