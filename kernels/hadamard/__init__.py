"""Fast Walsh–Hadamard transform: `hadamard_transform`, `hadamard_transform_reference`."""
from jaxft_kernels.hadamard.ops import (hadamard_transform, hadamard_transform_reference,
                                        hadamard_transform_sharded)

__all__ = ["hadamard_transform", "hadamard_transform_sharded", "hadamard_transform_reference"]
