"""Reference optimizers that optax already provides: AdamW and SGD.

Each module of `jaxft.optimizers` defines `REGISTRY = {name: (factory,
defaults)}` where `factory(lr_schedule, spec) -> optax.GradientTransformation`
and `defaults` holds the optimizer's own hyper-parameters (the shared ones live
in `jaxft.optimizers.COMMON`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxft import names


def _adamw(lr, spec):
  """AdamW (optax.adamw): Adam with decoupled weight decay."""
  return optax.adamw(lr, b1=spec["b1"], b2=spec["b2"], eps=spec["eps"],
                     weight_decay=spec["weight_decay"])


def _sgd(lr, spec):
  """SGD with (Nesterov) momentum (optax.sgd), optional L2 weight decay."""
  tx = optax.sgd(lr, momentum=spec["momentum"] or None, nesterov=spec["nesterov"])
  if spec["weight_decay"]:
    tx = optax.chain(optax.add_decayed_weights(spec["weight_decay"]), tx)
  return tx


REGISTRY = {
    "adamw": (_adamw, {"b1": 0.9, "b2": 0.999, "eps": 1e-8}),
    "sgd": (_sgd, {"momentum": 0.9, "nesterov": False}),
}


# Leaf names that are never decayed when `decay_mask="matrices"` (norm gains, biases).
NO_DECAY_NAMES = ("scale", "bias")
DECAY_MASKS = ("all", "matrices")


def _leaf_name(path) -> str:
  last = path[-1] if path else None
  return str(getattr(last, "key", getattr(last, "name", last)))


def matrix_mask(params):
  """True for weight matrices (ndim >= 2, not a norm `scale` or a `bias`), else False."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and _leaf_name(path) not in NO_DECAY_NAMES, params)


def decay_mask(spec):
  """The `mask` argument for decoupled weight decay from `spec['decay_mask']`."""
  kind = spec.get("decay_mask", "all")
  if kind not in DECAY_MASKS:
    raise ValueError(names.unknown_message("optimizer.decay_mask", kind, DECAY_MASKS))
  return matrix_mask if kind == "matrices" else None


def dtype_or_none(name: str):
  """'' -> None (follow the params), else the jnp dtype named (e.g. 'bfloat16')."""
  if not name:
    return None
  if name not in ("float32", "bfloat16", "float16", "float64"):
    raise ValueError(names.unknown_message(
        "optimizer state dtype", name, ("", "float32", "bfloat16", "float16", "float64")))
  return jnp.dtype(name)


def state_shardings(tx, opt_state, params, param_shardings, replicated):
  """Shardings for `opt_state` (arrays or ShapeDtypeStructs) that follow the params.

  Like `optax.tree_map_params`, but a state leaf whose shape differs from its
  parameter's (SM3 accumulators, low-rank moments, projections) keeps the
  parameter's partitioning only on the dimensions whose sizes agree and is
  replicated on the others. Non-parameter leaves (counters) are replicated.
  """
  def follow(leaf, param, sharding):
    if tuple(leaf.shape) == tuple(param.shape):
      return sharding
    spec = tuple(sharding.spec) + (None,) * (len(param.shape) - len(sharding.spec))
    if len(leaf.shape) != len(param.shape):
      return replicated
    keep = [s if a == b else None for s, a, b in zip(spec, leaf.shape, param.shape)]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*keep))

  def per_param(value, param, sharding):
    return jax.tree.map(lambda leaf: follow(leaf, param, sharding), value)

  return optax.tree_map_params(
      tx, per_param, opt_state, params, param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: x is None)
