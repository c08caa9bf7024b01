"""S²FT: "S^{2}FT: Efficient, Scalable and Generalizable LLM Fine-tuning by Structured Sparsity" (Yang et al., 2024).

Per layer a few attention heads and FFN channels are selected (random by default).
Their coupled weights are co-permuted so the selection is a contiguous slice:
q/k/v output columns with W_o input rows per head, gate/up output columns with
W_down input rows per channel (the permuted model computes the same function).
Only the slices of W_o and W_down (input rows, (d_in, d_out) layout) are updated:

    y = x W0 + x[..., :s] Δ,    dΔ = x[..., :s]ᵀ g    (partial backpropagation)

so the step keeps only the first s input features of o / down for the backward
pass, never forms a full weight gradient, and Adam state exists for Δ only.
`heads` heads of `head_dim` rows of W_o and ⌈channel_fraction·d_ff⌉ channels of
W_down train per layer (paper's LLaMA-3 run: 3% of FFN channels, W_down only, the
defaults). Head permutation needs q, k, v to have the same width (no GQA); with
GQA (or permute=False) the selected rows are gathered instead (same function).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.adapters import base, sparse_delta as sd
from jaxft.models.layers import lead

DEFAULTS = {"targets": (r"attn/o$", r"mlp/down$"), "heads": 0, "head_dim": 64, "channel_fraction": 0.03, "permute": True}
MERGEABLE = True
ATTN, MLP = "layers/attn", "layers/mlp"


def _select(key, lead_shape, n: int, k: int):
  _, idx = jax.lax.top_k(jax.random.uniform(key, (*lead_shape, n)), k)
  return jnp.sort(idx, axis=-1)


def _perm_first(sel, n: int):
  """Per layer a permutation of range(n) that puts the selected units first (in order)."""
  chosen = jnp.zeros((*sel.shape[:-1], n), bool)
  chosen = jnp.put_along_axis(chosen, sel, True, axis=-1, inplace=False)
  return jnp.argsort(~chosen, axis=-1, stable=True)


def _take_cols(w, perm):  # w (L, d, n), perm (L, n)
  return jnp.take_along_axis(w, perm[..., None, :], axis=-1)


def _take_rows(w, perm):  # w (L, n, d)
  return jnp.take_along_axis(w, perm[..., :, None], axis=-2)


def permute(params, channel_perm=None, head_perm=None, head_dim: int = 64):
  """The co-permuted model (same function): FFN channels / attention heads reordered."""
  flat = dict(base.flatten(params))
  if channel_perm is not None:
    for m in ("gate", "up"):
      if f"{MLP}/{m}/kernel" in flat:
        flat[f"{MLP}/{m}/kernel"] = _take_cols(flat[f"{MLP}/{m}/kernel"], channel_perm)
      if f"{MLP}/{m}/bias" in flat:
        flat[f"{MLP}/{m}/bias"] = jnp.take_along_axis(flat[f"{MLP}/{m}/bias"], channel_perm, -1)
    flat[f"{MLP}/down/kernel"] = _take_rows(flat[f"{MLP}/down/kernel"], channel_perm)
  if head_perm is not None:
    offsets = lead(jnp.arange(head_dim), head_perm.ndim + 1)
    unit = (head_perm[..., :, None] * head_dim + offsets).reshape(
        *head_perm.shape[:-1], -1)
    for m in ("q", "k", "v"):
      flat[f"{ATTN}/{m}/kernel"] = _take_cols(flat[f"{ATTN}/{m}/kernel"], unit)
      if f"{ATTN}/{m}/bias" in flat:
        flat[f"{ATTN}/{m}/bias"] = jnp.take_along_axis(flat[f"{ATTN}/{m}/bias"], unit, -1)
    flat[f"{ATTN}/o/kernel"] = _take_rows(flat[f"{ATTN}/o/kernel"], unit)
  return base.unflatten(flat)


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """Selects heads/channels, co-permutes them to the front (permute=True), Δ = 0."""
  del calib
  chosen_paths = set(base.match(base.linear_paths(frozen), spec["targets"], what="linear layer"))
  if not chosen_paths <= {f"{MLP}/down", f"{ATTN}/o"}:
    raise ValueError(f"adapter.targets={spec['targets']!r} selects {sorted(chosen_paths)}; s2ft "
                     f"trains only {MLP}/down and {ATTN}/o")
  flat = base.flatten(frozen)
  down = flat.get(f"{MLP}/down/kernel")
  o = flat.get(f"{ATTN}/o/kernel")
  if down is None or o is None:
    raise ValueError(f"s2ft needs {MLP}/down and {ATTN}/o kernels; param paths: {list(flat)}")
  lead_shape, d_ff = down.shape[:-2], down.shape[-2]
  hd, heads = int(spec["head_dim"]), int(spec["heads"])
  n_heads = o.shape[-2] // hd
  if heads and (o.shape[-2] % hd or not 0 <= heads <= n_heads):
    raise ValueError(f"adapter.heads={heads}, head_dim={hd} invalid for W_o with {o.shape[-2]} "
                     f"input rows; valid: head_dim dividing it, 0 <= heads <= {n_heads}")
  frac = float(spec["channel_fraction"])
  if not 0.0 <= frac <= 1.0 or (frac == 0 and heads == 0):
    raise ValueError(f"adapter.channel_fraction={frac!r} invalid; valid: 0..1, not 0 with heads=0")
  n_ch = math.ceil(frac * d_ff)
  k_ch, k_h = jax.random.split(key)
  ch = _select(k_ch, lead_shape, d_ff, n_ch) if n_ch else None
  hs = _select(k_h, lead_shape, n_heads, heads) if heads else None
  gqa = flat[f"{ATTN}/q/kernel"].shape[-1] != flat[f"{ATTN}/k/kernel"].shape[-1]
  permute_heads = spec["permute"] and not gqa
  if spec["permute"]:
    frozen = permute(frozen, None if ch is None else _perm_first(ch, d_ff),
                     _perm_first(hs, n_heads) if (hs is not None and permute_heads) else None, hd)
  chosen = {}
  if ch is not None and f"{MLP}/down" in chosen_paths:
    chosen[f"{MLP}/down"] = (jnp.broadcast_to(jnp.arange(n_ch), ch.shape)
                             if spec["permute"] else ch)
  if hs is not None and f"{ATTN}/o" in chosen_paths:
    hs = jnp.broadcast_to(jnp.arange(heads), hs.shape) if permute_heads else hs
    chosen[f"{ATTN}/o"] = (hs[..., :, None] * hd + lead(jnp.arange(hd), hs.ndim + 1)).reshape(
        *lead_shape, -1)
  return sd.rows_init(frozen, chosen)


logical_axes, combine = sd.logical_axes, sd.combine
materialize = merge = sd.materialize


def linear_hook(spec):
  """W_down: a contiguous prefix slice when permuted; W_o (and unpermuted): gathered rows."""
  permuted = bool(spec["permute"])

  def linear(p, x, name, rng):
    if sd.ROWS_DELTA in p and permuted and name.endswith("down"):
      y = sd.prefix_matmul(x, p["kernel"], p[sd.ROWS_DELTA])
      return y + lead(p["bias"], y.ndim) if "bias" in p else y
    return sd.linear(p, x, name, rng)

  return linear

