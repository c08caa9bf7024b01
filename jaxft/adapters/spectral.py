"""Frequency-domain adapters: a sparse learnable spectrum, transformed back to a weight update.

LoCA — "LoCA: Location-Aware Cosine Adaptation for Parameter-Efficient Fine-Tuning"
(Du et al., 2025). For a kernel W0 (d_in, d_out):

    ΔW = α · C_inᵀ Z C_out        (orthonormal 2-D inverse DCT-II, `jax.scipy.fft.idctn`)

Z holds n learnable coefficients (init 0, so ΔW = 0) at discrete locations,
so ‖ΔW‖_F = α‖Z‖_F. The dense spectral gradient ∂L/∂Z = α C_in G C_outᵀ (the 2-D
DCT of G = ∂L/∂ΔW, which autodiff of the iDCT gives) scores moves: a location
(r, c) = (r0, c0) + round(loc_scale · shift) has the finite-difference gradient
∂L/∂r ≈ z · (∂L/∂Z[r+1, c] − ∂L/∂Z[r−1, c]) / 2 (and likewise in c), so the
optimizer moves the trainable `loca_shift` and each coefficient hops to a
neighbouring frequency when its shift crosses half a cell. `loc_scale=0` keeps
the (random, per-layer) initial locations fixed. The paper alternates coefficient
and location steps and freezes locations after a warm-up; here both move every
step (a schedule would need the train loop).

FourierFT — "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform" (Gao
et al., 2024), the iDFT baseline LoCA compares against:

    ΔW = α · Re(iDFT2(F))          (numpy normalisation: 1/(d_in d_out))

F is zero except n fixed random locations (one seed shared by every layer and
every kernel of the same shape) holding trainable real coefficients (init zeros,
or N(0, 1) with `coef_init='normal'`).

Both merge exactly (W0 + ΔW). The update is formed densely per layer inside the
linear hook (x (W0 + ΔW): one matmul); a fused kernel could skip materialising it.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.adapters import base, featurewise
from jaxft.models import decoder

FOURIER_DEFAULTS = {"targets": (r"attn/(q|v)$",), "n_frequency": 1000, "scale": 150.0,
                    "loc_seed": 777, "coef_init": "zeros"}
LOCA_DEFAULTS = {"targets": (r"attn/(q|v)$",), "n_frequency": 1000, "scale": 1.0,
                 "loc_scale": 100.0}
COEF_INITS = ("zeros", "normal")


def _per_layer(fn, coef, *rest):
  """fn(coef_N, *rest) for one layer, mapped over coef's (and rest's) leading layer axes."""
  lead = coef.shape[:-1]
  if not lead:
    return fn(coef, *rest)
  flat = [a.reshape(-1, *a.shape[len(lead):]) for a in (coef, *rest)]
  out = jax.vmap(fn)(*flat)
  return out.reshape(*lead, *out.shape[1:])


def _count(spec, d_in: int, d_out: int, path: str) -> int:
  n = int(spec["n_frequency"])
  if not 1 <= n <= d_in * d_out:
    raise ValueError(f"adapter.n_frequency={n} must be in [1, {d_in * d_out}] for {path} "
                     f"({d_in}x{d_out})")
  return n


# ------------------------------------------------------------------ FourierFT


def fourier_delta(coef_N, index_N, d_in: int, d_out: int, scale: float):
  """α Re(iDFT2(F)) (d_in, d_out), F zero except F.flat[index] = coef (one layer)."""
  f = jnp.zeros((d_in * d_out,), jnp.float32).at[index_N].add(coef_N.astype(jnp.float32))
  return scale * jnp.real(jnp.fft.ifft2(f.reshape(d_in, d_out)))


def fourier_init(key, frozen, spec: Mapping[str, Any], calib=None):
  """-> (frozen + 'spectral_index' (…, n) int32, trainable 'spectral_coef' (…, n))."""
  del calib
  if spec["coef_init"] not in COEF_INITS:
    raise ValueError(f"adapter.coef_init={spec['coef_init']!r} is invalid; valid choices: "
                     f"{', '.join(COEF_INITS)}")
  flat = base.flatten(frozen)
  trainable = {}
  for i, path in enumerate(featurewise.linear_targets(frozen, spec)):
    w = flat[path + "/kernel"]
    *lead, d_in, d_out = w.shape
    n = _count(spec, d_in, d_out, path)
    # The same locations for every layer and every kernel of this shape (shared seed).
    rng = np.random.default_rng([int(spec["loc_seed"]), d_in, d_out])
    index = rng.choice(d_in * d_out, size=n, replace=False).astype(np.int32)
    flat[path + "/spectral_index"] = jnp.broadcast_to(jnp.asarray(index), (*lead, n))
    coef = (jnp.zeros((*lead, n), w.dtype) if spec["coef_init"] == "zeros"
            else jax.random.normal(jax.random.fold_in(key, i), (*lead, n), w.dtype))
    trainable[path + "/spectral_coef"] = coef
  return base.unflatten(flat), base.unflatten(trainable)


def _fourier_kernel(p, spec):
  w = p["kernel"]
  fn = lambda c, i: fourier_delta(c, i, *w.shape[-2:], float(spec["scale"]))
  return w + _per_layer(fn, p["spectral_coef"], p["spectral_index"]).astype(w.dtype)


# ------------------------------------------------------------------ LoCA


def _neighbour_diff(g, r, c, axis: int):
  """Central (one-sided at the edges) difference of g along `axis` at (r, c)."""
  size = g.shape[axis]
  i = r if axis == 0 else c
  hi, lo = jnp.minimum(i + 1, size - 1), jnp.maximum(i - 1, 0)
  at = lambda j: g[j, c] if axis == 0 else g[r, j]
  return (at(hi) - at(lo)) / jnp.maximum(hi - lo, 1).astype(g.dtype)


def _locations(shift_Nx2, rows_N, cols_N, loc_scale, d_in, d_out):
  r = jnp.clip(rows_N + jnp.round(loc_scale * shift_Nx2[:, 0]).astype(jnp.int32), 0, d_in - 1)
  c = jnp.clip(cols_N + jnp.round(loc_scale * shift_Nx2[:, 1]).astype(jnp.int32), 0, d_out - 1)
  return r, c


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def loca_spectrum(coef_N, shift_Nx2, rows_N, cols_N, loc_scale, d_in, d_out):
  """Dense Z (d_in, d_out) with coef at the current locations (one layer)."""
  r, c = _locations(shift_Nx2, rows_N, cols_N, loc_scale, d_in, d_out)
  return jnp.zeros((d_in, d_out), jnp.float32).at[r, c].add(coef_N.astype(jnp.float32))


def _spectrum_fwd(coef_N, shift_Nx2, rows_N, cols_N, loc_scale, d_in, d_out):
  z = loca_spectrum(coef_N, shift_Nx2, rows_N, cols_N, loc_scale, d_in, d_out)
  return z, (coef_N, shift_Nx2, rows_N, cols_N)


def _spectrum_bwd(loc_scale, d_in, d_out, res, g):
  coef_N, shift_Nx2, rows_N, cols_N = res
  r, c = _locations(shift_Nx2, rows_N, cols_N, loc_scale, d_in, d_out)
  z = coef_N.astype(jnp.float32)
  d_shift = loc_scale * z[:, None] * jnp.stack(
      [_neighbour_diff(g, r, c, 0), _neighbour_diff(g, r, c, 1)], axis=-1)
  zero_int = lambda a: np.zeros(a.shape, jax.dtypes.float0)
  return (g[r, c].astype(coef_N.dtype), d_shift.astype(shift_Nx2.dtype), zero_int(rows_N),
          zero_int(cols_N))


loca_spectrum.defvjp(_spectrum_fwd, _spectrum_bwd)


def loca_delta(coef_N, shift_Nx2, rows_N, cols_N, d_in: int, d_out: int, scale: float,
               loc_scale: float):
  """α C_inᵀ Z C_out (d_in, d_out) for one layer."""
  z = loca_spectrum(coef_N, shift_Nx2, rows_N, cols_N, float(loc_scale), d_in, d_out)
  return scale * jax.scipy.fft.idctn(z, type=2, norm="ortho")


def loca_init(key, frozen, spec: Mapping[str, Any], calib=None):
  """-> (frozen + 'loca_rows'/'loca_cols' (…, n) int32, trainable coef (…, n), shift (…, n, 2))."""
  del calib
  flat = base.flatten(frozen)
  trainable = {}
  for i, path in enumerate(featurewise.linear_targets(frozen, spec)):
    w = flat[path + "/kernel"]
    *lead, d_in, d_out = w.shape
    n = _count(spec, d_in, d_out, path)
    keys = jax.random.split(jax.random.fold_in(key, i), max(1, math.prod(lead)))
    pick = jax.vmap(lambda k: jax.random.choice(k, d_in * d_out, (n,), replace=False))(keys)
    pick = pick.reshape(*lead, n).astype(jnp.int32)
    flat[path + "/loca_rows"], flat[path + "/loca_cols"] = pick // d_out, pick % d_out
    trainable[path + "/spectral_coef"] = jnp.zeros((*lead, n), w.dtype)
    trainable[path + "/loca_shift"] = jnp.zeros((*lead, n, 2), w.dtype)
  return base.unflatten(flat), base.unflatten(trainable)


def _loca_kernel(p, spec):
  w = p["kernel"]
  fn = lambda c, s, r, k: loca_delta(c, s, r, k, *w.shape[-2:], float(spec["scale"]),
                                     float(spec["loc_scale"]))
  return w + _per_layer(fn, p["spectral_coef"], p["loca_shift"], p["loca_rows"],
                        p["loca_cols"]).astype(w.dtype)


# ------------------------------------------------------------------ shared plumbing


def _make(kernel_fn, frozen_leaves):
  def linear_hook(spec):
    def linear(p, x, name, rng):
      if "spectral_coef" not in p:
        return decoder.dense(p, x, name, rng)
      return decoder.dense({**p, "kernel": kernel_fn(p, spec)}, x, name, rng)
    return linear

  def materialize(frozen, trainable, spec):
    flat = base.flatten(base.merge_trees(frozen, trainable))
    out = {k: v for k, v in base.flatten(frozen).items()
           if k.rsplit("/", 1)[-1] not in frozen_leaves}
    for path in [p.rsplit("/", 1)[0] for p in flat if p.endswith("/spectral_coef")]:
      p = {k.rsplit("/", 1)[1]: v for k, v in flat.items() if k.rsplit("/", 1)[0] == path}
      out[path + "/kernel"] = kernel_fn(p, spec)
    return base.unflatten(out)

  def logical_axes(model_axes, trainable, spec):
    del spec
    extra = {"spectral_coef": featurewise.replicated(1), "loca_shift": featurewise.replicated(2)}
    t_axes = featurewise.axes_for(model_axes, trainable, extra)
    flat = base.flatten(model_axes)
    for path in [p.rsplit("/", 1)[0] for p in base.flatten(trainable)
                 if p.endswith("/spectral_coef")]:
      lead = tuple(flat[path + "/kernel"][:-2])
      for leaf in frozen_leaves:
        flat[f"{path}/{leaf}"] = (*lead, None)
    return base.unflatten(flat), t_axes

  def combine(frozen, trainable, spec):
    del spec
    return base.merge_trees(frozen, trainable)

  return dict(linear_hook=linear_hook, materialize=materialize, merge=materialize,
              logical_axes=logical_axes, combine=combine)


fourierft = featurewise.member(
    "fourierft",
    'FourierFT: "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform" — '
    'ΔW = α Re(iDFT2(F)), n trainable coefficients at fixed random frequencies.',
    DEFAULTS=dict(FOURIER_DEFAULTS), init=fourier_init,
    **_make(_fourier_kernel, ("spectral_index",)))
loca = featurewise.member(
    "loca",
    'LoCA: "LoCA: Location-Aware Cosine Adaptation for Parameter-Efficient Fine-Tuning" — '
    'ΔW = α iDCT2(Z), n coefficients whose locations move by finite-difference gradients.',
    DEFAULTS=dict(LOCA_DEFAULTS), init=loca_init,
    **_make(_loca_kernel, ("loca_rows", "loca_cols")))
