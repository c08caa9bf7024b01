"""The calibration pass of the data-driven initialisers (EVA, CorDA, LoRA-GA, LoRA-SB).

One pass over k real training batches (from the run's own pipeline, sharded like
training) gives, for every targeted linear y = x W (W stored (d_in, d_out), stacked
over layers):

  cov    C = sum_t w_t x_t x_t^T     (d_in, d_in) per layer, the input covariance
  total  sum_t w_t x_t               (d_in,) per layer (for mean-centring)
  count  sum_t w_t                   scalar, the calibration token count
  grad   G = mean over batches of dL/dW   (d_in, d_out) per layer, the full-FT gradient

w_t is a token weight: 'all' = every non-padding token, 'loss' = tokens whose target
is in the loss (the prompt-masked SFT label mask).

Layers run under `lax.scan`, so per-layer inputs cannot simply be collected from the
forward pass. Instead the model runs with zero "probe" leaves beside each targeted
kernel and one backward pass does everything: an identity `tap(x, probe)` whose
custom VJP returns sum_t w_t x_t x_t^T as the probe's cotangent, so the gradient
w.r.t. the probes *is* the covariance, stacked per layer by the scan; the gradient
w.r.t. the kernels is G. It all runs inside the jitted, sharded state init.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxft.adapters import base, lowrank
from jaxft.models.layers import dense

TOKENS = ("all", "loss")


class Calibration(NamedTuple):
  """What `adapter.init(key, frozen, spec, calib)` receives for a data-driven member."""
  apply: Callable              # model apply(params, tokens, *, positions, segment_ids, linear, rng)
  objective: Callable          # loss_fn(logits, batch, spec) -> (loss, metrics)
  objective_spec: Mapping[str, Any]
  batches: Mapping[str, jax.Array]   # each (k, B, L): k calibration batches


class Stats(NamedTuple):
  """Per-linear calibration statistics (leading `layers` axis kept when the kernel has one)."""
  count: jax.Array             # () float32
  cov: Any = None              # (*lead, d_in, d_in)
  total: Any = None            # (*lead, d_in)
  grad: Any = None             # (*lead, d_in, d_out)

  def covariance(self, center: bool = False):
    """C / count, optionally minus the mean's outer product."""
    c = self.cov / jnp.maximum(self.count, 1.0)
    if center:
      mu = self.total / jnp.maximum(self.count, 1.0)
      c = c - mu[..., :, None] * mu[..., None, :]
    return c


def stack(batches: Sequence[Mapping[str, Any]]) -> dict[str, jax.Array]:
  """[batch dict] -> one dict of (k, B, L) arrays."""
  return {k: jnp.stack([jnp.asarray(b[k]) for b in batches]) for k in batches[0]}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _tap(x, cov_probe, total_probe, weights, diag):
  del cov_probe, total_probe, weights, diag
  return x


def _tap_fwd(x, cov_probe, total_probe, weights, diag):
  del cov_probe, total_probe, diag
  return x, (x, weights)


def _tap_bwd(diag, res, g):
  x, weights = res
  d = x.shape[-1]
  xf = x.reshape(-1, d).astype(jnp.float32)
  wx = xf * weights.reshape(-1, 1).astype(jnp.float32)
  if diag:
    cov = jnp.sum(wx * xf, axis=0)
  else:
    cov = jnp.einsum("ti,tj->ij", wx, xf, precision=jax.lax.Precision.HIGHEST)
  return g, cov, jnp.sum(wx, axis=0), jnp.zeros_like(weights)


_tap.defvjp(_tap_fwd, _tap_bwd)


def token_weights(batch: Mapping[str, jax.Array], tokens: str) -> jax.Array:
  if tokens not in TOKENS:
    raise ValueError(f"calibration tokens={tokens!r} is invalid; valid choices: {TOKENS}")
  if tokens == "loss" and "loss_mask" in batch:
    return batch["loss_mask"].astype(jnp.float32)
  if "segment_ids" in batch:
    return (batch["segment_ids"] > 0).astype(jnp.float32)
  return jnp.ones(batch["tokens"].shape, jnp.float32)


def _hook(weights, diag):
  def linear(p, x, name, rng):
    if "calib_cov" in p:
      x = _tap(x, p["calib_cov"], p["calib_total"], weights, diag)
    return dense(p, x, name, rng)
  return linear


def statistics(calib: Calibration, params, paths: Sequence[str], *, cov: bool = False,
               grad: bool = False, tokens: str = "all", diag: bool = False
               ) -> dict[str, Stats]:
  """{linear path: Stats} over all calibration batches (see the module docstring).

  `diag=True` keeps only the diagonal of C (per-channel sums of squares, (*lead, d_in)).
  """
  if not cov and not grad:
    raise ValueError("calibration.statistics: ask for cov and/or grad")
  flat = {k: v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v
          for k, v in base.flatten(params).items()}
  diff = {}
  for path in paths:
    w = flat[path + "/kernel"]
    *lead, d_in, _ = w.shape
    if grad:
      diff[path + "/kernel"] = w
    if cov:
      shape = (*lead, d_in) if diag else (*lead, d_in, d_in)
      diff[path + "/calib_cov"] = jnp.zeros(shape, jnp.float32)
      diff[path + "/calib_total"] = jnp.zeros((*lead, d_in), jnp.float32)
  rest = {k: v for k, v in flat.items() if k not in diff}

  def loss(d, batch):
    p = base.unflatten({**rest, **d})
    logits = calib.apply(p, batch["tokens"], positions=batch.get("positions"),
                         segment_ids=batch.get("segment_ids"),
                         linear=_hook(token_weights(batch, tokens), diag), rng=None)
    return calib.objective(logits, batch, calib.objective_spec)[0]

  def body(acc, batch):
    g = jax.grad(loss)(diff, batch)
    n = jnp.sum(token_weights(batch, tokens))
    return jax.tree.map(jnp.add, acc, (g, n)), None

  zeros = jax.tree.map(jnp.zeros_like, (diff, jnp.zeros((), jnp.float32)))
  (sums, count), _ = jax.lax.scan(body, zeros, dict(calib.batches))
  k = jax.tree.leaves(calib.batches)[0].shape[0]
  out = {}
  for path in paths:
    out[path] = Stats(
        count=count,
        cov=sums.get(path + "/calib_cov"), total=sums.get(path + "/calib_total"),
        grad=None if not grad else sums[path + "/kernel"] / k)
  return out


def require(calib, name: str):
  """The calibration object, or a clear error for a data-driven member called without one."""
  if calib is None:
    raise ValueError(
        f"adapter {name!r} is a data-driven initialiser: it needs calibration batches "
        "(jaxft.build passes them; set adapter.calib_batches >= 1), got calib=None")
  return calib


# Config fields every data-driven member adds to the low-rank ones.
CALIB_DEFAULTS = {"calib_batches": 4, "calib_tokens": "all"}


@dataclasses.dataclass(frozen=True)
class Calibrated(lowrank.Member):
  """A low-rank member whose initialiser reads calibration statistics.

  `init_matrix(key, w, spec, stats)` gets the target's `Stats` (cov and/or grad,
  stacked over layers like `w`); everything else is the shared low-rank machinery.
  """
  needs_cov: bool = False
  needs_grad: bool = False

  def statistics(self, frozen, spec, calib, paths):
    return statistics(require(calib, self.name), frozen, paths, cov=self.needs_cov,
                      grad=self.needs_grad, tokens=spec.get("calib_tokens", "all"))


per_layer = lowrank.per_layer  # one matrix at a time (batched LAPACK can deadlock on XLA:CPU)
