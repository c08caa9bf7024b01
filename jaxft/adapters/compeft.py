"""ComPEFT: "ComPEFT: Compression for Communicating Parameter Efficient Updates via Sparsification and Quantization" (Yadav et al., 2023).

Compresses a task vector τ = θ_ft − θ0 per tensor (each layer's matrix of a targeted
linear), with no retraining:

    τ̃ = α · σ(τ) · sign(τ) ⊙ m,     m = the top-k |τ| entries (k = round(density · n)),

σ(τ) the standard deviation of the tensor's whole τ, α one scalar (`alpha`; the paper
tunes it on validation data). Stored: k positions, k signs and one float per tensor.
θ0 + τ̃ is `sparse_delta`'s element form with φ = scale · sign (`jaxft.adapters.selection`).

Post-hoc, as in the paper: `compress(θ0, θ_ft, spec)` -> {linear path: (idx, values)},
applied with `apply(θ0, diff)` (exact scatter-add, `sparse_delta.compose`); the
(θ0, θ_ft) of a finished run: `selection.run_params(workdir)`.

Adapter form: frozen positions `sd_idx` and signs `cp_sign` (int8), trainable per-tensor
magnitude `cp_scale` (…,): α is learned by gradient instead of a grid search.
`from_finetuned(θ0, θ_ft, spec)` gives it with scale = α σ(τ) (= the compressed model);
`jaxft train` (source='grad', no θ_ft) takes positions and signs from the stand-in task
vector τ ∝ −G of the calibration batches and starts at scale 0 (the model unchanged).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.adapters import calibrate, featurewise, selection, sparse_delta as sd

DEFAULTS = {"targets": featurewise.LINEARS, "density": 0.1, "alpha": 1.0, "grad_impl": "sddmm",
            "source": "grad", **calibrate.CALIB_DEFAULTS}
SIGN, SCALE = "cp_sign", "cp_scale"
MERGEABLE = True
CALIBRATION = True


def compress_tensor(tau, k: int, alpha: float):
  """(idx (…, k) int32, sign (…, k) int8, scale (…,) = α σ(τ)) of one stacked tensor τ."""
  tau = tau.astype(jnp.float32)
  flat = tau.reshape(*tau.shape[:-2], -1)
  idx = sd.top_k_indices(jnp.abs(tau), k)
  sign = jnp.sign(jnp.take_along_axis(flat, idx, axis=-1)).astype(jnp.int8)
  return idx, sign, alpha * jnp.std(flat, axis=-1)


def _k(spec, w) -> int:
  return selection.element_count(spec, w)


def compress(pre, ft, spec: Mapping[str, Any]) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{linear path: (idx, τ̃ values)}: the compressed task vector of every targeted linear."""
  out = {}
  for path, tau in selection.task_vectors(pre, ft, featurewise.linear_targets(pre, spec)).items():
    idx, sign, scale = compress_tensor(tau, _k(spec, tau), float(spec["alpha"]))
    out[path] = (idx, scale[..., None] * sign.astype(jnp.float32))
  return out


apply = sd.compose  # θ0 + Σ compressed diffs, exact


def from_finetuned(pre, ft, spec: Mapping[str, Any]):
  """(frozen, trainable) holding the compressed τ of (θ0, θ_ft); trainable = α σ(τ)."""
  taus = selection.task_vectors(pre, ft, featurewise.linear_targets(pre, spec))

  def build(path, w):
    idx, sign, scale = compress_tensor(taus[path], _k(spec, w), float(spec["alpha"]))
    return idx, {SIGN: sign}, {SCALE: scale.astype(w.dtype)}

  return selection.element_init(pre, list(taus), build)


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """Positions and signs of the stand-in task vector −G (top-k |G|); scale = 0."""
  del key
  taus = selection.grad_task_vectors(frozen, spec, calib, "compeft")

  def build(path, w):
    idx, sign, _ = compress_tensor(taus[path], _k(spec, w), float(spec["alpha"]))
    return idx, {SIGN: sign}, {SCALE: jnp.zeros(w.shape[:-2], w.dtype)}

  return selection.element_init(frozen, list(taus), build)


def _phi(leaves):
  return leaves[SCALE][..., None] * leaves[SIGN].astype(leaves[SCALE].dtype)


combine, logical_axes, materialize = selection.element_member(
    (SIGN,), {SCALE: featurewise.LEAD}, _phi)
merge = materialize
linear_hook = sd.linear_hook
