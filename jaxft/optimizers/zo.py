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
* `zo_subspace`: the perturbation itself lives in a k-dim subspace per leaf,
  z = Q w with w ~ N(0, I_k) and Q an orthonormal (QR) basis of the last
  `history` estimates plus `fresh` random directions (k = history + fresh), and
  the step is (d/k) g_hat z (`scale='dim'`): E[update] = (d/k) Q Q^T g, which is
  g on average over a random subspace and larger along directions the history
  keeps. [uncertain: the paper builds the subspace from the past token history;
  we use the past estimates, and the fresh directions keep the span from
  collapsing onto itself.] The first version drew z in the full space and
  projected g_hat z afterwards: E[update] = Q Q^T g, k/d of SPSA's step, so it
  barely descended (0.99x on the suite's quadratic; now ~0.6x, SPSA 0.35x, at the
  same lr and function evaluations). Memory: `history` copies of the params and a
  QR of (d, k) per leaf and step, meant for small trainable trees (soft prompts).

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


def _subspace_bases(params, history, filled, seed, key: int, fresh: int):
  """Per leaf, an orthonormal basis Q (d, k) of span(past estimates + `fresh` random directions).

  Unfilled history slots are replaced by random directions, so step 0 is a random k-subspace.
  k = min(history + fresh, d): a leaf no larger than k is searched in full (Q spans R^d).
  """
  base = jax.random.fold_in(jax.random.PRNGKey(key ^ 0xBA5E), seed)
  def leaf(i, p, *hs):
    d = p.size
    n = len(hs) + fresh
    rand = jax.random.normal(jax.random.fold_in(base, i), (n, d), jnp.float32)
    past = [h.reshape(-1).astype(jnp.float32) for h in hs]
    slot = jnp.arange(n)
    valid = (slot >= len(hs) - filled) & (slot < len(hs))   # the newest `filled` slots
    cols = jnp.where(valid[:, None], jnp.stack(past + [rand[0]] * fresh), rand) if hs else rand
    return jnp.linalg.qr(cols.T)[0]                                   # (d, min(n, d))
  leaves, treedef = jax.tree.flatten(params)
  hist_leaves = [treedef.flatten_up_to(h) for h in history]
  return [leaf(i, p, *[h[i] for h in hist_leaves]) for i, p in enumerate(leaves)], treedef


def subspace_direction(params, bases, treedef, seed, key: int = 0):
  """z = Q w per leaf, w ~ N(0, I_k) from fold_in(key, seed): E[z z^T] = Q Q^T."""
  base = jax.random.fold_in(jax.random.PRNGKey(key), seed)
  zs = [(q @ jax.random.normal(jax.random.fold_in(base, i), (q.shape[1],), jnp.float32))
        .reshape(p.shape).astype(p.dtype)
        for i, (p, q) in enumerate(zip(treedef.flatten_up_to(params), bases))]
  return jax.tree.unflatten(treedef, zs)


SUBSPACE_SCALES = ("dim", "none")


def _subspace_scales(params, bases, treedef, scale: str):
  """Per-leaf factor on g_hat z: d/k ('dim': unbiased over a random k-subspace) or 1 ('none')."""
  return jax.tree.unflatten(treedef, [
      (p.size / q.shape[1]) if scale == "dim" else 1.0
      for p, q in zip(treedef.flatten_up_to(params), bases)])


def scale_by_zo(eps: float = 1e-3, key: int = 0, num_seeds: int = 0, importance: bool = True,
                grad_clip: float = 0.0, history: int = 0, direction_dist: str = "normal",
                fresh: int = 4, scale: str = "dim") -> optax.GradientTransformationExtraArgs:
  """The zeroth-order estimate g_hat z (feed it to `scale_by_learning_rate`).

  Args:
    eps: perturbation scale.
    key: the shared PRNG key every party derives z from.
    num_seeds: K > 0 = FedKSeed's seed pool (seed ids 0..K-1); 0 = a fresh seed per step.
    importance: FedKSeed's probability-differentiated seed sampling (else uniform).
    grad_clip: > 0 clips g_hat to [-grad_clip, grad_clip] (FedKSeed).
    history: > 0 = Subspace Gradient over the last `history` estimates.
    fresh: Subspace Gradient: random directions added to the history's span each step.
    scale: Subspace Gradient: 'dim' scales g_hat z by d/k per leaf, 'none' keeps it.
    direction_dist: 'normal' (MeZO) or 'rademacher' (+-1, Spall's SPSA): with +-1
      entries every product is exact, so a replay is bit-exact in any program.
  """
  if direction_dist not in DIRECTIONS:
    raise ValueError(names.unknown_message("optimizer.direction", direction_dist, DIRECTIONS))
  if scale not in SUBSPACE_SCALES:
    raise ValueError(names.unknown_message("optimizer.scale", scale, SUBSPACE_SCALES))
  if history and fresh < 0:
    raise ValueError(f"optimizer.fresh (random subspace directions) must be >= 0, got {fresh}")
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
    if history:
      bases, treedef = _subspace_bases(params, state.history, jnp.minimum(state.count, history),
                                       seed, key, fresh)
      z = subspace_direction(params, bases, treedef, seed, key)
    else:
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
      hist = hist[1:] + (jax.tree.map(lambda e, h: e.astype(h.dtype), est, hist[-1]),)
      scales = _subspace_scales(params, bases, treedef, scale)
      est = jax.tree.map(lambda e, s: (e * s).astype(e.dtype), est, scales)
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
                direction: str = "normal", fresh: int = 4, scale: str = "dim"):
  """Subspace Gradient: SPSA perturbed inside span(past estimates + fresh directions).

  `direction` is unused (the in-subspace coordinates w are N(0, I)); kept for the registry.
  """
  return optax.chain(scale_by_zo(eps, key, history=history, direction_dist=direction,
                                 fresh=fresh, scale=scale),
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
  """Subspace Gradient: SPSA inside the span of the last `history` estimates + `fresh` directions."""
  return zo_subspace(lr, spec["eps"], spec["history"], spec["key"], spec["direction"],
                     spec["fresh"], spec["scale"])


# Zeroth-order estimates are not gradients: no global-norm clipping by default.
_ZO = {"eps": 1e-3, "key": 0, "direction": "normal", "clip_norm": 0.0}
REGISTRY = {
    "spsa": (_spsa, dict(_ZO)),
    "fedkseed": (_fedkseed, {**_ZO, "direction": "rademacher", "num_seeds": 1024, "importance": True, "grad_clip": 0.0}),
    "zo_subspace": (_zo_subspace, {**_ZO, "history": 16, "fresh": 4, "scale": "dim"}),
}
