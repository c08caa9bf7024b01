"""Layer and tensor freezing members (issue 5, P2): Telly, GreenTrainer, SlimFit.

Each targeted linear trains or stays frozen per layer. Layers are stacked and scanned, so
the choice is HFT's per-layer flag (`jaxft.adapters.hft`, whose contract functions these
members reuse): a frozen int32 flag `hft_on` (L,) and a trainable delta `hft_delta`
(L, d_in, d_out), 0 at init, beside each targeted kernel,

    y = cond(on_ℓ, x (W0 + Δ_ℓ), x W0).

A frozen layer's Δ_ℓ gets exactly zero gradient, its weight-gradient GEMM sits only in the
untaken branch (never executed), and with zero gradient and zero moments the optimizer
leaves it at exactly 0. Embeddings, norms and the head stay frozen. The members differ in
the selector only:

  telly         "Towards Efficient Fine-tuning of Pre-trained Code Models: An Experimental
                Study and Beyond": freeze the embeddings and the bottom K layers
                (`frozen_layers` K >= 0; K < 0 freezes all but the top |K|).
  greentrainer  "Towards Green AI in Fine-tuning Large Language Models via Adaptive
                Backpropagation": tensor importance I_k = −Σ g_k ⊙ Δw_k with Δw = −η g
                (so I_k ∝ ‖G_k‖², G from calibration batches) and backprop FLOPs per tensor
                (dW: 2·d_in·d_out per token if trained; dx: 2·d_in·d_out per token for every
                tensor above the deepest trained one); `knapsack` picks max Σ I_k subject to
                backprop FLOPs <= `rho` · full backprop FLOPs, exactly, by dynamic programming
                over depth (costs in units of full/`resolution`). Re-selected from ‖G‖² of
                the current batch every `reselect_every` steps (0 = once; the paper: each
                epoch); attention-score matmuls, norms and the head are not in the count.
  slimfit       "SlimFit: Memory-Efficient Fine-Tuning of Transformer-based Models Using
                Training Dynamics": freeze the `freeze_rate` fraction of (layer, tensor)
                matrices with the smallest update magnitude ‖ΔW‖ (/‖W‖ with
                normalize='weight'); all train until the first re-selection; every
                `reselect_every` steps `slimfit_reselect` re-scores the training matrices
                by their update since the last call (frozen ones keep their last score,
                `sf_score`, so they thaw once the others' updates fall below it) and
                re-freezes. Quantisation/pruning of
                static activations is not implemented.

Re-selection (`refreeze`, run by `jaxft.runner.periodic_update` through each member's
`periodic`/`update`): W0 ← W0 + Δ, Δ ← 0, new flags, optimizer moments of the now-frozen
matrices zeroed (their update is then exactly 0), shapes unchanged (the compiled step is
reused); flags, folded kernels and scores are `MUTABLE` (saved in checkpoints).
"""
from __future__ import annotations

import itertools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import names
from jaxft.adapters import base, calibrate, featurewise, hft, selection

ON, DELTA = hft.ON, hft.DELTA
BACKPROP_ORDER = ("mlp/down", "mlp/up", "mlp/gate", "attn/o", "attn/v", "attn/k", "attn/q")
NORMALIZE = ("weight", "none")
SCORE = "sf_score"  # SlimFit: last measured update magnitude per layer (frozen, mutable)


def _stacked(frozen, spec) -> tuple[list[str], int]:
  flat = base.flatten(frozen)
  paths = featurewise.linear_targets(frozen, spec)
  shapes = {p: np.shape(flat[p + "/kernel"]) for p in paths}
  bad = [p for p, s in shapes.items() if len(s) != 3]
  if bad:
    raise ValueError(f"adapter.targets={spec['targets']!r} match linears without a stacked "
                     f"layers axis {bad}; valid: stacked kernels (layers/attn/*, layers/mlp/*)")
  return paths, int(shapes[paths[0]][0])


