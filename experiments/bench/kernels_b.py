"""Benchmark cases of the part-B kernels for `experiments/bench/kernels.py` (METHODS.md K4–K6).

  fft_conv            B ∈ {8, 64}, H = 768, L ∈ {256 … 16K (64K at B = 8)}: jnp.fft rfft
                      (baseline), direct O(L²) conv (L <= 4K), the Monarch FFT as jnp
                      einsums, the Pallas kernel; bytes = the HBM floor (input + output).
  monarch_matmul      n ∈ {1024, 4096}, nblocks ∈ {4, 16, 64}, M ∈ {2048, 8192}: the densified
                      matrix as one dense matmul (baseline), two einsums, the fused kernel.
  hadamard_transform  d ∈ {576, 1536, 4096, 14336} (blocks 64, 512, 4096, 2048), 16K tokens:
                      dense block matmul (baseline) vs the kernel; memory-bound.

`ops(Case, randn)` returns {name: cases(size)} for kernels.py's OPS table.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp

from jaxft_kernels import fft_conv as fc
from jaxft_kernels import hadamard as hd
from jaxft_kernels import monarch as mo
from jaxft_kernels.fft_conv import reference as fref


def _fft_conv_cases(Case, randn, size):
  if size == "tiny":
    grid = [(2, 4, 64), (2, 4, 100)]
  else:
    grid = ([(8, 768, l) for l in (256, 1024, 4096, 16384, 65536)]
            + [(64, 768, l) for l in (256, 1024, 4096, 16384)])
  cases = []
  for b, h, l in grid:
    u, k, post = randn(0, (b, h, l), jnp.float32), randn(1, (h, l), jnp.float32, l ** -0.5), \
        randn(2, (b, h, l), jnp.float32)
    plan = fref.make_plan(l)
    nk = len(plan.cols)
    flops = b * h * (8 * plan.n1 * plan.l1 * plan.n2 + 16 * plan.n1 * plan.n2 * nk)
    arms = {
        "jnp_fft_rfft": lambda u, k, g: fc.fft_conv_reference(u, k, None, g),
        "jnp_monarch_einsum": lambda u, k, g: fc.fft_conv_monarch(u, k, None, g),
        "pallas_fused": lambda u, k, g: fc.fft_conv(u, k, None, g),
    }
    if l <= 4096 and b * h * l * l <= 2 ** 33:
      arms["direct_conv"] = lambda u, k, g: fc.direct_conv_reference(u, k, None, g)
    cases.append(Case("fft_conv", dict(B=b, H=h, L=l, dtype="f32", mode="fwd, post-gated"),
                      (u, k, post), arms, flops, 3 * b * h * l * 4))
  return cases


def _monarch_cases(Case, randn, size):
  grid = [(n, nb, m) for n in (1024, 4096) for nb in (4, 16, 64) for m in (2048, 8192)]
  if size == "tiny":
    grid = [(64, 4, 40)]
  cases = []
  for n, nb, m in grid:
    s1, s2 = mo.default_shapes(n, n, nb)
    x = randn(0, (m, n))
    w1, w2 = randn(1, s1, scale=s1[2] ** -0.5), randn(2, s2, scale=s2[2] ** -0.5)
    dense = mo.monarch_dense(w1.astype(jnp.float32), w2.astype(jnp.float32)).astype(jnp.bfloat16)
    f32 = dict(preferred_element_type=jnp.float32)
    arms = {
        "dense_matmul": lambda x, w1, w2, d: jnp.matmul(x, d, **f32).astype(jnp.bfloat16),
        "two_einsums": lambda x, w1, w2, d: mo.monarch_matmul_reference(x, w1, w2),
        "pallas_fused": lambda x, w1, w2, d: mo.monarch_matmul(x, w1, w2),
    }
    params = s1[0] * s1[1] * s1[2] + s2[0] * s2[1] * s2[2]
    cases.append(Case("monarch_matmul", dict(M=m, n=n, nblocks=nb, dtype="bf16",
                                             ideal_speedup=n * n / params),
                      (x, w1, w2, dense), arms, 2 * m * params, (2 * m * n + params) * 2,
                      other=()))
  return cases


def _hadamard_cases(Case, randn, size):
  grid = [(16384, 576, 64), (16384, 1536, 512), (16384, 4096, 4096), (16384, 14336, 2048)]
  if size == "tiny":
    grid = [(40, 96, 32)]
  cases = []
  for m, d, blk in grid:
    x = randn(0, (m, d))
    arms = {
        "dense_block_matmul": functools.partial(hd.hadamard_transform_reference, block=blk),
        "pallas": functools.partial(hd.hadamard_transform, block=blk,
                                    base=8 if size == "tiny" else 128),
    }
    cases.append(Case("hadamard_transform", dict(M=m, d=d, block=blk, dtype="bf16"), (x,), arms,
                      2 * m * d * min(blk, 128) + m * d * max(0, blk.bit_length() - 8),
                      2 * m * d * 2))
  return cases


def ops(Case, randn):
  """{op name: cases(size)} for `experiments/bench/kernels.py`."""
  bind = lambda fn: (lambda size: fn(Case, randn, size))
  return {"fft_conv": bind(_fft_conv_cases), "monarch_matmul": bind(_monarch_cases),
          "hadamard_transform": bind(_hadamard_cases)}
