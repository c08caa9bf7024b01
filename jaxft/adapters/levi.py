"""LEVI: "LEVI: Generalizable Fine-tuning via Layer-wise Ensemble of Different Views" (Roh et al., 2024).

A small side network, trained from scratch beside the frozen model, is ensembled
with it layer-wise. Per token, with h_ℓ the frozen model's MLP input at layer ℓ
(its "view" of layer ℓ, tapped through `linear.mlp`) and sg = stop-gradient:

    a_ℓ     = sg(h_ℓ) A_ℓ                                    adapting layer ℓ (D -> d_s)
    s_0     = sg(E(x)) W_in                                  side input ('embed'; 'none': 0)
    s_{ℓ+1} = s_ℓ + σ((s_ℓ + a_ℓ) W1_ℓ + b1_ℓ) W2_ℓ          one side block per layer
    logits  = logits_frozen + ((rms(s_L) ⊙ γ) W_out ⊙ g) sg(E)ᵀ     (or sg(lm_head) untied)

The side network's prediction joins the frozen model's logits (the ensemble);
the output gate g ∈ R^D is 0 at init, so the model starts as the base model.
With `stop_gradient` (default) no gradient reaches the frozen model through the
side path, so the backward pass never runs through the backbone (the memory
saving of side networks). The tap is the input of the targeted MLP linear
(`targets` must pick 'layers/mlp/up' or 'layers/mlp/gate', whose input is the
normed residual stream); the decoder hands the stacked taps to `linear.mlp.side`.
Not mergeable (a second network).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.adapters import base, featurewise
from jaxft.models import decoder, layers

DEFAULTS = {"targets": (r"mlp/up$",), "side_dim": 64, "hidden": 128, "activation": "gelu",
            "side_input": "embed", "stop_gradient": True}
MERGEABLE = False
SIDE_INPUTS = ("embed", "none")
TAPPABLE = ("layers/mlp/up", "layers/mlp/gate")
ADAPT, SIDE, TAP = "levi_adapt", "levi", "levi_tap"


def _target(params, spec) -> str:
  paths = featurewise.linear_targets(params, spec)
  if len(paths) != 1 or paths[0] not in TAPPABLE:
    raise ValueError(f"levi taps the MLP input: adapter.targets={tuple(spec['targets'])!r} must "
                     f"match exactly one of {', '.join(TAPPABLE)}, got {paths}")
  if spec["side_input"] not in SIDE_INPUTS:
    raise ValueError(f"adapter.side_input={spec['side_input']!r} is invalid; valid choices: "
                     f"{', '.join(SIDE_INPUTS)}")
  return paths[0]


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """-> (frozen unchanged, {<target>/levi_adapt: (L, D, d_s), 'levi': the side network})."""
  del calib
  featurewise.activation(spec)
  path = _target(frozen, spec)
  w = base.flatten(frozen)[path + "/kernel"]
  n_layers, d, dtype = w.shape[0], w.shape[1], w.dtype
  ds, hid = int(spec["side_dim"]), int(spec["hidden"])
  if ds < 1 or hid < 1:
    raise ValueError(f"adapter.side_dim and adapter.hidden must be >= 1, got {ds}, {hid}")
  ks = jax.random.split(key, 5)
  side = {"w1": featurewise.kaiming_uniform(ks[0], (n_layers, ds, hid), ds, dtype),
          "b1": jnp.zeros((n_layers, hid), dtype),
          "w2": featurewise.kaiming_uniform(ks[1], (n_layers, hid, ds), hid, dtype),
          "norm": jnp.ones((ds,), dtype),
          "w_out": featurewise.kaiming_uniform(ks[2], (ds, d), ds, dtype),
          "gate": jnp.zeros((d,), dtype)}
  if spec["side_input"] == "embed":
    side["w_in"] = featurewise.kaiming_uniform(ks[3], (d, ds), d, dtype)
  adapt = featurewise.kaiming_uniform(ks[4], (n_layers, d, ds), d, dtype)
  return frozen, base.unflatten({f"{path}/{ADAPT}": adapt, SIDE: side})


logical_axes = featurewise.logical_axes_fn({ADAPT: lambda lead, ai, ao: (*lead, ai, None)})


def combine(frozen, trainable, spec):
  del spec
  return base.merge_trees(frozen, trainable)


def side_logits(side, taps_LxBxTxS, x0_BxTxD, head_VxD, act) -> jax.Array:
  """The side network's logits (B, T, V) from the adapted taps and its input embedding."""
  s = jnp.zeros(taps_LxBxTxS.shape[1:], taps_LxBxTxS.dtype)
  if "w_in" in side:
    s = x0_BxTxD @ side["w_in"].astype(x0_BxTxD.dtype)

  def block(s, xs):
    a, w1, b1, w2 = xs
    h = act((s + a) @ w1.astype(s.dtype) + layers.lead(b1, s.ndim).astype(s.dtype))
    return s + h @ w2.astype(s.dtype), None

  s, _ = jax.lax.scan(block, s.astype(taps_LxBxTxS.dtype),
                      (taps_LxBxTxS, side["w1"], side["b1"], side["w2"]))
  s32 = s.astype(jnp.float32)
  normed = s32 * jax.lax.rsqrt(jnp.mean(s32 * s32, -1, keepdims=True) + 1e-6)
  normed = normed * layers.lead(side["norm"].astype(jnp.float32), normed.ndim)
  out = (normed @ side["w_out"].astype(jnp.float32)) * layers.lead(
      side["gate"].astype(jnp.float32), normed.ndim)
  return jnp.einsum("BTD,VD->BTV", out, head_VxD.astype(jnp.float32))


def linear_hook(spec):
  """The plain linear, with `.mlp` (tap the MLP input) and `.mlp.side` (add the side logits)."""
  act, stop = featurewise.activation(spec), bool(spec["stop_gradient"])
  sg = jax.lax.stop_gradient if stop else (lambda x: x)

  def linear(p, x, name, rng):
    return decoder.dense(p, x, name, rng)

  def mlp(p, h, cfg, *, rng, linear):
    out = layers.mlp(p, h, cfg, rng=rng, linear=linear)
    adapt = (p["up"] if ADAPT in p["up"] else p["gate"])[ADAPT]
    return out, {TAP: sg(h) @ adapt.astype(h.dtype)}

  def side(params, tokens, logits, aux):
    aux = dict(aux)
    taps = aux.pop(TAP)
    table = params["embed"]["embedding"]
    head = table if "lm_head" not in params else params["lm_head"]["kernel"].T
    x0 = sg(table[tokens])
    return logits + side_logits(params[SIDE], taps, x0, sg(head), act), aux

  mlp.side = side  # on the FFN hook, which wrappers (sharding.constrain_activations) carry over
  linear.mlp = mlp
  return linear


materialize = combine
merge = featurewise.not_mergeable("levi", "the side network is a second model beside the base")
