"""HFT: "HFT: Half Fine-Tuning for Large Language Models" (Hui et al., 2024).

Per stage half of the matrices train and half stay frozen. Per layer ℓ: 2 of
{W_q, W_k, W_v, W_o}; of {W_gate, W_up, W_down} 1 in a random half of the layers
and 2 in the other half (exactly half of all matrices for an even layer count).
The draw is a pure function of (seed, stage): `masks(key, n_layers, stage)`;
`targets` limits which of the seven take part (default all; the rest stay frozen).

Layers are stacked and scanned, so the per-layer choice is a per-layer flag
`hft_on` (frozen, int32 (L,)) beside each kernel and a delta `hft_delta` (L, d_in,
d_out) that starts at 0:

    y = cond(on_ℓ, x (W0 + Δ_ℓ), x W0)

The gradient of Δ_ℓ is exactly 0 for a frozen matrix and its weight-gradient GEMM
sits only in the taken branch of the `cond`, so it never runs for frozen matrices;
with zero gradient and zero state Adam(W) leaves those Δ_ℓ at exactly 0. The
optimizer therefore holds state for every stacked kernel (the reported trainable
count is the full stacks; `active_params` gives the half that trains). `restage`
starts a new stage: W0 ← W0 + Δ, Δ ← 0, new flags, optimizer moments zeroed.
Embeddings, norms and the head stay frozen (`hft_extra` is not implemented).

In the trainer (`jaxft.runner.periodic_update`): `periodic(spec)` = `stage_steps`
(0 = one stage for the whole run); `update` calls `restage` after every
`stage_steps` steps with stage = `stage` + step // stage_steps. The flags and the
folded W0 are `MUTABLE` frozen leaves, saved in checkpoints so a resumed run
continues the same stage.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.adapters import base, featurewise
from jaxft.models.layers import lead

DEFAULTS = {"targets": featurewise.LINEARS, "stage": 0, "stage_steps": 0}
ATTN = ("attn/q", "attn/k", "attn/v", "attn/o")
MLP = ("mlp/gate", "mlp/up", "mlp/down")
ON, DELTA = "hft_on", "hft_delta"
MERGEABLE = True
MUTABLE = (ON, "kernel")  # changed by `update`: saved in checkpoints (build.checkpointed)


def masks(key, n_layers: int, stage: int) -> dict[str, jax.Array]:
  """{'attn/q': (L,) int32 0/1, ...}: 2 of 4 attention and 1 or 2 of 3 FFN matrices per layer."""
  k_attn, k_two, k_mlp = jax.random.split(jax.random.fold_in(key, stage), 3)
  rank = lambda k, shape: jnp.argsort(jnp.argsort(jax.random.uniform(k, shape), -1), -1)
  attn = rank(k_attn, (n_layers, len(ATTN))) < 2
  layer_rank = jnp.argsort(jax.random.permutation(k_two, n_layers))
  n_mlp = jnp.where(layer_rank < n_layers - n_layers // 2, 2, 1)
  mlp = rank(k_mlp, (n_layers, len(MLP))) < n_mlp[:, None]
  out = {m: attn[:, i].astype(jnp.int32) for i, m in enumerate(ATTN)}
  out.update({m: mlp[:, i].astype(jnp.int32) for i, m in enumerate(MLP)})
  return out


def _draw(key, frozen, stage: int):
  flat = base.flatten(frozen)
  n = flat["layers/" + ATTN[0] + "/kernel"].shape[0]
  return {f"layers/{m}": v for m, v in masks(key, n, stage).items()
          if f"layers/{m}/kernel" in flat}


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """Flags for stage `spec['stage']`, drawn from the adapter key; Δ = 0."""
  del calib
  flat = dict(base.flatten(frozen))
  if "layers/attn/q/kernel" not in flat:
    raise ValueError(f"hft needs stacked layers/attn/* and layers/mlp/* kernels; got {list(flat)}")
  chosen = set(featurewise.linear_targets(frozen, spec))  # others stay frozen
  train = {}
  for path, on in _draw(key, frozen, int(spec["stage"])).items():
    if path not in chosen:
      continue
    flat[f"{path}/{ON}"] = jnp.asarray(on)
    train[f"{path}/{DELTA}"] = jnp.zeros_like(flat[f"{path}/kernel"])
  return base.unflatten(flat), base.unflatten(train)


def logical_axes(model_axes, trainable, spec):
  del spec
  flat_axes = dict(base.flatten(model_axes))
  for path in base.flatten(trainable):
    linear = path.rsplit("/", 1)[0]
    flat_axes[f"{linear}/{ON}"] = (flat_axes[f"{linear}/kernel"][0],)
  table = {DELTA: lambda lead_, ai, ao: (*lead_, ai, ao)}
  return base.unflatten(flat_axes), featurewise.axes_for(model_axes, trainable, table)


def combine(frozen, trainable, spec):
  del spec
  return base.merge_trees(frozen, trainable)


def linear_hook(spec):
  del spec

  def linear(p, x, name, rng):
    del name, rng
    w = p["kernel"]
    if DELTA in p:
      y = jax.lax.cond(p[ON] > 0,
                       lambda x, w, d: x @ (w + d).astype(x.dtype),
                       lambda x, w, d: x @ w.astype(x.dtype),
                       x, w, p[DELTA])
    else:
      y = x @ w.astype(x.dtype)
    return y + lead(p["bias"], y.ndim) if "bias" in p else y

  return linear


def materialize(frozen, trainable, spec):
  """W0 + Δ (Δ is 0 wherever the flag is off)."""
  del spec
  flat = dict(base.flatten(frozen))
  for path, d in base.flatten(trainable).items():
    linear = path.rsplit("/", 1)[0]
    on = flat.pop(f"{linear}/{ON}")
    w = flat[f"{linear}/kernel"]
    flat[f"{linear}/kernel"] = (w + d * on[:, None, None].astype(d.dtype)).astype(w.dtype)
  return base.unflatten(flat)


merge = materialize


def active_params(frozen, trainable) -> int:
  """Entries that actually train this stage (the flagged layers' matrices)."""
  flat = base.flatten(frozen)
  return int(sum(int(np.sum(flat[p.rsplit("/", 1)[0] + "/" + ON])) * int(np.prod(d.shape[1:]))
                 for p, d in base.flatten(trainable).items()))


def restage(key, frozen, trainable, opt_state, stage: int):
  """Next stage: fold Δ into W0, Δ ← 0, flags re-drawn from (key, stage), state zeroed."""
  merged = materialize(frozen, trainable, None)
  flat = dict(base.flatten(merged))
  trained = {p.rsplit("/", 1)[0] for p in base.flatten(trainable)}
  for path, on in _draw(key, merged, stage).items():
    if path in trained:
      flat[f"{path}/{ON}"] = jnp.asarray(on)
  shapes = {tuple(d.shape) for d in jax.tree.leaves(trainable)}
  zero = lambda x: jnp.zeros_like(x) if tuple(getattr(x, "shape", ())) in shapes else x
  return (base.unflatten(flat), jax.tree.map(jnp.zeros_like, trainable),
          jax.tree.map(zero, opt_state))  # moments zeroed; step counts (schedules) kept


def periodic(spec) -> int:
  """Steps per stage (0 = never restage)."""
  k = int(spec.get("stage_steps", 0))
  if k < 0:
    raise ValueError(f"adapter.stage_steps={k!r} is invalid; valid: 0 (one stage) or >= 1")
  return k


def update(key, state, step: int, task, batch):
  """Runner hook: `restage` into stage `stage` + step // stage_steps (batch unused)."""
  del batch
  spec = task.adapter_spec
  stage = int(spec.get("stage", 0)) + step // periodic(spec)
  frozen, trainable, opt_state = restage(key, state.frozen, state.trainable, state.opt_state,
                                         stage)
  return state._replace(frozen=frozen, trainable=trainable, opt_state=opt_state)
