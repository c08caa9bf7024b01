"""SpIEL: "Scaling Sparse Fine-Tuning to Large Language Models" (Ansell et al., 2024).

Per targeted weight a fixed number K = density·d_in·d_out of active indices η and
deltas φ (`jaxft.adapters.sparse_delta`, element granularity):

    W = W0 + scatter(η, φ),

trained with optimizer state for the K active entries only. Every `reselect_every`
steps `reselect` (a pure function of the state and the step) updates η:

  (a) prune: drop the n = ⌈f(t)·K⌉ active entries with the smallest |φ| (their
      deltas are removed, so the weight returns to W0 there);
  (b) regrow: add the n inactive entries with the largest regrowth score — the
      |accumulated gradient| of the dense weight (SpIEL-AG) or the SM3 estimate
      min(r_i, c_j) of its running second moment, r_i = Σ_t max_j g_ij², c_j =
      Σ_t max_i g_ij² (SpIEL-MA); the new deltas start at 0;
  (c) the optimizer state of the replaced slots is zeroed; K stays constant.

f(t) = reselect_fraction · (1 + cos(π t / T)) / 2 (cosine decay over the run's T
steps). The paper draws 5× candidates; here every inactive entry is a candidate
(the same set when the accumulated dense gradient is available). `grad_impl`:
'sddmm' (no full weight gradient) or 'dense' (see `sparse_delta.linear`).
In the trainer (`jaxft.runner.periodic_update`): `periodic(spec)` =
`reselect_every` (0 = static mask) and `update` runs one `reselect` after every
`reselect_every` steps. Its regrowth scores come from ONE extra jitted evaluation of
the dense weight gradient G = ∂L/∂W (W = W0 + scatter(η, φ)) on that step's batch:
AG scores |G| (the paper accumulates over a few steps of candidates; here one
batch), MA scores the SM3 estimate min(max_j G², max_i G²) of that batch (the
paper's running SM3 accumulators would need G every step; `sm3_update` can fold
several batches when a caller has them). η (`sd_idx`) is `MUTABLE`: saved in
checkpoints, so a resumed run continues with the same index set.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxft.adapters import base, sparse_delta as sd

DEFAULTS = {"targets": (r"attn/(q|k|v|o)$", r"mlp/(gate|up|down)$"), "density": 0.01,
            "grad_impl": "sddmm",
            "reselect_every": 20, "reselect_fraction": 0.2, "regrow": "ag", "total_steps": 0}
REGROW = ("ag", "ma")
MERGEABLE = True
MUTABLE = (sd.IDX,)  # changed by `update`: saved in checkpoints (build.checkpointed)


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """Random initial η at `density` per matrix; φ = 0 (the model is unchanged at init)."""
  del calib

  def select(i, path, w):
    return sd.random_indices(jax.random.fold_in(key, i), w.shape,
                             sd.count(spec["density"], w.shape[-2] * w.shape[-1]))

  return sd.element_init(frozen, spec, select)


logical_axes, combine, linear_hook = sd.logical_axes, sd.combine, sd.linear_hook
materialize = merge = sd.materialize


def fraction(step: int, spec: Mapping[str, Any]) -> float:
  """f(t): cosine decay from reselect_fraction to 0 over total_steps (0 = no decay)."""
  total = int(spec.get("total_steps", 0))
  f0 = float(spec["reselect_fraction"])
  return f0 if total <= 0 else f0 * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def sm3_update(stats, grads):
  """SpIEL-MA's running row/column accumulators: r += max_j g², c += max_i g² per matrix."""
  out = {}
  for path, g in grads.items():
    g2 = jnp.square(g.astype(jnp.float32))
    r, c = stats.get(path, (0.0, 0.0))
    out[path] = (r + jnp.max(g2, axis=-1), c + jnp.max(g2, axis=-2))
  return out


def sm3_scores(stats):
  """The SM3 second-moment estimate min(r_i, c_j), (…, d_in, d_out) per matrix."""
  return {p: jnp.minimum(r[..., :, None], c[..., None, :]) for p, (r, c) in stats.items()}


