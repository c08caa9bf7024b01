"""MiLoRA: "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM
Finetuning" (Wang et al., 2024) — PiSSA's code path with the minor triplets.

    A = U_r S_r^{1/2} / sqrt(s), B = S_r^{1/2} Vh_r / sqrt(s) over the r *smallest*
    singular triplets of W0;  W_res = W0 - s A B (holds the principal ones, ‖W_res‖₂ = σ₁).
"""
from __future__ import annotations

from jaxft.adapters import lowrank, pissa

DEFAULTS = {**pissa.DEFAULTS, "component": "bottom"}

MEMBER = lowrank.Member("milora", __doc__, DEFAULTS, pissa.init_matrix, peft="lora_residual")
init, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
