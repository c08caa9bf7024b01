"""The shared optimizer suite: every optimizer joins with ONE line in `CASES`.

Each case builds its transformation from a learning rate (`make(lr)`), and the
suite checks what every member must do: converge on a quadratic and on a tiny LM,
compile the train step once (no recompilation on the second step) under
donation of params and state, keep state dtypes stable in float32 and bfloat16, and keep the state
sharded like the parameters on an 8-device CPU mesh. Per-optimizer reference
tests (update formulas written out, optax oracles) live in the files named in
each case's comment.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxft import objectives, optimizers
from jaxft.optimizers import adams_cast, fira, sm3


class Case(NamedTuple):
  name: str                                      # the OPTIMIZERS name it covers
  make: Callable[[optax.Schedule], optax.GradientTransformation]
  quad_lr: float = 0.1                           # peak lr on the quadratic (cosine-decayed)
  lm_lr: float = 1e-2                            # constant lr on the tiny LM
  kind: str = "gradient"  # "zeroth_order": one random direction per step, so the suite checks
                          # descent, compile-once, dtypes and sharding, not the convergence
                          # thresholds (convergence: test_sam_zo.py)


CASES = [
    Case("adamw", lambda lr: optax.adamw(lr, weight_decay=1e-4)),
    Case("sgd", lambda lr: optax.sgd(lr, momentum=0.9), quad_lr=0.1, lm_lr=0.5),
    Case("lion", lambda lr: optimizers.lion(lr, weight_decay=1e-3), quad_lr=0.02, lm_lr=3e-3),  # test_sign_momentum.py
    Case("signum", lambda lr: optimizers.signum(lr), quad_lr=0.02, lm_lr=3e-3),  # test_sign_momentum.py
    Case("signsgd", lambda lr: optimizers.signsgd(lr), quad_lr=0.02, lm_lr=1e-3),  # test_sign_momentum.py
    Case("adams_cast", lambda lr: adams_cast.adams_cast(lr, lam=1e-4, ramp_steps=10, mask_every=5)),  # test_cast.py
    Case("sm3", lambda lr: sm3.sm3(lr), quad_lr=0.3, lm_lr=0.1),  # test_sm3_fira.py
    Case("fira", lambda lr: fira.fira(lr, rank=2, update_proj_gap=10)),  # test_sm3_fira.py
    Case("galore", lambda lr: fira.galore(lr, rank=2, update_proj_gap=10), quad_lr=1.0, lm_lr=0.05),  # test_sm3_fira.py
    Case("sam", lambda lr: optimizers.sam(lr, opaque=False)),  # test_sam_zo.py (suite: transparent mode, 2 calls/step)
    Case("tram", lambda lr: optimizers.tram(lr, rho_source="fixed", opaque=False)),  # test_sam_zo.py
    Case("orthogonal_subspace", lambda lr: optimizers.orthogonal_subspace(lr)),  # test_optimizers_wrappers.py
    Case("spsa", lambda lr: optimizers.spsa(lr), quad_lr=0.005, lm_lr=1e-3, kind="zeroth_order"),  # test_sam_zo.py
    Case("fedkseed", lambda lr: optimizers.fedkseed(lr, num_seeds=16), quad_lr=0.005, lm_lr=1e-3,
         kind="zeroth_order"),  # test_sam_zo.py
    # zo_subspace: perturbed inside span(last 4 estimates + 4 random), 0.62x here (spsa 0.35x).
    Case("zo_subspace", lambda lr: optimizers.zo_subspace(lr, history=4), quad_lr=0.005, lm_lr=1e-3,
         kind="zeroth_order"),  # test_sam_zo.py
]
IDS = [c.name for c in CASES]


def quadratic():
  """Separable quadratic 0.5 sum h (p - p*)^2 over a matrix, a stacked matrix and a vector."""
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  shapes = {"w": (8, 16), "stack": (2, 4, 8), "bias": (8,)}
  target = {k: jax.random.normal(keys[i], s) for i, (k, s) in enumerate(shapes.items())}
  curv = {k: jax.random.uniform(keys[3 + i], s, minval=0.5, maxval=2.0)
          for i, (k, s) in enumerate(shapes.items())}
  def loss(p):
    return sum(0.5 * jnp.sum(curv[k] * (p[k] - target[k]) ** 2) for k in p)
  return loss, jax.tree.map(jnp.zeros_like, target)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_converges_on_quadratic(case):
  loss, params = quadratic()
  steps = 300
  tx = case.make(optax.cosine_decay_schedule(case.quad_lr, steps))

  @jax.jit
  def run(params):
    def body(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None
    (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return p

  bound = 0.02 if case.kind == "gradient" else 0.9
  assert float(loss(run(params))) < bound * float(loss(params))


def lm_init(key, vocab=64, d=32, layers=2):
  """A 2-layer residual tanh LM (d=32): the optimizer sees embeddings, stacked kernels, a gain."""
  k = jax.random.split(key, 3)
  return {"embed": {"embedding": jax.random.normal(k[0], (vocab, d)) * 0.5},
          "layers": {"mlp": {"kernel": jax.random.normal(k[1], (layers, d, d)) / d ** 0.5}},
          "final_norm": {"scale": jnp.ones((d,))},
          "head": {"kernel": jax.random.normal(k[2], (d, vocab)) / d ** 0.5}}


def lm_loss(params, tokens):
  h = params["embed"]["embedding"][tokens[:, :-1]]
  for w in params["layers"]["mlp"]["kernel"]:
    h = h + jnp.tanh(h @ w)
  logits = (h * params["final_norm"]["scale"][None, None]) @ params["head"]["kernel"]
  batch = {"targets": tokens[:, 1:], "loss_mask": jnp.ones(tokens[:, 1:].shape)}
  return objectives.xent.loss_fn(logits, batch)[0]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tiny_lm_converges_compiles_once_with_donation(case):
  tx = case.make(case.lm_lr)
  params = lm_init(jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 17), 0, 64)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lm_loss)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = tx.init(params)
  dtypes = jax.tree.map(lambda x: x.dtype, state)
  losses = []
  for _ in range(30):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert step._cache_size() == 1  # pylint: disable=protected-access
  assert jax.tree.map(lambda x: x.dtype, state) == dtypes      # float32 state stays float32
  assert all(np.isfinite(losses)), losses
  if case.kind == "gradient":
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dtypes_stable_in_bf16(case, dtype=jnp.bfloat16):
  """bfloat16 params and grads (float32 is checked in the tiny-LM test)."""
  loss, params = quadratic()
  params = jax.tree.map(lambda p: (p + 0.5).astype(dtype), params)
  tx = case.make(1e-2)
  state = tx.init(params)
  before = jax.tree.map(lambda x: x.dtype, state)
  update = jax.jit(tx.update)
  for _ in range(3):
    grads = jax.grad(lambda p: loss(jax.tree.map(lambda x: x.astype(jnp.float32), p)))(params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert jax.tree.map(lambda x: x.dtype, state) == before
  assert all(p.dtype == dtype for p in jax.tree.leaves(params))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_sharded_like_params(case):
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  specs = {"w": P("fsdp", "tensor"), "stack": P(None, "fsdp", "tensor"), "bias": P("fsdp")}
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  loss, params = quadratic()
  params = jax.device_put(jax.tree.map(lambda p: p + 0.5, params), shardings)
  tx = case.make(1e-2)
  want = optimizers.state_shardings(tx, jax.eval_shape(tx.init, params), params, shardings,
                                    NamedSharding(mesh, P()))
  state = jax.jit(tx.init, out_shardings=want)(params)
  update = jax.jit(tx.update, out_shardings=(shardings, want), donate_argnums=1)
  for _ in range(2):
    updates, state = update(jax.grad(loss)(params), state, params)
  same_as_init = jax.tree.map(lambda x, w: x.sharding.is_equivalent_to(w, x.ndim), state, want)
  assert all(jax.tree.leaves(same_as_init))
  # Params-shaped state leaves carry exactly their parameter's sharding.
  same = optax.tree_map_params(
      tx, lambda leaf, p: leaf.shape != p.shape or leaf.sharding.is_equivalent_to(p.sharding, p.ndim),
      state, params, transform_non_params=lambda _: True)
  assert all(jax.tree.leaves(same))


def test_every_registered_optimizer_is_in_the_suite():
  missing = sorted(set(optimizers.OPTIMIZERS) - set(IDS))
  assert not missing, f"add a Case line for {missing} to CASES"


@pytest.mark.parametrize("name", sorted(optimizers.OPTIMIZERS))
def test_builds_by_name_with_defaults(name):
  spec = {**optimizers.DEFAULTS[name], "name": name}
  tx, _ = optimizers.build(spec, total_steps=10)
  tx = optax.with_extra_args_support(tx)
  loss, params = quadratic()
  # What jaxft.train.make_train_step passes (sharpness-aware and zeroth-order members use them).
  kl = lambda p, q, noise_std=0.0: sum(jnp.sum((a - b) ** 2) for a, b in
                                      zip(jax.tree.leaves(p), jax.tree.leaves(q)))
  extra = {"grad_fn": jax.grad(loss), "kl_fn": kl, "loss_fn": loss}
  updates, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))(
      jax.grad(loss)(params), tx.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
