"""The train state and the pure train step, built once from model + adapter + objective + optax.

`make_train_step(...)` returns `step(state, batch) -> (state, metrics)`, a pure
function the runner jits with in/out shardings and state donation. Everything
every method shares lives here, once: mixed precision (params cast to the compute
dtype inside the step; master weights and optimizer state stay in their own
dtype), exact token-weighted gradient accumulation over microbatches, the global
gradient norm, and the non-finite guard (a step whose loss or gradient is NaN/Inf
returns the input state unchanged and reports `finite = 0`).

Method extras a config switches on (a dense self-teacher, CAST's weight scales, an
adapter's optimizer transform in `Task.post_update`) wrap the adapter: `jaxft/extras.py`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxft.adapters import base as adapters_base
from jaxft.extras import TEACHER
from jaxft.objectives import kd

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
  # The adapter's optimizer transform (jaxft.optimizers.compose.adapter_transform), applied
  # to every update after the optimizer with step=state.step; None: nothing.
  post_update: Any = None


def cast_floating(tree, dtype):
  """Casts floating leaves to `dtype` (integer/bool leaves untouched)."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def loss_and_metrics(task: Task, trainable, frozen, batch, rng, compute_dtype):
  """Token-weighted loss *sum* (what gets differentiated) and the objective's metrics."""
  if isinstance(frozen, Mapping) and TEACHER in frozen:  # the dense self-teacher, no gradient
    teacher = cast_floating(frozen[TEACHER], compute_dtype)
    batch = {**batch, "teacher_logits": kd.teacher_logits(task.apply, teacher, batch)}
  params = task.adapter.combine(frozen, trainable, task.adapter_spec)
  params = cast_floating(params, compute_dtype)
  hook = task.adapter.linear_hook(task.adapter_spec)
  # A hook that replaces whole FFNs (MixLoRA) reports auxiliary losses from every layer.
  aux_kw = {"return_aux": True} if hasattr(hook, "mlp") else {}
  out = task.apply(
      params, batch["tokens"], positions=batch.get("positions"),
      segment_ids=batch.get("segment_ids"), linear=hook, rng=rng, **aux_kw)
  logits, aux = out if aux_kw else (out, None)
  loss, metrics = task.objective(logits, batch, task.objective_spec)
  # Adapter regularisers (KaSA, PEGO) and auxiliary losses join the differentiated loss.
  loss, metrics = adapters_base.with_adapter_losses(task.adapter, task.adapter_spec, frozen,
                                                    trainable, loss, metrics, aux)
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


def _accumulate(fn, batch, rng, n: int):
  """Sum of `fn(microbatch, key)` (a tree of float sums) over `n` microbatches."""
  if n == 1:
    return fn(batch, rng)
  mbs = _microbatches(batch, n)
  keys = jax.random.split(rng, n)
  shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], mbs), rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)

  def body(acc, mb_and_key):
    out = fn(*mb_and_key)
    return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, out), None

  return jax.lax.scan(body, zeros, (mbs, keys))[0]


