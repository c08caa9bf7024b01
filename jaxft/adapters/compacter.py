"""Compacter: "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers" (Karimi Mahabadi et al., 2021).

A series bottleneck adapter (see `bottleneck`) whose two projections are
parameterised hypercomplex multiplication (PHM) layers with low-rank fast weights:

    W = Σ_{i=1}^{n} A_i ⊗ (s_i t_iᵀ),    y' = y + s · σ(y W_down) W_up,

A_i ∈ R^{n×n} "slow" weights shared by every adapter layer (one set for the down
and one for the up projections), s_i t_iᵀ rank-one "fast" weights per layer; n =
`phm_dim` must divide d, the bottleneck and d_out. Placement is Compacter++'s:
one adapter after the MLP (the down projection's output). W_up = 0 at init (t_up =
0), so the model is unchanged. Trainable per adapter: d + 2m + d_out, plus 2n³
shared. Not mergeable (σ is nonlinear).
"""
from __future__ import annotations

from jaxft.adapters import bottleneck, featurewise

DEFAULTS = {"targets": (r"mlp/down$",), "bottleneck": 32, "phm_dim": 4, "activation": "gelu",
            "scaling": 1.0}
MERGEABLE = False

init = bottleneck.make_init("series", "phm")
logical_axes = bottleneck.make_logical_axes("series")
combine = bottleneck.combine
linear_hook = bottleneck.make_linear_hook("series")
materialize = merge = featurewise.not_mergeable("compacter", "a series bottleneck is nonlinear")
phm_matrix = bottleneck.phm_matrix
