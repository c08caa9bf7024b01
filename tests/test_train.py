"""The train step: accumulation, mixed precision, the non-finite guard, the objective."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import adapters, objectives, train
from jaxft.models import DecoderConfig, decoder

CFG = DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=48)


def make_task(name="full", **kw):
  s = {**adapters.DEFAULTS[name], "name": name, **kw}
  apply = lambda p, t, **k: decoder.apply(p, t, CFG, **k)
  return train.Task(apply, adapters.ADAPTERS[name], s, objectives.xent.loss_fn,
                    objectives.DEFAULTS["xent"])


def make_batch(key, rows=4, length=16):
  k1, k2 = jax.random.split(key)
  tokens = jax.random.randint(k1, (rows, length + 1), 0, CFG.vocab_size)
  mask = (jax.random.uniform(k2, (rows, length)) > 0.3).astype(jnp.float32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
          "segment_ids": jnp.ones((rows, length), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(length), (rows, length))}


def init(task, tx, dtype="float32"):
  return train.init_state(jax.random.PRNGKey(0), lambda k: decoder.init(k, CFG), task.adapter,
                          task.adapter_spec, tx, param_dtype=dtype)


def test_xent_closed_form():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
  batch = {"targets": jnp.array([[0, 2]]), "loss_mask": jnp.array([[1.0, 1.0]])}
  loss, m = objectives.xent.loss_fn(logits, batch)
  np.testing.assert_allclose(loss, (np.log(2) + np.log(10)) / 2, rtol=1e-6)
  assert float(m["num_tokens"]) == 2.0 and float(m["accuracy"]) == 0.5
  batch["loss_mask"] = jnp.array([[0.0, 1.0]])
  loss, m = objectives.xent.loss_fn(logits, batch)
  np.testing.assert_allclose(loss, np.log(10), rtol=1e-6)
  assert float(m["num_tokens"]) == 1.0


@pytest.mark.parametrize("name", ["full", "lora"])
def test_grad_accumulation_is_exact(name):
  """Two microbatches with different token counts give the same update as one big batch."""
  task = make_task(name, dropout=0.0) if name == "lora" else make_task(name)
  tx = optax.sgd(0.1)
  batch = make_batch(jax.random.PRNGKey(1))
  out = {}
  for accum in (1, 2, 4):
    state = init(task, tx)
    new, metrics = jax.jit(train.make_train_step(task, tx, grad_accum=accum))(state, batch)
    out[accum] = (new, metrics)
  for accum in (2, 4):
    np.testing.assert_allclose(out[accum][1]["loss"], out[1][1]["loss"], rtol=1e-5)
    assert float(out[accum][1]["num_tokens"]) == float(jnp.sum(batch["loss_mask"]))
    for a, b in zip(jax.tree.leaves(out[accum][0].trainable), jax.tree.leaves(out[1][0].trainable)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_loss_is_token_weighted_not_row_weighted():
  task, tx = make_task(), optax.sgd(0.0)
  batch = make_batch(jax.random.PRNGKey(2))
  state = init(task, tx)
  _, m = jax.jit(train.make_train_step(task, tx))(state, batch)
  logits = decoder.apply(state.trainable, batch["tokens"], CFG)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  expected = jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])
  np.testing.assert_allclose(m["loss"], expected, rtol=1e-5)


def test_nonfinite_step_leaves_state_unchanged():
  task, tx = make_task(), optax.adam(1e-3)
  state = init(task, tx)
  poisoned = state._replace(trainable=jax.tree.map(lambda x: x.at[..., 0].set(jnp.nan)
                                                   if x.ndim == 2 else x, state.trainable))
  new, m = jax.jit(train.make_train_step(task, tx))(poisoned, make_batch(jax.random.PRNGKey(3)))
  assert int(m["finite"]) == 0 and not np.isfinite(float(m["loss"]))
  assert int(new.step) == 0
  for a, b in zip(jax.tree.leaves((new.opt_state, new.rng)),
                  jax.tree.leaves((poisoned.opt_state, poisoned.rng))):
    np.testing.assert_array_equal(a, b)
  good, m = jax.jit(train.make_train_step(task, tx))(state, make_batch(jax.random.PRNGKey(3)))
  assert int(m["finite"]) == 1 and int(good.step) == 1


def test_bf16_compute_keeps_fp32_master_and_optimizer_state():
  task, tx = make_task(), optax.adam(1e-3)
  batch = make_batch(jax.random.PRNGKey(4))
  state = init(task, tx)
  step32 = jax.jit(train.make_train_step(task, tx, compute_dtype="float32"))
  step16 = jax.jit(train.make_train_step(task, tx, compute_dtype="bfloat16"))
  s16, m16 = step16(state, batch)
  _, m32 = step32(state, batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.trainable))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.opt_state)
             if jnp.issubdtype(x.dtype, jnp.floating))
  assert abs(float(m16["loss"]) - float(m32["loss"])) < 0.05
  assert float(m16["loss"]) != float(m32["loss"])  # bf16 really was used


def test_bf16_frozen_base_gives_the_same_bf16_step_with_f32_adapters():
  """frozen_dtype='bfloat16' stores the base as the bf16 step would cast it: same loss and
  update bit for bit; the adapter and its optimizer state stay float32."""
  task, tx = make_task("lora", rank=2, dropout=0.0), optax.adam(1e-3)
  batch = make_batch(jax.random.PRNGKey(6))
  step = jax.jit(train.make_train_step(task, tx, compute_dtype="bfloat16"))
  out = {}
  for frozen_dtype in ("", "bfloat16"):
    state = train.init_state(jax.random.PRNGKey(0), lambda k: decoder.init(k, CFG), task.adapter,
                             task.adapter_spec, tx, frozen_dtype=frozen_dtype)
    out[frozen_dtype] = (state, *step(state, batch))
  (s32, new32, m32), (s16, new16, m16) = out[""], out["bfloat16"]
  assert {x.dtype for x in jax.tree.leaves(s32.frozen)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(s16.frozen)} == {jnp.dtype(jnp.bfloat16)}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new16.trainable))
  assert float(m16["loss"]) == float(m32["loss"])
  for a, b in zip(jax.tree.leaves(new16.trainable), jax.tree.leaves(new32.trainable)):
    np.testing.assert_array_equal(a, b)


def test_lora_optimizer_sees_only_adapter_params():
  task, tx = make_task("lora", rank=2), optax.adam(1e-3)
  state = init(task, tx)
  n_trainable = adapters.count_params(state.trainable)
  mu = state.opt_state[0].mu
  assert adapters.count_params(mu) == n_trainable
  assert n_trainable < adapters.count_params(state.frozen) / 5
  new, _ = jax.jit(train.make_train_step(task, tx))(state, make_batch(jax.random.PRNGKey(5)))
  for a, b in zip(jax.tree.leaves(new.frozen), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(a, b)


def test_training_reduces_loss_with_lora():
  """A frozen model plus LoRA actually learns (a fixed batch, 30 steps)."""
  task, tx = make_task("lora", rank=4, dropout=0.0), optax.adam(1e-2)
  state = init(task, tx)
  step = jax.jit(train.make_train_step(task, tx))
  batch = make_batch(jax.random.PRNGKey(6))
  _, first = step(state, batch)
  for _ in range(30):
    state, m = step(state, batch)
  assert float(m["loss"]) < float(first["loss"]) - 0.3


@pytest.mark.parametrize("name,extra", [("kasa", "adapter_reg"), ("mixlora", "mixlora_aux")])
def test_adapter_regulariser_and_aux_losses_join_the_loss(name, extra):
  """KaSA's regularisers and MixLoRA's load-balance loss are part of what the step differentiates."""
  from jaxft import build, config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load("tiny", [f"adapter.name={name}"])
  model = build.load_model(cfg)
  task = build.build_task(cfg, model)
  params = model.module.init(jax.random.PRNGKey(0), model.cfg)
  frozen, trainable = task.adapter.init(jax.random.PRNGKey(1), params, task.adapter_spec, None)
  toks = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 3, 100)
  batch = {"tokens": toks, "targets": jnp.roll(toks, -1, 1), "loss_mask": jnp.ones((2, 16))}
  loss_sum, m = train.loss_and_metrics(task, trainable, frozen, batch, None, jnp.float32)
  assert float(m[extra]) > 0
  np.testing.assert_allclose(float(m["loss"]), float(m["xent"]) + float(m[extra]), rtol=1e-6)
  np.testing.assert_allclose(float(loss_sum), float(m["loss"]) * 32, rtol=1e-6)
