"""Shared kernel plumbing: interpret switch, platform dispatch, ragged padding, meshes, TPU AOT.

Every op in `kernels/<op>/` follows the layout of jax's `experimental/pallas/ops`:
`kernel.py` (the `pallas_call`s), `ops.py` (the public op with `interpret=`, its
`custom_vjp` and a `shard_map` wrapper) and `reference.py` (pure jnp, `<op>_reference`).

Conventions used by all ops:

* `interpret=None` means "interpret when the default backend is the CPU": the
  same code runs in CPU CI (slow, for correctness only) and lowers for real on a
  GPU or TPU. `interpret=True/False` forces it.
* One op may carry two kernel bodies: `'grid_k'` (TPU Mosaic and interpret mode: the
  reduction is the last, "arbitrary" grid axis and an f32 VMEM scratch accumulates)
  and `'loop_k'` (GPU Triton: every grid axis is parallel, the reduction is a
  `fori_loop` inside the kernel). `on_platform` picks the body at *lowering* time
  (`lax.platform_dependent`), so a CPU host can ahead-of-time compile the TPU body.
* Ragged shapes are zero-padded up to whole blocks (`pad_dim`) and the result is
  sliced back: zero padding is exact for every contraction used here.
* Pallas has no reverse-mode autodiff: every public op is a `jax.custom_vjp`.
  Mosaic kernels are not partitioned automatically, so the `*_sharded` wrappers
  run the op inside `jax.shard_map` (`check_vma=False`, see JAX_NOTES.md).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = ("grid_k", "loop_k")

# Tile alignment of the last two block dims per kernel family: Mosaic TPU wants
# (8, 128) (16 sublanes for 16-bit types, set by `sublane`); Triton wants powers of two.
TPU_LANE = 128


def sublane(dtype) -> int:
  """Second-to-last tile dim on TPU for `dtype` (8 for 32-bit, 16 for 16-bit, 32 for 8-bit)."""
  return {4: 8, 2: 16, 1: 32}.get(jnp.dtype(dtype).itemsize, 8)


def resolve_interpret(interpret: Optional[bool]) -> bool:
  """None -> interpret only when JAX's default backend is the CPU."""
  if interpret is None:
    return jax.default_backend() == "cpu"
  return bool(interpret)


def check_variant(variant: str) -> str:
  if variant not in VARIANTS:
    raise ValueError(f"kernel variant must be one of {VARIANTS}, got {variant!r}")
  return variant


def on_platform(interpret: bool, build: Callable[[str], Callable[..., Any]],
                *args, variant: Optional[str] = None):
  """Run `build(variant)(*args)` with the variant that fits where it lowers.

  In interpret mode `variant` (default 'grid_k') is used as given, so both kernel
  bodies are testable on CPU. Otherwise the TPU lowering gets 'grid_k' and GPU
  lowerings get 'loop_k' (or `variant` when given), chosen by `lax.platform_dependent`.
  """
  if interpret:
    return build(check_variant(variant or "grid_k"))(*args)
  if variant is not None:
    return build(check_variant(variant))(*args)
  return jax.lax.platform_dependent(
      *args, tpu=build("grid_k"), cuda=build("loop_k"), rocm=build("loop_k"),
      default=build("grid_k"))


