"""Pure-jnp reference of the fused low-rank matmul (unfused, autodiff-able)."""
from __future__ import annotations

import jax.numpy as jnp


def lora_matmul_reference(x, w, a, b, *, scale: float, bias=None, x_adapter=None):
  """y = x W + scale·(h A) B (+ bias), h = x_adapter or x; W (d_in, d_out), A (d_in, r), B (r, d_out).

  Computed in the promoted dtype of x and W with float32 accumulation (like the kernel).
  """
  dtype = jnp.result_type(x, w)
  h = x if x_adapter is None else x_adapter
  f32 = dict(preferred_element_type=jnp.float32)
  y = jnp.matmul(x.astype(dtype), w.astype(dtype), **f32)
  s = jnp.matmul(h.astype(dtype), a.astype(dtype), **f32)
  y = y + jnp.matmul((scale * s).astype(dtype), b.astype(dtype), **f32)
  if bias is not None:
    y = y + bias.astype(jnp.float32).reshape((1,) * (y.ndim - 1) + bias.shape)
  return y.astype(dtype)
