"""Objectives by name: `loss_fn(logits, batch, spec) -> (loss, metrics)`.

Metrics hold `num_tokens`; all other metrics are token-weighted means.
"""
from jaxft.objectives import kd, xent

OBJECTIVES = {"xent": xent, "kd": kd}
DEFAULTS = {name: module.DEFAULTS for name, module in OBJECTIVES.items()}
