"""L4Q: "L4Q: Parameter Efficient Quantization-Aware Training on Large Language Models via LoRA-wise LSQ" (Jeon et al., 2024).

Quantization-aware LoRA: the adapter is merged *before* quantization, so training
sees exactly the low-bit weights it exports (x W layout, W0 frozen full precision):

    W_q = step * clip(round((W0 + s A B) / step), Q_N, Q_P),   Q_N = -2^(b-1), Q_P = 2^(b-1) - 1,

with one learned step per group of `group` consecutive input rows per output column
(`group=0`: per output channel). Gradients follow LSQ ("Learned Step Size
Quantization", Esser et al.): rounding is straight-through inside the clip range
(dW_q/dW = 1 there, 0 outside) and

    dW_q/dstep = round(v) - v inside, Q_N or Q_P outside (v = W / step),

summed over the group and scaled by 1/sqrt(N * Q_P) (N = weights per step). B = 0 at
init, so training starts from round-to-nearest W0 with steps absmax / Q_P
(`step_init='absmax'`) or LSQ's 2 mean|W| / sqrt(Q_P) ('lsq'). A, B and the steps train.
Export (`export`) gives the integers and steps; no adapter remains, and
`merge` == integers * steps reproduces the training forward exactly.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxft.adapters import base, lowrank, quant
from jaxft.models.layers import dense, lead

DEFAULTS = {**lowrank.COMMON, "dropout": 0.0, "bits": 4, "group": 64, "step_init": "absmax"}
STEP_INITS = ("absmax", "lsq")


def q_range(bits: int) -> tuple[int, int]:
  if bits < 2 or bits > 8:
    raise ValueError(f"adapter.bits must be in 2..8, got {bits}")
  return -2 ** (bits - 1), 2 ** (bits - 1) - 1


def _expand(step, d_in):
  """(…, n_groups, d_out) -> (…, d_in, d_out) (each step repeated over its group)."""
  return jnp.repeat(step, d_in // step.shape[-2], axis=-2)


def _codes(w, step, qn, qp):
  return jnp.clip(jnp.round(w / _expand(step, w.shape[-2])), qn, qp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def lsq(w, step, qn: int, qp: int):
  """Fake-quantized w (…, d_in, d_out) with per-group steps (…, d_in/g, d_out)."""
  return _codes(w, step, qn, qp) * _expand(step, w.shape[-2])


def _lsq_fwd(w, step, qn, qp):
  return lsq(w, step, qn, qp), (w, step)


def _lsq_bwd(qn, qp, res, g):
  w, step = res
  d_in, groups = w.shape[-2], step.shape[-2]
  v = w / _expand(step, d_in)
  inside = (v >= qn) & (v <= qp)
  dstep = g * jnp.where(inside, jnp.round(v) - v, jnp.clip(v, qn, qp))
  dstep = jnp.sum(dstep.reshape(*step.shape[:-2], groups, d_in // groups, -1), axis=-2)
  scale = 1.0 / jnp.sqrt(float(d_in // groups) * qp)
  return jnp.where(inside, g, jnp.zeros_like(g)), (dstep * scale).astype(step.dtype)


lsq.defvjp(_lsq_fwd, _lsq_bwd)


def init_step(w, bits: int, group: int, how: str):
  """Per-group steps (…, d_in/g, d_out) for w (…, d_in, d_out)."""
  if how not in STEP_INITS:
    raise ValueError(f"adapter.step_init={how!r} is invalid; valid choices: {STEP_INITS}")
  *lead_dims, d_in, d_out = w.shape
  g = d_in if group <= 0 else quant.divisor_block(d_in, group)
  blocks = jnp.abs(w).reshape(*lead_dims, d_in // g, g, d_out)
  _, qp = q_range(bits)
  step = (jnp.max(blocks, axis=-2) / qp if how == "absmax"
          else 2.0 * jnp.mean(blocks, axis=-2) / jnp.sqrt(float(qp)))
  return jnp.maximum(step, 1e-8)


def init_matrix(key, w, spec, stats=None):
  del stats
  rank = lowrank.check_rank(spec, w)
  *lead_dims, _, d_out = w.shape
  return {"lora_a": lowrank.kaiming_a(key, w, rank),
          "lora_b": jnp.zeros((*lead_dims, rank, d_out), jnp.float32),
          "quant_step": init_step(w, int(spec["bits"]), int(spec["group"]), spec["step_init"])}


def step_axes(leaf, lead_ax, ax_in, ax_out):
  if leaf == "quant_step":
    return (*lead_ax, ax_in, ax_out)
  return (*lead_ax, None)   # QALoRA's per-layer activation step


@dataclasses.dataclass(frozen=True)
class QATMember(lowrank.Member):
  """Merge-then-quantize: W_q = LSQ(W0 + s A B); the hook and merge are its own."""

  def quantized_weight(self, p, spec):
    qn, qp = q_range(int(spec["bits"]))
    w = p["kernel"].astype(jnp.float32) + self.delta(p, self.scale(spec), p["kernel"].shape)
    return lsq(w, p["quant_step"].astype(jnp.float32), qn, qp)

  def quantize_input(self, p, x, spec):
    del p, spec
    return x

  def linear_hook(self, spec):
    member = self

    def linear(p, x, name, rng):
      if "quant_step" not in p:
        return dense(p, x, name, rng)
      x = member.quantize_input(p, x, spec)
      y = jnp.einsum("...i,io->...o", x, member.quantized_weight(p, spec).astype(x.dtype))
      if "bias" in p:
        y = y + lead(p["bias"].astype(y.dtype), y.ndim)
      return y

    return linear

  def materialize(self, frozen, trainable, spec):
    """Plain params with every targeted kernel = integers * steps (the exported model)."""
    flat = base.flatten(base.merge_trees(frozen, trainable))
    for path in {p.rsplit("/", 1)[0] for p in base.flatten(trainable)}:
      p = {k.rsplit("/", 1)[1]: v for k, v in flat.items() if k.rsplit("/", 1)[0] == path}
      flat[path + "/kernel"] = self.quantized_weight(p, spec).astype(p["kernel"].dtype)
      for leaf in self.leaves + ("act_step",):
        flat.pop(f"{path}/{leaf}", None)
    return base.unflatten(flat)

  def export(self, frozen, trainable, spec) -> dict:
    """{linear path: (int8 codes (…, d_in, d_out), steps (…, d_in/g, d_out))}."""
    qn, qp = q_range(int(spec["bits"]))
    flat = base.flatten(base.merge_trees(frozen, trainable))
    out = {}
    for path in {p.rsplit("/", 1)[0] for p in base.flatten(trainable)}:
      p = {k.rsplit("/", 1)[1]: v for k, v in flat.items() if k.rsplit("/", 1)[0] == path}
      w = p["kernel"].astype(jnp.float32) + self.delta(p, self.scale(spec), p["kernel"].shape)
      step = p["quant_step"].astype(jnp.float32)
      out[path] = (_codes(w, step, qn, qp).astype(jnp.int8), step)
    return out


MEMBER = QATMember(name="l4q", doc=__doc__, defaults=DEFAULTS, init_matrix=init_matrix,
                   leaves=("lora_a", "lora_b", "quant_step"),
                   trains=("lora_a", "lora_b", "quant_step"), extra_axes=step_axes)
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
export = MEMBER.export
