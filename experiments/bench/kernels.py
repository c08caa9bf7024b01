"""Kernel benchmark: each Pallas op against its plain XLA/jnp baselines (METHODS.md §6).

    python experiments/bench/kernels.py [--ops lora_matmul,nm_sparse_matmul] [--size full|tiny]
                                        [--out experiments/bench/results/kernels.json]

Rules (METHODS.md §6): `jit`, 3 warm-ups, median of 20 runs with `block_until_ready`;
report ms, TFLOP/s, GB/s and the fraction of the roofline time
max(FLOPs / 989 TFLOP/s, bytes / 3.35 TB/s) (H100 bf16 dense). On a CPU host the kernels
run in interpret mode, so `--size tiny` checks that every arm agrees with the first
(the baseline) and the timings mean nothing; timings need a GPU or TPU.

Adding an op: write `<op>_cases(size) -> list[Case]` and add it to `OPS` (the part-B ops
register below the marked line). A Case holds jitted arms over the same arguments,
the first arm being the baseline the others are checked against.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxft_kernels import common
from jaxft_kernels import lora_matmul as lm
from jaxft_kernels import nm_sparse as nm
from jaxft_kernels import sparse_delta as sd

PEAK_FLOPS = 989e12   # H100 SXM bf16 dense
PEAK_BYTES = 3.35e12  # H100 SXM HBM3


@dataclasses.dataclass
class Case:
  op: str
  shape: dict
  args: tuple
  arms: dict[str, Callable[..., Any]]   # first arm = baseline
  flops: float
  bytes: float
  other: tuple = ()                     # arms computing something else (speed context only)


def _randn(key, shape, dtype=jnp.bfloat16, scale=1.0):
  return (scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)).astype(dtype)


def _itemsize(dtype):
  return jnp.dtype(dtype).itemsize


# --- K1: fused low-rank matmul -----------------------------------------------------------

def lora_matmul_cases(size: str) -> list[Case]:
  grid = ([(4096, 4096), (4096, 14336)], [512, 2048, 8192, 16384], [8, 16, 64])
  if size == "tiny":
    grid = ([(256, 384)], [200], [8])
  dt, s = jnp.bfloat16, 2.0
  cases = []
  for (d_in, d_out) in grid[0]:
    for m in grid[1]:
      for r in grid[2]:
        args = (_randn(0, (m, d_in)), _randn(1, (d_in, d_out), scale=d_in ** -0.5),
                _randn(2, (d_in, r), scale=d_in ** -0.5), _randn(3, (r, d_out)))
        f32 = dict(preferred_element_type=jnp.float32)
        arms = {
            "unfused_jnp": lambda x, w, a, b: lm.lora_matmul_reference(x, w, a, b, scale=s),
            "dense_xW": lambda x, w, a, b: jnp.matmul(x, w, **f32).astype(dt),
            "concat_k_jnp": lambda x, w, a, b: jnp.matmul(
                jnp.concatenate([x, (s * jnp.matmul(x, a, **f32)).astype(dt)], 1),
                jnp.concatenate([w, b], 0), **f32).astype(dt),
            "pallas_fused": lambda x, w, a, b: lm.lora_matmul(x, w, a, b, scale=s),
        }
        flops = 2 * m * d_in * d_out + 2 * m * r * (d_in + d_out)
        nbytes = (m * d_in + d_in * d_out + r * (d_in + d_out) + m * d_out) * _itemsize(dt)
        shape = dict(M=m, d_in=d_in, d_out=d_out, r=r, dtype="bf16", mode="fwd")
        cases.append(Case("lora_matmul", shape, args, arms, flops, nbytes, other=("dense_xW",)))
        # Forward + backward with W frozen (grads of x, A, B) vs the full-FT backward.
        loss = lambda f: jax.grad(lambda x, w, a, b: jnp.sum(f(x, w, a, b).astype(jnp.float32)),
                                  (0, 2, 3))
        bwd_arms = {
            "unfused_jnp": loss(arms["unfused_jnp"]),
            "pallas_fused": loss(arms["pallas_fused"]),
            "full_ft_dense": jax.grad(lambda x, w, a, b: jnp.sum(
                jnp.matmul(x, w, **f32)), (0, 1)),
        }
        cases.append(Case("lora_matmul", {**shape, "mode": "fwd+bwd (W frozen)"}, args, bwd_arms,
                          3 * flops - 2 * m * d_in * d_out, 2 * nbytes, other=("full_ft_dense",)))
  return cases


# --- K2: N:M sparse matmul ---------------------------------------------------------------

def nm_sparse_matmul_cases(size: str) -> list[Case]:
  grid = ([(4096, 4096), (4096, 14336)], [1, 16, 64, 512, 8192])
  if size == "tiny":
    grid = ([(512, 256)], [1, 24])
  dt = jnp.bfloat16
  cases = []
  for (d_in, d_out) in grid[0]:
    w = _randn(1, (d_in, d_out), scale=d_in ** -0.5)
    values, meta = jax.jit(nm.nm_compress)(w)
    mask = nm.nm_mask(w)
    w_masked = (w * mask).astype(dt)
    for m in grid[1]:
      x = _randn(0, (m, d_in))
      f32 = dict(preferred_element_type=jnp.float32)
      arms = {
          "dense_masked_weight": lambda x, w, mk, v, mt: jnp.matmul(x, w, **f32).astype(dt),
          "mask_then_dense": lambda x, w, mk, v, mt: jnp.matmul(x, jnp.where(mk, w, 0), **f32).astype(dt),
          "decompress_jnp": lambda x, w, mk, v, mt: nm.nm_sparse_matmul_reference(x, v, mt),
          "pallas_compressed": lambda x, w, mk, v, mt: nm.nm_sparse_matmul(x, v, mt),
      }
      nbytes = (m * d_in + 0.625 * d_in * d_out + m * d_out) * _itemsize(dt)
      cases.append(Case("nm_sparse_matmul", dict(M=m, d_in=d_in, d_out=d_out, nm="2:4", dtype="bf16"),
                        (x, w_masked, mask, values, meta), arms, 2 * m * d_in * d_out, nbytes))
  return cases


# --- K3: sparse-delta SDDMM --------------------------------------------------------------

def sparse_delta_cases(size: str) -> list[Case]:
  grid = ([(4096, 14336)], [2048, 8192], (8, 128), 0.01)
  if size == "tiny":
    grid = ([(64, 256)], [200], (8, 128), 0.25)
  (shapes, ms, bs, density) = grid
  dt = jnp.bfloat16
  cases = []
  for (d_in, d_out) in shapes:
    tiles = (d_in // bs[0]) * (d_out // bs[1])
    nb = max(1, int(density * tiles))
    flat = np.random.default_rng(0).choice(tiles, nb, replace=False)
    blocks = sd.make_blocks(np.stack([flat // (d_out // bs[1]), flat % (d_out // bs[1])], 1),
                            (d_in, d_out), bs)
    for m in ms:
      x, dy = _randn(0, (m, d_in)), _randn(1, (m, d_out))
      arms = {
          "full_xTdy_gather": lambda x, dy, blk: sd.gather_blocks(
              jnp.matmul(x.T, dy, preferred_element_type=jnp.float32), blk, bs),
          "pallas_sddmm": lambda x, dy, blk: sd.sparse_delta_sddmm(x, dy, blk, bs),
      }
      nnz = nb * bs[0] * bs[1]
      nbytes = (m * nb * (bs[0] + bs[1])) * _itemsize(dt) + nnz * 4
      cases.append(Case("sparse_delta_sddmm", dict(M=m, d_in=d_in, d_out=d_out, block=bs,
                                                   density=density, dtype="bf16"),
                        (x, dy, blocks), arms, 2 * m * nnz, nbytes))
  return cases


OPS: dict[str, Callable[[str], list[Case]]] = {
    "lora_matmul": lora_matmul_cases,
    "nm_sparse_matmul": nm_sparse_matmul_cases,
    "sparse_delta": sparse_delta_cases,
}
# --- part B (fft_conv, monarch_matmul, hadamard_transform) registers its ops below this line ---
import importlib.util as _ilu  # noqa: E402  (the sibling file kernels_b.py holds the part-B cases)
_spec = _ilu.spec_from_file_location("kernels_b", os.path.join(os.path.dirname(__file__), "kernels_b.py"))
_kernels_b = _ilu.module_from_spec(_spec)
_spec.loader.exec_module(_kernels_b)
OPS.update(_kernels_b.ops(Case, _randn))
# --- end of part B ---


def time_ms(fn, args, warmup=3, iters=20) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def run_case(case: Case, timed: bool) -> list[dict]:
  rows, baseline = [], None
  roofline_s = max(case.flops / PEAK_FLOPS, case.bytes / PEAK_BYTES)
  for name, fn in case.arms.items():
    jfn = jax.jit(fn)
    out = jax.block_until_ready(jfn(*case.args))
    baseline = out if baseline is None else baseline
    row = {"op": case.op, **case.shape, "arm": name}
    if name not in case.other:
      row["rel_l2_vs_baseline"] = max(common.rel_l2(o, b) for o, b in
                                      zip(jax.tree.leaves(out), jax.tree.leaves(baseline)))
    if timed:
      ms = time_ms(jfn, case.args)
      row.update(ms=ms, tflops=case.flops / ms / 1e9, gbs=case.bytes / ms / 1e6,
                 roofline_fraction=roofline_s / (ms / 1e3))
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--ops", default=",".join(OPS))
  p.add_argument("--size", choices=("full", "tiny"), default=None,
                 help="default: full on an accelerator, tiny on CPU")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "kernels.json"))
  args = p.parse_args()
  on_cpu = jax.default_backend() == "cpu"
  size = args.size or ("tiny" if on_cpu else "full")
  names = args.ops.split(",")
  unknown = [n for n in names if n not in OPS]
  if unknown:
    raise ValueError(f"unknown ops {unknown}; known: {sorted(OPS)}")
  rows = []
  for name in names:
    for case in OPS[name](size):
      rows.extend(run_case(case, timed=not on_cpu))
  result = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "host": platform.node(), "size": size, "timed": not on_cpu, "rows": rows}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  bad = [r for r in rows if r.get("rel_l2_vs_baseline", 0.0) > 2e-2]
  if bad:
    raise SystemExit(f"arms disagree with their baseline: {bad}")


if __name__ == "__main__":
  main()
