"""Sparse-delta scatter and SDDMM (block-structured) for SpIEL-style adapters."""
from jaxft_kernels.sparse_delta.ops import (gather_blocks, sparse_delta_matmul,
                                            sparse_delta_matmul_sharded, sparse_delta_scatter,
                                            sparse_delta_sddmm)
from jaxft_kernels.sparse_delta.reference import (expand_blocks, make_blocks,
                                                  sparse_delta_matmul_reference,
                                                  sparse_delta_scatter_reference,
                                                  sparse_delta_sddmm_reference)

__all__ = ["expand_blocks", "gather_blocks", "make_blocks", "sparse_delta_matmul",
           "sparse_delta_matmul_reference", "sparse_delta_matmul_sharded", "sparse_delta_scatter",
           "sparse_delta_scatter_reference", "sparse_delta_sddmm", "sparse_delta_sddmm_reference"]
