"""QALoRA from "EfficientDM: Efficient Quantization-Aware Fine-Tuning of Low-Bit Diffusion Models" (He et al., 2023).

A "quantization-aware variant of the low-rank adapter (QALoRA) that can be merged
with model weights and jointly quantized to low bit-width": as L4Q (x W layout),

    y = Q_a(x) W_q,   W_q = step * clip(round((W0 + s A B) / step), Q_N, Q_P),

with learned weight steps per output channel (`group=0`, EfficientDM's channel-wise
weights) and, when `act_bits > 0`, a learned per-layer activation step (LSQ on the
layer input, signed `act_bits` range), initialised from the calibration batches'
input RMS as LSQ's 2 E|x| / sqrt(Q_P) with E|x| = RMS * sqrt(2/pi). Without calibration
(`calib=None`) the activation step starts at `act_init`.

Defaults: W4 with activations unquantized (`act_bits=0`), because a merged plain
model has no place for an activation quantizer: with `act_bits > 0`, `merge` holds the
quantized weights and the activation quantizer must run at inference (merged and
unmerged logits then differ by exactly Q_a). The paper's data-free distillation from
the full-precision model is an objective, not part of the adapter.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from jaxft.adapters import base, calibrate, l4q

DEFAULTS = {**l4q.DEFAULTS, "group": 0, "act_bits": 0, "act_init": 0.05,
            "calib_batches": 2, "calib_tokens": "all"}


def CALIBRATION(spec) -> bool:  # pylint: disable=invalid-name
  """Calibration batches are needed only to initialise activation steps."""
  return int(spec["act_bits"]) > 0


def lsq_act(x, step, bits: int):
  """Fake-quantized activations with one step per layer (LSQ, straight-through)."""
  qn, qp = l4q.q_range(bits)
  d = x.shape[-1]
  w = x.reshape(-1, d, 1).astype(jnp.float32)                    # one "group" = everything
  step2 = jnp.broadcast_to(step.astype(jnp.float32).reshape(1, 1, 1), (w.shape[0], 1, 1))
  return l4q.lsq(w, step2, qn, qp).reshape(x.shape).astype(x.dtype)


def act_step_from(stats, bits: int):
  _, qp = l4q.q_range(bits)
  rms = jnp.sqrt(jnp.mean(stats.covariance(), axis=-1))          # diag stats: (…, d_in)
  return 2.0 * rms * math.sqrt(2.0 / math.pi) / math.sqrt(qp)


@dataclasses.dataclass(frozen=True)
class QALoRA(l4q.QATMember):
  """L4Q's merged-then-quantized weight plus an optional LSQ activation quantizer."""

  def quantize_input(self, p, x, spec):
    bits = int(spec["act_bits"])
    return x if bits <= 0 or "act_step" not in p else lsq_act(x, p["act_step"], bits)

  def init(self, key, frozen, spec, calib=None):
    frozen, trainable = super().init(key, frozen, spec, None)
    bits = int(spec["act_bits"])
    if bits <= 0:
      return frozen, trainable
    paths = self.targets(frozen, spec)
    stats = (None if calib is None else calibrate.statistics(
        calib, frozen, paths, cov=True, diag=True, tokens=spec["calib_tokens"]))
    flat = base.flatten(trainable)
    for path in paths:
      lead_dims = flat[path + "/lora_a"].shape[:-2]
      step = (jnp.full(lead_dims, float(spec["act_init"])) if stats is None
              else act_step_from(stats[path], bits))
      flat[path + "/act_step"] = step.astype(flat[path + "/lora_a"].dtype)
    return frozen, base.unflatten(flat)

  def logical_axes(self, model_axes, trainable, spec):
    plain = {k: v for k, v in base.flatten(trainable).items() if not k.endswith("/act_step")}
    f_axes, t_axes = super().logical_axes(model_axes, base.unflatten(plain), spec)
    flat_t = base.flatten(t_axes)
    for path in base.flatten(trainable):
      if path.endswith("/act_step"):
        flat_t[path] = base.flatten(model_axes)[path.rsplit("/", 1)[0] + "/kernel"][:-2]
    return f_axes, base.unflatten(flat_t)


MEMBER = QALoRA(name="qalora", doc=__doc__, defaults=DEFAULTS, init_matrix=l4q.init_matrix,
                leaves=("lora_a", "lora_b", "quant_step"),
                trains=("lora_a", "lora_b", "quant_step"), extra_axes=l4q.step_axes)
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
export = MEMBER.export
