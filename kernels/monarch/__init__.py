"""Monarch matmul and dense→Monarch projection: `monarch_matmul`, `monarch_matmul_reference`."""
from jaxft_kernels.monarch.ops import (default_shapes, monarch_dense, monarch_matmul,
                                       monarch_matmul_reference, monarch_matmul_sharded, project)

__all__ = ["monarch_matmul", "monarch_matmul_sharded", "monarch_matmul_reference",
           "monarch_dense", "project", "default_shapes"]
