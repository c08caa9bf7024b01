"""NormalFloat (NF-k) blockwise quantization with double-quantized scales.

From "QLoRA: Efficient Finetuning of Quantized LLMs" (Dettmers et al., 2023). A
kernel W (*lead, d_in, d_out) is cut into blocks of `block` consecutive input rows
per output column; each block stores k-bit codes into the NF-k codebook and its
absmax c, so

    W ~= code_book[codes] * c,        c = absmax over the block.

Double quantization stores c itself in 8 bits: c ~= offset + c2 * int8 / 127,
with one float32 c2 per `dq_block` consecutive absmax values (along d_out) and one
float32 offset (the mean of c) per matrix. Storage per parameter is
k + 8/block + 32/(block*dq_block) bits (4.127 for NF4, block 64, dq_block 256).

Codes of 4 bits or fewer are packed two per byte along d_in, so every stored array
keeps the weight's (*lead, rows, d_out) layout and shards like the weight.
A block size that does not divide its dimension falls back to the largest divisor
below it (SmolLM2's 576-wide outputs use dq blocks of 192).
"""
from __future__ import annotations

import statistics
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# The published NF4 table (bitsandbytes / QLoRA appendix), for the test.
NF4_TABLE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
             0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0)
_OFFSET = 0.5 * (1.0 / 32 + 1.0 / 30)  # QLoRA's quantile offset 0.9677 = 1 - this
KEYS = ("codes", "absmax_q", "absmax_scale", "absmax_offset")


def nf_codebook(bits: int = 4) -> np.ndarray:
  """The NF-k levels: 2^(k-1) positive and 2^(k-1)-1 negative N(0,1) quantiles, 0, scaled to [-1, 1].

  For k = 4 this is QLoRA's asymmetric NF4 table (8 positive, 7 negative, exact 0).
  """
  if bits < 2 or bits > 8:
    raise ValueError(f"NF quantization bits must be in 2..8, got {bits}")
  nd = statistics.NormalDist()
  hi = 1.0 - _OFFSET
  pos = [nd.inv_cdf(p) for p in np.linspace(hi, 0.5, 2 ** (bits - 1) + 1)[:-1]]
  neg = [-nd.inv_cdf(p) for p in np.linspace(hi, 0.5, 2 ** (bits - 1))[:-1]]
  levels = np.sort(np.asarray(pos + [0.0] + neg, np.float64))
  return (levels / np.max(np.abs(levels))).astype(np.float32)


def divisor_block(dim: int, want: int) -> int:
  """The largest divisor of `dim` that is <= `want` (the block size actually used)."""
  return max(b for b in range(1, min(dim, want) + 1) if dim % b == 0)


