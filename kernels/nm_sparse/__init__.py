"""N:M (2:4) structured-sparse matmul from a compressed weight (values + packed indices)."""
from jaxft_kernels.nm_sparse.ops import nm_sparse_matmul, nm_sparse_matmul_sharded
from jaxft_kernels.nm_sparse.reference import (nm_compress, nm_decompress, nm_mask,
                                               nm_sparse_matmul_reference)

__all__ = ["nm_compress", "nm_decompress", "nm_mask", "nm_sparse_matmul", "nm_sparse_matmul_reference",
           "nm_sparse_matmul_sharded"]
