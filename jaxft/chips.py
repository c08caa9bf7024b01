"""Accelerator peaks (FLOP/s, HBM, bandwidths) for the step-time planner (`jaxft.plan`).

One row per chip, with the page the numbers come from. `peak_flops` is the dense
bf16 matmul peak (no 2:4 sparsity), the number MFU is conventionally quoted
against. TPU capacities are GiB as the compiler sees them; `ici_bytes_s` is the
bidirectional inter-chip bandwidth per chip (NVLink for GPUs), used only for a
rough communication estimate.

  chip = chips.lookup("TPU v5p")      # a device_kind or a short name ("v5p", "h100")
  seconds = flops / chip.peak_flops
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from jaxft import names

GiB = 2 ** 30


class Chip(NamedTuple):
  name: str
  peak_flops: float              # dense bf16 FLOP/s per chip
  hbm_bytes: float               # memory per chip
  hbm_bytes_s: float             # memory bandwidth per chip
  ici_bytes_s: Optional[float]   # bidirectional chip-to-chip bandwidth (None = not published)
  cores_per_chip: int            # TensorCores a chip holds (v4/v5p: 2, as one megacore device)
  source: str


CHIPS: dict[str, Chip] = {
    # "Peak compute per chip 275 teraflops (bf16 or int8); HBM2 32 GiB, 1200 GBps".
    "v4": Chip("TPU v4", 275e12, 32 * GiB, 1200e9, None, 2,
               "https://cloud.google.com/tpu/docs/v4"),
    # "197 TFLOPs (bf16); HBM2 16 GB, 819 GBps; bidirectional ICI 400 GBps per chip".
    "v5e": Chip("TPU v5 lite", 197e12, 16 * GiB, 819e9, 400e9, 1,
                "https://cloud.google.com/tpu/docs/v5e"),
    # "459 TFLOPs (bf16); HBM2e 95 GB, 2765 GBps; bidirectional ICI 1200 GBps per chip".
    "v5p": Chip("TPU v5", 459e12, 95 * GiB, 2765e9, 1200e9, 2,
                "https://cloud.google.com/tpu/docs/v5p"),
    # "918 TFLOPs (bf16); HBM 32 GB, 1638 GBps; bidirectional ICI 800 GBps per chip".
    "v6e": Chip("TPU v6 lite", 918e12, 32 * GiB, 1638e9, 800e9, 1,
                "https://cloud.google.com/tpu/docs/v6e"),
    # H100 SXM: 989 TFLOPS dense bf16 (1979 with sparsity), 80 GB HBM3, 3.35 TB/s, NVLink 900 GB/s.
    "h100": Chip("NVIDIA H100", 989e12, 80e9, 3.35e12, 900e9, 1,
                 "https://www.nvidia.com/en-us/data-center/h100/ (SXM datasheet)"),
    # H200 SXM: same compute as H100; 141 GB HBM3e, 4.8 TB/s, NVLink 900 GB/s.
    "h200": Chip("NVIDIA H200", 989e12, 141e9, 4.8e12, 900e9, 1,
                 "https://www.nvidia.com/en-us/data-center/h200/ (SXM datasheet)"),
}

# jax `device.device_kind` prefixes -> table key.
_KINDS = (("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5p", "v5p"),
          ("TPU v5", "v5p"), ("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"),
          ("NVIDIA H100", "h100"), ("NVIDIA H200", "h200"))


def key_of(device_kind: str) -> Optional[str]:
  """Table key of a jax `device_kind` ('TPU v5 lite' -> 'v5e'), or None for unknown hardware."""
  for prefix, key in _KINDS:
    if device_kind.startswith(prefix):
      return key
  return None


def lookup(name: str) -> Chip:
  """A chip by short name ('v5p', 'h100') or jax device_kind; unknown names list the valid ones."""
  key = name if name in CHIPS else key_of(name)
  return names.lookup(CHIPS, key or name, "chip")