def flag_init(frozen, flags: Mapping[str, Any]):
  """(frozen + `hft_on` flags, trainable `hft_delta` = 0) for {linear path: (L,) 0/1}."""
  flat = dict(base.flatten(frozen))
  train = {}
  for path, on in flags.items():
    flat[f"{path}/{ON}"] = jnp.asarray(on, jnp.int32)
    train[f"{path}/{DELTA}"] = jnp.zeros_like(flat[f"{path}/kernel"])
  return base.unflatten(flat), base.unflatten(train)


def refreeze(frozen, trainable, opt_state, flags: Mapping[str, Any]):
  """(frozen, trainable, opt_state) with new flags: W0 ← W0 + Δ, Δ ← 0; the optimizer
  moments of now-frozen matrices zeroed (so they get exactly zero update), others kept."""
  merged = hft.materialize(frozen, trainable, None)
  frozen, new_trainable = flag_init(merged, flags)
  keep = base.unflatten({f"{p}/{DELTA}": jnp.asarray(v) for p, v in flags.items()})
  tdef = jax.tree.structure(trainable)
  like = lambda x: isinstance(x, Mapping) and jax.tree.structure(x) == tdef
  mask = lambda x: jax.tree.map(lambda m, k: m * k[:, None, None].astype(m.dtype), x, keep)
  opt_state = jax.tree.map(lambda x: mask(x) if like(x) else x, opt_state, is_leaf=like)
  return frozen, new_trainable, opt_state


def _periodic(spec) -> int:
  k = int(spec.get("reselect_every", 0))
  if k < 0:
    raise ValueError(f"adapter.reselect_every={k!r} is invalid; valid: 0 (never) or >= 1")
  return k


def _strip(frozen):
  return base.split(frozen, lambda p: p.endswith("/" + SCORE))[0]


def _logical_axes(model_axes, trainable, spec):
  """HFT's axes plus the per-layer scores beside the flags (SlimFit)."""
  fa, ta = hft.logical_axes(model_axes, trainable, spec)
  flat = dict(base.flatten(fa))
  for path in base.flatten(trainable):
    linear = path.rsplit("/", 1)[0]
    flat[f"{linear}/{SCORE}"] = flat[f"{linear}/{ON}"]
  return base.unflatten(flat), ta


def _member(name, doc, defaults, init, **extra):
  functions = dict(logical_axes=hft.logical_axes, combine=hft.combine,
                   linear_hook=hft.linear_hook, materialize=hft.materialize, merge=hft.merge,
                   active_params=hft.active_params)
  functions.update(extra)
  return featurewise.member(name, doc, DEFAULTS=defaults, init=init, **functions)


# ------------------------------------------------------------------ Telly
def telly_init(key, frozen, spec: Mapping[str, Any], calib=None):
  """Layers ℓ >= K train, ℓ < K are frozen (K = frozen_layers, or L + K when negative)."""
  del key, calib
  paths, n = _stacked(frozen, spec)
  k = int(spec["frozen_layers"])
  if not -n <= k < n:
    raise ValueError(f"adapter.frozen_layers={k} is invalid for {n} layers; valid: "
                     f"{-n}..{n - 1} (K >= 0 freezes the bottom K, K < 0 all but the top |K|)")
  k = k if k >= 0 else n + k
  return flag_init(frozen, {p: np.arange(n) >= k for p in paths})


# ------------------------------------------------------------------ GreenTrainer
def greentrainer_select(frozen, spec, scores: Mapping[str, Any]):
  """{linear path: (L,) flags} from {targeted path: (L,) importance} (a traced value is fine:
  the DP runs on the host through `jax.pure_callback`)."""
  flat = base.flatten(frozen)
  paths, n_layers = _stacked(frozen, spec)
  linears = [p for p in base.linear_paths(frozen) if np.ndim(flat[p + "/kernel"]) == 3]
  rank = {s: i for i, s in enumerate(BACKPROP_ORDER)}
  linears.sort(key=lambda p: rank.get(p.split("/", 1)[1], len(rank)))
  items = [(layer, p) for layer in range(n_layers - 1, -1, -1) for p in linears]
  cost = np.array([2 * np.prod(np.shape(flat[p + "/kernel"])[1:]) for _, p in items], np.float64)
  res = int(spec["resolution"])
  units = np.ceil(cost / (2 * cost.sum()) * res).astype(np.int64)  # full backprop = dW + dx
  rho = float(spec["rho"])
  if not 0.0 < rho <= 1.0:
    raise ValueError(f"adapter.rho={rho!r} is invalid; valid: 0 < rho <= 1")
  selectable = np.array([p in scores for _, p in items])
  imp = jnp.stack([scores[p][layer] if p in scores else jnp.zeros(()) for layer, p in items])

  def host(v):
    return selection.knapsack(np.asarray(v), units, units, int(rho * res), selectable).astype(np.int32)

  mask = jax.pure_callback(host, jax.ShapeDtypeStruct((len(items),), jnp.int32),
                           imp.astype(jnp.float32))
  out = {p: jnp.zeros((n_layers,), jnp.int32) for p in paths}
  for i, (layer, p) in enumerate(items):
    if p in out:
      out[p] = out[p].at[layer].set(mask[i])
  return out


