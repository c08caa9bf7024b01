"""The low-rank adapter family: one algebra, many small members.

Every member is a choice of parts in (x W convention: W stored (d_in, d_out))

    W_eff = T(W0) + s * A · M · diag(d) · B  (+ S)           (LoRA-like)
    W_eff = mag ⊙ V / ‖V‖_col,  V = T(W0) + s A M diag(d) B  (decompose=True, DoRA)

with A (d_in, r), B (r, d_out), an optional r×r middle M and diagonal d, an
optional sparse delta S on a fixed support. In METHODS.md's (d_out, d_in)
notation this is W0 + s·B·M·A. A member supplies:

  * `init_matrix(key, w, spec, stats) -> {leaf: array}` — the initialiser and
    the base transform T in one: it gets one stacked kernel `w` (lead..., d_in,
    d_out) in float32 and returns its leaves (all of `leaves`); a returned
    `kernel` replaces W0 in the frozen tree (PiSSA's residual, KaSA's
    truncation). `stats` is `calib[path]` when the run passes a calibration
    Mapping keyed by linear path ('layers/attn/q'), else None (data-driven
    initialisers read activations/gradients from it).
  * `leaves` — the factor leaves init_matrix returns; `trains` — those the
    optimizer sees; the rest are frozen (rebuilt from the config at restore, so
    they must be a pure function of (key, W0, spec, calib)).
  * optionally `scale(spec)`, `decompose`, `regularizer(frozen, trainable, spec)
    -> (loss, metrics)`, `peft` (how the member maps to PyTorch PEFT).
  * quantized bases: `drops_kernel=True` (init_matrix returns no `kernel`; W0
    leaves the tree), `base_fn(p) -> T(W0)` reads the base from the linear's
    leaves (e.g. dequantise NF4 codes), `extra_axes(leaf, lead_ax, ax_in,
    ax_out) -> logical axes` for leaves not in FACTORS.

Leaves beside a targeted `kernel` (per linear, stacked over layers like it):
  lora_a (…, d_in, r)   lora_b (…, r, d_out)   lora_m (…, r, r)   lora_d (…, r)
  dora_mag (…, d_out)   sparse_index (…, nnz) int32 flat index into d_in·d_out
  sparse_values (…, nnz)

Everything else — target matching, splitting into frozen/trainable, logical
axes, the unmerged linear hook, merge, counting — is shared here. A new member
is a module with a docstring (paper + equation), its DEFAULTS and one
`MEMBER = lowrank.Member(...)`, then `init, logical_axes, ... = MEMBER.functions()`
and one line in `jaxft/adapters/__init__.py`.

Shared helpers for initialisers: `svd` (exact below `EXACT_SVD_MAX`, else
randomized subspace iteration), `kaiming_a`, `top_or_bottom`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from jaxft import names
from jaxft.adapters import base, fused
from jaxft.models import decoder
from jaxft.models import layers
from jaxft.models.layers import lead

# Fields every low-rank member has (so `--config.adapter.name=X` works on any config
# written for LoRA, e.g. smollm2_lora_math, which sets rank/alpha/dropout).
COMMON = {
    "targets": (r"attn/(q|k|v|o)$", r"mlp/(gate|up|down)$"),
    "rank": 8,
    "alpha": 16.0,
    "dropout": 0.05,
}
FACTORS = ("lora_a", "lora_b", "lora_m", "lora_d", "dora_mag", "sparse_index", "sparse_values")
EXACT_SVD_MAX = 2048
# How `linear_hook` computes x W + s h A B (`adapter.kernel`; members with other factors
# always use the reference path): 'fused' = plain XLA with a hand-written backward
# (jaxft.adapters.fused; the default: same values, faster on XLA:CPU), 'reference' =
# the expression left to autodiff, 'pallas' = the fused Pallas kernel.
KERNELS = ("fused", "reference", "pallas")


def lora_scale(spec) -> float:
  return float(spec["alpha"]) / int(spec["rank"])


def rs_scale(spec) -> float:
  return float(spec["alpha"]) / math.sqrt(int(spec["rank"]))


def unit_scale(spec) -> float:
  del spec
  return 1.0


# ---------------------------------------------------------------------------
# Initialiser helpers.


def kaiming_a(key, w, rank: int):
  """A (…, d_in, r) kaiming-uniform as PyTorch's Linear (a=√5): U(±1/√d_in)."""
  *lead_dims, d_in, _ = w.shape
  bound = 1.0 / math.sqrt(d_in)
  return jax.random.uniform(key, (*lead_dims, d_in, rank), jnp.float32, -bound, bound)