def round_up(n: int, m: int) -> int:
  return -(-int(n) // int(m)) * int(m)


def pow2_ceil(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def block_size(dim: int, preferred: int, align: int, *, pow2: bool = False) -> int:
  """Block length for an axis of length `dim`: `preferred`, shrunk for small dims.

  Small axes get one block of `dim` rounded up to `align` (a power of two with
  `pow2`, for Triton), so tiny and ragged shapes still tile.
  """
  if dim <= 0 or preferred <= 0 or align <= 0:
    raise ValueError(f"block_size needs positive sizes, got dim={dim}, preferred={preferred}, align={align}")
  b = round_up(min(preferred, dim), align)
  return pow2_ceil(b) if pow2 else b


def pad_dim(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
  """Pad `axis` of `x` at the end up to a multiple of `multiple` (no copy when aligned)."""
  n = x.shape[axis]
  extra = round_up(n, multiple) - n
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def pad_to(x: jax.Array, shape: Sequence[int], value=0) -> jax.Array:
  """Pad every axis of `x` at the end up to `shape`."""
  widths = [(0, int(t) - int(s)) for s, t in zip(x.shape, shape)]
  if any(w < 0 for _, w in widths):
    raise ValueError(f"pad_to: target {tuple(shape)} smaller than {x.shape}")
  return x if not any(w for _, w in widths) else jnp.pad(x, widths, constant_values=value)


def compiler_params(variant: str, dimension_semantics: Sequence[str], *,
                    num_warps: int = 4, num_stages: int = 3):
  """Backend compiler params for the variant (TPU dimension semantics or Triton warps)."""
  if variant == "grid_k":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=tuple(dimension_semantics))
  from jax.experimental.pallas import triton as pltriton
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def vmem_scratch(shape, dtype=jnp.float32):
  """A VMEM scratch buffer (the 'grid_k' accumulator; also works in interpret mode)."""
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.VMEM(tuple(shape), dtype)


def flatten_leading(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
  """(..., d) -> ((prod(...), d), lead shape) so ops see plain matrices."""
  lead = x.shape[:-1]
  return x.reshape(math.prod(lead), x.shape[-1]), lead


def shard_mapped(fn: Callable[..., Any], mesh, in_specs, out_specs) -> Callable[..., Any]:
  """`jax.shard_map` with `check_vma=False` (Pallas calls carry no varying-axis types)."""
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def cpu_mesh(shape: Sequence[int] = (8,), names: Sequence[str] = ("data",)):
  """A mesh over the first prod(shape) local devices with Auto axes (tests, benches)."""
  n = math.prod(shape)
  devices = np.array(jax.devices()[:n]).reshape(tuple(shape))
  return jax.sharding.Mesh(devices, tuple(names),
                           axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


# ---------------------------------------------------------------------------
# Ahead-of-time TPU compilation on a CPU host (needs libtpu: `pip install "jax[tpu]"`).

def has_libtpu() -> bool:
  try:
    import libtpu  # noqa: F401
  except ImportError:
    return False
  return True


@functools.lru_cache(maxsize=None)
def tpu_topology_mesh(topology: str = "v5e:2x2", names: tuple[str, ...] = ("data",)):
  """A mesh over the devices of a TPU topology this host does not have (AOT only)."""
  import os
  # Several processes (parallel test runs) may load libtpu; its lockfile would refuse all but one.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  devices = np.array(topo.devices)
  shape = (devices.size,) + (1,) * (len(names) - 1)
  return jax.sharding.Mesh(devices.reshape(shape), names,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def tpu_aot_compile(fn: Callable[..., Any], args: Sequence[jax.ShapeDtypeStruct],
                    in_specs, out_specs, *, topology: str = "v5e:2x2",
                    names: tuple[str, ...] = ("data",)):
  """Lower `fn` (a Pallas op, `interpret=False`) for TPU through Mosaic and compile it.

  `fn` runs per device inside `jax.shard_map` over a mesh of the topology's chips;
  `args` are global abstract shapes. Returns the compiled executable (its
  `as_text()` shows the Mosaic custom call); raises if the kernel does not lower.
  """
  mesh = tpu_topology_mesh(topology, tuple(names))
  mapped = shard_mapped(fn, mesh, tuple(in_specs), out_specs)
  abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.NamedSharding(mesh, spec))
              for a, spec in zip(args, in_specs)]
  return jax.jit(mapped).lower(*abstract).compile()


def rel_l2(a, b) -> float:
  """||a - b|| / ||b|| in float64 (the bf16 tolerance measure of METHODS.md)."""
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---------------------------------------------------------------------------
# Test helpers shared by the kernel test files.

def jit_value_and_vjp(f: Callable[..., Any], args: Sequence[Any], cot: jax.Array):
  """Jitted (y, cotangents of <y, cot> for every argument): one compile per check."""
  def run(*args):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(cot.astype(y.dtype))
  return jax.jit(run)(*args)


def dot_output_shapes(jaxpr) -> list[tuple[int, ...]]:
  """Output shapes of every dot_general outside Pallas kernels, searched recursively."""
  import jax.extend
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(tuple(eqn.outvars[0].aval.shape))
    if eqn.primitive.name == "pallas_call":
      continue
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += dot_output_shapes(sub)
  return out
