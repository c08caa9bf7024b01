"""Low-rank gradient projection (GaLore), the building block of Fira.

From "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"
(Zhao et al., 2024), as used by "Fira: Can We Achieve Full-rank Training of LLMs
Under Low-rank Constraint?". For a matrix gradient G (the last two axes; leading
axes, e.g. stacked layers, are a batch), every `update_proj_gap` steps

    P = top-r left singular vectors of G        if m >= n  (R = P^T G,   r x n)
    P = top-r right singular vectors of G       if m <  n  (R = G P,     m x r)

and the optimizer state lives on R. The same orientation as `optax.contrib.galore`.
Internally a matrix is put in "tall" form X (X = G, or G^T when m < n) so that
always R = P^T X and the update maps back with P R.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxft.optimizers import core


def projectable(path, p, rank: int) -> bool:
  """A weight matrix (not a norm gain or bias) whose smaller side exceeds `rank`."""
  return (p.ndim >= 2 and core._leaf_name(path) not in core.NO_DECAY_NAMES  # pylint: disable=protected-access
          and min(p.shape[-2:]) > rank)


def is_tall(shape) -> bool:
  return shape[-2] >= shape[-1]


def to_tall(x, tall: bool):
  return x if tall else jnp.swapaxes(x, -1, -2)


def from_tall(x, tall: bool):
  return to_tall(x, tall)


def shapes(p, rank: int):
  """(projector shape (..., big, r), low-rank shape (..., r, small))."""
  big, small = (p.shape[-2], p.shape[-1]) if is_tall(p.shape) else (p.shape[-1], p.shape[-2])
  return (*p.shape[:-2], big, rank), (*p.shape[:-2], rank, small)


def projector(g, rank: int):
  """P (..., big, r) from the SVD of g (float32), as in optax.contrib.galore."""
  u, _, vh = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
  if is_tall(g.shape):
    return u[..., :rank].astype(g.dtype)
  return jnp.swapaxes(vh[..., :rank, :], -1, -2).astype(g.dtype)


def project(g, proj):
  """R = P^T X: (..., r, small)."""
  return jnp.swapaxes(proj, -1, -2) @ to_tall(g, is_tall(g.shape))


def project_back(r, proj, shape):
  """P R in the original orientation."""
  return from_tall(proj @ r, is_tall(shape))
