"""rsLoRA: "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (Kalajdzievski, 2023).

LoRA (see `lora`) with the rank-stabilised scale

    W_eff = W0 + s A B,    s = alpha / sqrt(rank),

so raising r from 4 to 16 at fixed alpha halves s (LoRA's alpha / r quarters it).
"""
from __future__ import annotations

from jaxft.adapters import lora, lowrank

DEFAULTS = dict(lowrank.COMMON)

MEMBER = lowrank.Member("rslora", __doc__, DEFAULTS, lora.init_matrix, scale=lowrank.rs_scale,
                        peft="lora")
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
