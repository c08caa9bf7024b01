"""EVA: "One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation" (Paischer et al., 2024).

LoRA (W_eff = W0 + s A B, x W layout) with A initialised from the right-singular
vectors of each layer's input activations X (rows = calibration tokens) and B = 0,
so the model is unchanged at init; ranks are then redistributed to explain the
maximal variance:

  1. per targeted matrix (every layer of every target), the eigen-decomposition of
     X^T X gives components v_i with explained-variance ratio lambda_i / sum(lambda);
  2. over all matrices, keep the global top r * #matrices components, with at most
     rho * r per matrix (rho = 1 is uniform rank r);
  3. A = the kept components (unused columns of the rho*r-wide A are zero, and stay
     zero: with B's matching rows at 0 their gradients vanish), B = 0; alpha scales
     with each matrix's rank, so s = alpha / r everywhere.

The exact eigen-decomposition of the full calibration covariance replaces the
paper's incremental SVD over minibatches with its cosine-similarity stopping rule
(same fixed point). Tokens: `calib_tokens='loss'` (default) uses only tokens in the
loss, as the reference implementation masks label-ignored tokens; `center`
subtracts the mean [uncertain, default False].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.adapters import base, calibrate, lowrank
from jaxft.models.layers import lead

DEFAULTS = {**lowrank.COMMON, **calibrate.CALIB_DEFAULTS, "calib_tokens": "loss",
            "rho": 2.0, "center": False}
CALIBRATION = True


def components(stats, center: bool):
  """(explained-variance ratios (…, d_in) descending, eigenvectors (…, d_in, d_in) as columns)."""
  cov = stats.covariance(center)
  lam, vecs = calibrate.per_layer(jnp.linalg.eigh, cov.ndim - 2)(cov)
  lam, vecs = jnp.flip(lam, -1), jnp.flip(vecs, -1)
  lam = jnp.maximum(lam, 0.0)
  return lam / jnp.maximum(jnp.sum(lam, axis=-1, keepdims=True), 1e-30), vecs


def allocate(ratios: list, rank: int, cap: int) -> list:
  """Per-matrix ranks (…,) int32: the global top rank*#matrices ratios, each matrix <= cap.

  `ratios[k]` is (…, d) descending; the kept set of each matrix is a prefix.
  """
  cands = [r[..., :min(cap, r.shape[-1])] for r in ratios]
  flat = jnp.concatenate([c.reshape(-1) for c in cands])
  budget = min(rank * sum(c[..., 0].size for c in cands), flat.size)
  keep = jnp.zeros(flat.shape, jnp.int32).at[jax.lax.top_k(flat, budget)[1]].set(1)
  out, start = [], 0
  for c in cands:
    out.append(jnp.sum(keep[start:start + c.size].reshape(c.shape), axis=-1))
    start += c.size
  return out


def init_matrix(key, w, spec, stats):
  """Uniform EVA for one matrix (rho = 1): the top-r components (used for shapes)."""
  del key
  rank = lowrank.check_rank(spec, w)
  _, vecs = components(stats, bool(spec.get("center", False)))
  return {"lora_a": vecs[..., :rank], "lora_b": jnp.zeros((*w.shape[:-2], rank, w.shape[-1]))}


def _init(key, frozen, spec, calib=None):
  del key
  rank = lowrank.check_rank(spec)
  rho = float(spec["rho"])
  if rho < 1.0:
    raise ValueError(f"adapter.rho must be >= 1 (1 = uniform ranks), got {rho}")
  paths = MEMBER.targets(frozen, spec)
  stats = MEMBER.statistics(frozen, spec, calib, paths)
  flat = base.flatten(frozen)
  comps = [components(stats[p], bool(spec["center"])) for p in paths]
  cap = int(round(rho * rank))
  ranks = allocate([c[0] for c in comps], rank, cap)
  trainable = {}
  for path, (_, vecs), r_i in zip(paths, comps, ranks):
    w = flat[path + "/kernel"]
    width = min(cap, w.shape[-2])
    used = (lead(jnp.arange(width), r_i.ndim + 1) < r_i[..., None]).astype(jnp.float32)
    a = vecs[..., :width] * jnp.expand_dims(used, -2)
    trainable[path + "/lora_a"] = a.astype(w.dtype)
    trainable[path + "/lora_b"] = jnp.zeros((*w.shape[:-2], width, w.shape[-1]), w.dtype)
  return frozen, base.unflatten(trainable)


def ranks(trainable) -> dict:
  """{linear path: per-layer ranks} of an EVA init (non-zero columns of A)."""
  return {p.rsplit("/", 1)[0]: jnp.sum(jnp.any(v != 0, axis=-2), axis=-1)
          for p, v in base.flatten(trainable).items() if p.endswith("lora_a")}


MEMBER = calibrate.Calibrated(
    name="eva", doc=__doc__, defaults=DEFAULTS, init_matrix=init_matrix, needs_cov=True,
    peft="lora")
_, logical_axes, combine, linear_hook, materialize, merge = MEMBER.functions()
init = _init
