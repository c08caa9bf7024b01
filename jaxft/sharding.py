"""Device mesh and logical-axis rules.

Every param leaf carries logical axis names (`('embed', 'mlp')`); one small table
maps them to the mesh axes `('data', 'fsdp', 'tensor')`. A dimension that does
not divide its mesh axes stays replicated instead of failing, and a mesh axis is
used at most once per array.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes it is split over (in order of preference).
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "lora_rank": (),
    "layers": (),
    "norm": (),
    "pos": (),
    "seq": (),
}


class MeshError(ValueError):
  """A mesh shape that does not fit the devices."""


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves `{data, fsdp, tensor}` (one may be -1) to sizes whose product is the device count."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise MeshError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes (product {fixed}) "
                      f"do not divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise MeshError(
        f"mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)} but there are "
        f"{num_devices} devices; set mesh.data/mesh.fsdp/mesh.tensor so the product is "
        f"{num_devices} (one of them may be -1 to fill)")
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh with automatic (GSPMD) axis types."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == jax.devices():
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return jax.sharding.Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh,
                    rules: Mapping[str, tuple[str, ...]] = RULES) -> P:
  """PartitionSpec for one array from its logical axis names."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    if name is not None and name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule (known: {', '.join(sorted(rules))})")
    chosen = []
    for mesh_axis in rules.get(name, ()) if name else ():
      size = mesh.shape[mesh_axis]
      if mesh_axis in used or size == 1:
        continue
      if dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
        chosen.append(mesh_axis)
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return P(*spec)


def is_axes(x: Any) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def tree_shardings(axes_tree, abstract_tree, mesh: jax.sharding.Mesh):
  """NamedShardings for `abstract_tree` (arrays or ShapeDtypeStructs) from a logical-axes tree."""
  return jax.tree.map(
      lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)),
      axes_tree, abstract_tree, is_leaf=is_axes)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batch rows split over data and fsdp; sequence not split."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def bytes_per_device(tree) -> dict[int, int]:
  """Bytes each device holds for `tree`, measured from the arrays' actual shards."""
  out: dict[int, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return out


def constrain_activations(apply, mesh: jax.sharding.Mesh):
  """Wraps a model `apply` so every linear's input keeps its rows split over (data, fsdp).

  Without it, GSPMD may meet an FSDP weight (split on its input dim over 'fsdp') and
  a batch (rows split over 'fsdp') by all-gathering the *batch*: every chip then
  holds the whole batch's activations (seen compiling Llama-3-8B for v5p-64: 32x
  the activation memory). The constraint goes through the model's `linear` hook, so
  the model stays mesh-free; the last dim is left to the partitioner (tensor parallel).
  """
  batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1) or None

  def spec(ndim: int) -> P:
    return P(batch_axes, *([None] * (ndim - 2)), P.UNCONSTRAINED)

  def wrapped(params, tokens, *, linear=None, **kw):
    from jaxft.models.layers import dense  # pylint: disable=g-import-not-at-top
    inner = linear or dense

    def hook(p, x, name, rng):
      x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(x.ndim)))
      return inner(p, x, name, rng)

    for attr in ("mlp",):  # hooks may carry more than the call (a whole-FFN replacement)
      if hasattr(inner, attr):
        setattr(hook, attr, getattr(inner, attr))
    out = apply(params, tokens, linear=hook, **kw)
    if isinstance(out, tuple):  # (logits, cache): decoding, left alone
      return out
    # The logits too: else a tied lm head (an FSDP-split embedding) may be met by gathering rows.
    return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, spec(out.ndim)))

  return wrapped
