"""The shared mechanism of the sparse / masked-delta adapters (SpIEL, LT-SFT, PaCA, S²FT, HFT).

Every member changes a subset of the pretrained weights W0 (stored (d_in, d_out),
stacked over layers) and keeps the rest fixed; only the changed part trains. Two
granularities, one frozen index leaf and one trainable delta leaf beside the kernel:

  element  W = W0 + scatter(η, φ)        η = `sd_idx` (…, K) flat indices into the
           (SpIEL, LT-SFT)                 d_in·d_out matrix (frozen, int32),
                                           φ = `sd_delta` (…, K)
  rows     W = W0 + scatter_rows(S, Δ)   S = `sd_rows` (…, r) input rows (frozen, int32),
           (PaCA, S²FT)                    Δ = `sd_rows_delta` (…, r, d_out)

Both run as one merged matmul y = x W whose custom VJP never forms the full weight
gradient xᵀg of a frozen W0: the element form's dφ_k = Σ_m x[m, i_k] g[m, j_k] (a
gathered dot, M·K work), the row form's dΔ = x[..., S]ᵀ g, and only x[..., S] (not x)
is saved for it. Optimizer state therefore exists only for the active entries. The
merge is exact: `materialize` returns W0 + the scattered delta. Each member is a
small module: its own `init` (the selector) and DEFAULTS; the rest is here.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.adapters import base, featurewise
from jaxft.models.layers import lead

IDX, DELTA, ROWS, ROWS_DELTA = "sd_idx", "sd_delta", "sd_rows", "sd_rows_delta"


# ------------------------------------------------------------------ the two matmuls
@jax.custom_vjp
def element_matmul(x, w, idx, phi):
  """x (…, d_in) @ (W0 + scatter(idx, φ)); idx (K,) flat into d_in·d_out, φ (K,)."""
  return x @ scatter(w, idx, phi).astype(x.dtype)


def _element_fwd(x, w, idx, phi):
  x, w, idx, phi = (p.value for p in (x, w, idx, phi))
  return x @ scatter(w, idx, phi).astype(x.dtype), (x, w, idx, phi)  # W_eff is not saved


def _element_bwd(res, g):
  x, w, idx, phi = res
  g = g.astype(x.dtype)
  dx = g @ scatter(w, idx, phi).astype(x.dtype).T
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  rows, cols = idx // w.shape[-1], idx % w.shape[-1]
  dphi = jnp.einsum("mk,mk->k", jnp.take(x2, rows, axis=1), jnp.take(g2, cols, axis=1),
                    preferred_element_type=jnp.float32).astype(phi.dtype)
  return dx, None, None, dphi  # dW0 is never formed: W0 is frozen by construction


element_matmul.defvjp(_element_fwd, _element_bwd, symbolic_zeros=True)


@jax.custom_vjp
def row_matmul(x, w, rows, delta):
  """x (…, d_in) @ W with W[rows] += Δ; rows (r,), Δ (r, d_out). Saves only x[..., rows]."""
  return x @ w.astype(x.dtype) + jnp.take(x, rows, axis=-1) @ delta.astype(x.dtype)


def _row_fwd(x, w, rows, delta):
  x, w, rows, delta = (p.value for p in (x, w, rows, delta))
  xs = jnp.take(x, rows, axis=-1)
  y = x @ w.astype(x.dtype) + xs @ delta.astype(x.dtype)
  return y, (xs, w, rows, delta)


def _row_bwd(res, g):
  xs, w, rows, delta = res
  g = g.astype(xs.dtype)
  dx = g @ w.astype(g.dtype).T
  dx = dx.at[..., rows].add(g @ delta.astype(g.dtype).T)
  ddelta = jnp.einsum("...r,...o->ro", xs, g, preferred_element_type=jnp.float32)
  return dx, None, None, ddelta.astype(delta.dtype)


row_matmul.defvjp(_row_fwd, _row_bwd, symbolic_zeros=True)


# ------------------------------------------------------------------ scatter / merge
def scatter(w, idx, phi):
  """W0 + φ at flat indices idx over the last two axes (any lead axes, matching idx/φ)."""
  *lead_shape, d_in, d_out = w.shape
  flat = w.reshape(-1, d_in * d_out)
  i, p = idx.reshape(flat.shape[0], -1), phi.reshape(flat.shape[0], -1)
  out = jax.vmap(lambda a, j, q: a.at[j].add(q.astype(a.dtype)))(flat, i, p)
  return out.reshape(w.shape)


def scatter_rows(w, rows, delta):
  """W0 with rows `rows` (…, r) increased by Δ (…, r, d_out)."""
  *lead_shape, d_in, d_out = w.shape
  flat = w.reshape(-1, d_in, d_out)
  r, d = rows.reshape(flat.shape[0], -1), delta.reshape(flat.shape[0], -1, d_out)
  out = jax.vmap(lambda a, j, q: a.at[j].add(q.astype(a.dtype)))(flat, r, d)
  return out.reshape(w.shape)


def dense_delta(shape, idx, phi):
  """The dense (…, d_in, d_out) delta of a sparse one (zeros elsewhere)."""
  return scatter(jnp.zeros(shape, phi.dtype), idx, phi)


# ------------------------------------------------------------------ selectors
def top_k_indices(scores, k: int):
  """Flat indices (…, k) of the k largest scores over the last two axes, sorted."""
  *lead_shape, d_in, d_out = scores.shape
  if not 0 < k <= d_in * d_out:
    raise ValueError(f"sparse delta: {k} entries per matrix is invalid; valid: 1..{d_in * d_out}")
  _, idx = jax.lax.top_k(scores.reshape(*lead_shape, d_in * d_out), k)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


def random_indices(key, shape, k: int):
  """k distinct uniformly random flat indices per matrix of `shape` (…, d_in, d_out)."""
  return top_k_indices(jax.random.uniform(key, shape), k)


def count(density: float, n: int) -> int:
  if not 0.0 < density <= 1.0:
    raise ValueError(f"adapter.density={density!r} is invalid; valid: 0 < density <= 1")
  return max(1, int(round(density * n)))


def element_init(frozen, spec, select):
  """(frozen + `sd_idx`, trainable `sd_delta` = 0) for every targeted linear.

  `select(i, path, w)` -> (…, K) flat indices of the linear's kernel w.
  """
  flat = base.flatten(frozen)
  train = {}
  for i, path in enumerate(featurewise.linear_targets(frozen, spec)):
    w = flat[path + "/kernel"]
    idx = select(i, path, w)
    flat[path + "/" + IDX] = idx
    train[path + "/" + DELTA] = jnp.zeros(idx.shape, w.dtype)
  return base.unflatten(flat), base.unflatten(train)


def rows_init(frozen, chosen: Mapping[str, Any]):
  """(frozen + `sd_rows`, trainable `sd_rows_delta` = 0) for {linear path: rows (…, r)}."""
  flat = base.flatten(frozen)
  train = {}
  for path, rows in chosen.items():
    w = flat[path + "/kernel"]
    flat[path + "/" + ROWS] = jnp.asarray(rows, jnp.int32)
    train[path + "/" + ROWS_DELTA] = jnp.zeros((*rows.shape, w.shape[-1]), w.dtype)
  return base.unflatten(flat), base.unflatten(train)


# ------------------------------------------------------------------ the adapter contract
_AXES = {IDX: featurewise.replicated(1), DELTA: featurewise.replicated(1),
         ROWS: featurewise.replicated(1), ROWS_DELTA: lambda lead_, ai, ao: (*lead_, None, ao)}


def logical_axes(model_axes, trainable, spec):
  """Frozen: the model's axes + replicated index leaves; trainable: deltas (lead, …)."""
  del spec
  flat_axes = base.flatten(model_axes)
  frozen_out = dict(flat_axes)
  partner = {DELTA: IDX, ROWS_DELTA: ROWS}
  for path in base.flatten(trainable):
    linear_path, leaf = path.rsplit("/", 1)
    if leaf in partner:
      *lead_ax, _, _ = flat_axes[linear_path + "/kernel"]
      frozen_out[linear_path + "/" + partner[leaf]] = (*lead_ax, None)
  return base.unflatten(frozen_out), featurewise.axes_for(model_axes, trainable, _AXES)


