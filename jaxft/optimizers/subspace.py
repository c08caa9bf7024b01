"""Orthogonal-subspace full fine-tuning for continual learning.

Paper: "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual
Learning". At the start of a task each targeted matrix is split by SVD,

    W = U_h S_h V_h^T + U_l S_l V_l^T,

and the high-rank part (the previous tasks' directions) is frozen: gradients are
projected away from it, dW <- (I - U_h U_h^T) dW (I - V_h V_h^T), which is the
paper's dU_l -= U_h U_h^T dU_l, dV_l -= V_h V_h^T dV_l written on W. Adam's
elementwise scaling breaks that orthogonality, so the final update is projected
again (`reproject_params`, default True): U_h^T W V_h = S_h stays fixed and the
trained part stays orthogonal to U_h and V_h. Only the bases live in the state.

Kept rank per layer: floor((mrr + I (trr - mrr)) min(m, n)), I in [0, 1] the layer
importance [uncertain: the paper scores layers from activations; `importance`
'uniform' uses I = 0.5, 'depth' I = l / (L - 1)]. Stacked layers (leading axis)
each get their own SVD. A new task = a new run from the previous task's params
(the bases are recomputed at `init`).
"""
from __future__ import annotations

import math
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxft import names

IMPORTANCE = ("uniform", "depth")


class OrthogonalSubspaceState(NamedTuple):
  u: Any      # per leaf (..., m, n): kept left singular vectors in the first k columns, zeros after
  vt: Any     # per leaf (..., m, n): kept right singular vectors (transposed) in the first k rows
  inner: Any  # the wrapped optimizer's state


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def kept_ranks(shape: Sequence[int], path: str, mrr: float, trr: float, importance: str):
  """Kept (frozen) rank of each stacked matrix of a leaf of `shape`."""
  if importance not in IMPORTANCE:
    raise ValueError(names.unknown_message("optimizer.importance", importance, IMPORTANCE))
  *lead, m, n = shape
  count = math.prod(lead)
  if importance == "depth" and "layers" in path.split("/") and count > 1:
    imp = [i / (count - 1) for i in range(count)]
  else:
    imp = [0.5] * count
  return [int((mrr + i * (trr - mrr)) * min(m, n)) for i in imp]


def _bases(p, path, mrr, trr, importance):
  *lead, m, n = p.shape
  ks = kept_ranks(p.shape, path, mrr, trr, importance)
  kmax = max(ks)
  u, _, vt = jnp.linalg.svd(p.astype(jnp.float32).reshape(-1, m, n), full_matrices=False)
  mask = (jnp.arange(kmax)[None, :] < jnp.asarray(ks)[:, None]).astype(jnp.float32)  # (count, kmax)
  u = u[:, :, :kmax] * mask[:, None, :]
  vt = vt[:, :kmax, :] * mask[:, :, None]
  # Stored padded to the parameter's own shape, so the state shards exactly like it.
  u = jnp.pad(u, ((0, 0), (0, 0), (0, n - kmax))).reshape(*lead, m, n).astype(p.dtype)
  vt = jnp.pad(vt, ((0, 0), (0, m - kmax), (0, 0))).reshape(*lead, m, n).astype(p.dtype)
  return u, vt


def project(g, u, vt, k: int | None = None):
  """(I - U U^T) g (I - V V^T) for one leaf, U = u[..., :k], V^T = vt[..., :k, :]."""
  if u.size == 0:
    return g
  if k is not None:
    u, vt = u[..., :k].astype(jnp.float32), vt[..., :k, :].astype(jnp.float32)
  x = g.astype(jnp.float32)
  x = x - jnp.einsum("...mk,...kn->...mn", u, jnp.einsum("...mk,...mn->...kn", u, x))
  x = x - jnp.einsum("...mk,...kn->...mn", jnp.einsum("...mn,...kn->...mk", x, vt), vt)
  return x.astype(g.dtype)


def orthogonalize(inner: optax.GradientTransformation,
                  targets: Sequence[str] = (r"(attn|mlp)/\w+/kernel$",), mrr: float = 0.1,
                  trr: float = 0.8, importance: str = "uniform",
                  reproject_params: bool = True) -> optax.GradientTransformation:
  """Runs `inner` on gradients projected off each targeted matrix's top singular subspace."""
  if not 0.0 <= mrr <= trr <= 1.0:
    raise ValueError(f"need 0 <= optimizer.mrr <= optimizer.trr <= 1, got mrr={mrr}, trr={trr}")
  pattern = re.compile("|".join(f"(?:{t})" for t in targets))
  targeted = lambda name, p: p.ndim >= 2 and pattern.search(name) is not None

  def init_fn(params):
    def one(which):
      def leaf(path, p):
        name = _path(path)
        if not targeted(name, p):  # full-size zeros: orbax saves no empty arrays, and the
          return jnp.zeros_like(p)  # state must shard like the params under any mesh
        return _bases(p, name, mrr, trr, importance)[which]
      return jax.tree_util.tree_map_with_path(leaf, params)
    return OrthogonalSubspaceState(one(0), one(1), inner.init(params))

  def update_fn(updates, state, params=None):
    def leaf(path, g, u, vt):
      if not targeted(_path(path), g):
        return g
      return project(g, u, vt, max(kept_ranks(g.shape, _path(path), mrr, trr, importance)))
    proj = lambda tree: jax.tree_util.tree_map_with_path(leaf, tree, state.u, state.vt)
    out, inner_state = inner.update(proj(updates), state.inner, params)
    if reproject_params:  # Adam's elementwise scaling leaves the complement: project again
      out = proj(out)
    return out, OrthogonalSubspaceState(state.u, state.vt, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def orthogonal_subspace(learning_rate, mrr: float = 0.1, trr: float = 0.8,
                        importance: str = "uniform", reproject_params: bool = True,
                        b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                        weight_decay: float = 0.0,
                        targets: Sequence[str] = (r"(attn|mlp)/\w+/kernel$",)):
  """AdamW on projected gradients, its update projected again (reproject_params)."""
  adam = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return orthogonalize(adam, targets, mrr, trr, importance, reproject_params)


def _orthogonal_subspace(lr, spec):
  """Sculpting Subspaces: AdamW orthogonal to each matrix's top singular directions."""
  return orthogonal_subspace(lr, spec["mrr"], spec["trr"], spec["importance"],
                             spec["reproject_params"], spec["b1"], spec["b2"], spec["eps"],
                             spec["weight_decay"], tuple(spec["targets"]))


REGISTRY = {
    "orthogonal_subspace": (_orthogonal_subspace, {
        "mrr": 0.1, "trr": 0.8, "importance": "uniform", "reproject_params": True,
        "b1": 0.9, "b2": 0.999, "eps": 1e-8, "targets": (r"(attn|mlp)/\w+/kernel$",)}),
}