def per_layer(fn: Callable, lead_ndim: int) -> Callable:
  """fn(*arrays) run one matrix at a time over the leading (stacked-layer) axes.

  Batched LAPACK calls (svd, eigh, solve) on XLA:CPU fan out over the intra-op
  thread pool they already run on and can deadlock on a busy host (seen with 2
  cores and with 8 fake devices); `lax.map` keeps every call unbatched.
  """
  if lead_ndim == 0:
    return fn

  def mapped(*arrays):
    lead = arrays[0].shape[:lead_ndim]
    flat = tuple(a.reshape(-1, *a.shape[lead_ndim:]) for a in arrays)
    out = jax.lax.map(lambda xs: fn(*xs), flat)
    return jax.tree.map(lambda y: y.reshape(*lead, *y.shape[1:]), out)

  return mapped


def svd(w, *, rank: int = 0, niter: int = 4, key=None):
  """(U (…, d_in, k), S (…, k), Vh (…, k, d_out)), singular values descending.

  Exact `jnp.linalg.svd` when both dims are <= EXACT_SVD_MAX (or rank == 0),
  else randomized subspace iteration for the top `rank` (k = rank).
  """
  if w.ndim > 2:
    return per_layer(lambda m: svd(m, rank=rank, niter=niter, key=key), w.ndim - 2)(w)
  d_in, d_out = w.shape[-2:]
  if rank <= 0 or max(d_in, d_out) <= EXACT_SVD_MAX:
    u, s, vh = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
    return u, s, vh
  q = min(rank + 8, d_in, d_out)
  key = jax.random.PRNGKey(0) if key is None else key
  w = w.astype(jnp.float32)
  y = w @ jax.random.normal(key, (*w.shape[:-2], d_out, q), jnp.float32)
  mt = lambda x: jnp.swapaxes(x, -1, -2)
  qm, _ = jnp.linalg.qr(y)
  for _ in range(niter):
    qm, _ = jnp.linalg.qr(w @ jnp.linalg.qr(mt(w) @ qm)[0])
  ub, s, vh = jnp.linalg.svd(mt(qm) @ w, full_matrices=False)
  return (qm @ ub)[..., :rank], s[..., :rank], vh[..., :rank, :]


def top_or_bottom(u, s, vh, rank: int, component: str):
  """The r principal ('top') or minor ('bottom') singular triplets."""
  if component == "top":
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]
  if component == "bottom":
    return u[..., -rank:], s[..., -rank:], vh[..., -rank:, :]
  raise ValueError(f"adapter.component={component!r} is invalid; valid choices: 'top', 'bottom'")


def check_rank(spec, w=None) -> int:
  rank = int(spec["rank"])
  if rank < 1:
    raise ValueError(f"adapter.rank must be >= 1, got {rank}")
  if w is not None and rank > min(w.shape[-2:]):
    raise ValueError(f"adapter.rank={rank} exceeds min(d_in, d_out)={min(w.shape[-2:])} "
                     f"of a targeted kernel {tuple(w.shape)}")
  return rank


def densify(index, values, d_in: int, d_out: int):
  """Sparse (…, nnz) flat indices + values -> dense (…, d_in, d_out)."""
  lead_dims = index.shape[:-1]
  flat_i = index.reshape(-1, index.shape[-1])
  flat_v = values.reshape(-1, values.shape[-1])
  dense = jax.vmap(lambda i, v: jnp.zeros((d_in * d_out,), v.dtype).at[i].add(v))(flat_i, flat_v)
  return dense.reshape(*lead_dims, d_in, d_out)


def plain_base(p):
  return p["kernel"]


# ---------------------------------------------------------------------------
# The member: shared init / axes / hook / merge built from its parts.