def combine(frozen, trainable, spec):
  del spec
  return base.merge_trees(frozen, trainable)


GRAD_IMPLS = ("sddmm", "dense")


def linear(p, x, name, rng, grad_impl: str = "sddmm"):
  """The hook: merged matmul with the frozen-W0 VJP (plain dense where no delta).

  grad_impl (element form): 'sddmm' = the gathered dot above (no full weight gradient);
  'dense' = autodiff through the scatter (forms xᵀg, then gathers: more FLOPs, but
  on CPU a GEMM beats the M·K gathers).
  """
  del name, rng
  if DELTA in p and grad_impl == "dense":
    y = x @ scatter(p["kernel"], p[IDX], p[DELTA]).astype(x.dtype)
  elif DELTA in p:
    y = element_matmul(x, p["kernel"], p[IDX], p[DELTA])
  elif ROWS_DELTA in p:
    y = row_matmul(x, p["kernel"], p[ROWS], p[ROWS_DELTA])
  else:
    y = jnp.einsum("...i,io->...o", x, p["kernel"])
  if "bias" in p:
    y = y + lead(p["bias"], y.ndim)
  return y


def linear_hook(spec):
  impl = spec.get("grad_impl", "sddmm")
  if impl not in GRAD_IMPLS:
    raise ValueError(f"adapter.grad_impl={impl!r} is invalid; valid: {', '.join(GRAD_IMPLS)}")
  return lambda p, x, name, rng: linear(p, x, name, rng, impl)


