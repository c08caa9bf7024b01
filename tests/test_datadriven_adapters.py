"""Data-driven initialisers (LoRA-GA, EVA, CorDA, LoRA-SB) and their calibration pass.

Each member's own property, the shared ones (merge == unmerged, loss falls, 8-device
mesh == one device) with a calibration, and the build plumbing (calibration batches
from the run's pipeline, sharded like training).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import adapters, build, config, objectives, optimizers, sharding, train
from jaxft.adapters import base, calibrate, corda, eva, lora_ga, lora_sb
from jaxft.models import DecoderConfig, decoder, layers

CFG = DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=48)
K, B, L = 2, 8, 12
R = 4


def _apply(p, t, **kw):
  return decoder.apply(p, t, CFG, **kw)


@pytest.fixture(scope="module")
def params():
  return decoder.init(jax.random.PRNGKey(0), CFG)


@pytest.fixture(scope="module")
def batches():
  tok = jax.random.randint(jax.random.PRNGKey(1), (K, B, L + 1), 0, 8)  # low entropy: learnable
  mask = (jax.random.uniform(jax.random.PRNGKey(2), (K, B, L)) > 0.3).astype(jnp.float32)
  return {"tokens": tok[..., :-1], "targets": tok[..., 1:], "loss_mask": mask,
          "segment_ids": jnp.ones((K, B, L), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (K, B, L))}


@pytest.fixture(scope="module")
def calib(batches):
  return calibrate.Calibration(_apply, objectives.xent.loss_fn, objectives.xent.DEFAULTS, batches)


def spec(name, **kw):
  return {**adapters.DEFAULTS[name], "name": name, "rank": R, "dropout": 0.0, **kw}


def mean_loss(params_, batches, linear=layers.dense):
  losses = [objectives.xent.loss_fn(
      _apply(params_, batches["tokens"][i], positions=batches["positions"][i], linear=linear),
      {k: v[i] for k, v in batches.items()}, objectives.xent.DEFAULTS)[0] for i in range(K)]
  return sum(losses) / K


def cosine(a, b):
  a, b = np.ravel(a), np.ravel(b)
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def best_rank(g, r):
  u, s, vh = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
  return (u[:, :r] * s[:r]) @ vh[:r]


def test_calibration_matches_directly_computed_inputs_and_gradients(params, batches, calib):
  paths = ["layers/attn/q", "layers/attn/k", "layers/mlp/down"]
  st = calibrate.statistics(calib, params, paths, cov=True, grad=True, tokens="loss")
  # Layer 0's q input, computed by hand: attn_norm(embed(tokens)).
  p0 = jax.tree.map(lambda x: x[0], params["layers"])
  x = layers.norm(p0["attn_norm"], params["embed"]["embedding"][batches["tokens"]], CFG)
  w = batches["loss_mask"]
  ref = jnp.einsum("kbli,kbl,kblj->ij", x, w, x)
  np.testing.assert_allclose(st["layers/attn/q"].cov[0], ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(st["layers/attn/k"].cov, st["layers/attn/q"].cov)  # same input
  assert float(st["layers/attn/q"].count) == float(jnp.sum(w))
  grads = jax.grad(mean_loss)(params, batches)
  for path in paths:
    np.testing.assert_allclose(st[path].grad, base.flatten(grads)[path + "/kernel"],
                               rtol=1e-4, atol=1e-7)


def test_lora_ga_first_step_is_the_best_rank_2r_full_step(params, batches, calib):
  s = spec("lora_ga")
  frozen, trainable = lora_ga.init(jax.random.PRNGKey(3), params, s, calib)
  linear = lora_ga.linear_hook(s)
  loss = lambda tr: mean_loss(lora_ga.combine(frozen, tr, s), batches, linear)
  np.testing.assert_allclose(loss(trainable), mean_loss(params, batches), rtol=1e-5)  # unchanged
  g_tr = jax.grad(loss)(trainable)
  g_full = jax.grad(mean_loss)(params, batches)
  sc = lora_ga.MEMBER.scale(s)
  for path in ["layers/attn/q", "layers/mlp/up", "layers/mlp/down"]:
    a, b = (base.flatten(trainable)[f"{path}/lora_{n}"] for n in "ab")
    ga, gb = (base.flatten(g_tr)[f"{path}/lora_{n}"] for n in "ab")
    dw = -sc * (ga @ b + a @ gb)                       # first-order change of s A B under SGD
    for layer in range(CFG.n_layers):
      g = base.flatten(g_full)[path + "/kernel"][layer]
      assert cosine(dw[layer], -best_rank(g, 2 * R)) >= 0.999


def test_corda_reconstructs_w0_and_orients_by_the_covariance(params, calib):
  path = "layers/mlp/up"
  st = calibrate.statistics(calib, params, [path], cov=True)[path]
  w0 = params["layers"]["mlp"]["up"]["kernel"]
  for mode in ("ipm", "kpm"):
    for damping in (1e-4, 0.3):
      s = spec("corda", mode=mode, damping=damping, targets=("mlp/up$",))
      frozen, trainable = corda.init(jax.random.PRNGKey(0), params, s, calib)
      p = base.flatten(frozen)
      delta = corda.MEMBER.scale(s) * (trainable["layers"]["mlp"]["up"]["lora_a"]
                                       @ trainable["layers"]["mlp"]["up"]["lora_b"])
      np.testing.assert_allclose(p[path + "/kernel"] + delta, w0, rtol=1e-5, atol=1e-6)
      c = np.asarray(corda.damped(st.covariance(), damping), np.float64)
      for layer in range(CFG.n_layers):
        sv = np.linalg.svd(c[layer] @ np.asarray(w0[layer], np.float64), compute_uv=False)
        d = c[layer] @ np.asarray(delta[layer], np.float64)
        if mode == "ipm":   # Eckart-Young in the context-oriented space
          resid = c[layer] @ np.asarray(w0[layer], np.float64) - d
          assert np.sum(resid ** 2) == pytest.approx(np.sum(sv[R:] ** 2), rel=1e-3)
        else:               # the adapter holds the r smallest components
          assert np.sum(d ** 2) == pytest.approx(np.sum(sv[-R:] ** 2), rel=1e-3)


def test_eva_components_and_rank_budget(params, calib):
  s = spec("eva")
  frozen, trainable = eva.init(jax.random.PRNGKey(0), params, s, calib)
  ranks = eva.ranks(trainable)
  n_mat = sum(int(r.size) for r in ranks.values())
  assert sum(int(jnp.sum(r)) for r in ranks.values()) == R * n_mat
  assert all(int(jnp.max(r)) <= 2 * R for r in ranks.values())
  path = "layers/mlp/down"
  cov = calibrate.statistics(calib, params, [path], cov=True, tokens="loss")[path].covariance()
  a = trainable["layers"]["mlp"]["down"]["lora_a"]
  for layer in range(CFG.n_layers):
    r = int(ranks[path][layer])
    used = np.asarray(a[layer][:, :r], np.float64)
    np.testing.assert_allclose(used.T @ used, np.eye(r), atol=1e-5)
    _, vecs = np.linalg.eigh(np.asarray(cov[layer], np.float64))
    top = vecs[:, ::-1][:, :r]
    assert np.all(np.abs(np.sum(used * top, axis=0)) >= 0.99)
    assert np.all(np.asarray(a[layer][:, r:]) == 0)
  uniform = eva.ranks(eva.init(jax.random.PRNGKey(0), params, spec("eva", rho=1.0), calib)[1])
  assert all(np.all(np.asarray(r) == R) for r in uniform.values())
  np.testing.assert_array_equal(  # B = 0: the model is unchanged
      eva.merge(frozen, trainable, s)["layers"]["mlp"]["down"]["kernel"],
      params["layers"]["mlp"]["down"]["kernel"])


def test_lora_sb_step_follows_the_best_rank_r_gradient(params, batches, calib):
  s = spec("lora_sb")
  frozen, trainable = lora_sb.init(jax.random.PRNGKey(0), params, s, calib)
  n_mat = sum(int(np.prod(v.shape[:-2])) for v in jax.tree.leaves(trainable))
  assert base.count_params(trainable) == R * R * n_mat
  g_full = jax.grad(mean_loss)(params, batches)
  f = base.flatten(frozen)
  for path in ["layers/attn/v", "layers/mlp/down"]:
    a, b = f[path + "/lora_a"], f[path + "/lora_b"]
    g = base.flatten(g_full)[path + "/kernel"]
    gm = jnp.swapaxes(a, -1, -2) @ g @ jnp.swapaxes(b, -1, -2)   # dL/dM at W0 (s = 1)
    dw = -(a @ gm @ b)
    for layer in range(CFG.n_layers):
      assert cosine(dw[layer], -best_rank(g[layer], R)) >= 0.999
  frozen2, trainable2 = lora_sb.init(jax.random.PRNGKey(0), params, spec("lora_sb", offset_base=True),
                                     calib)
  merged = lora_sb.merge(frozen2, trainable2, s)
  np.testing.assert_allclose(merged["layers"]["mlp"]["up"]["kernel"],
                             params["layers"]["mlp"]["up"]["kernel"], atol=1e-6)


def test_data_driven_members_need_calibration(params):
  with pytest.raises(ValueError, match="calib_batches"):
    lora_ga.init(jax.random.PRNGKey(0), params, spec("lora_ga"))


MEMBERS = ["lora_ga", "eva", "corda", "lora_sb"]


def _run(name, params, batches, calib, mesh=None, steps=3):
  adapter, s = adapters.ADAPTERS[name], spec(name)
  frozen, trainable = adapter.init(jax.random.PRNGKey(2), params, s, calib)
  tx = optax.adam(1e-2)
  state = train.TrainState(jnp.zeros((), jnp.int32), frozen, trainable, tx.init(trainable),
                           jax.random.PRNGKey(0))
  task = train.Task(_apply, adapter, s, objectives.xent.loss_fn, objectives.xent.DEFAULTS)
  step = train.make_train_step(task, tx)
  batch = {k: v[0] for k, v in batches.items()}
  if mesh is not None:
    f_axes, t_axes = adapter.logical_axes(decoder.logical_axes(CFG), trainable, s)
    tr = sharding.tree_shardings(t_axes, trainable, mesh)
    rep = sharding.replicated(mesh)
    opt = optax.tree_map_params(tx, lambda _, x: x, state.opt_state, tr,
                                transform_non_params=lambda _: rep)
    shard = train.TrainState(rep, sharding.tree_shardings(f_axes, frozen, mesh), tr, opt, rep)
    state = jax.device_put(state, shard)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    step = jax.jit(step, in_shardings=(shard, sharding.batch_sharding(mesh)),
                   out_shardings=(shard, rep))
  else:
    step = jax.jit(step)
  losses = []
  for _ in range(steps):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return np.array(losses), adapter, s, frozen, state.trainable


@pytest.mark.parametrize("name", MEMBERS)
def test_shared_merge_loss_and_mesh(name, params, batches, calib):
  """Loss falls, merge == unmerged; the 2x2x2 mesh run (one member: the shared
  Calibrated path; EVA's sharded init is in the build test) gives the same losses."""
  single, adapter, s, frozen, trained = _run(name, params, batches, calib)
  assert single[-1] < single[0] - 1e-3, single
  tokens = batches["tokens"][0]
  unmerged = _apply(adapter.combine(frozen, trained, s), tokens, linear=adapter.linear_hook(s))
  np.testing.assert_allclose(_apply(adapter.merge(frozen, trained, s), tokens), unmerged,
                             rtol=1e-5, atol=1e-5)
  if name != "lora_ga":
    return
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = _run(name, params, batches, calib, mesh)[0]
  np.testing.assert_allclose(sharded, single, rtol=2e-4)


def test_build_calibrates_from_the_pipeline_sharded_like_training():
  cfg = config.load("tiny", ["adapter.name=eva", "adapter.calib_batches=2", "steps=2"])
  model = build.load_model(cfg)
  task = build.build_task(cfg, model)
  tx, _ = optimizers.build(build.section(cfg, "optimizer"), cfg.steps)
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  batches = build.calibration_batches(cfg, model, task, mesh)
  assert batches["tokens"].shape == (2, cfg.batch_size, cfg.seq_len)
  assert batches["tokens"].sharding.spec == jax.P(None, ("data", "fsdp"))
  state, _, _ = build.init_sharded_state(cfg, model, task, tx, mesh)
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  ref, _, _ = build.init_sharded_state(cfg, model, task, tx, one)
  for got, want in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(ref.trainable)):
    np.testing.assert_allclose(np.abs(got), np.abs(want), atol=2e-4)  # eigenvector signs
  assert build.needs_calibration(build.build_task(config.load("tiny", ["adapter.name=lora"]),
                                                  model)) == 0
