"""CAST: AdamS (`adams_cast`), N:M masks and export, Weight Scaling, the dense self-teacher loss."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxft import objectives
from jaxft.objectives import kd
from jaxft.optimizers import adams_cast, nm_mask, weight_scale


def test_nm_mask_keeps_top_n_per_group_along_inputs():
  w = jnp.array([[0.1, -5.0], [-3.0, 0.2], [2.0, 0.3], [0.5, 4.0],
                 [1.0, 1.0], [1.0, 0.0], [-7.0, 0.0], [0.0, 0.0]])  # (d_in=8, d_out=2)
  mask = np.asarray(nm_mask.nm_mask(w, 2, 4))
  np.testing.assert_array_equal(mask[:4, 0], [False, True, True, False])
  np.testing.assert_array_equal(mask[:4, 1], [True, False, False, True])
  np.testing.assert_array_equal(mask[4:, 0], [True, False, True, False])   # tie: earlier wins
  assert mask.reshape(2, 4, 2).sum(1).tolist() == [[2, 2], [2, 2]]


def test_projection_leaves_at_most_n_nonzeros_per_group():
  params = {"layers": {"q": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8))}},
            "embed": {"embedding": jnp.ones((8, 8))}}
  out = nm_mask.project(params, 2, 4)
  report = nm_mask.assert_nm(out, 2, 4)
  assert report["layers/q/kernel"]["zero_fraction"] == 0.5
  assert report["layers/q/kernel"]["max_nonzeros"] == 2
  np.testing.assert_array_equal(out["embed"]["embedding"], 1.0)   # embeddings stay dense
  with pytest.raises(ValueError, match="not 2:4 sparse"):
    nm_mask.assert_nm(params, 2, 4)
  with pytest.raises(ValueError, match="do not divide"):
    nm_mask.nm_mask(jnp.ones((6, 2)), 2, 4)


def test_positive_column_scale_never_changes_the_mask():
  keys = jax.random.split(jax.random.PRNGKey(1), 20)
  for k in keys:
    kw, ks = jax.random.split(k)
    w = jax.random.normal(kw, (3, 16, 5))
    s = jnp.exp(3 * jax.random.normal(ks, (3, 1, 5)))
    np.testing.assert_array_equal(nm_mask.nm_mask(w), nm_mask.nm_mask(s * w))


def test_lambda_zero_is_adamw():
  params = {"kernel": jax.random.normal(jax.random.PRNGKey(0), (8, 4)),
            "bias": jnp.ones((4,))}
  ours = adams_cast.adams_cast(1e-2, b1=0.9, b2=0.95, weight_decay=0.1, lam=0.0)
  ref = optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.1)
  def run(tx):
    def body(carry, i):
      p, s = carry
      u, s = tx.update(jax.tree.map(lambda x: jnp.cos(3.0 * x + i), p), s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), jnp.arange(30.0))[0][0])(params)
  p1, p2 = run(ours), run(ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), p1, p2)


def test_update_formula_written_out():
  """One step against the AdamS equations computed by hand (l1 decay, decayed second moment)."""
  w = jnp.array([[3.0], [-0.5], [2.0], [0.1]])          # mask keeps rows 0 and 2
  g = jnp.array([[0.2], [0.1], [-0.3], [0.4]])
  lr, lam, b1, b2, eps = 0.1, 0.5, 0.9, 0.95, 1e-8
  tx = adams_cast.adams_cast(lr, b1=b1, b2=b2, eps=eps, lam=lam, targets=".*", prox_clip=False)
  u, _ = tx.update({"w": g}, tx.init({"w": w}), {"w": w})
  keep = np.array([[1.0], [0.0], [1.0], [0.0]])
  d = lam * (1 - keep) * np.sign(w)
  m_hat = g                                              # (1 - b1) g / (1 - b1)
  v_hat = (g + d) ** 2
  np.testing.assert_allclose(u["w"], -lr * (m_hat + d) / (np.sqrt(v_hat) + eps), rtol=1e-6)


def test_zero_gradient_shrinks_pruned_weights_to_exact_zero_without_sign_change():
  w0 = jax.random.normal(jax.random.PRNGKey(3), (16, 4))
  tx = adams_cast.adams_cast(0.05, lam=1e-2, ramp_steps=5, mask_every=3, targets=".*")
  keep = np.asarray(nm_mask.nm_mask(w0))
  state, w, prev = tx.init({"w": w0}), {"w": w0}, np.asarray(w0)
  update = jax.jit(tx.update)
  for _ in range(80):
    u, state = update({"w": jnp.zeros_like(w0)}, state, w)
    w = optax.apply_updates(w, u)
    cur = np.asarray(w["w"])
    np.testing.assert_array_equal(cur[keep], np.asarray(w0)[keep])          # kept: fixed
    assert np.all(np.abs(cur[~keep]) <= np.abs(prev[~keep]))                 # monotone
    assert np.all(cur[~keep] * np.asarray(w0)[~keep] >= 0)                   # no sign change
    prev = cur
  assert np.all(cur[~keep] == 0.0)
  nm_mask.assert_nm(w, 2, 4, targets=".*")


def test_mask_refresh_only_every_mask_every_steps():
  tx = adams_cast.scale_by_adams_cast(lam=0.0, mask_every=3, targets=".*")
  ws = [jax.random.normal(jax.random.PRNGKey(10 + t), (8, 4)) for t in range(8)]
  state = tx.init({"w": ws[0]})
  for t in range(1, 8):   # update number t-1 sees ws[t]
    _, state = tx.update({"w": jnp.ones((8, 4))}, state, {"w": ws[t]})
    last_refresh = 3 * ((t - 1) // 3) + 1
    np.testing.assert_array_equal(state.mask["w"], nm_mask.nm_mask(ws[last_refresh]))
  assert not np.array_equal(nm_mask.nm_mask(ws[1]), nm_mask.nm_mask(ws[2]))


def test_final_step_projects_exactly_to_n_m():
  params = {"layers": {"up": {"kernel": jax.random.normal(jax.random.PRNGKey(5), (2, 8, 6))}},
            "norm": {"scale": jnp.ones((6,))}}
  tx = adams_cast.adams_cast(1e-2, lam=1e-3, total_steps=4, mask_every=2)
  state, p = tx.init(params), params
  update = jax.jit(tx.update)
  for i in range(4):
    if i == 3:   # dense until the last update
      assert nm_mask.nm_report(p)["layers/up/kernel"]["violations"] > 0
    u, state = update(jax.tree.map(lambda x: jnp.sin(x + i), p), state, p)
    p = optax.apply_updates(p, u)
  report = nm_mask.assert_nm(p)
  assert report["layers/up/kernel"]["zero_fraction"] >= 0.5
  np.testing.assert_array_equal(p["norm"]["scale"] != 0, True)


def test_registered_by_name_with_config_switches():
  from jaxft import optimizers
  spec = {**optimizers.DEFAULTS["adams_cast"], "name": "adams_cast", "decay_kind": "l3"}
  with pytest.raises(ValueError, match="l1"):
    optimizers.build(spec, 10)
  assert "adams" not in optimizers.OPTIMIZERS   # never the unrelated "AdamS"


def test_weight_scaling_effective_weights_and_fold():
  w = jax.random.normal(jax.random.PRNGKey(6), (2, 8, 3))
  params = {"mlp": {"up": {"kernel": w}}, "embed": {"embedding": jnp.ones((4, 2))}}
  scales = weight_scale.init(params)
  assert scales["embed"]["embedding"] is None
  log_s = jnp.log(jnp.array([2.0, 0.5, 1.0])).reshape(1, 1, 3) * jnp.ones((2, 1, 3))
  scales = {"mlp": {"up": {"kernel": log_s}}, "embed": {"embedding": None}}
  eff = weight_scale.effective(params, scales, mode="learned", masked=True)
  mask = nm_mask.nm_mask(w)
  np.testing.assert_allclose(eff["mlp"]["up"]["kernel"], jnp.exp(log_s) * mask * w, rtol=1e-6)
  ratio = weight_scale.effective(params, None, mode="norm_ratio", masked=True)["mlp"]["up"]["kernel"]
  np.testing.assert_allclose(jnp.linalg.norm(ratio, axis=-2), jnp.linalg.norm(w, axis=-2), rtol=1e-5)
  exported = weight_scale.export(params, scales, n=2, m=4)
  np.testing.assert_allclose(exported["mlp"]["up"]["kernel"], eff["mlp"]["up"]["kernel"], rtol=1e-6)
  nm_mask.assert_nm(exported)


def test_kd_loss_closed_form():
  student = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
  teacher = jnp.log(jnp.array([[[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]]]))
  batch = {"targets": jnp.array([[0, 1]]), "loss_mask": jnp.array([[1.0, 1.0]]),
           "teacher_logits": teacher}
  loss, m = kd.loss_fn(student, batch, kd.DEFAULTS)
  ce = (np.log(2) - np.log(0.8)) / 2
  kl = (0.25 * np.log(0.5) + 0.5 * np.log(2)) / 2   # KL(teacher || student), token mean
  np.testing.assert_allclose(m["kl"], kl, rtol=1e-6)
  np.testing.assert_allclose(loss, 0.33 * ce + 0.67 * kl, rtol=1e-6)
  assert m["num_tokens"] == 2
  assert "kd" in objectives.OBJECTIVES
  with pytest.raises(ValueError, match="teacher_logits"):
    kd.loss_fn(student, {k: v for k, v in batch.items() if k != "teacher_logits"}, kd.DEFAULTS)


def test_kd_gradient_matches_autodiff_of_the_definition():
  key = jax.random.PRNGKey(7)
  s, t = jax.random.normal(key, (2, 3, 5)), jax.random.normal(jax.random.fold_in(key, 1), (2, 3, 5))
  batch = {"targets": jnp.zeros((2, 3), jnp.int32), "loss_mask": jnp.ones((2, 3)),
           "teacher_logits": t}
  spec = {**kd.DEFAULTS, "ce_weight": 0.0, "kd_weight": 1.0}
  def ref(z):
    pt = jax.nn.softmax(t)
    return jnp.mean(jnp.sum(pt * (jax.nn.log_softmax(t) - jax.nn.log_softmax(z)), -1))
  ours = jax.jit(jax.grad(lambda z: kd.loss_fn(z, batch, spec)[0]))
  np.testing.assert_allclose(ours(s), jax.jit(jax.grad(ref))(s), atol=1e-6)


@pytest.mark.slow   # ~15 s idle, much more on a loaded machine: a real CLI run + checkpoint restore
def test_cli_run_ends_exactly_2_4_sparse(tmp_path, capsys):
  """`jaxft train tiny --config.optimizer.name=adams_cast`: the last checkpoint is exactly 2:4."""
  from jaxft import build, cli
  args = ["train", "tiny", "--workdir", str(tmp_path), "--config.steps=4", "--config.eval_every=0",
          "--config.checkpoint_every=4", "--no_progress", "--config.optimizer.name=adams_cast",
          "--config.optimizer.mask_every=2"]
  assert cli.main(args) == 0
  _, model, _, step = build.restore_params(str(tmp_path))
  assert step == 4
  report = nm_mask.assert_nm(model.params)
  assert len(report) == 7 and all(r["zero_fraction"] == 0.5 for r in report.values())
  assert cli.main(["list"]) == 0 and "adams_cast" in capsys.readouterr().out