def _pack(codes):
  """(..., n, d_out) uint8 < 16 -> (..., n/2, d_out): rows 2i (low nibble) and 2i+1 (high)."""
  *lead, n, d = codes.shape
  pairs = codes.reshape(*lead, n // 2, 2, d)
  return pairs[..., 0, :] | (pairs[..., 1, :] << 4)


def _unpack(packed):
  *lead, n2, d = packed.shape
  both = jnp.stack([packed & 15, packed >> 4], axis=-2)
  return both.reshape(*lead, 2 * n2, d)


def quantize(w, *, bits: int = 4, block: int = 64, dq_block: int = 256,
             double: bool = True) -> dict[str, jax.Array]:
  """NF-k quantization of a kernel (*lead, d_in, d_out). Returns the stored arrays.

  Returns a dict with `codes` uint8 ((*lead, d_in/2, d_out) packed when bits <= 4),
  and the block absmax: double-quantized as `absmax_q` int8 (*lead, d_in/block,
  d_out), `absmax_scale` float32 (*lead, d_in/block, d_out/dq_block) and
  `absmax_offset` float32 (*lead,); without double quantization just `absmax`.
  """
  *lead, d_in, d_out = w.shape
  if bits <= 4 and d_in % 2:
    raise ValueError(f"{bits}-bit codes are packed two per byte along d_in: d_in={d_in} must be even")
  b = divisor_block(d_in, block)
  book = jnp.asarray(nf_codebook(bits))
  blocks = w.astype(jnp.float32).reshape(*lead, d_in // b, b, d_out)
  absmax = jnp.max(jnp.abs(blocks), axis=-2)                          # (*lead, nb, d_out)
  safe = jnp.where(absmax > 0, absmax, jnp.ones_like(absmax))
  normed = blocks / jnp.expand_dims(safe, -2)
  mids = (book[1:] + book[:-1]) / 2                                   # nearest level
  codes = jnp.searchsorted(mids, normed).astype(jnp.uint8)
  codes = codes.reshape(*lead, d_in, d_out)
  out = {"codes": _pack(codes) if bits <= 4 else codes}
  if not double:
    out["absmax"] = absmax
    return out
  return {**out, **_double_quantize(absmax, dq_block)}


def _double_quantize(absmax, dq_block):
  *lead, nb, d_out = absmax.shape
  g = divisor_block(d_out, dq_block)
  offset = jnp.mean(absmax, axis=(-2, -1))
  centred = absmax - offset[..., None, None]
  groups = centred.reshape(*lead, nb, d_out // g, g)
  scale = jnp.max(jnp.abs(groups), axis=-1)                           # (*lead, nb, d_out/g)
  safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
  q = jnp.clip(jnp.round(groups / safe[..., None] * 127), -127, 127).astype(jnp.int8)
  return {"absmax_q": q.reshape(*lead, nb, d_out), "absmax_scale": scale,
          "absmax_offset": offset}


def absmax_of(q: Mapping[str, jax.Array]) -> jax.Array:
  """The (dequantized) block absmax (*lead, d_in/block, d_out), float32."""
  if "absmax" in q:
    return q["absmax"].astype(jnp.float32)
  aq, scale = q["absmax_q"], q["absmax_scale"].astype(jnp.float32)
  *lead, nb, d_out = aq.shape
  g = d_out // scale.shape[-1]
  vals = aq.astype(jnp.float32).reshape(*lead, nb, d_out // g, g) / 127 * scale[..., None]
  return vals.reshape(*lead, nb, d_out) + q["absmax_offset"].astype(jnp.float32)[..., None, None]


def dequantize(q: Mapping[str, jax.Array], *, bits: int = 4, book=None,
               dtype=jnp.float32) -> jax.Array:
  """The kernel (*lead, d_in, d_out) the stored arrays represent, in `dtype`.

  `book`: the codebook (2^bits levels; a stored (*lead, 2^bits) copy per stacked
  matrix is the same table, its first row is used); default the NF-`bits` table.
  """
  if book is None:
    book = jnp.asarray(nf_codebook(bits))
  book = book.astype(jnp.float32).reshape(-1, book.shape[-1])[0]
  codes = q["codes"]
  if book.shape[-1] <= 16:
    codes = _unpack(codes)
  absmax = absmax_of(q)
  *lead, nb, d_out = absmax.shape
  d_in = codes.shape[-2]
  vals = book[codes.astype(jnp.int32)].reshape(*lead, nb, d_in // nb, d_out)
  return (vals * jnp.expand_dims(absmax, -2)).reshape(*lead, d_in, d_out).astype(dtype)


def roundtrip(w, **kw) -> jax.Array:
  """dequantize(quantize(w)): what the quantized base computes with."""
  return dequantize(quantize(w, **kw), bits=kw.get("bits", 4), dtype=w.dtype)


def logical_axes(kernel_axes: tuple, q: Mapping[str, jax.Array]) -> dict[str, tuple]:
  """Logical axes of the stored arrays: codes and absmax shard like the kernel."""
  *lead, ax_in, ax_out = kernel_axes
  out = {}
  for name in q:
    if name == "absmax_offset":
      out[name] = tuple(lead)
    elif name == "absmax_scale":
      out[name] = (*lead, ax_in, None)
    else:
      out[name] = (*lead, ax_in, ax_out)
  return out


def bits_per_param(q: Mapping[str, jax.Array], d_in: int, d_out: int, lead: int = 1) -> float:
  """Stored bits per represented parameter (codes + scales + offsets)."""
  total = sum(np.dtype(v.dtype).itemsize * 8 * int(np.prod(v.shape)) for v in q.values())
  return total / (lead * d_in * d_out)
