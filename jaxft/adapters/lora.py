"""LoRA: "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., 2021).

For each targeted linear y = x W (W stored (d_in, d_out), stacked over layers):

    y = x W0 + s * dropout(x) A B,    s = alpha / rank,

with A (d_in, r) kaiming-uniform (bound 1/sqrt(d_in), PyTorch's a=sqrt(5)), B
(r, d_out) zero, so the model is unchanged at init. Only A and B train. The merged
weight is W0 + s A B. In METHODS.md's (d_out, d_in) notation this is W0 + s B A.
The family's shared code (hook, merge, axes) is `jaxft.adapters.lowrank`.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from jaxft.adapters import base, lowrank

# kernel: "fused" (XLA, hand-written backward: jaxft.adapters.fused), "reference" (the
# expression left to autodiff) or "pallas" (the fused kernel, jaxft_kernels.lora_matmul).
DEFAULTS = {**lowrank.COMMON, "kernel": "fused"}


def scale(spec: Mapping[str, Any]) -> float:
  return lowrank.lora_scale(spec)


def targets(params, spec) -> list[str]:
  """Linear paths (e.g. 'layers/attn/q') the spec selects."""
  return base.match(base.linear_paths(params), spec["targets"], what="linear layer")


def init_matrix(key, w, spec, stats=None):
  """A kaiming-uniform, B = 0 (no-op at init)."""
  del stats
  rank = lowrank.check_rank(spec)
  return {"lora_a": lowrank.kaiming_a(key, w, rank),
          "lora_b": jnp.zeros((*w.shape[:-2], rank, w.shape[-1]), jnp.float32)}


MEMBER = lowrank.Member("lora", __doc__, DEFAULTS, init_matrix, peft="lora")
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
