"""Sign momentum: Signum and signSGD, the sign-of-momentum family Lion belongs to.

From "Symbolic Discovery of Optimization Algorithms" (Chen et al., 2023), which
places Lion in this family. One transformation covers all three members:

    c = b1 * m + (1 - b1) * g;    update = sign(c);    m <- b2 * m + (1 - b2) * g

  * Lion:    b1 = 0.9, b2 = 0.99 (`jaxft.optimizers.lion`).
  * Signum:  b1 = b2 = beta, so c is the new momentum: m <- beta m + (1 - beta) g,
             theta <- theta - lr (sign(m) + wd theta).
  * signSGD: b1 = 0, so c = g and no momentum is stored: theta <- theta - lr sign(g).

Weight decay is decoupled (added after the sign, scaled by the learning rate),
and can be masked off norm gains and biases (`decay_mask="matrices"`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxft.optimizers import core


class ScaleBySignMomentumState(NamedTuple):
  count: jax.Array   # int32 scalar
  mu: Any            # momentum (params-shaped), or optax.EmptyState() when b1 == 0


def _stores_momentum(b1) -> bool:
  return not (isinstance(b1, (int, float)) and b1 == 0)


def scale_by_sign_momentum(b1: float = 0.9, b2: float = 0.99,
                           mu_dtype=None) -> optax.GradientTransformation:
  """sign(b1 m + (1 - b1) g), then m <- b2 m + (1 - b2) g (no state when b1 == 0).

  Args:
    b1: interpolation between momentum and the current gradient inside the sign.
    b2: momentum decay.
    mu_dtype: momentum dtype (e.g. jnp.bfloat16); None follows the params.
  """
  keep = _stores_momentum(b1)

  def init_fn(params):
    mu = optax.tree.zeros_like(params, dtype=mu_dtype) if keep else optax.EmptyState()
    return ScaleBySignMomentumState(jnp.zeros([], jnp.int32), mu)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    if not keep:
      return jax.tree.map(jnp.sign, updates), ScaleBySignMomentumState(count, state.mu)
    signs = jax.tree.map(lambda g, m: jnp.sign((1.0 - b1) * g + b1 * m), updates, state.mu)
    mu = optax.tree.update_moment(updates, state.mu, b2, 1)
    mu = jax.tree.map(lambda new, old: new.astype(old.dtype), mu, state.mu)
    return signs, ScaleBySignMomentumState(count, mu)

  return optax.GradientTransformation(init_fn, update_fn)


def _with_decay(tx, learning_rate, weight_decay, mask):
  return optax.chain(tx, optax.add_decayed_weights(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))


def signum(learning_rate, b1: float = 0.9, weight_decay: float = 0.0, mu_dtype=None,
           mask=None) -> optax.GradientTransformation:
  """Signum: theta <- theta - lr (sign(m) + wd theta), m <- b1 m + (1 - b1) g."""
  return _with_decay(scale_by_sign_momentum(b1, b1, mu_dtype), learning_rate, weight_decay, mask)


def signsgd(learning_rate, weight_decay: float = 0.0, mask=None) -> optax.GradientTransformation:
  """signSGD: theta <- theta - lr (sign(g) + wd theta); no optimizer state."""
  return _with_decay(scale_by_sign_momentum(0.0, 0.0), learning_rate, weight_decay, mask)


def _signum(lr, spec):
  """Signum: signSGD with momentum, update sign(m), m = b1 m + (1 - b1) g."""
  return signum(lr, b1=spec["b1"], weight_decay=spec["weight_decay"],
                mu_dtype=core.dtype_or_none(spec["mu_dtype"]), mask=core.decay_mask(spec))


def _signsgd(lr, spec):
  """signSGD: update sign(g), no state."""
  return signsgd(lr, weight_decay=spec["weight_decay"], mask=core.decay_mask(spec))


REGISTRY = {
    "signum": (_signum, {"b1": 0.9, "mu_dtype": "", "decay_mask": "matrices"}),
    "signsgd": (_signsgd, {"decay_mask": "matrices"}),
}
