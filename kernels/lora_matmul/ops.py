"""Fused low-rank matmul (K1): the public op, its custom_vjp and a shard_map wrapper.

"LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., 2021) computes, per
targeted linear with W stored (d_in, d_out) as in jaxft,

    y = x W + s (x A) B (+ bias),   A (d_in, r), B (r, d_out), s = alpha / r.

Forward: S = x A (a tiny GEMM, kept for the backward), then one kernel computes
[x | s·S]·[W; B] into one float32 accumulator. The backward computes only what is
differentiated (`custom_vjp` with symbolic zeros): with W frozen there is no
(d_in, d_out) weight-gradient GEMM,

    dS = s·dy Bᵀ,  dB = (s·S)ᵀ dy,  dA = xᵀ dS,  dx = dy Wᵀ + dS Aᵀ (one fused kernel),

so a linear costs ≈ 4·M·d_in·d_out FLOPs per step instead of 6·M·d_in·d_out.

Argument layout: x (..., d_in), w (d_in, d_out), a (d_in, r), b (r, d_out), bias
(d_out,) or None; the result is (..., d_out) in the promoted dtype of x and w
(A and B are cast to it, like jaxft's LoRA hook).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxft_kernels import common
from jaxft_kernels.lora_matmul import kernel
from jaxft_kernels.lora_matmul.reference import lora_matmul_reference

__all__ = ["lora_matmul", "lora_linear", "lora_matmul_reference", "lora_matmul_sharded", "matmul2"]


def _blocks(m, n, k, dtype, variant):
  """(bm, bn, bk, r multiple) for an (M, K) @ (K, N) problem."""
  if variant == "grid_k":
    return (common.block_size(m, 256, common.sublane(dtype)), common.block_size(n, 256, 128),
            common.block_size(k, 512, 128), 8)
  pow2 = dict(pow2=True)
  return (common.block_size(m, 64, 16, **pow2), common.block_size(n, 128, 16, **pow2),
          common.block_size(k, 64, 16, **pow2), 16)


def matmul2(x1, w1, x2, w2, bias=None, *, trans_w=False, out_dtype=None, interpret=None,
            variant=None):
  """x1 @ op(w1) + x2 @ op(w2) (+ bias) with the fused kernel, any (ragged) shapes.

  x1 (M, K), x2 (M, R); w1 (K, N) / w2 (R, N), or (N, K) / (N, R) with `trans_w`.
  """
  interpret = common.resolve_interpret(interpret)
  out_dtype = out_dtype or x1.dtype
  m, k = x1.shape
  n = w1.shape[0] if trans_w else w1.shape[1]

  def build(var):
    def run(x1, w1, x2, w2, *bias):
      bm, bn, bk, rmul = _blocks(m, n, k, x1.dtype, var)
      rp = common.round_up(x2.shape[1], rmul)
      if var == "loop_k":
        rp = common.pow2_ceil(rp)
      kp, np_, mp = common.round_up(k, bk), common.round_up(n, bn), common.round_up(m, bm)
      xs1 = common.pad_to(x1, (mp, kp))
      xs2 = common.pad_to(x2, (mp, rp))
      ws1 = common.pad_to(w1, (np_, kp) if trans_w else (kp, np_))
      ws2 = common.pad_to(w2, (np_, rp) if trans_w else (rp, np_))
      bs = common.pad_to(bias[0].reshape(1, n), (1, np_)) if bias else None
      out = kernel.fused_matmul2(xs1, ws1, xs2, ws2, bs, trans_w=trans_w, blocks=(bm, bn, bk),
                                 out_dtype=out_dtype, variant=var, interpret=interpret)
      return out[:m, :n]
    return run

  args = (x1, w1, x2, w2) + (() if bias is None else (bias,))
  return common.on_platform(interpret, build, *args, variant=variant)


def _dot(a, b, dtype):
  return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _lora(x, w, a, b, bias, h, scale, interpret, variant):
  return _lora_fwd_value(x, w, a, b, bias, h, scale, interpret, variant)[0]


def _lora_fwd_value(x, w, a, b, bias, h, scale, interpret, variant):
  dtype = x.dtype
  h = x if h is None else h
  s_scaled = (scale * jnp.matmul(h, a.astype(dtype), preferred_element_type=jnp.float32)).astype(dtype)
  y = matmul2(x, w, s_scaled, b.astype(dtype), bias, interpret=interpret, variant=variant)
  return y, s_scaled


def _lora_fwd(x, w, a, b, bias, h, scale, interpret, variant):
  val = lambda p: None if p is None else p.value
  args = tuple(val(p) for p in (x, w, a, b, bias, h))
  y, s_scaled = _lora_fwd_value(*args, scale, interpret, variant)
  need = tuple(p is not None and p.perturbed for p in (x, w, a, b, bias, h))
  return y, (args[:4], args[5], s_scaled, need)


def _lora_bwd(scale, interpret, variant, res, dy):
  (x, w, a, b), h, s_scaled, (need_x, need_w, need_a, need_b, need_bias, need_h) = res
  dtype = x.dtype
  dy = dy.astype(dtype)
  a = a.astype(dtype)
  fused = h is None  # the adapter reads x itself: dx = dy Wᵀ + dS Aᵀ in one kernel
  ds = None
  if need_a or need_h or (fused and need_x):
    ds = (scale * jnp.matmul(dy, b.astype(dtype).T, preferred_element_type=jnp.float32)).astype(dtype)
  dx = dh = None
  if need_x and fused:
    dx = matmul2(dy, w, ds, a, trans_w=True, interpret=interpret, variant=variant)
  elif need_x:
    dx = _dot(dy, w.T, dtype)
  if need_h:
    dh = _dot(ds, a.T, h.dtype)
  dw = _dot(x.T, dy, w.dtype) if need_w else None
  da = _dot((x if fused else h).T, ds, res[0][2].dtype) if need_a else None
  db = _dot(s_scaled.T, dy, b.dtype) if need_b else None
  dbias = jnp.sum(dy.astype(jnp.float32), axis=0).astype(dtype) if need_bias else None
  return dx, dw, da, db, dbias, dh


_lora.defvjp(_lora_fwd, _lora_bwd, symbolic_zeros=True)


def _check(x, w, a, b, bias):
  d_in, d_out = w.shape
  r = a.shape[-1]
  if x.shape[-1] != d_in or a.shape != (d_in, r) or b.shape != (r, d_out):
    raise ValueError(f"lora_matmul expects x (..., d_in), w (d_in, d_out), a (d_in, r), "
                     f"b (r, d_out); got x {x.shape}, w {w.shape}, a {a.shape}, b {b.shape}")
  if bias is not None and bias.shape != (d_out,):
    raise ValueError(f"lora_matmul bias must be (d_out,) = ({d_out},), got {bias.shape}")


def lora_matmul(x, w, a, b, *, scale: float, bias=None, x_adapter=None,
                interpret: Optional[bool] = None, variant: Optional[str] = None):
  """y = x W + scale·(h A) B (+ bias) with the fused Pallas kernel; h = x_adapter or x.

  Args:
    x: (..., d_in) activations. w: (d_in, d_out). a: (d_in, r). b: (r, d_out).
    scale: the LoRA scale s (a Python float, static).
    bias: optional (d_out,).
    x_adapter: optional input of the low-rank branch (e.g. dropout(x)), same shape as x;
      its gradient then flows separately (dx = dy Wᵀ, dh = dS Aᵀ, unfused).
    interpret: None = interpret on CPU only; True/False forces it.
    variant: None = by platform ('grid_k' TPU, 'loop_k' GPU); a name forces one.
  Returns:
    (..., d_out) in the promoted dtype of x and w.
  """
  _check(x, w, a, b, bias)
  dtype = jnp.result_type(x, w)
  x2d, lead = common.flatten_leading(x.astype(dtype))
  w = w.astype(dtype)
  scale = float(scale)
  interpret = common.resolve_interpret(interpret)
  h2d = None
  if x_adapter is not None:
    if x_adapter.shape != x.shape:
      raise ValueError(f"lora_matmul x_adapter must have x's shape {x.shape}, got {x_adapter.shape}")
    h2d = common.flatten_leading(x_adapter.astype(dtype))[0]
  if bias is not None:
    bias = bias.astype(dtype)
  y = _lora(x2d, w, a, b, bias, h2d, scale, interpret, variant)
  return y.reshape(*lead, w.shape[1])


def lora_linear(x, w, a, b, scale, *, bias=None, interpret=None, x_adapter=None):
  """`lora_matmul` with a positional scale: the body of a LoRA linear hook."""
  return lora_matmul(x, w, a, b, scale=scale, bias=bias, interpret=interpret, x_adapter=x_adapter)


def lora_matmul_sharded(x, w, a, b, *, scale: float, mesh, bias=None, batch_axis="data",
                        out_axis: Optional[str] = None, interpret=None, variant=None):
  """`lora_matmul` inside `jax.shard_map`: rows of x over `batch_axis`; with `out_axis`,
  W, B and bias are split by output column (tensor parallel, no communication)."""
  P = jax.P
  col = P(None, out_axis)
  in_specs = (P(batch_axis), col, P(), col) + (() if bias is None else (P(out_axis),))
  out_spec = P(*([batch_axis] + [None] * (x.ndim - 2) + [out_axis]))

  def local(x, w, a, b, *bias):
    return lora_matmul(x, w, a, b, scale=scale, bias=bias[0] if bias else None,
                       interpret=interpret, variant=variant)

  args = (x, w, a, b) + (() if bias is None else (bias,))
  return common.shard_mapped(local, mesh, in_specs, out_spec)(*args)
