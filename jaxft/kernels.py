"""Public namespace of the Pallas kernels in top-level `kernels/` (installed as `jaxft_kernels`).

Each op takes `interpret=None` (interpret on CPU, lower for real on GPU/TPU; True/False
forces it) and has a pure-jnp `<op>_reference` beside it; see each op's docstring for
its argument layout.

  lora_matmul(x, w, a, b, *, scale, bias=None)   y = x W + s (x A) B, fused (K1)
  lora_linear(x, w, a, b, scale, *, bias=None)   the same, shaped for a linear hook
  nm_sparse_matmul(x, values, meta, *, n, m)     y = x W from a compressed N:M weight (K2)
  sparse_delta_scatter(w, blocks, phi)           W + scatter(blocks, phi) (K3)
  sparse_delta_matmul(x, w, blocks, phi)         y = x (W + scatter(blocks, phi)), SDDMM backward
"""
from __future__ import annotations

from jaxft_kernels.lora_matmul import lora_linear, lora_matmul, lora_matmul_reference
from jaxft_kernels.nm_sparse import (nm_compress, nm_decompress, nm_mask, nm_sparse_matmul,
                                     nm_sparse_matmul_reference)
from jaxft_kernels.sparse_delta import (sparse_delta_matmul, sparse_delta_matmul_reference,
                                        sparse_delta_scatter, sparse_delta_scatter_reference,
                                        sparse_delta_sddmm, sparse_delta_sddmm_reference)

# --- part B (FFT convolution, Monarch, Hadamard) adds its three ops below this line ---
#   fft_conv(u, k, pre=None, post=None, *, freq_keep=1.0)   post ⊙ (k ∗ (pre ⊙ u)), causal,
#       u (B, H, L), k (H, Lk <= L); FFT as Monarch matmuls (K4)
#   monarch_matmul(x, w1, w2)    x (..., k·p), w1 (k, q, p), w2 (l, s, r) -> (..., s·l) (K5)
#   hadamard_transform(x, block=None)   orthonormal blockwise Walsh–Hadamard of the last axis (K6)
from jaxft_kernels.fft_conv import fft_conv, fft_conv_reference
from jaxft_kernels.monarch import monarch_matmul, monarch_matmul_reference
from jaxft_kernels.hadamard import hadamard_transform, hadamard_transform_reference
# --- end of part B ---