def _mean_kl(logits_p, logits_q, mask):
  """Token sum of KL(softmax(p) || softmax(q)) over `mask` (float32)."""
  lp = jax.nn.log_softmax(logits_p.astype(jnp.float32), axis=-1)
  lq = jax.nn.log_softmax(logits_q.astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
  return jnp.sum(kl * mask)


def make_train_step(task: Task, tx: optax.GradientTransformation, *, grad_accum: int = 1,
                    compute_dtype: str = "float32"):
  """Returns the pure `step(state, batch) -> (state, metrics)`.

  Two kinds of step, picked from the optimizer state's structure at trace time:

  * gradient (the default): backprop, then `tx.update(grads, opt_state, params,
    grad_fn=..., kl_fn=...)`. The extra arguments let sharpness-aware optimizers
    (`jaxft.optimizers.sharpness`) take a second gradient on the same batch:
    `grad_fn(trainable)` is the token-mean gradient there, and `kl_fn(p, q,
    noise_std)` the token-mean KL(f(x; p) || f(x~; q)), x~ the input with
    N(0, noise_std^2) added to the token-embedding table. Other optimizers ignore them.
  * zeroth-order (the state holds a `jaxft.optimizers.zo.ZORecord`): no backprop;
    `tx.update(zeros, opt_state, params, loss_fn=...)` with `loss_fn(trainable)`
    the token-mean loss on this batch, evaluated by the optimizer at theta +- eps z.
  """
  from jaxft.optimizers import zo  # pylint: disable=g-import-not-at-top
  dtype = DTYPES[compute_dtype]
  tx = optax.with_extra_args_support(tx)
  grad_fn = jax.value_and_grad(
      lambda tr, fr, b, r: loss_and_metrics(task, tr, fr, b, r, dtype), has_aux=True)

  def gradients(trainable, frozen, batch, rng):
    """(gradient sums in float32, weighted metric sums)."""
    def one(mb, key):
      (_, m), g = grad_fn(trainable, frozen, mb, key)
      return jax.tree.map(lambda x: x.astype(jnp.float32), g), _weighted(m)
    g_sum, m_sum = _accumulate(one, batch, rng, grad_accum)
    return jax.tree.map(lambda g, p: g.astype(p.dtype), g_sum, trainable), m_sum

  def mean_grads(trainable, frozen, batch, rng):
    grads_sum, m_sum = gradients(trainable, frozen, batch, rng)
    denom = jnp.maximum(m_sum["num_tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads_sum)
    return grads, {k: (v if k == "num_tokens" else v / denom) for k, v in m_sum.items()}

  def mean_loss(trainable, frozen, batch, rng):
    def one(mb, key):
      loss_sum, m = loss_and_metrics(task, trainable, frozen, mb, key, dtype)
      return {"loss": loss_sum, "num_tokens": m["num_tokens"]}
    s = _accumulate(one, batch, rng, grad_accum)
    return s["loss"] / jnp.maximum(s["num_tokens"], 1.0)

  def logits(trainable, frozen, tokens, noise):
    params = cast_floating(task.adapter.combine(frozen, trainable, task.adapter_spec), dtype)
    if noise is not None:
      if "embed" not in params or "embedding" not in params["embed"]:
        raise ValueError("kl_fn with noise_std > 0 needs params['embed']['embedding']")
      std, key = noise
      table = params["embed"]["embedding"]
      params = {**params, "embed": {**params["embed"], "embedding": table + (
          std * jax.random.normal(key, table.shape, jnp.float32)).astype(table.dtype)}}
    return task.apply(params, tokens, linear=task.adapter.linear_hook(task.adapter_spec), rng=None)

  def mean_kl(p, q, noise_std, frozen, batch, rng):
    def one(mb, key):
      mask = mb.get("loss_mask", jnp.ones(mb["tokens"].shape, jnp.float32)).astype(jnp.float32)
      noise = (noise_std, key) if noise_std else None
      lp = logits(p, frozen, mb["tokens"], None)
      lq = logits(q, frozen, mb["tokens"], noise)
      return {"kl": _mean_kl(lp, lq, mask), "n": jnp.sum(mask)}
    s = _accumulate(one, batch, jax.random.fold_in(rng, 1), grad_accum)
    return jax.lax.stop_gradient(s["kl"] / jnp.maximum(s["n"], 1.0))

  def gradient_update(state, batch, rng):
    grads, metrics = mean_grads(state.trainable, state.frozen, batch, rng)
    grad_norm = optax.tree.norm(grads)
    extra = {"grad_fn": lambda tr: mean_grads(tr, state.frozen, batch, rng)[0],
             "kl_fn": lambda p, q, noise_std=0.0: mean_kl(p, q, noise_std, state.frozen, batch, rng)}
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable, **extra)
    return updates, opt_state, metrics, grad_norm

  def zeroth_order_update(state, batch, rng):
    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    loss_fn = lambda tr: mean_loss(tr, state.frozen, batch, rng)
    updates, opt_state = tx.update(zeros, state.opt_state, state.trainable, loss_fn=loss_fn)
    rec = zo.find_record(opt_state)
    n = jnp.sum(batch["loss_mask"]).astype(jnp.float32) if "loss_mask" in batch else jnp.float32(
        batch["tokens"].size)
    return updates, opt_state, {"loss": rec.loss, "num_tokens": n}, jnp.abs(rec.grad)

  def step(state: TrainState, batch):
    rng, step_rng = jax.random.split(state.rng)
    kind = zeroth_order_update if zo.find_record(state.opt_state) is not None else gradient_update
    updates, opt_state, metrics, grad_norm = kind(state, batch, step_rng)
    if task.post_update is not None:  # the adapter's transform (compose.adapter_transform)
      post = task.post_update
      updates, _ = post.update(updates, post.init(state.trainable), state.trainable,
                               step=state.step)
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


def init_state(key, init_params: Callable, adapter, adapter_spec, tx, *, param_dtype="float32",
               calib=None, frozen_dtype: str = ""):
  """Builds a TrainState from a params initialiser (pure: jit it with out_shardings).

  `calib` is passed to the adapter's `init` (data-driven initialisers: EVA, CorDA,
  LoRA-GA, ...); None for the others. `frozen_dtype` ('' = `param_dtype`) stores the
  adapter's frozen floating leaves in that dtype after `init` (e.g. a LoRA base in
  bfloat16 with float32 adapters: half the memory, no per-step cast in a bf16 step).
  """
  k_model, k_adapter, k_rng = jax.random.split(key, 3)
  params = cast_floating(init_params(k_model), DTYPES[param_dtype])
  frozen, trainable = adapter.init(k_adapter, params, adapter_spec, calib)
  if frozen_dtype:
    frozen = cast_floating(frozen, DTYPES[frozen_dtype])
  return TrainState(jnp.zeros((), jnp.int32), frozen, trainable, tx.init(trainable), k_rng)
