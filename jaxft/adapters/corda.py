"""CorDA: "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models" (Yang et al., 2024).

Each targeted weight is decomposed oriented by the covariance C = X^T X of its
inputs over a few calibration samples. In the x W layout (W (d_in, d_out), so
METHODS.md's W0·C is (C W)^T):

    SVD(C W) = U S V^T   =>   W = C^-1 U S V^T   exactly,

with C damped as C + damping * mean(diag C) * I before use. The adapter holds r
components, split as PiSSA: A = C^-1 U_r S_r^(1/2) / sqrt(s), B = S_r^(1/2) V_r^T / sqrt(s);
the frozen residual is W - s A B (so frozen + adapter == W0 for any damping).

  mode='ipm' (instruction-previewed): C from the task's own instruction data, the
    r *largest* components train (they capture the task's main characteristics).
  mode='kpm' (knowledge-preserved): C from question-answering samples, the r
    *smallest* components train and the rest, which carry the world knowledge the
    samples exercise, stay frozen.

The calibration batches come from the run's data pipeline (`data.*`): for KPM as in
the paper, point the run's calibration data at a QA source. `calib_tokens` picks
all non-padding tokens (default) or only loss tokens.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxft.adapters import calibrate, lowrank

MODES = {"ipm": "top", "kpm": "bottom"}

# dropout 0: the adapter holds live components of W0 (as PiSSA); dropping its input
# would perturb the decomposed model (measured on SmolLM2: step-1 loss 4.27 vs 3.64).
DEFAULTS = {**lowrank.COMMON, **calibrate.CALIB_DEFAULTS, "dropout": 0.0, "mode": "ipm",
            "damping": 1e-4}
CALIBRATION = True


def damped(cov, damping: float):
  """C + damping * mean(diag C) * I (the matrix actually inverted)."""
  d = cov.shape[-1]
  mean_diag = jnp.mean(jnp.diagonal(cov, axis1=-2, axis2=-1), axis=-1)
  return cov + jnp.einsum("...,ij->...ij", damping * mean_diag, jnp.eye(d, dtype=cov.dtype))


def init_matrix(key, w, spec, stats):
  del key
  rank = lowrank.check_rank(spec, w)
  mode = spec["mode"]
  if mode not in MODES:
    raise ValueError(f"adapter.mode={mode!r} is invalid; valid choices: {tuple(MODES)}")
  scale = lowrank.lora_scale(spec)

  def one(w, cov):
    c = damped(cov, float(spec["damping"]))
    u, s, vh = jnp.linalg.svd(c @ w, full_matrices=False)
    u, s, vh = lowrank.top_or_bottom(u, s, vh, rank, MODES[mode])
    root = jnp.sqrt(s / scale)
    a = jnp.linalg.solve(c, u) * root[None, :]
    b = root[:, None] * vh
    return {"kernel": w - scale * (a @ b), "lora_a": a, "lora_b": b}

  return calibrate.per_layer(one, w.ndim - 2)(w, stats.covariance())


MEMBER = calibrate.Calibrated(
    name="corda", doc=__doc__, defaults=DEFAULTS, init_matrix=init_matrix, needs_cov=True,
    peft="lora")
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