def materialize(frozen, trainable, spec):
  """Plain params: W0 + the scattered delta; index leaves dropped."""
  del spec
  flat = dict(base.flatten(frozen))
  tr = base.flatten(trainable)
  for path, value in tr.items():
    linear_path, leaf = path.rsplit("/", 1)
    w = flat[linear_path + "/kernel"]
    if leaf == DELTA:
      flat[linear_path + "/kernel"] = scatter(w, flat.pop(linear_path + "/" + IDX), value)
    elif leaf == ROWS_DELTA:
      flat[linear_path + "/kernel"] = scatter_rows(w, flat.pop(linear_path + "/" + ROWS), value)
    else:
      flat[path] = value
  for path in [p for p in flat if p.endswith("/" + IDX) or p.endswith("/" + ROWS)]:
    del flat[path]
  return base.unflatten(flat)


merge = materialize


def compose(params, *diffs):
  """θ0 + Σ sparse diffs: each diff is {linear path: (idx, φ)}; exact addition."""
  flat = dict(base.flatten(params))
  for diff in diffs:
    for path, (idx, phi) in diff.items():
      flat[path + "/kernel"] = scatter(flat[path + "/kernel"], idx, phi)
  return base.unflatten(flat)


def diff_of(frozen, trainable):
  """{linear path: (idx, φ)}: an element-granularity adapter's sparse diff, for `compose`."""
  flat = base.flatten(frozen)
  return {p.rsplit("/", 1)[0]: (flat[p.rsplit("/", 1)[0] + "/" + IDX], v)
          for p, v in base.flatten(trainable).items() if p.endswith("/" + DELTA)}


def active_params(trainable) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(trainable)))


@jax.custom_vjp
def prefix_matmul(x, w, delta):
  """x @ W with W[:r] += Δ (r, d_out): the contiguous-slice form (S²FT after co-permutation)."""
  r = delta.shape[0]
  return x @ w.astype(x.dtype) + x[..., :r] @ delta.astype(x.dtype)


def _prefix_fwd(x, w, delta):
  x, w, delta = x.value, w.value, delta.value
  xs = x[..., :delta.shape[0]]
  return x @ w.astype(x.dtype) + xs @ delta.astype(x.dtype), (xs, w, delta)


def _prefix_bwd(res, g):
  xs, w, delta = res
  g = g.astype(xs.dtype)
  r = delta.shape[0]
  dx = (g @ w.astype(g.dtype).T).at[..., :r].add(g @ delta.astype(g.dtype).T)
  ddelta = jnp.einsum("...r,...o->ro", xs, g, preferred_element_type=jnp.float32)
  return dx, None, ddelta.astype(delta.dtype)


prefix_matmul.defvjp(_prefix_fwd, _prefix_bwd, symbolic_zeros=True)
