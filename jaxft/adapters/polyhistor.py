"""Polyhistor: "Polyhistor: Parameter-Efficient Multi-Task Adaptation for Dense Vision Tasks" (Liu et al., 2022).

Bottleneck adapters (see `bottleneck`) whose weights a shared hypernetwork
generates ("Decomposed HyperNetworks and Layer-wise Scaling Kernels", the
Polyhistor-Lite form). For target linear ℓ (one per layer of each targeted path)
and each projection p ∈ {down, up}:

    z_ℓ   = [e_task ; e_ℓ]                                   (2e,)  task + layer embedding
    U_ℓ^p = reshape(z_ℓ H_U^p, (t, r)),  V_ℓ^p = reshape(z_ℓ H_V^p, (r, t))
    W_ℓ^p = (U_ℓ^p V_ℓ^p) ⊗ K_ℓ^p                            decomposed template ⊗ scaling kernel
    y'    = y + s · σ(src W_ℓ^down) W_ℓ^up                   src = y (series) | x (parallel)

The hypernetwork heads H_U^p (2e, t·r), H_V^p (2e, r·t) and e_task are shared by
every layer and every target (the t × t template has one size for all widths);
the layer embeddings e_ℓ and the scaling kernels K_ℓ^down (d_src/t, m/t), K_ℓ^up
(m/t, d_out/t) are per layer. K^up = 0 at init, so W^up = 0 and the model is
unchanged. One task (this trainer's runs are single-task): e_task is one vector.
Not mergeable (σ is nonlinear); `materialize` = `combine` gives the generated
dense `adapter_down` / `adapter_up` leaves the bottleneck hook runs.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.adapters import base, bottleneck, featurewise

DEFAULTS = {"targets": (r"mlp/down$",), "placement": "series", "bottleneck": 64, "template": 8,
            "rank": 4, "embed_dim": 32, "activation": "gelu", "scaling": 1.0}
MERGEABLE = False
PLACEMENTS = ("series", "parallel")
HYPER = "polyhistor"  # top-level trainable: the shared hypernetwork
LAYER_EMBED, KERNEL = "poly_layer_embed", "poly_kernel_"


def _sizes(spec) -> tuple[str, int, int, int, int]:
  kind = spec["placement"]
  if kind not in PLACEMENTS:
    raise ValueError(f"adapter.placement={kind!r} is invalid; valid choices: {', '.join(PLACEMENTS)}")
  t, r, e, m = (int(spec[k]) for k in ("template", "rank", "embed_dim", "bottleneck"))
  for what, v in {"template": t, "rank": r, "embed_dim": e, "bottleneck": m}.items():
    if v < 1:
      raise ValueError(f"adapter.{what} must be >= 1, got {v}")
  return kind, t, r, e, m


def kron(a_TxT, k_AxB) -> jax.Array:
  """Batched Kronecker product: (…, t, t) ⊗ (…, a, b) -> (…, t·a, t·b)."""
  w = jnp.einsum("...ij,...ab->...iajb", a_TxT, k_AxB)
  return w.reshape(*w.shape[:-4], w.shape[-4] * w.shape[-3], w.shape[-2] * w.shape[-1])


def generate(hyper, layer_embed, kernel, side: str, t: int, r: int) -> jax.Array:
  """W_ℓ = (U_ℓ V_ℓ) ⊗ K_ℓ for every leading index ℓ of `layer_embed` (…, e)."""
  task = jnp.broadcast_to(hyper["task_embed"], layer_embed.shape)
  z = jnp.concatenate([task, layer_embed], -1)
  u = (z @ hyper[side + "_u"]).reshape(*z.shape[:-1], t, r)
  v = (z @ hyper[side + "_v"]).reshape(*z.shape[:-1], r, t)
  return kron(u @ v, kernel)


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """-> (frozen unchanged, {HYPER: shared leaves, <path>/poly_*: per-layer leaves})."""
  del calib
  featurewise.activation(spec)
  kind, t, r, e, m = _sizes(spec)
  flat, out = base.flatten(frozen), {}
  for i, path in enumerate(featurewise.linear_targets(frozen, spec)):
    w = flat[path + "/kernel"]
    *lead, d_in, d_out = w.shape
    d_src = d_out if kind == "series" else d_in
    for what, d in {f"{path} input": d_src, f"{path} output": d_out, "adapter.bottleneck": m}.items():
      if d % t:
        raise ValueError(f"{what}={d} is not divisible by adapter.template={t}")
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    out[f"{path}/{LAYER_EMBED}"] = jax.random.normal(k1, (*lead, e), w.dtype)
    out[f"{path}/{KERNEL}down"] = featurewise.kaiming_uniform(
        k2, (*lead, d_src // t, m // t), d_src, w.dtype)
    out[f"{path}/{KERNEL}up"] = jnp.zeros((*lead, m // t, d_out // t), w.dtype)
  ks = jax.random.split(jax.random.fold_in(key, 10_000), 5)
  # U, V entries ~ N(0, 1) and N(0, 1/r), so the template U V has unit-variance entries.
  std_u, std_v = (2 * e) ** -0.5, (2 * e * r) ** -0.5
  out[HYPER + "/task_embed"] = jax.random.normal(ks[0], (e,))
  for j, side in enumerate(("down", "up")):
    out[f"{HYPER}/{side}_u"] = std_u * jax.random.normal(ks[1 + 2 * j], (2 * e, t * r))
    out[f"{HYPER}/{side}_v"] = std_v * jax.random.normal(ks[2 + 2 * j], (2 * e, r * t))
  return frozen, base.unflatten(out)


logical_axes = featurewise.logical_axes_fn({LAYER_EMBED: featurewise.replicated(1),
                                            KERNEL + "down": featurewise.replicated(2),
                                            KERNEL + "up": featurewise.replicated(2)})


def combine(frozen, trainable, spec):
  """Model params with the generated `adapter_down` / `adapter_up` beside each target kernel."""
  _, t, r, _, _ = _sizes(spec)
  trainable = dict(trainable)
  hyper = trainable.pop(HYPER)
  flat, out = base.flatten(trainable), {}
  for path in [p[: -len(LAYER_EMBED) - 1] for p in flat if p.endswith("/" + LAYER_EMBED)]:
    emb = flat[f"{path}/{LAYER_EMBED}"]
    for side in ("down", "up"):
      w = generate(hyper, emb, flat[f"{path}/{KERNEL}{side}"], side, t, r)
      out[f"{path}/adapter_{side}"] = w.astype(emb.dtype)
  return base.merge_trees(frozen, base.unflatten(out))


def linear_hook(spec):
  return bottleneck.make_linear_hook(_sizes(spec)[0])(spec)


materialize = combine
merge = featurewise.not_mergeable("polyhistor", "its generated bottleneck adapter is nonlinear")
