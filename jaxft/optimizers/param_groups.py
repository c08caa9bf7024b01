"""Layer-wise learning-rate decay.

Paper: "Fine-Tuning Large Neural Language Models for Biomedical Natural Language
Processing". Layer l of L (1 = next to the input) gets lr * xi^(L - l), the
embeddings lr * xi^L, everything above the last layer (final norm, head) lr;
xi = 0.9 (0.8-0.95 in the paper).

The layers here are stacked on a leading axis (one leaf holds all L layers), so a
`multi_transform` over per-layer labels cannot split them; instead the final
update of each leaf is scaled by a per-layer vector along that axis. For every
optimizer whose last stage multiplies by the learning rate (all of optax's and
ours), this is exactly the per-layer learning rate, and it needs no state.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def layer_scales(params, decay: float, layers_key: str = "layers",
                 embed_keys: Sequence[str] = ("embed", "pos_embed")):
  """Per-leaf multipliers: (L,) vectors for stacked layers, scalars elsewhere."""
  n_layers = max([p.shape[0] for path, p in jax.tree_util.tree_leaves_with_path(params)
                  if layers_key in _path(path).split("/")] or [0])

  def leaf(path, p):
    parts = _path(path).split("/")
    if layers_key in parts:
      exps = n_layers - 1 - jnp.arange(p.shape[0], dtype=jnp.float32)
      return jnp.power(jnp.float32(decay), exps)
    if parts[0] in embed_keys:
      return jnp.float32(decay) ** n_layers
    return jnp.float32(1.0)
  return jax.tree_util.tree_map_with_path(leaf, params)


def layerwise_lr_decay(inner: optax.GradientTransformation, decay: float = 0.9,
                       layers_key: str = "layers") -> optax.GradientTransformationExtraArgs:
  """Scales `inner`'s update of layer l by decay^(L - l) (embeddings decay^L, head 1)."""
  if not 0.0 < decay <= 1.0:
    raise ValueError(f"layer_decay must be in (0, 1], got {decay}")
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra):
    out, state = inner.update(updates, state, params, **extra)
    scales = layer_scales(out, decay, layers_key)

    def scale(u, s):
      s = s.reshape(s.shape + (1,) * (u.ndim - s.ndim)) if s.ndim else s
      return (u * s.astype(u.dtype)).astype(u.dtype)
    return jax.tree.map(scale, out, scales), state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
