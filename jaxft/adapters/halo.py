"""HALO as a fine-tuning option: "HALO: Hadamard-Assisted Lossless Optimization for
Efficient Low-Precision LLM Training and Fine-Tuning".

Full (or regex-partial) fine-tuning whose every linear runs its three GEMMs in low
precision with Hadamard rotations (`jaxft.models.structured.halo_matmul`):

    Y = Q(X H) Q(Hᵀ W),   dX = Q(dY H) Q(Hᵀ Wᵀ),   dW = Q(Xᵀ H) Q(Hᵀ dY),

H an orthonormal block-Hadamard along each GEMM's inner dimension, Q per-row (or
per-output-channel) INT8 / FP8-E4M3 quantisation with 32-bit accumulation. `quant`
picks the format ('none' = full precision, same function as `full`), `rotate` which
GEMMs are rotated, `kernel` the Hadamard implementation ('pallas' = the Pallas
kernel, 'reference' = jnp). Trainable params and merge are exactly `full`'s: the
master weights stay in their own dtype and export unchanged.
"""
from __future__ import annotations

from jaxft import names
from jaxft.adapters import full
from jaxft.models import structured

DEFAULTS = {**full.DEFAULTS, "quant": "int8", "rotate": structured.GEMMS, "token_block": 256,
            "kernel": "reference"}
KERNELS = ("reference", "pallas")

init, logical_axes, combine, materialize, merge = (
    full.init, full.logical_axes, full.combine, full.materialize, full.merge)


def linear_hook(spec):
  """Every linear through `halo_matmul` with the spec's format and rotations."""
  if spec["kernel"] not in KERNELS:
    raise ValueError(names.unknown_message("adapter.kernel", spec["kernel"], KERNELS))
  return structured.halo_hook(spec["quant"], tuple(spec["rotate"]),
                              token_block=int(spec["token_block"]),
                              use_kernel=spec["kernel"] == "pallas")
