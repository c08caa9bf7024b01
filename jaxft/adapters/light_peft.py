"""Light-PEFT: "Light-PEFT: Lightening Parameter-Efficient Fine-Tuning via Early Pruning" (Gu et al., 2024).

Two early-pruning methods on top of LoRA (`jaxft.adapters.lora`: W0 + s·A B per target):

* Masked early pruning of the foundation model: trainable scalar masks on the attention
  heads m_H (one per head, on the input of W_o) and the FFN channels m_F (on the input of
  W_down), both 1 at init, trained with the LoRA factors in the early phase under

      L + λ (‖m_H‖₁ + ‖m_F‖₁)          (λ = `mask_l1`, the `regularizer`),

  i.e. y_o = (x_o ⊙ repeat(m_H, head_dim)) W_o and y_down = (x_down ⊙ m_F) W_down
  (`head_dim` is a config field: adapters do not see the model config).
* Multi-granularity early pruning of PEFT: coarse — drop the LoRA modules of the lowest
  importance (Σ of their rank scores); fine — keep the top ranks of each matrix by the
  first-order Taylor score |Σ A_r ⊙ ∂L/∂A_r + B_r ⊙ ∂L/∂B_r| (magnitude ‖A_r‖‖B_r‖ when no
  gradients are given).

`jaxft train` runs the estimation phase (masks + LoRA + L1). `prune(frozen, trainable,
spec, ...)` then returns the pruned pair to train on: masks frozen at m ⊙ keep (the
lowest `head_ratio` / `ffn_ratio` per layer — the same count in every layer, so the
stacked layers can be sliced — set to 0), LoRA ranks and modules pruned.
`shrink_ffn(params, cfg)` physically removes the zeroed FFN channels of merged params
(pruned model == masked model); pruned heads stay masked (GQA head slicing is not done).
`merge` folds the masks into the rows of W_o / W_down: exact.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.adapters import base, featurewise, lora, lowrank
from jaxft.models.layers import lead

DEFAULTS = {**lowrank.COMMON, "kernel": "fused", "mask_l1": 1e-4, "head_dim": 64}
MASK = "lp_mask"
MASKED = {"attn/o": "head", "mlp/down": "channel"}
MERGEABLE = True


def _groups(path: str, d_in: int, spec) -> int | None:
  kind = next((k for s, k in MASKED.items() if path.endswith(s)), None)
  if kind == "channel":
    return d_in
  if kind == "head":
    hd = int(spec["head_dim"])
    if hd < 1 or d_in % hd:
      raise ValueError(f"adapter.head_dim={hd} does not divide {path}'s input size {d_in}; "
                       "valid: the model's head_dim")
    return d_in // hd
  return None


def expand(mask, d_in: int):
  """(…, g) group masks -> (…, d_in) input-channel masks (each group d_in / g channels)."""
  return jnp.repeat(mask, d_in // mask.shape[-1], axis=-1)


def _split(trainable):
  return base.split(trainable, lambda p: p.endswith("/" + MASK))  # (lora leaves, masks)


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """LoRA on the targets + masks of ones beside every attn/o and mlp/down kernel."""
  frozen, trainable = lora.init(key, frozen, spec, calib)
  flat, tr = base.flatten(frozen), dict(base.flatten(trainable))
  for path in base.linear_paths(frozen):
    w = flat[path + "/kernel"]
    g = _groups(path, w.shape[-2], spec)
    if g is not None:
      tr[f"{path}/{MASK}"] = jnp.ones((*w.shape[:-2], g), w.dtype)
  return frozen, base.unflatten(tr)


def logical_axes(model_axes, trainable, spec):
  ranks, masks = _split(trainable)
  frozen_axes, rank_axes = lora.logical_axes(model_axes, ranks, spec)
  mask_axes = featurewise.axes_for(model_axes, masks, {MASK: featurewise.replicated(1)})
  return frozen_axes, base.merge_trees(rank_axes, mask_axes)


combine = lora.combine


def linear_hook(spec):
  inner = lora.linear_hook(spec)

  def linear(p, x, name, rng):
    if MASK in p:
      x = x * lead(expand(p[MASK], x.shape[-1]).astype(x.dtype), x.ndim)
      p = {k: v for k, v in p.items() if k != MASK}
    return inner(p, x, name, rng)

  return linear


def regularizer(frozen, trainable, spec):
  """λ Σ |m| over all head and channel masks."""
  del frozen
  l1 = sum(jnp.sum(jnp.abs(m.astype(jnp.float32))) for m in jax.tree.leaves(_split(trainable)[1]))
  return float(spec["mask_l1"]) * l1, {"mask_l1": l1}


def materialize(frozen, trainable, spec):
  """W0 + s A B, then rows of W_o / W_down scaled by the expanded masks (exact)."""
  # Masks may sit in `frozen` (after `prune`) or in `trainable` (estimation phase).
  f_rest, f_masks = base.split(frozen, lambda p: p.endswith("/" + MASK))
  ranks, masks = _split(trainable)
  flat = dict(base.flatten(lora.materialize(f_rest, ranks, spec)))
  for path, m in {**base.flatten(f_masks), **base.flatten(masks)}.items():
    kpath = path.rsplit("/", 1)[0] + "/kernel"
    w = flat[kpath]
    flat[kpath] = (w * expand(m, w.shape[-2])[..., None].astype(w.dtype)).astype(w.dtype)
  return base.unflatten(flat)


merge = materialize


def rank_scores(trainable, grads=None) -> dict[str, jax.Array]:
  """{linear path: (…, r)}: |Σ θ ⊙ ∂L/∂θ| over A[:, r] and B[r] (grads given), else ‖A_r‖‖B_r‖."""
  flat = base.flatten(trainable)
  g = base.flatten(grads) if grads is not None else None
  out = {}
  for path in {p.rsplit("/", 1)[0] for p in flat if p.endswith("/lora_a")}:
    a, b = flat[path + "/lora_a"].astype(jnp.float32), flat[path + "/lora_b"].astype(jnp.float32)
    if g is None:
      out[path] = jnp.linalg.norm(a, axis=-2) * jnp.linalg.norm(b, axis=-1)
    else:
      out[path] = jnp.abs(jnp.sum(a * g[path + "/lora_a"], -2) + jnp.sum(b * g[path + "/lora_b"], -1))
  return out


def _keep_top(scores, ratio: float, what: str):
  """0/1 of the same shape: per row (…), drop the round(ratio · n) lowest scores."""
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"light_peft.prune: {what}={ratio!r} is invalid; valid: 0 <= ratio < 1")
  n = scores.shape[-1]
  rank = jnp.argsort(jnp.argsort(-scores, axis=-1, stable=True), axis=-1, stable=True)
  return rank < n - int(round(ratio * n))


def prune(frozen, trainable, spec, *, head_ratio=0.4, ffn_ratio=0.4, rank_ratio=0.75,
          module_ratio=0.0, grads=None):
  """(frozen, trainable) of the pruned model: masks frozen at m ⊙ keep, ranks and modules cut."""
  ranks, masks = _split(trainable)
  fl = dict(base.flatten(frozen))
  for path, m in base.flatten(masks).items():
    ratio = head_ratio if path.rsplit("/", 1)[0].endswith("attn/o") else ffn_ratio
    fl[path] = m * _keep_top(jnp.abs(m.astype(jnp.float32)), ratio, "head/ffn ratio").astype(m.dtype)
  scores = rank_scores(ranks, grads)
  paths = sorted(scores)
  importance = np.array([float(jnp.sum(scores[p])) for p in paths])
  n_drop = int(round(module_ratio * len(paths)))
  dropped = {paths[i] for i in np.argsort(importance, kind="stable")[:n_drop]}
  tr = {}
  for path, leaf in base.flatten(ranks).items():
    linear, name = path.rsplit("/", 1)
    if linear in dropped:
      continue
    keep = _keep_top(scores[linear], rank_ratio, "rank_ratio")
    r_keep = int(keep.shape[-1] - round(rank_ratio * keep.shape[-1]))
    idx = jnp.sort(jnp.argsort(~keep, axis=-1, stable=True)[..., :r_keep], axis=-1)
    if name == "lora_a":
      tr[path] = jnp.take_along_axis(leaf, idx[..., None, :], axis=-1)
    else:
      tr[path] = jnp.take_along_axis(leaf, idx[..., :, None], axis=-2)
  return base.unflatten(fl), base.unflatten(tr)


def shrink_ffn(params, cfg):
  """(params, cfg) without the FFN channels whose W_down row is all zero (same count per layer)."""
  mlp = params["layers"]["mlp"]
  alive = np.asarray(jnp.any(mlp["down"]["kernel"] != 0, axis=-1))      # (L, d_ff)
  counts = set(alive.sum(-1).tolist())
  if len(counts) != 1:
    raise ValueError(f"shrink_ffn: layers keep different channel counts {sorted(counts)}")
  idx = jnp.asarray(np.stack([np.flatnonzero(a) for a in alive]))       # (L, kept)
  new = dict(mlp)
  for name in ("gate", "up"):
    new[name] = {k: jnp.take_along_axis(v, idx[:, None] if k == "kernel" else idx, -1)
                 for k, v in mlp[name].items()}
  new["down"] = {**mlp["down"], "kernel": jnp.take_along_axis(mlp["down"]["kernel"], idx[..., None], 1)}
  layers = {**params["layers"], "mlp": new}
  return {**params, "layers": layers}, dataclasses.replace(cfg, d_ff=int(idx.shape[-1]))
