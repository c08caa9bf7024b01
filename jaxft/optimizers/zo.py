"""Zeroth-order optimizers: MeZO-style SPSA, FedKSeed, Subspace Gradient.

Papers: "Federated Full-Parameter Tuning of Billion-Sized Language Models with
Communication Cost under 18 Kilobytes" (FedKSeed) and "Efficient Personalization
of Quantized Diffusion Model without Backpropagation" (Subspace Gradient). The
SPSA core (two forward passes, no backprop):

    z = N(0, I) drawn from fold_in(key, seed)       (regenerated, never stored)
    g_hat = [L(theta + eps z) - L(theta - eps z)] / (2 eps)
    theta <- theta - lr * g_hat * z

A step is fully described by its record `(seed, g_hat)`: 4 + 4 = 8 bytes. Every
party holding theta_0 and the log replays it exactly (`replay`).

* `spsa`: a fresh seed every step (MeZO).
* `fedkseed`: seeds come from a pool of K; seed j is drawn with probability
  softmax(psi)_j, psi = the min-max normalised mean |clipped g_hat| seen so far for
  seed j (unseen seeds get the mean), or uniformly (`importance=False`).
* `zo_subspace`: the estimate g_hat z is projected onto the span of the last
  `history` unprojected estimates (per parameter leaf; least squares through the
  pseudo-inverse of the history's Gram matrix). [uncertain: the paper builds the
  subspace from the past token history; we use the past estimates so the span
  cannot collapse onto the trajectory.] Memory: `history` copies of the params,
  meant for small trainable trees (soft prompts).

Each is a `GradientTransformationExtraArgs` whose `update` takes the keyword
`loss_fn(params) -> scalar loss`; the train step passes it (and skips backprop)
when the optimizer state holds a `ZORecord`. Without `loss_fn` the transform
uses the exact directional derivative <g, z> of the incoming gradient (the
eps -> 0 limit), so it also runs where only gradients are available.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxft import names


class ZORecord(NamedTuple):
  """What one zeroth-order step sends: the seed and the projected gradient (+ its loss)."""
  seed: jax.Array     # uint32
  grad: jax.Array     # float32 g_hat
  loss: jax.Array     # float32 (L+ + L-) / 2, for logging (not sent)


class ZOState(NamedTuple):
  count: jax.Array    # int32
  last: ZORecord
  scores: Any = ()    # FedKSeed: (sum |g_hat|, visits) per pool seed
  history: Any = ()   # zo_subspace: tuple of past estimates (params-shaped)


def _record0():
  return ZORecord(jnp.zeros((), jnp.uint32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


DIRECTIONS = ("normal", "rademacher")


def direction(params, seed, key: int = 0, dist: str = "normal"):
  """z shaped like `params` from fold_in(PRNGKey(key), seed): N(0, I) or uniform +-1."""
  base = jax.random.fold_in(jax.random.PRNGKey(key), seed)
  leaves, treedef = jax.tree.flatten(params)
  if dist == "normal":
    draw = lambda k, p: jax.random.normal(k, p.shape, p.dtype)
  elif dist == "rademacher":
    draw = lambda k, p: jax.random.rademacher(k, p.shape, p.dtype)
  else:
    raise ValueError(names.unknown_message("optimizer.direction", dist, DIRECTIONS))
  zs = [draw(jax.random.fold_in(base, i), p) for i, p in enumerate(leaves)]
  return jax.tree.unflatten(treedef, zs)


def _estimate(ghat, z):
  return jax.tree.map(lambda zz: ghat * zz, z)


def _axpy(params, a, z):
  return jax.tree.map(lambda p, zz: (p + a * zz).astype(p.dtype), params, z)


def projected_gradient(params, z, eps: float, loss_fn: Callable | None, grads=None):
  """(g_hat, loss): the two-point SPSA estimate, or <grads, z> when there is no loss_fn."""
  if loss_fn is None:
    dots = [jnp.vdot(g.astype(jnp.float32), zz.astype(jnp.float32))
            for g, zz in zip(jax.tree.leaves(grads), jax.tree.leaves(z))]
    return sum(dots), jnp.zeros((), jnp.float32)
  lp = jnp.asarray(loss_fn(_axpy(params, eps, z)), jnp.float32)
  lm = jnp.asarray(loss_fn(_axpy(params, -eps, z)), jnp.float32)
  return (lp - lm) / (2.0 * eps), (lp + lm) / 2.0


def _fedkseed_probs(scores, importance: bool):
  total, visits = scores
  k = total.shape[0]
  if not importance:
    return jnp.full((k,), 1.0 / k, jnp.float32)
  seen = visits > 0
  mean = jnp.where(seen, total / jnp.maximum(visits, 1.0), 0.0)
  fill = jnp.sum(mean) / jnp.maximum(jnp.sum(seen), 1.0)
  amp = jnp.where(seen, mean, fill)
  lo, hi = jnp.min(amp), jnp.max(amp)
  psi = jnp.where(hi > lo, (amp - lo) / jnp.maximum(hi - lo, 1e-30), 0.0)
  return jax.nn.softmax(psi)


def _subspace_project(est, history, filled):
  """Least-squares projection of each leaf of `est` onto the span of `history[:filled]`."""
  def leaf(e, *hs):
    h = jnp.stack([x.reshape(-1).astype(jnp.float32) for x in hs])   # (H, d)
    valid = (jnp.arange(h.shape[0]) < filled).astype(jnp.float32)[:, None]
    h = h * valid
    gram = h @ h.T
    coef = jnp.linalg.pinv(gram, rtol=1e-6, hermitian=True) @ (h @ e.reshape(-1).astype(jnp.float32))
    return (coef @ h).reshape(e.shape).astype(e.dtype)
  return jax.tree.map(leaf, est, *history)


def scale_by_zo(eps: float = 1e-3, key: int = 0, num_seeds: int = 0, importance: bool = True,
                grad_clip: float = 0.0, history: int = 0, direction_dist: str = "normal"
                ) -> optax.GradientTransformationExtraArgs:
  """The zeroth-order estimate g_hat z (feed it to `scale_by_learning_rate`).

  Args:
    eps: perturbation scale.
    key: the shared PRNG key every party derives z from.
    num_seeds: K > 0 = FedKSeed's seed pool (seed ids 0..K-1); 0 = a fresh seed per step.
    importance: FedKSeed's probability-differentiated seed sampling (else uniform).
    grad_clip: > 0 clips g_hat to [-grad_clip, grad_clip] (FedKSeed).
    history: > 0 = Subspace Gradient over the last `history` estimates.
    direction_dist: 'normal' (MeZO) or 'rademacher' (+-1, Spall's SPSA): with +-1
      entries every product is exact, so a replay is bit-exact in any program.
  """
  if direction_dist not in DIRECTIONS:
    raise ValueError(names.unknown_message("optimizer.direction", direction_dist, DIRECTIONS))
  if eps <= 0:
    raise ValueError(f"optimizer.eps (the zeroth-order perturbation) must be > 0, got {eps}")

  def init_fn(params):
    scores = ((jnp.zeros((num_seeds,), jnp.float32), jnp.zeros((num_seeds,), jnp.float32))
              if num_seeds else ())
    hist = tuple(jax.tree.map(jnp.zeros_like, params) for _ in range(history))
    return ZOState(jnp.zeros((), jnp.int32), _record0(), scores, hist)

  def update_fn(updates, state, params, *, loss_fn=None, **extra):
    del extra
    skey = jax.random.fold_in(jax.random.PRNGKey(key ^ 0x5EED), state.count)
    if num_seeds:
      probs = _fedkseed_probs(state.scores, importance)
      seed = jax.random.choice(skey, num_seeds, p=probs).astype(jnp.uint32)
    else:
      seed = jax.random.bits(skey, (), jnp.uint32)
    z = direction(params, seed, key, direction_dist)
    ghat, loss = projected_gradient(params, z, eps, loss_fn, updates)
    if grad_clip > 0:
      ghat = jnp.clip(ghat, -grad_clip, grad_clip)
    ghat = ghat.astype(jnp.float32)
    est = _estimate(ghat, z)
    scores, hist = state.scores, state.history
    if num_seeds:
      idx = seed.astype(jnp.int32)
      scores = (scores[0].at[idx].add(jnp.abs(ghat)), scores[1].at[idx].add(1.0))
    if history:
      filled = jnp.minimum(state.count, history)
      proj = _subspace_project(est, hist, filled)
      hist = hist[1:] + (jax.tree.map(lambda e, h: e.astype(h.dtype), est, hist[-1]),)
      est = jax.tree.map(lambda a, b: jnp.where(state.count > 0, a, b), proj, est)
    new = ZOState(state.count + 1, ZORecord(seed, ghat, loss.astype(jnp.float32)), scores, hist)
    return est, new

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def spsa(learning_rate, eps: float = 1e-3, key: int = 0, direction: str = "normal"):
  """MeZO / SPSA: theta <- theta - lr * g_hat * z with a fresh seed per step."""
  return optax.chain(scale_by_zo(eps, key, direction_dist=direction),
                     optax.scale_by_learning_rate(learning_rate))


def fedkseed(learning_rate, eps: float = 1e-3, num_seeds: int = 1024, importance: bool = True,
             grad_clip: float = 0.0, key: int = 0, direction: str = "rademacher"):
  """FedKSeed: SPSA with seeds drawn from a pool of K (importance-sampled)."""
  return optax.chain(scale_by_zo(eps, key, num_seeds, importance, grad_clip, 0, direction),
                     optax.scale_by_learning_rate(learning_rate))


def zo_subspace(learning_rate, eps: float = 1e-3, history: int = 16, key: int = 0,
                direction: str = "normal"):
  """Subspace Gradient: SPSA with g_hat z projected onto the span of past estimates."""
  return optax.chain(scale_by_zo(eps, key, history=history, direction_dist=direction),
                     optax.scale_by_learning_rate(learning_rate))


def find_record(opt_state) -> ZORecord | None:
  """The ZORecord inside an optimizer state (None: not a zeroth-order optimizer)."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ZORecord))
           if isinstance(x, ZORecord)]
  return found[0] if found else None