def _grad_sq(frozen, paths, calib, spec, name):
  stats = calibrate.statistics(calibrate.require(calib, name), frozen, paths, grad=True,
                               tokens=spec.get("calib_tokens", "all"))
  return {p: jnp.sum(jnp.square(stats[p].grad.astype(jnp.float32)), axis=(-2, -1)) for p in paths}


def greentrainer_init(key, frozen, spec: Mapping[str, Any], calib=None):
  """Flags from the DP over I = ‖G‖² per (layer, tensor) of the calibration batches."""
  del key
  paths, _ = _stacked(frozen, spec)
  scores = _grad_sq(frozen, paths, calib, spec, "greentrainer")
  return flag_init(frozen, greentrainer_select(frozen, spec, scores))


def greentrainer_update(key, state, step, task, batch):
  """Runner hook (every `reselect_every` steps): re-select from ‖G‖² on this step's batch."""
  del key, step
  spec = task.adapter_spec

  @jax.jit
  def reselect(frozen, trainable, opt_state, batch):
    merged = hft.materialize(frozen, trainable, spec)
    calib = calibrate.Calibration(task.apply, task.objective, task.objective_spec,
                                  {k: v[None] for k, v in batch.items()})
    scores = _grad_sq(merged, _stacked(merged, spec)[0], calib, spec, "greentrainer")
    return refreeze(frozen, trainable, opt_state, greentrainer_select(merged, spec, scores))

  frozen, trainable, opt_state = reselect(state.frozen, state.trainable, state.opt_state, batch)
  return state._replace(frozen=frozen, trainable=trainable, opt_state=opt_state)


# ------------------------------------------------------------------ SlimFit
def slimfit_flags(scores: Mapping[str, Any], freeze_rate: float) -> dict[str, jax.Array]:
  """Freeze the round(rate · n) lowest-scored (layer, tensor) matrices of all n (ties: first)."""
  if not 0.0 <= freeze_rate < 1.0:
    raise ValueError(f"adapter.freeze_rate={freeze_rate!r} is invalid; valid: 0 <= rate < 1")
  paths = list(scores)
  allv = jnp.concatenate([jnp.asarray(scores[p], jnp.float32) for p in paths])
  n_freeze = int(round(freeze_rate * allv.shape[0]))
  rank = jnp.argsort(jnp.argsort(allv, stable=True), stable=True)
  on = (rank >= n_freeze).astype(jnp.int32)
  sizes = list(itertools.accumulate(int(np.shape(scores[p])[0]) for p in paths))
  return dict(zip(paths, jnp.split(on, sizes[:-1])))


def _update_scores(frozen, deltas: Mapping[str, Any], spec) -> dict[str, jax.Array]:
  norm = spec.get("normalize", "weight")
  if norm not in NORMALIZE:
    raise ValueError(names.unknown_message("adapter.normalize", norm, NORMALIZE))
  flat = base.flatten(frozen)
  out = {}
  for p, d in deltas.items():
    s = jnp.sqrt(jnp.sum(jnp.square(d.astype(jnp.float32)), axis=(-2, -1)))
    if norm == "weight":
      w = flat[p + "/kernel"].astype(jnp.float32)
      s = s / (jnp.sqrt(jnp.sum(w * w, axis=(-2, -1))) + 1e-12)
    out[p] = s
  return out


