"""SAID: "Intrinsic Dimensionality Explains the Effectiveness of Language Model Fine-Tuning" (Aghajanyan et al., 2021).

Fine-tuning in a random d-dimensional subspace of the targeted parameters:

    θ_i = θ0_i + λ_i · (P θ_d)_i,       θ_d ∈ R^d (init 0, so θ = θ0 at init),

P a Fastfood transform, per targeted leaf and per block of m = 2^⌈log2 d⌉ outputs

    P_j = H G_j Π H B_j / sqrt(m ‖G_j‖²)     (unit-norm columns),

H the unnormalised Walsh–Hadamard transform, B_j a random ±1 diagonal, G_j a
Gaussian diagonal, Π a random permutation (shared by the blocks); θ_d is
zero-padded to m, the blocks' outputs are concatenated and cut to the leaf's size.
SAID learns one scalar λ per layer and leaf (init 1, m of them, counted in the
trainable parameters); `said=False` is plain DID (λ = 1, not trained). B, G, Π
are a pure function of the adapter key (rebuilt, not checkpointed): O(D) memory,
O(D log d) time per step. The Hadamard transform is pure jnp (`fwht`); a Pallas
kernel (kernels/hadamard) could replace it. Merges exactly (`combine` is the merge).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.adapters import base
from jaxft.models import decoder

DEFAULTS = {"targets": (r"^layers/",), "dim": 1000, "said": True}
MERGEABLE = True
KEY = "said"   # frozen[KEY]: projection buffers; trainable[KEY]: theta and per-layer scales


def fwht(x: jax.Array) -> jax.Array:
  """Unnormalised fast Walsh–Hadamard transform over the last axis (a power of two)."""
  m = x.shape[-1]
  if m & (m - 1):
    raise ValueError(f"fwht needs a power-of-two length, got {m}")
  lead, h = x.shape[:-1], 1
  while h < m:
    y = x.reshape(*lead, m // (2 * h), 2, h)
    x = jnp.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], axis=-2)
    h *= 2
  return x.reshape(*lead, m)


@jax.custom_vjp
def _permute(y_NxM, perm_M, inverse_M):
  return y_NxM[:, perm_M]


def _permute_fwd(y_NxM, perm_M, inverse_M):
  return y_NxM[:, perm_M], (perm_M, inverse_M)


def _permute_bwd(res, g_NxM):
  # The transpose of a permutation is its inverse: a gather, not XLA's slow scatter-add.
  perm_M, inverse_M = res
  zero = np.zeros(perm_M.shape, jax.dtypes.float0)
  return g_NxM[:, inverse_M], zero, zero


_permute.defvjp(_permute_fwd, _permute_bwd)


def fastfood(theta_d, bits_NxM, gauss_NxM, perm_M, inverse_M=None) -> jax.Array:
  """P θ_d as a flat (N·M,) vector: N Fastfood blocks of m = M outputs each."""
  m = perm_M.shape[0]
  if inverse_M is None:
    inverse_M = jnp.argsort(perm_M)
  x = jnp.pad(theta_d.astype(jnp.float32), (0, m - theta_d.shape[0]))
  y = fwht(bits_NxM.astype(jnp.float32) * x[None])
  y = fwht(_permute(y, perm_M, inverse_M) * gauss_NxM)
  norm = jnp.sqrt(m * jnp.sum(jnp.square(gauss_NxM), axis=1, keepdims=True))
  return (y / norm).reshape(-1)


def _name(path: str) -> str:
  return path.replace("/", ".")


def _targets(tree, spec) -> list[str]:
  return base.match(base.flatten(tree), spec["targets"])


def _block_size(spec) -> int:
  d = int(spec["dim"])
  if d < 1:
    raise ValueError(f"adapter.dim must be >= 1, got {d}")
  return 1 << (d - 1).bit_length()


def _scale_shape(path: str, w) -> tuple[int, ...]:
  """One λ per layer of a stacked leaf ('layers/...'), else one for the leaf."""
  return w.shape[:1] if path.startswith("layers/") and w.ndim >= 1 else ()


def init(key, frozen, spec: Mapping[str, Any], calib=None):
  """-> (frozen + frozen['said'] buffers, {'said': {'theta': (d,), 'scale': {leaf: (L,)}}})."""
  del calib
  if KEY in frozen:
    raise ValueError(f"params already hold a top-level {KEY!r} entry")
  m, flat = _block_size(spec), base.flatten(frozen)
  k_perm, k_rest = jax.random.split(key)
  perm = jax.random.permutation(k_perm, m).astype(jnp.int32)
  buffers = {"perm": perm, "perm_inverse": jnp.argsort(perm).astype(jnp.int32)}
  scales = {}
  for i, path in enumerate(_targets(frozen, spec)):
    w = flat[path]
    n_blocks = -(-w.size // m)
    kb, kg = jax.random.split(jax.random.fold_in(k_rest, i))
    buffers[_name(path)] = {
        "bits": jax.random.rademacher(kb, (n_blocks, m), jnp.int8),
        "gauss": jax.random.normal(kg, (n_blocks, m), jnp.float32)}
    scales[_name(path)] = jnp.ones(_scale_shape(path, w), jnp.float32)
  trainable = {"theta": jnp.zeros((int(spec["dim"]),), jnp.float32)}
  if spec["said"]:
    trainable["scale"] = scales
  return {**frozen, KEY: buffers}, {KEY: trainable}


def logical_axes(model_axes, trainable, spec):
  frozen_axes = {"perm": (None,), "perm_inverse": (None,)}
  for path in _targets(model_axes, spec):
    frozen_axes[_name(path)] = {"bits": (None, None), "gauss": (None, None)}
  t_axes = jax.tree.map(lambda x: (None,) * x.ndim, trainable)
  return {**model_axes, KEY: frozen_axes}, t_axes


def combine(frozen, trainable, spec):
  """θ0 + λ · (P θ_d) for every targeted leaf: plain params the model runs (and exports)."""
  del spec
  buffers = frozen[KEY]
  flat = base.flatten({k: v for k, v in frozen.items() if k != KEY})
  theta, scales = trainable[KEY]["theta"], trainable[KEY].get("scale", {})
  for name, buf in buffers.items():
    if name in ("perm", "perm_inverse"):
      continue
    path = name.replace(".", "/")
    w = flat[path]
    delta = fastfood(theta, buf["bits"], buf["gauss"], buffers["perm"], buffers["perm_inverse"])
    delta = delta[:w.size].reshape(w.shape)
    if name in scales:
      lam = scales[name]
      delta = delta * lam.reshape(lam.shape + (1,) * (w.ndim - lam.ndim))
    flat[path] = (w + delta).astype(w.dtype)
  return base.unflatten(flat)


def linear_hook(spec):
  del spec
  return decoder.dense


materialize = merge = combine
