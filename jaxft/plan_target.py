"""Where the planner compiles for: a TPU topology described by libtpu, or the local devices.

    tgt = target("v5p:4x4x4")     # 64 v5p chips; also "v5p-128" (Cloud TPU name: 128 cores)
    tgt = target("local")         # jax.devices(); CPU peaks are measured on the spot

Valid forms are listed in `FORMS` (and in the error for anything else).
"""
from __future__ import annotations

import math
import os
import re
import time
from typing import NamedTuple, Optional

import jax

from jaxft import chips as chips_lib

FORMS = ("local  (the devices at hand)",
         "v5e:AxB, v6e:AxB  (2-D torus, A*B chips, e.g. v5e:2x4)",
         "v4:AxBxC, v5p:AxBxC  (3-D torus, A*B*C chips, e.g. v5p:4x4x4)",
         "v5e-N, v6e-N  (Cloud TPU names: N chips, e.g. v5e-8)",
         "v4-N, v5p-N  (Cloud TPU names: N TensorCores = N/2 chips, e.g. v5p-256 = v5p:4x4x8)")
_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
_SHAPES = {2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
               256: "16x16"},
           3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
               256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}}


class TopologyError(ValueError):
  """A topology string the planner cannot compile for; the message lists the valid forms."""


class Target(NamedTuple):
  name: str                       # canonical: 'v5p:4x4x4' or 'local'
  devices: list
  chip: Optional[chips_lib.Chip]
  num_chips: int

  @property
  def devices_per_chip(self) -> float:
    return len(self.devices) / self.num_chips

  def hbm_bytes_per_device(self, chip: Optional[chips_lib.Chip] = None) -> Optional[float]:
    chip = chip or self.chip
    return None if chip is None else chip.hbm_bytes / self.devices_per_chip


def _bad(text: str, why: str) -> TopologyError:
  return TopologyError(f"unknown topology {text!r}: {why}. Valid forms: " + "; ".join(FORMS))


def parse(text: str) -> tuple[str, str]:
  """('v5p', '4x4x4') for any TPU form, ('local', '') for local; TopologyError otherwise."""
  text = text.strip().lower()
  if text == "local":
    return "local", ""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)*)", text)
  if m:
    family, dims = m.groups()
    if len(dims.split("x")) != _DIMS[family]:
      raise _bad(text, f"{family} is a {_DIMS[family]}-D torus, so it takes "
                       f"{_DIMS[family]} dimensions")
    if any(int(d) < 1 for d in dims.split("x")):
      raise _bad(text, "dimensions must be >= 1")
    return family, dims
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", text)
  if m:
    family, n = m.group(1), int(m.group(2))
    chips = n // 2 if family in ("v4", "v5p") else n
    shape = _SHAPES[_DIMS[family]].get(chips)
    if shape is None or (family in ("v4", "v5p") and n % 2):
      raise _bad(text, f"no standard {family} slice has {n} "
                       f"{'cores' if family in ('v4', 'v5p') else 'chips'}")
    return family, shape
  raise _bad(text, "not a known accelerator and shape")


def tpu_devices(family: str, dims: str) -> list:
  """The devices of a TPU topology, described by libtpu (no TPU needed)."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu's lock would refuse a 2nd process
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise TopologyError(f"compiling for TPU topology {family}:{dims} needs libtpu: "
                        f'pip install "jax[tpu]=={jax.__version__}"') from None
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  topo = topologies.get_topology_desc(topology_name=f"{family}:{dims}", platform="tpu")
  return list(topo.devices)


def target(text: str) -> Target:
  """The devices and chip peaks to plan for (see `FORMS`)."""
  family, dims = parse(text)
  if family == "local":
    devices = jax.devices()
    key = chips_lib.key_of(devices[0].device_kind)
    if key is None:  # a CPU: all devices share one machine
      return Target("local", devices, local_chip(devices), 1)
    chip = chips_lib.CHIPS[key]
    limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    if limit:  # what the runtime really lets us use
      chip = chip._replace(hbm_bytes=float(limit))
    return Target("local", devices, chip, len(devices))
  devices = tpu_devices(family, dims)
  return Target(f"{family}:{dims}", devices, chips_lib.CHIPS[family],
                math.prod(int(d) for d in dims.split("x")))


def local_chip(devices) -> chips_lib.Chip:
  """Peaks of unlisted local hardware (a CPU), measured: a bf16/f32 matmul and a large copy.

  The devices share the machine, so the whole machine counts as one chip of
  `len(devices)` devices: HBM is the physical memory.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dev = devices[0]
  a = jax.device_put(jnp.ones((512, 512), jnp.float32), dev)
  mm = jax.jit(lambda x: x @ x)
  big = jax.device_put(jnp.ones((8 * 2**20,), jnp.float32), dev)
  copy = jax.jit(lambda x: x * 2.0)
  best = lambda f, x: min(_timed(f, x) for _ in range(3))
  flops = 2 * 512 ** 3 / best(mm, a)
  bw = 2 * big.nbytes / best(copy, big)
  mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return chips_lib.Chip(dev.device_kind or dev.platform, flops, float(mem), bw, None, 1,
                        "measured here: f32 512^3 matmul and a 32 MiB copy")


def _timed(f, x) -> float:
  f(x).block_until_ready()
  t0 = time.perf_counter()
  f(x).block_until_ready()
  return time.perf_counter() - t0