def encode(seeds, grads) -> bytes:
  """A client's log as bytes: 4-byte seed + 4-byte float32 g_hat per step."""
  return (np.asarray(seeds, np.uint32).tobytes() + np.asarray(grads, np.float32).tobytes())


def decode(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
  n = len(blob) // 8
  return (np.frombuffer(blob[:4 * n], np.uint32), np.frombuffer(blob[4 * n:], np.float32))


def replay(params, seeds, grads, learning_rate, *, start: int = 0, key: int = 0,
           dist: str = "rademacher"):
  """theta_0 + the log -> theta_T, by the same float ops as the train step (bit-exact).

  `learning_rate` is the schedule (or float) the run used; `start` its step count at
  the first record.
  """
  lr_tx = optax.scale_by_learning_rate(learning_rate)

  @jax.jit
  def run(params, seeds, grads):
    lr_state = lr_tx.init(params)
    if start and callable(learning_rate):
      lr_state = optax.tree_utils.tree_set(lr_state, count=jnp.asarray(start, jnp.int32))

    def body(carry, xs):
      p, s = carry
      seed, ghat = xs
      upd, s = lr_tx.update(_estimate(ghat, direction(p, seed, key, dist)), s, p)
      return (optax.apply_updates(p, upd), s), None
    return jax.lax.scan(body, (params, lr_state), (seeds, grads))[0][0]

  return run(params, jnp.asarray(seeds, jnp.uint32), jnp.asarray(grads, jnp.float32))


def _spsa(lr, spec):
  """MeZO-style SPSA: two forward passes per step, a fresh seed each step."""
  return spsa(lr, spec["eps"], spec["key"], spec["direction"])


def _fedkseed(lr, spec):
  """FedKSeed: SPSA over a pool of K seeds; a client step is (seed id, g_hat), 8 bytes."""
  return fedkseed(lr, spec["eps"], spec["num_seeds"], spec["importance"], spec["grad_clip"],
                  spec["key"], spec["direction"])


def _zo_subspace(lr, spec):
  """Subspace Gradient: SPSA projected onto the span of the last `history` estimates."""
  return zo_subspace(lr, spec["eps"], spec["history"], spec["key"], spec["direction"])


# Zeroth-order estimates are not gradients: no global-norm clipping by default.
_ZO = {"eps": 1e-3, "key": 0, "direction": "normal", "clip_norm": 0.0}
REGISTRY = {
    "spsa": (_spsa, dict(_ZO)),
    "fedkseed": (_fedkseed, {**_ZO, "direction": "rademacher", "num_seeds": 1024, "importance": True, "grad_clip": 0.0}),
    "zo_subspace": (_zo_subspace, {**_ZO, "history": 16}),
}
