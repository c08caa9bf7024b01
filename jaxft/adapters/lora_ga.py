"""LoRA-GA: "LoRA-GA: Low-Rank Adaptation with Gradient Approximation" (Wang et al., 2024).

The initialiser "aligns the gradients of low-rank matrix product with those of full
fine-tuning at the first step". With G the full-weight gradient averaged over
`calib_batches` training batches (x W layout, G (d_in, d_out)) and its SVD
G = U S V^T, the default direction 'ArB2r' takes

    A0 = U[:, :r] * c,   B0 = V[:, r:2r]^T * c,   c = d_out^(1/4) / sqrt(gamma)  ('stable')

(METHODS.md's (d_out, d_in) form: A0 = V_r^T, B0 = U_{r:2r}), and freezes the offset
base W0 - s A0 B0, so the model is unchanged at init. One SGD step then changes
s A B by -lr s^2 c^2 (G_r^{A} + G_r^{B}) = -lr s^2 c^2 G_2r: the best rank-2r
approximation of the full fine-tuning step. Switches: `direction` in {ArB2r, A2rBr,
ArBr, random}, `ga_scale` in {stable, unit}, `gamma` (16).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.adapters import calibrate, lowrank

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "unit")

# dropout 0: the adapter starts non-zero, and dropout on its input would break the
# offset that keeps the model unchanged at init.
DEFAULTS = {**lowrank.COMMON, **calibrate.CALIB_DEFAULTS, "dropout": 0.0,
            "direction": "ArB2r", "ga_scale": "stable", "gamma": 16.0}
CALIBRATION = True


def _factors(key, g, rank: int, direction: str):
  """(A (…, d_in, r), B (…, r, d_out)) orthonormal pieces of the gradient's SVD."""
  u, _, vh = lowrank.svd(g, rank=2 * rank, key=key)
  if direction == "ArB2r":
    return u[..., :rank], vh[..., rank:2 * rank, :]
  if direction == "A2rBr":
    return u[..., rank:2 * rank], vh[..., :rank, :]
  if direction == "ArBr":
    return u[..., :rank], vh[..., :rank, :]
  if direction == "random":
    k1, k2 = jax.random.split(key)
    idx = jax.random.permutation(k1, min(u.shape[-1], vh.shape[-2]))
    return jnp.take(u, idx[:rank], axis=-1), jnp.take(vh, idx[rank:2 * rank], axis=-2)
  raise ValueError(f"adapter.direction={direction!r} is invalid; valid choices: {DIRECTIONS}")


def init_matrix(key, w, spec, stats):
  rank = lowrank.check_rank(spec, w)
  if 2 * rank > min(w.shape[-2:]):
    raise ValueError(f"lora_ga needs 2*rank <= min(d_in, d_out); rank={rank}, kernel "
                     f"{tuple(w.shape)}")
  a, b = calibrate.per_layer(lambda g: _factors(key, g, rank, spec["direction"]),
                             w.ndim - 2)(stats.grad)
  mode = spec["ga_scale"]
  if mode not in SCALES:
    raise ValueError(f"adapter.ga_scale={mode!r} is invalid; valid choices: {SCALES}")
  c = (w.shape[-1] ** 0.25 / float(spec["gamma"]) ** 0.5) if mode == "stable" else 1.0
  a, b = a * c, b * c
  offset = w - lowrank.lora_scale(spec) * (a @ b)
  return {"kernel": offset, "lora_a": a, "lora_b": b}


MEMBER = calibrate.Calibrated(
    name="lora_ga", doc=__doc__, defaults=DEFAULTS, init_matrix=init_matrix,
    needs_grad=True, peft="lora")
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
