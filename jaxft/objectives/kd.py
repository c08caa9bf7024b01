"""Distillation from a dense self-teacher, CAST's third component.

From "CAST: Continuous and Differentiable Semi-Structured Sparsity-Aware Training
for Large Language Models" (the dense model before sparsification is the
teacher; the 0.33 / 0.67 mix follows the AST release):

    loss = ce_weight * CE(student, targets)
         + kd_weight * T^2 * sum_t m_t KL(softmax(z_teacher / T) || softmax(z_student / T)) / sum_t m_t

with T = `temperature` and the distillation weight λ = `kd_weight` (the task-loss
weight is `ce_weight`; ce_weight=1, kd_weight=λ gives "task loss + λ·KD").

The teacher's logits arrive precomputed in `batch["teacher_logits"]` (B, L, V)
(e.g. from `teacher_logits(apply, teacher_params, batch)`, under stop_gradient),
so the objective stays a pure function of the student's logits. With
`teacher='initial'` (the default) a run supplies them itself: the train step keeps
a frozen copy of the initial weights (the pretrained model, before any update) in
`state.frozen['teacher']` and runs it on every batch (`jaxft.extras.with_extras`);
`teacher='batch'` expects the data to carry them.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.objectives import xent

DEFAULTS: dict[str, Any] = {"ce_weight": 0.33, "kd_weight": 0.67, "temperature": 1.0,
                            "teacher": "initial"}
TEACHERS = ("initial", "batch")


def teacher_logits(apply, teacher_params, batch):
  """The dense teacher's logits for `batch` (no gradient): what `loss_fn` expects in the batch."""
  out = apply(teacher_params, batch["tokens"], positions=batch.get("positions"),
              segment_ids=batch.get("segment_ids"))
  return jax.lax.stop_gradient(out)


def loss_fn(logits_BxLxV, batch: Mapping[str, jax.Array], spec: Mapping[str, Any] = DEFAULTS):
  """ce_weight * CE + kd_weight * T^2 KL(teacher || student), token-weighted."""
  if "teacher_logits" not in batch:
    raise ValueError("objective 'kd' needs batch['teacher_logits'] (the dense teacher's logits, "
                     "see jaxft.objectives.kd.teacher_logits); the batch has "
                     f"{sorted(batch)}")
  temp = float(spec["temperature"])
  _, metrics = xent.loss_fn(logits_BxLxV, batch)
  mask_BxL = batch["loss_mask"].astype(jnp.float32)
  log_s = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32) / temp, axis=-1)
  log_t = jax.nn.log_softmax(batch["teacher_logits"].astype(jnp.float32) / temp, axis=-1)
  kl_BxL = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
  kl = jnp.sum(kl_BxL * mask_BxL) / jnp.maximum(metrics["num_tokens"], 1.0)
  loss = float(spec["ce_weight"]) * metrics["xent"] + float(spec["kd_weight"]) * temp ** 2 * kl
  return loss, {**metrics, "loss": loss, "kl": kl}