@dataclasses.dataclass(frozen=True)
class Member:
  """One low-rank family member (see the module docstring for the parts)."""
  name: str
  doc: str
  defaults: Mapping[str, Any]
  init_matrix: Callable
  leaves: tuple[str, ...] = ("lora_a", "lora_b")
  trains: tuple[str, ...] = ("lora_a", "lora_b")
  scale: Callable[[Mapping[str, Any]], float] = lora_scale
  decompose: bool = False                  # DoRA: W_eff = mag ⊙ V / ‖V‖_col
  regularizer: Optional[Callable] = None   # (frozen, trainable, spec) -> (loss, metrics)
  base_fn: Callable = plain_base           # T(W0) from a linear's leaves
  drops_kernel: bool = False               # quantized bases: W0 is replaced by other leaves
  extra_axes: Optional[Callable] = None    # (leaf, lead_ax, ax_in, ax_out) -> axes
  peft: Optional[str] = None               # PEFT export kind: 'lora' | 'dora' | None

  def __post_init__(self):
    unknown = set(self.trains) - set(self.leaves)
    if unknown:
      raise ValueError(f"member {self.name}: trains {sorted(unknown)} not among leaves {self.leaves}")

  # -- contract -------------------------------------------------------------

  def targets(self, params, spec) -> list[str]:
    return base.match(base.linear_paths(params), spec["targets"], what="linear layer")

  def statistics(self, frozen, spec, calib, paths) -> dict:
    """Per-path data an initialiser uses (data-driven members: `calibrate.Calibrated`)."""
    del frozen, spec
    return {p: calib.get(p) if isinstance(calib, Mapping) else None for p in paths}

  def init(self, key, frozen, spec, calib=None):
    """-> (frozen' with T(W0) and frozen factors, trainable factors)."""
    check_rank(spec)
    paths = self.targets(frozen, spec)
    stats = self.statistics(frozen, spec, calib, paths)
    flat = base.flatten(frozen)
    train_flat = {}
    for i, path in enumerate(paths):
      w = flat[path + "/kernel"]
      leaves = self.init_matrix(jax.random.fold_in(key, i), w.astype(jnp.float32), spec,
                                stats[path])
      if self.drops_kernel:
        del flat[path + "/kernel"]
      for leaf, value in leaves.items():
        if not jnp.issubdtype(value.dtype, jnp.integer):
          value = value.astype(w.dtype)
        (train_flat if leaf in self.trains else flat)[f"{path}/{leaf}"] = value
    return base.unflatten(flat), base.unflatten(train_flat)

  def logical_axes(self, model_axes, trainable, spec):
    """Factors shard like their weight: A on d_in, B and magnitudes on d_out."""
    del spec
    flat_axes = base.flatten(model_axes)
    frozen_out, train_out = dict(flat_axes), {}
    paths = {p.rsplit("/", 1)[0] for p in base.flatten(trainable)}
    for path in paths:
      *lead_ax, ax_in, ax_out = flat_axes[path + "/kernel"]
      axes = {"lora_a": (*lead_ax, ax_in, "lora_rank"), "lora_b": (*lead_ax, "lora_rank", ax_out),
              "lora_m": (*lead_ax, "lora_rank", "lora_rank"), "lora_d": (*lead_ax, "lora_rank"),
              "dora_mag": (*lead_ax, ax_out), "sparse_index": (*lead_ax, None),
              "sparse_values": (*lead_ax, None)}
      if self.drops_kernel:
        del frozen_out[path + "/kernel"]
      for leaf in self.leaves:
        ax = axes[leaf] if leaf in axes else self.extra_axes(leaf, lead_ax, ax_in, ax_out)
        (train_out if leaf in self.trains else frozen_out)[f"{path}/{leaf}"] = ax
    return base.unflatten(frozen_out), base.unflatten(train_out)

  def combine(self, frozen, trainable, spec):
    """Params with the factors beside each targeted kernel (the hook runs them unmerged)."""
    del spec
    return base.merge_trees(frozen, trainable)

  def delta(self, p, s: float, shape):
    """s · A M diag(d) B (+ densified S) of one linear (any leading dims), float32."""
    out = 0.0
    if "lora_a" in p:
      a = p["lora_a"].astype(jnp.float32)
      if "lora_m" in p:
        a = a @ p["lora_m"].astype(jnp.float32)
      if "lora_d" in p:
        a = a * jnp.expand_dims(p["lora_d"].astype(jnp.float32), -2)
      out = s * (a @ p["lora_b"].astype(jnp.float32))
    if "sparse_values" in p:
      d_in, d_out = shape[-2:]
      out = out + densify(p["sparse_index"], p["sparse_values"].astype(jnp.float32), d_in, d_out)
    return out

  def linear_hook(self, spec):
    """`linear(p, x, name, rng)`: x T(W0) + s dropout(x) A M diag(d) B (+ x S), or DoRA's form."""
    s, rate = self.scale(spec), float(spec.get("dropout", 0.0))
    detach = bool(spec.get("detach_norm", True))
    member = self
    kernel = spec.get("kernel", "fused")
    if kernel not in KERNELS:
      raise ValueError(names.unknown_message("adapter.kernel", kernel, KERNELS))

    def linear(p, x, name, rng):
      if not any(k in p for k in member.leaves):
        return decoder.dense(p, x, name, rng)
      w = member.base_fn(p).astype(x.dtype)
      h = layers.dropout(x, rate, rng)
      if kernel == "fused" and member.fusable(p):
        y = fused.lora_linear(x, w, h, p["lora_a"].astype(x.dtype), p["lora_b"].astype(x.dtype), s)
        return y + lead(p["bias"].astype(y.dtype), y.ndim) if "bias" in p else y
      if kernel == "pallas" and member.fusable(p):
        # The fused Pallas op (jaxft_kernels.lora_matmul): x W + s h A B in one kernel,
        # backward without dW for the frozen W.
        from jaxft_kernels.lora_matmul.ops import lora_linear  # pylint: disable=g-import-not-at-top
        return lora_linear(x, w, p["lora_a"].astype(x.dtype), p["lora_b"].astype(x.dtype), s,
                           bias=p.get("bias"), x_adapter=None if h is x else h)
      y = jnp.einsum("...i,io->...o", x, w)
      if "lora_a" in p:
        t = h @ p["lora_a"].astype(x.dtype)
        if "lora_m" in p:
          t = t @ p["lora_m"].astype(x.dtype)
        if "lora_d" in p:
          t = t * lead(p["lora_d"].astype(x.dtype), t.ndim)
        y = y + s * (t @ p["lora_b"].astype(x.dtype))
      if "sparse_values" in p:
        d_in, d_out = w.shape
        y = y + x @ densify(p["sparse_index"], p["sparse_values"], d_in, d_out).astype(x.dtype)
      if member.decompose:
        v = w.astype(jnp.float32) + member.delta(p, s, w.shape)
        norm = jnp.linalg.norm(v, axis=-2)
        norm = jax.lax.stop_gradient(norm) if detach else norm
        y = y * lead((p["dora_mag"].astype(jnp.float32) / norm).astype(y.dtype), y.ndim)
      if "bias" in p:
        y = y + lead(p["bias"].astype(y.dtype), y.ndim)
      return y

    return linear

  def fusable(self, p) -> bool:
    """Whether this linear is plain x W + s h A B (what the fused kernel computes)."""
    return not self.decompose and {k for k in FACTORS if k in p} == {"lora_a", "lora_b"}

  def materialize(self, frozen, trainable, spec):
    """Plain effective params (the model's own tree): every targeted kernel = W_eff."""
    s = self.scale(spec)
    flat = base.flatten(base.merge_trees(frozen, trainable))
    paths = {p.rsplit("/", 1)[0] for p in base.flatten(trainable)}
    for path in paths:
      p = {k.rsplit("/", 1)[1]: v for k, v in flat.items() if k.rsplit("/", 1)[0] == path}
      w = self.base_fn(p)
      v = w.astype(jnp.float32) + self.delta(p, s, w.shape)
      if self.decompose:
        v = v * jnp.expand_dims(p["dora_mag"].astype(jnp.float32) / jnp.linalg.norm(v, axis=-2), -2)
      flat[path + "/kernel"] = v.astype(w.dtype)
      for leaf in self.leaves:
        flat.pop(f"{path}/{leaf}", None)
    return base.unflatten(flat)

  def functions(self):
    """(init, logical_axes, combine, linear_hook, materialize, merge) for a member module."""
    return (self.init, self.logical_axes, self.combine, self.linear_hook, self.materialize,
            self.materialize)


def regularizer(adapter, frozen, trainable, spec):
  """(loss, metrics) of an adapter's own regulariser; (0, {}) when it has none."""
  fn = getattr(adapter, "regularizer", None)
  if fn is None:
    return jnp.zeros((), jnp.float32), {}
  return fn(frozen, trainable, spec)


def factor_groups(tree, leaf: str) -> list:
  """All arrays named `leaf` in a (trainable or frozen) tree, one per targeted linear."""
  return [v for p, v in base.flatten(tree).items() if p.rsplit("/", 1)[-1] == leaf]


def n_matrices(arrays, core_ndim: int) -> int:
  """Number of adapted matrices among factor arrays (stacked layers counted one by one)."""
  return sum(int(math.prod(v.shape[:v.ndim - core_ndim])) for v in arrays)