def reselect(frozen, trainable, opt_state, scores: Mapping[str, Any], step: int, spec):
  """One prune-and-regrow of η. `scores`: {linear path: (…, d_in, d_out)} regrowth scores
  (|accumulated dense gradient| for AG, `sm3_scores` for MA). -> (frozen', trainable',
  opt_state') with K unchanged, regrown deltas 0 and their optimizer state zeroed."""
  if spec["regrow"] not in REGROW:
    raise ValueError(f"adapter.regrow={spec['regrow']!r} is invalid; valid: {', '.join(REGROW)}")
  fl, tr = dict(base.flatten(frozen)), dict(base.flatten(trainable))
  keep = {}
  for path, phi in list(tr.items()):
    linear, leaf = path.rsplit("/", 1)
    if leaf != sd.DELTA:
      continue
    idx = fl[linear + "/" + sd.IDX]
    k = idx.shape[-1]
    n = min(k, math.ceil(fraction(step, spec) * k))
    if n == 0:
      continue
    s = scores[linear].astype(jnp.float32)
    *lead, d_in, d_out = s.shape
    s = s.reshape(-1, d_in * d_out)
    i2, p2 = idx.reshape(s.shape[0], k), phi.reshape(s.shape[0], k)

    def one(s_row, i_row, p_row):
      _, drop = jax.lax.top_k(-jnp.abs(p_row.astype(jnp.float32)), n)   # smallest |φ|
      kept = jnp.ones((k,), bool).at[drop].set(False)
      active = jnp.zeros((d_in * d_out,), bool).at[i_row].set(kept)     # kept entries only
      _, grow = jax.lax.top_k(jnp.where(active, -jnp.inf, s_row), n)
      return i_row.at[drop].set(grow.astype(i_row.dtype)), jnp.where(kept, p_row, 0), kept

    i_new, p_new, kept = jax.vmap(one)(s, i2, p2)
    fl[linear + "/" + sd.IDX] = i_new.reshape(idx.shape)
    tr[path] = p_new.reshape(phi.shape).astype(phi.dtype)
    keep[path] = kept.reshape(phi.shape)
  return base.unflatten(fl), base.unflatten(tr), zero_state(opt_state, keep)


def zero_state(opt_state, keep: Mapping[str, Any]):
  """Zeroes optimizer-state entries where keep is False, for leaves mirroring a delta path."""

  def fix(key_path, x):
    names = [getattr(k, "key", None) for k in key_path]
    names = [n for n in names if isinstance(n, str)]
    for path, mask in keep.items():
      parts = path.split("/")
      if names[-len(parts):] == parts and getattr(x, "shape", None) == mask.shape:
        return jnp.where(mask, x, jnp.zeros_like(x))
    return x

  return jax.tree_util.tree_map_with_path(fix, opt_state)


def periodic(spec) -> int:
  """Steps between reselections (0 = never: a static mask)."""
  k = int(spec.get("reselect_every", 0))
  if k < 0:
    raise ValueError(f"adapter.reselect_every={k!r} is invalid; valid: 0 (static) or >= 1")
  return k


_GRADS: dict[int, Any] = {}  # id(task) -> (task, jitted dense-gradient fn)


def dense_grads(task, frozen, trainable, batch):
  """{linear path: ∂L/∂W} of the token-mean loss on `batch` at the merged weights (jitted)."""
  hit = _GRADS.get(id(task))
  if hit is None or hit[0] is not task:
    paths = [p.rsplit("/", 1)[0] for p in base.flatten(trainable)]

    def grads(frozen, trainable, batch):
      flat = dict(base.flatten(merge(frozen, trainable, task.adapter_spec)))
      kernels = {p: flat[p + "/kernel"].astype(jnp.float32) for p in paths}

      def loss(kernels):
        params = base.unflatten({**flat, **{p + "/kernel": w for p, w in kernels.items()}})
        logits = task.apply(params, batch["tokens"], positions=batch.get("positions"),
                            segment_ids=batch.get("segment_ids"), rng=None)
        return task.objective(logits, batch, task.objective_spec)[0]

      return jax.grad(loss)(kernels)

    hit = _GRADS[id(task)] = (task, jax.jit(grads))
  return hit[1](frozen, trainable, batch)


def update(key, state, step: int, task, batch):
  """Runner hook: one prune-and-regrow with scores from the dense gradient on `batch`."""
  del key
  spec = task.adapter_spec
  g = dense_grads(task, state.frozen, state.trainable, batch)
  if spec["regrow"] == "ma":
    scores = sm3_scores(sm3_update({}, g))
  else:
    scores = {p: jnp.abs(x) for p, x in g.items()}
  frozen, trainable, opt_state = reselect(state.frozen, state.trainable, state.opt_state, scores,
                                          step, spec)
  return state._replace(frozen=frozen, trainable=trainable, opt_state=opt_state)
