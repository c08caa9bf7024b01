"""The train state and the pure train step, built once from model + adapter + objective + optax.

`make_train_step(...)` returns `step(state, batch) -> (state, metrics)`, a pure
function the runner jits with in/out shardings and state donation. Everything
every method shares lives here, once: mixed precision (params cast to the compute
dtype inside the step; master weights and optimizer state stay in their own
dtype), exact token-weighted gradient accumulation over microbatches, the global
gradient norm, and the non-finite guard (a step whose loss or gradient is NaN/Inf
returns the input state unchanged and reports `finite = 0`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainState(NamedTuple):
  step: jax.Array         # int32 scalar: number of updates applied
  frozen: Any             # params the adapter keeps fixed (not checkpointed: rebuilt from the config)
  trainable: Any          # the only tree the optimizer sees
  opt_state: Any
  rng: jax.Array          # raw uint32[2] key


class Task(NamedTuple):
  """What a step needs to compute the loss; all plain functions."""
  apply: Callable         # model apply(params, tokens, *, positions, segment_ids, linear, rng)
  adapter: Any            # adapter module (combine, linear_hook)
  adapter_spec: Mapping[str, Any]
  objective: Callable     # loss_fn(logits, batch, spec) -> (loss, metrics)
  objective_spec: Mapping[str, Any]


def cast_floating(tree, dtype):
  """Casts floating leaves to `dtype` (integer/bool leaves untouched)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def loss_and_metrics(task: Task, trainable, frozen, batch, rng, compute_dtype):
  """Token-weighted loss *sum* (what gets differentiated) and the objective's metrics."""
  params = task.adapter.combine(frozen, trainable, task.adapter_spec)
  params = cast_floating(params, compute_dtype)
  logits = task.apply(
      params, batch["tokens"], positions=batch.get("positions"),
      segment_ids=batch.get("segment_ids"),
      linear=task.adapter.linear_hook(task.adapter_spec), rng=rng)
  loss, metrics = task.objective(logits, batch, task.objective_spec)
  num_tokens = jax.lax.stop_gradient(metrics["num_tokens"])
  return loss * num_tokens, metrics


def _weighted(metrics):
  """Per-token means -> sums (weighted by num_tokens), so microbatches add exactly."""
  n = metrics["num_tokens"]
  return {k: (v if k == "num_tokens" else v * n) for k, v in metrics.items()}


def _microbatches(batch, n: int):
  """(B, ...) -> (n, B/n, ...), microbatch i = rows i, i+n, ... (each device keeps its rows)."""
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(task: Task, tx: optax.GradientTransformation, *, grad_accum: int = 1,
                    compute_dtype: str = "float32"):
  """Returns the pure `step(state, batch) -> (state, metrics)`."""
  dtype = DTYPES[compute_dtype]
  grad_fn = jax.value_and_grad(
      lambda tr, fr, b, r: loss_and_metrics(task, tr, fr, b, r, dtype), has_aux=True)

  def gradients(state, batch, rng):
    if grad_accum == 1:
      (_, metrics), grads = grad_fn(state.trainable, state.frozen, batch, rng)
      return grads, _weighted(metrics)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.trainable)

    def body(carry, mb_and_key):
      g_sum, m_sum = carry
      mb, key = mb_and_key
      (_, m), g = grad_fn(state.trainable, state.frozen, mb, key)
      g_sum = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_sum, g)
      m_sum = jax.tree.map(jnp.add, m_sum, _weighted(m))
      return (g_sum, m_sum), None

    mbs = _microbatches(batch, grad_accum)
    keys = jax.random.split(rng, grad_accum)
    m0 = jax.tree.map(lambda x: jnp.zeros((), jnp.float32),
                      jax.eval_shape(lambda: grad_fn(state.trainable, state.frozen,
                                                     jax.tree.map(lambda x: x[0], mbs), rng)[0][1]))
    (g_sum, m_sum), _ = jax.lax.scan(body, (zeros, m0), (mbs, keys))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), g_sum, state.trainable)
    return grads, m_sum

  def step(state: TrainState, batch):
    rng, step_rng = jax.random.split(state.rng)
    grads_sum, m_sum = gradients(state, batch, step_rng)
    n = m_sum["num_tokens"]
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads_sum)
    metrics = {k: (v if k == "num_tokens" else v / denom) for k, v in m_sum.items()}
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    # On a non-finite loss or gradient nothing changes: the state stays the last good one.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    state = TrainState(keep(state.step + 1, state.step), state.frozen,
                       keep(trainable, state.trainable), keep(opt_state, state.opt_state),
                       keep(rng, state.rng))
    metrics.update(grad_norm=grad_norm, finite=finite.astype(jnp.int32))
    return state, metrics

  return step


def make_eval_step(task: Task, *, compute_dtype: str = "float32"):
  """`eval_step(state, batch) -> metrics` with token sums (loss_sum, num_tokens)."""
  dtype = DTYPES[compute_dtype]

  def eval_step(state: TrainState, batch):
    _, metrics = loss_and_metrics(task, state.trainable, state.frozen, batch, None, dtype)
    return _weighted(metrics)

  return eval_step


def init_state(key, init_params: Callable, adapter, adapter_spec, tx, *, param_dtype="float32"):
  """Builds a TrainState from a params initialiser (pure: jit it with out_shardings)."""
  k_model, k_adapter, k_rng = jax.random.split(key, 3)
  params = cast_floating(init_params(k_model), DTYPES[param_dtype])
  frozen, trainable = adapter.init(k_adapter, params, adapter_spec)
  return TrainState(jnp.zeros((), jnp.int32), frozen, trainable, tx.init(trainable), k_rng)