def _with_scores(frozen, scores):
  flat = dict(base.flatten(frozen))
  flat.update({f"{p}/{SCORE}": jnp.asarray(v, jnp.float32) for p, v in scores.items()})
  return base.unflatten(flat)


def slimfit_init(key, frozen, spec: Mapping[str, Any], calib=None):
  """Every targeted matrix trains until the first re-selection (scores 0)."""
  del key, calib
  paths, n = _stacked(frozen, spec)
  slimfit_flags({p: jnp.zeros((n,)) for p in paths}, float(spec["freeze_rate"]))  # validates
  frozen, trainable = flag_init(frozen, {p: np.ones((n,), np.int32) for p in paths})
  return _with_scores(frozen, {p: jnp.zeros((n,), jnp.float32) for p in paths}), trainable


def slimfit_reselect(frozen, trainable, opt_state, spec):
  """(frozen, trainable, opt_state): scores of training matrices = ‖Δ‖ (/‖W‖), their update
  since the last call; frozen ones keep their last score (`sf_score`); the lowest
  `freeze_rate` freeze; then `refreeze` (Δ folded into W0, frozen moments zeroed)."""
  ff = base.flatten(frozen)
  deltas = {p.rsplit("/", 1)[0]: d for p, d in base.flatten(trainable).items()}
  fresh = _update_scores(frozen, deltas, spec)
  scores = {p: jnp.where(ff[f"{p}/{ON}"] > 0, s, ff[f"{p}/{SCORE}"]) for p, s in fresh.items()}
  flags = slimfit_flags(scores, float(spec["freeze_rate"]))
  frozen, trainable, opt_state = refreeze(_strip(frozen), trainable, opt_state, flags)
  return _with_scores(frozen, scores), trainable, opt_state


def slimfit_update(key, state, step, task, batch):
  """Runner hook (every `reselect_every` steps): `slimfit_reselect`, jitted."""
  del key, step, batch
  spec = task.adapter_spec
  frozen, trainable, opt_state = jax.jit(lambda f, t, o: slimfit_reselect(f, t, o, spec))(
      state.frozen, state.trainable, state.opt_state)
  return state._replace(frozen=frozen, trainable=trainable, opt_state=opt_state)


TELLY_DOC = ('Telly: "Towards Efficient Fine-tuning of Pre-trained Code Models: An Experimental '
             'Study and Beyond" (Shi et al., 2023): freeze the embeddings and the bottom K layers.\n\n'
             + __doc__)
GREENTRAINER_DOC = ('GreenTrainer: "Towards Green AI in Fine-tuning Large Language Models via Adaptive '
                    'Backpropagation" (Huang et al., 2023): tensors by importance under a FLOPs budget.'
                    '\n\n' + __doc__)
SLIMFIT_DOC = ('SlimFit: "SlimFit: Memory-Efficient Fine-Tuning of Transformer-based Models Using '
               'Training Dynamics" (Ardakani et al., 2023): freeze the smallest updates.\n\n' + __doc__)

telly = _member("telly", TELLY_DOC, {"targets": featurewise.LINEARS, "frozen_layers": -2},
                telly_init)
greentrainer = _member(
    "greentrainer", GREENTRAINER_DOC, {"targets": featurewise.LINEARS, "rho": 0.5, "resolution": 2000,
                              "reselect_every": 0, **calibrate.CALIB_DEFAULTS},
    greentrainer_init, CALIBRATION=True, MUTABLE=(ON, "kernel"), periodic=_periodic,
    update=greentrainer_update, select=greentrainer_select, knapsack=selection.knapsack)
slimfit = _member(
    "slimfit", SLIMFIT_DOC, {"targets": featurewise.LINEARS, "freeze_rate": 0.5,
                         "normalize": "weight", "reselect_every": 10},
    slimfit_init, MUTABLE=(ON, "kernel", SCORE), periodic=_periodic,
    update=slimfit_update, reselect=slimfit_reselect, logical_axes=_logical_axes,
    materialize=lambda f, t, s: hft.materialize(_strip(f), t, s),
    merge=lambda f, t, s: hft.materialize(_strip(f), t, s),
    active_params=lambda f, t: hft.active_params(_strip(f), t))
