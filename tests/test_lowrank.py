"""The low-rank family: one parametrized suite of shared properties, then each member's own.

Shared (every member, one line each in MEMBERS): no-op at init (where the member
promises it), merge == unmerged logits after the factors move, trainable count ==
closed form, a few Adam steps lower the loss, and a 2x2x2 mesh of 8 fake devices
gives the single-device loss.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import adapters, objectives, sharding, train
from jaxft.adapters import base, lowrank
from jaxft.models import DecoderConfig, decoder
from adapter_testlib import perturb

CFG = DecoderConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                    d_ff=48)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (8, 12), 0, 64)
R = 4


def per_matrix(params, s, fn):
  """Sum over targeted matrices of fn(d_in, d_out) (closed-form trainable counts)."""
  flat = base.flatten(params)
  total = 0
  for p in adapters.lora.targets(params, s):
    *lead_dims, d_in, d_out = flat[p + "/kernel"].shape
    total += int(np.prod(lead_dims)) * fn(d_in, d_out)
  return total


# name, spec overrides, closed-form trainable params per (d_in, d_out) matrix, no-op at init
MEMBERS = [
    ("lora", {}, lambda i, o: R * (i + o), True),
    ("rslora", {}, lambda i, o: R * (i + o), True),
    ("dora", {}, lambda i, o: R * (i + o) + o, True),
    ("pissa", {}, lambda i, o: R * (i + o), True),
    ("milora", {}, lambda i, o: R * (i + o), True),
    ("kasa", {}, lambda i, o: R * (i + o) + R, False),  # T(W0) drops r components
    ("svfit", {}, lambda i, o: R, True),
    ("lora_xs", {}, lambda i, o: R * R, True),
    ("codyra", {}, lambda i, o: R * (i + o) + R, True),
    ("dsee", {}, lambda i, o: R * (i + o) + max(1, round(0.01 * i * o)), True),
    ("sltrain", {}, lambda i, o: R * (i + o) + max(1, round(0.03 * i * o)), True),
    ("pego", {"groups": 3}, lambda i, o: 3 * R * (i + o), True),
    ("qlora", {}, lambda i, o: R * (i + o), False),  # NF4 base
    ("lq_lora", {}, lambda i, o: R * (i + o), False),
    ("l4q", {}, lambda i, o: R * (i + o) + o, False),  # + per-channel steps (d_in <= 64)
    ("qalora", {}, lambda i, o: R * (i + o) + o, False),
]


def spec(name, **kw):
  return {**adapters.DEFAULTS[name], "name": name, "rank": R, "dropout": 0.0, **kw}


def logits(adapter, frozen, trainable, s, tokens=TOKENS):
  fn = lambda f, t: decoder.apply(adapter.combine(f, t, s), tokens, CFG,
                                  linear=adapter.linear_hook(s))
  return jax.jit(fn)(frozen, trainable)


def plain(params, tokens=TOKENS):
  return jax.jit(lambda p: decoder.apply(p, tokens, CFG))(params)


@pytest.fixture(scope="module")
def params():
  return decoder.init(jax.random.PRNGKey(0), CFG)


def setup(name, kw, params):
  adapter, s = adapters.ADAPTERS[name], spec(name, **kw)
  frozen, trainable = adapter.init(jax.random.PRNGKey(2), params, s)
  return adapter, s, frozen, trainable


@pytest.mark.parametrize("name,kw,count,noop", MEMBERS, ids=[m[0] for m in MEMBERS])
def test_shared_properties(name, kw, count, noop, params):
  adapter, s, frozen, trainable = setup(name, kw, params)
  assert base.count_params(trainable) == per_matrix(params, s, count)
  base_logits = plain(params)
  if noop:
    np.testing.assert_allclose(logits(adapter, frozen, trainable, s), base_logits,
                               rtol=1e-5, atol=1e-5)
  moved = perturb(trainable, jax.random.PRNGKey(3))
  merged = adapter.merge(frozen, moved, s)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  unmerged = logits(adapter, frozen, moved, s)
  np.testing.assert_allclose(plain(merged), unmerged, rtol=1e-5, atol=1e-5)
  assert not np.allclose(unmerged, base_logits, atol=1e-4)
  f_axes, t_axes = adapter.logical_axes(decoder.logical_axes(CFG), trainable, s)
  is_axes = lambda x: isinstance(x, tuple)
  assert jax.tree.structure(t_axes, is_leaf=is_axes) == jax.tree.structure(trainable)
  assert jax.tree.structure(f_axes, is_leaf=is_axes) == jax.tree.structure(frozen)


def _task(adapter, s):
  apply = lambda p, t, **kw: decoder.apply(p, t, CFG, **kw)
  return train.Task(apply, adapter, s, objectives.xent.loss_fn, objectives.xent.DEFAULTS)


def _batch():
  tokens = TOKENS % 8  # a learnable (low-entropy) sequence
  return {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1),
          "loss_mask": jnp.ones_like(tokens)}


def _run(name, kw, params, mesh=None, steps=3):
  adapter, s, frozen, trainable = setup(name, kw, params)
  tx = optax.adam(1e-2)
  state = train.TrainState(jnp.zeros((), jnp.int32), frozen, trainable, tx.init(trainable),
                           jax.random.PRNGKey(0))
  step = train.make_train_step(_task(adapter, s), tx)
  batch = _batch()
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
  return np.array(losses)


TRAINED = [(m[0], m[1]) for m in MEMBERS] + [("mixlora", {"experts": 4})]
# One member per kind of factor layout (A/B, magnitude, middle matrix, sparse, quantized
# base, router) runs on the 8-device mesh by default.
MESH_CHECKED = ("lora", "dora", "lora_xs", "sltrain", "qlora", "mixlora")


@pytest.mark.parametrize("name,kw", TRAINED, ids=[m[0] for m in TRAINED])
def test_train_steps_lower_loss_and_mesh_matches(name, kw, params):
  single = _run(name, kw, params)
  assert single[-1] < single[0] - 1e-3, single
  if name not in MESH_CHECKED and not os.environ.get("JAXFT_ALL_MESH_TESTS"):
    return  # the 8-device run of every member: JAXFT_ALL_MESH_TESTS=1 (keeps CI short)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = _run(name, kw, params, mesh)
  np.testing.assert_allclose(sharded, single, rtol=2e-4)


def test_registry_lists_every_member():
  for name, *_ in TRAINED:
    assert name in adapters.ADAPTERS
    assert set(lowrank.COMMON) <= set(adapters.DEFAULTS[name])  # smollm2_lora_math's fields


# ---------------------------------------------------------------------------
# Member properties.


def _kernel(params, path="layers/mlp/up"):
  return base.flatten(params)[path + "/kernel"]


def test_rslora_scale_halves_when_rank_quadruples():
  assert lowrank.rs_scale({"alpha": 16.0, "rank": 4}) / lowrank.rs_scale(
      {"alpha": 16.0, "rank": 16}) == 2.0
  assert lowrank.lora_scale({"alpha": 16.0, "rank": 4}) / lowrank.lora_scale(
      {"alpha": 16.0, "rank": 16}) == 4.0


@pytest.mark.parametrize("detach", [True, False])
def test_dora_column_norms_equal_magnitude(detach, params):
  adapter, s, frozen, trainable = setup("dora", {"detach_norm": detach}, params)
  moved = perturb(trainable, jax.random.PRNGKey(4), 0.3)
  w = _kernel(adapter.merge(frozen, moved, s))
  mag = base.flatten(moved)["layers/mlp/up/dora_mag"]
  # Norm over d_in (axis -2): one per output unit. Over the wrong axis this fails.
  np.testing.assert_allclose(jnp.linalg.norm(w, axis=-2), jnp.abs(mag), rtol=1e-5)


def test_dora_gradient_without_detach_matches_finite_differences(params):
  adapter, s, frozen, trainable = setup("dora", {"detach_norm": False,
                                                 "targets": ("layers/attn/q$",)}, params)
  trainable = perturb(trainable, jax.random.PRNGKey(5), 0.2)
  loss = lambda t: jnp.sum(logits(adapter, frozen, t, s)[:, -1, :4] ** 2)
  loss = jax.jit(loss)
  g = jax.jit(jax.grad(loss))(trainable)["layers"]["attn"]["q"]["lora_a"]
  eps = 1e-3
  t_plus = jax.tree.map(lambda x: x, trainable)
  a = trainable["layers"]["attn"]["q"]["lora_a"]
  direction = jax.random.normal(jax.random.PRNGKey(6), a.shape)
  t_plus["layers"]["attn"]["q"]["lora_a"] = a + eps * direction
  t_minus = jax.tree.map(lambda x: x, trainable)
  t_minus["layers"]["attn"]["q"]["lora_a"] = a - eps * direction
  fd = (loss(t_plus) - loss(t_minus)) / (2 * eps)
  np.testing.assert_allclose(jnp.sum(g * direction), fd, rtol=2e-2)
  # The detached variant differs (it drops the norm's gradient).
  s_det = {**s, "detach_norm": True}
  loss_det = lambda t: jnp.sum(logits(adapter, frozen, t, s_det)[:, -1, :4] ** 2)
  g_det = jax.jit(jax.grad(loss_det))(trainable)["layers"]["attn"]["q"]["lora_a"]
  assert not np.allclose(g_det, g, atol=1e-6)


@pytest.mark.parametrize("name,which", [("pissa", "top"), ("milora", "bottom")])
def test_pissa_milora_reconstruct_and_residual_spectrum(name, which, params):
  adapter, s, frozen, trainable = setup(name, {}, params)
  w0 = _kernel(params)
  f = base.flatten(frozen)
  t = base.flatten(trainable)
  res = f["layers/mlp/up/kernel"]
  recon = res + lowrank.lora_scale(s) * (t["layers/mlp/up/lora_a"] @ t["layers/mlp/up/lora_b"])
  np.testing.assert_allclose(recon, w0, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(w0))))
  sv = jnp.linalg.svd(w0, compute_uv=False)
  spectral = jnp.linalg.norm(res, ord=2, axis=(-2, -1))
  expected = sv[:, R] if which == "top" else sv[:, 0]
  np.testing.assert_allclose(spectral, expected, rtol=1e-4)


def test_randomized_svd_matches_exact_top_triplets():
  w = jax.random.normal(jax.random.PRNGKey(7), (40, 30)) @ jnp.diag(jnp.linspace(3.0, 0.1, 30))
  old = lowrank.EXACT_SVD_MAX
  lowrank.EXACT_SVD_MAX = 8
  try:
    u, s, vh = lowrank.svd(w, rank=5, niter=6)
  finally:
    lowrank.EXACT_SVD_MAX = old
  u_x, s_x, vh_x = jnp.linalg.svd(w, full_matrices=False)
  np.testing.assert_allclose(s, s_x[:5], rtol=1e-4)
  np.testing.assert_allclose((u * s[None]) @ vh, (u_x[:, :5] * s_x[None, :5]) @ vh_x[:5], atol=1e-4)


def _grad_w(params, path="layers/mlp/up"):
  """G = dL/dW of the plain model for the probe loss below."""
  g = jax.jit(jax.grad(lambda p: jnp.sum(plain(p)[:, -1, :5] ** 2)))(params)
  return base.flatten(g)[path + "/kernel"]


def test_kasa_truncation_regulariser_and_d_gradient(params):
  adapter, s, frozen, trainable = setup("kasa", {}, params)
  w0 = _kernel(params)
  sv = jnp.linalg.svd(w0, compute_uv=False)
  dropped = jnp.sum(jnp.square(_kernel(frozen) - w0), axis=(-2, -1))
  np.testing.assert_allclose(dropped, jnp.sum(jnp.square(sv[:, -R:]), axis=-1), rtol=1e-4)
  # R_orth is 0 for orthonormal factors, > 0 otherwise.
  q = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(8), (2, 16, R)))[0]
  qb = jnp.swapaxes(jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(9), (2, 20, R)))[0], -1, -2)
  assert float(adapters.kasa.orth_penalty(q, qb)) < 1e-9
  assert float(adapters.kasa.orth_penalty(2 * q, qb)) > 1.0
  # d's regulariser gradient is 2 beta d / #matrices.
  g = jax.grad(lambda t: adapter.regularizer(frozen, t, s)[0])(trainable)
  n = 7 * CFG.n_layers
  d = trainable["layers"]["mlp"]["up"]["lora_d"]
  np.testing.assert_allclose(g["layers"]["mlp"]["up"]["lora_d"], 2 * s["beta"] * d / n, rtol=1e-5)


def test_svfit_gradient_is_u_g_v(params):
  adapter, s, frozen, trainable = setup("svfit", {"targets": ("layers/mlp/up$",)}, params)
  g_d = jax.jit(jax.grad(lambda t: jnp.sum(logits(adapter, frozen, t, s)[:, -1, :5] ** 2)))(
      trainable)["layers"]["mlp"]["up"]["lora_d"]
  f = frozen["layers"]["mlp"]["up"]
  expected = jnp.einsum("lir,lio,lro->lr", f["lora_a"], _grad_w(params), f["lora_b"])
  np.testing.assert_allclose(g_d, expected, rtol=1e-4, atol=1e-7)
  assert base.count_params(trainable) == CFG.n_layers * R


def test_lora_xs_gradient_of_r(params):
  adapter, s, frozen, trainable = setup("lora_xs", {"targets": ("layers/mlp/up$",)}, params)
  g_r = jax.jit(jax.grad(lambda t: jnp.sum(logits(adapter, frozen, t, s)[:, -1, :5] ** 2)))(
      trainable)["layers"]["mlp"]["up"]["lora_m"]
  f = frozen["layers"]["mlp"]["up"]
  expected = lowrank.lora_scale(s) * jnp.einsum("lia,lio,lbo->lab", f["lora_a"], _grad_w(params),
                                                f["lora_b"])
  np.testing.assert_allclose(g_r, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["sltrain", "dsee"])
def test_sparse_delta_gradient_support_and_dense_forward(name, params):
  adapter, s, frozen, trainable = setup(name, {"targets": ("layers/mlp/up$",)}, params)
  idx = frozen["layers"]["mlp"]["up"]["sparse_index"]
  g = jax.jit(jax.grad(lambda t: jnp.sum(logits(adapter, frozen, t, s)[:, -1, :5] ** 2)))(trainable)
  g_w = _grad_w(params).reshape(CFG.n_layers, -1)
  np.testing.assert_allclose(g["layers"]["mlp"]["up"]["sparse_values"],
                             jnp.take_along_axis(g_w, idx, axis=-1), rtol=1e-4, atol=1e-7)
  assert all(len(set(np.asarray(row).tolist())) == row.shape[0] for row in idx)  # no repeats
  # Unmerged forward == dense s A B + densify(S).
  moved = perturb(trainable, jax.random.PRNGKey(10), 0.3)
  t = moved["layers"]["mlp"]["up"]
  dense = lowrank.lora_scale(s) * t["lora_a"] @ t["lora_b"]
  dense = dense + lowrank.densify(idx, t["sparse_values"], CFG.d_model, CFG.d_ff)
  manual = jax.tree.map(lambda x: x, params)
  manual["layers"]["mlp"]["up"]["kernel"] = _kernel(params) + dense
  np.testing.assert_allclose(logits(adapter, frozen, moved, s), plain(manual), rtol=1e-5,
                             atol=1e-5)


def test_dsee_support_is_top_of_sparse_part_and_prune_hits_target(params):
  _, s, frozen, _ = setup("dsee", {"targets": ("layers/mlp/up$",), "decomp_rank": 3}, params)
  w0 = _kernel(params)
  u, sv, vh = jnp.linalg.svd(w0, full_matrices=False)
  sparse = (w0 - (u[..., :3] * sv[:, None, :3]) @ vh[:, :3]).reshape(CFG.n_layers, -1)
  idx = frozen["layers"]["mlp"]["up"]["sparse_index"]
  nnz = idx.shape[-1]
  for l in range(CFG.n_layers):
    top = set(np.argsort(-np.abs(np.asarray(sparse[l])))[:nnz].tolist())
    assert set(np.asarray(idx[l]).tolist()) == top
  pruned = adapters.dsee.prune(params, 0.5, ["layers/mlp/up"])
  zeros = np.mean(np.asarray(_kernel(pruned)) == 0, axis=(-2, -1))
  np.testing.assert_allclose(zeros, 0.5, atol=1 / (CFG.d_model * CFG.d_ff))


def test_pego_regulariser_zero_for_orthogonal_members(params):
  _, s, frozen, trainable = setup("pego", {"groups": 3, "preserve_form": "none"}, params)
  q = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(11), (16, 3 * R)))[0]
  assert float(adapters.pego.diversify(q, 3)) < 1e-10
  scaled = q * jnp.repeat(jnp.array([1.0, 2.0, 3.0]), R)[None]  # orthogonal, not orthonormal
  assert float(adapters.pego.diversify(scaled, 3)) < 1e-9
  mixed = q.at[:, R].add(q[:, 0])  # member 2 leans on member 1
  assert float(adapters.pego.diversify(mixed, 3)) > 0.5
  loss, metrics = adapters.pego.regularizer(frozen, trainable, s)
  assert float(loss) > 0 and float(metrics["pego_preserve"]) == 0.0
  a = trainable["layers"]["mlp"]["up"]["lora_a"][0]
  brute = sum(float(jnp.sum((a[:, i * R:(i + 1) * R].T @ a[:, j * R:(j + 1) * R]) ** 2))
              for i in range(3) for j in range(3) if i != j)
  np.testing.assert_allclose(float(adapters.pego.diversify(a, 3)), brute, rtol=1e-4)


def test_codyra_prox_zeroes_small_ranks_exactly(params):
  adapter, s, frozen, trainable = setup("codyra", {}, params)
  lam, lr = 0.5, 0.1
  tx = optax.chain(optax.sgd(lr), adapters.codyra.proximal(lam, lr))
  d = jnp.array([[0.01, -0.04, 0.2, -1.0], [0.049, 0.051, -0.3, 0.0]])
  t = {"layers": {"mlp": {"up": {"lora_d": d}}}}
  zero = jax.tree.map(jnp.zeros_like, t)
  upd, _ = tx.update(zero, tx.init(t), t)
  new = optax.apply_updates(t, upd)["layers"]["mlp"]["up"]["lora_d"]
  expected = np.where(np.abs(d) <= lam * lr, 0.0, np.sign(d) * (np.abs(d) - lam * lr))
  np.testing.assert_allclose(new, expected, atol=1e-7)
  assert np.sum(np.asarray(new) == 0) == 4
  # Merge after pruning is exact.
  moved = perturb(trainable, jax.random.PRNGKey(12))
  moved["layers"]["mlp"]["up"]["lora_d"] = moved["layers"]["mlp"]["up"]["lora_d"].at[:, :2].set(0.0)
  np.testing.assert_allclose(plain(adapter.merge(frozen, moved, s)),
                             logits(adapter, frozen, moved, s), rtol=1e-5, atol=1e-5)


def test_mixlora_one_expert_equals_lora_on_the_ffn(params):
  adapter, s, frozen, trainable = setup("mixlora", {"experts": 1, "top_k": 1}, params)
  moved = perturb(trainable, jax.random.PRNGKey(13))
  flat = base.flatten(moved)
  ref = {k: v for k, v in flat.items() if "/lora_" in k}
  for n in ("gate", "up", "down"):
    ref[f"layers/mlp/{n}/lora_a"] = flat[f"layers/mlp/{n}/moe_a"][:, 0]
    ref[f"layers/mlp/{n}/lora_b"] = flat[f"layers/mlp/{n}/moe_b"][:, 0]
  ls = spec("lora")
  np.testing.assert_allclose(logits(adapter, frozen, moved, s),
                             logits(adapters.lora, frozen, base.unflatten(ref), ls),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="no merged"):
    adapter.merge(frozen, moved, s)


def test_mixlora_router_weights_and_load_balance():
  h = jax.random.normal(jax.random.PRNGKey(14), (3, 5, 16))
  router = jax.random.normal(jax.random.PRNGKey(15), (16, 8))
  w, probs, dispatch = adapters.mixlora.route(h, router, 2)
  np.testing.assert_allclose(jnp.sum(w, -1), 1.0, rtol=1e-6)
  assert np.all(np.sum(np.asarray(w) > 0, -1) == 2) and np.all(np.sum(dispatch, -1) == 2)
  # Uniform router: L_aux == a exactly; a skewed one (f and P aligned) costs more.
  _, p_u, d_u = adapters.mixlora.route(h, jnp.zeros((16, 8)), 2)
  np.testing.assert_allclose(adapters.mixlora.load_balance(p_u, d_u, 2, 0.01), 0.01, rtol=1e-6)
  skew = jnp.zeros((16, 8)).at[:, 0].set(5.0) + 0.0 * router
  h_pos = jnp.abs(h)
  _, p_s, d_s = adapters.mixlora.route(h_pos, skew, 2)
  assert float(adapters.mixlora.load_balance(p_s, d_s, 2, 0.01)) > 0.011


def test_mixlora_aux_loss_comes_out_of_the_layer_scan(params):
  adapter, s, frozen, trainable = setup("mixlora", {"experts": 4}, params)
  p = adapter.combine(frozen, trainable, s)
  out, aux = decoder.apply(p, TOKENS, CFG, linear=adapter.linear_hook(s), return_aux=True)
  assert out.shape == (8, 12, 64) and set(aux) == {"mixlora_aux"}
  assert 0.0 < float(aux["mixlora_aux"]) < 0.04  # a·E·Σ f P averaged over layers
  g = jax.grad(lambda t: decoder.apply(adapter.combine(frozen, t, s), TOKENS, CFG,
                                       linear=adapter.linear_hook(s), return_aux=True)[1][
                                           "mixlora_aux"])(trainable)
  assert float(jnp.sum(jnp.abs(g["layers"]["mlp"]["moe_router"]))) > 0


FAMILY = [m[0] for m in TRAINED]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY)
def test_tiny_cli_runs_every_member_with_defaults(name, tmp_path):
  from jaxft import cli, logbook  # pylint: disable=g-import-not-at-top
  assert cli.main(["train", "tiny", "--workdir", str(tmp_path), "--config.steps=6",
                   "--config.eval_every=0", f"--config.adapter.name={name}", "--no_progress"]) == 0
  rows = [r for r in logbook.read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
  assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY)
def test_smollm2_short_run_loss_falls(name, tmp_path):
  """The runs recorded in docs/adapters.md (8 steps of smollm2_lora_math)."""
  from jaxft import cli, logbook  # pylint: disable=g-import-not-at-top
  assert cli.main(["train", "smollm2_lora_math", "--workdir", str(tmp_path), "--config.steps=8",
                   "--config.eval_examples=0", "--config.eval_every=0", "--config.log_every=1",
                   f"--config.adapter.name={name}", "--no_progress"]) == 0
  rows = [r for r in logbook.read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
  assert rows[-1]["loss"] < rows[0]["loss"]


def test_adapter_losses_add_regulariser_and_aux(params):
  adapter, s, frozen, trainable = setup("kasa", {}, params)
  reg, _ = adapter.regularizer(frozen, trainable, s)
  loss, m = base.with_adapter_losses(adapter, s, frozen, trainable, 1.0, {"num_tokens": 3.0},
                                     {"mixlora_aux": 0.5})
  np.testing.assert_allclose(loss, 1.5 + reg, rtol=1e-6)
  assert m["loss"] == loss and "kasa_orth" in m and m["mixlora_aux"] == 0.5
  loss, m = base.with_adapter_losses(adapters.lora, s, frozen, trainable, 1.0, {})
  assert loss == 1.0
