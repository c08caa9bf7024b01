"""Periodic adapter updates in the trainer: SpIEL reselection, HFT stages, and their resume."""
import os
import shutil

import jax
import numpy as np
import pytest

from jaxft import adapters, build, config, runner
from jaxft.adapters import base, hft, spiel, sparse_delta as sd


def _run(tmp_path, name, overrides, workdir=None):
  cfg = config.load("tiny", ["eval_every=0", "log_every=1", *overrides])
  return runner.run(cfg, str(workdir or tmp_path / name), progress=False,
                    devices=jax.devices()[:1])


def _flat(tree):
  return {k: np.asarray(v) for k, v in base.flatten(jax.device_get(tree)).items()}


def _init_state(overrides):
  cfg = config.load("tiny", overrides)
  model = build.load_model(cfg)
  task = build.build_task(cfg, model)
  frozen, trainable = task.adapter.init(jax.random.PRNGKey(1), model.module.init(
      jax.random.PRNGKey(0), model.cfg), task.adapter_spec)
  return task, frozen, trainable


def _losses(out):
  from jaxft import logbook  # pylint: disable=g-import-not-at-top
  rows = logbook.read_metrics(os.path.join(out["workdir"], "metrics.jsonl"))
  return [r["loss"] for r in rows if "loss" in r and "event" not in r and "split" not in r]


def test_spiel_reselects_in_training_keeps_k_and_compiled_step(tmp_path, monkeypatch):
  calls = []
  real = spiel.update

  def spy(key, state, step, task, batch):
    new = real(key, state, step, task, batch)
    calls.append((step, _flat(state.frozen), _flat(new.frozen)))
    return new

  monkeypatch.setattr(spiel, "update", spy)
  out = _run(tmp_path, "spiel", ["adapter.name=spiel", "adapter.density=0.05",
                                 "adapter.reselect_every=2", "adapter.reselect_fraction=0.3",
                                 "steps=8"])
  assert [c[0] for c in calls] == [2, 4, 6, 8]
  changed = 0
  for _, before, after in calls:
    for path, idx in after.items():
      if path.endswith(sd.IDX):
        assert idx.shape == before[path].shape
        for row in idx.reshape(-1, idx.shape[-1]):  # K distinct entries per matrix
          assert len(np.unique(row)) == row.size
        changed += int(np.any(np.sort(idx, -1) != np.sort(before[path], -1)))
  assert changed > 0  # the index set moved
  final = _flat(out["state"].frozen)
  assert all(np.array_equal(final[p], calls[-1][2][p]) for p in final if p.endswith(sd.IDX))
  losses = _losses(out)
  assert len(losses) == 8 and losses[-1] < losses[0]  # the AOT-compiled step ran all 8 steps


@pytest.mark.parametrize("regrow", ["ag", "ma"])
def test_spiel_update_regrows_top_dense_gradient_and_keeps_shapes(regrow):
  task, frozen, trainable = _init_state(["adapter.name=spiel", "adapter.density=0.05",
                                         "adapter.targets=mlp/down$", f"adapter.regrow={regrow}",
                                         "adapter.reselect_fraction=0.5"])
  from jaxft import train  # pylint: disable=g-import-not-at-top
  trainable = jax.tree.map(  # distinct |φ|: the pruned set is determined
      lambda x: jax.random.uniform(jax.random.PRNGKey(2), x.shape, minval=0.5, maxval=1.5),
      trainable)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 2048)
  batch = {"tokens": tokens, "targets": jax.numpy.roll(tokens, -1, 1),
           "loss_mask": np.ones((2, 16), np.float32)}
  opt = {"mu": trainable}
  state = train.TrainState(np.int32(0), frozen, trainable, opt, jax.random.PRNGKey(0))
  new = spiel.update(None, state, 1, task, batch)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), new) == jax.tree.map(
      lambda x: (x.shape, x.dtype), state)
  g = np.asarray(spiel.dense_grads(task, frozen, trainable, batch)["layers/mlp/down"])
  score = np.abs(g) if regrow == "ag" else np.minimum(
      np.max(g ** 2, -1)[..., :, None], np.max(g ** 2, -2)[..., None, :])
  old = np.asarray(base.flatten(frozen)["layers/mlp/down/" + sd.IDX])
  phi0 = np.asarray(base.flatten(trainable)["layers/mlp/down/" + sd.DELTA])
  idx = np.asarray(base.flatten(new.frozen)["layers/mlp/down/" + sd.IDX])
  phi = np.asarray(base.flatten(new.trainable)["layers/mlp/down/" + sd.DELTA])
  mu = np.asarray(base.flatten(new.opt_state)["mu/layers/mlp/down/" + sd.DELTA])
  k = idx.shape[-1]
  n = int(np.ceil(0.5 * k))
  for l in range(idx.shape[0]):
    dropped = np.argsort(np.abs(phi0[l]))[:n]           # slots with the smallest |φ|
    kept = np.delete(old[l], dropped)
    s = score[l].reshape(-1).copy()
    s[kept] = -np.inf                                   # kept entries are not candidates
    grown = np.argsort(-s)[:n]
    assert len(np.unique(idx[l])) == k                  # K distinct, constant
    new_entries = np.setdiff1d(idx[l], kept)
    assert new_entries.size == n  # the top-n scores among candidates (MA scores tie: by value)
    np.testing.assert_allclose(np.sort(s[new_entries]), np.sort(s[grown]), rtol=1e-6)
    np.testing.assert_array_equal(np.delete(idx[l], dropped), kept)  # kept slots in place
    assert np.all(phi[l][dropped] == 0) and np.all(mu[l][dropped] == 0)
    np.testing.assert_array_equal(np.delete(mu[l], dropped), np.delete(phi0[l], dropped))


def test_hft_two_stages_change_flags_and_fold_delta(tmp_path, monkeypatch):
  seen = []
  real = hft.update

  def spy(key, state, step, task, batch):
    seen.append((_flat(state.frozen), _flat(state.trainable)))
    return real(key, state, step, task, batch)

  monkeypatch.setattr(hft, "update", spy)
  out = _run(tmp_path, "hft", ["adapter.name=hft", "adapter.stage_steps=3", "steps=6"])
  assert len(seen) == 2
  frozen0, delta0 = seen[0]
  after = _flat(out["state"].frozen)
  flags = [p for p in frozen0 if p.endswith(hft.ON)]
  stage1 = seen[1][0]
  assert any(not np.array_equal(frozen0[p], stage1[p]) for p in flags)  # trainable set changed
  for p in flags:  # stage-1 W0 = stage-0 W0 + Δ on the flagged layers, exactly
    lin = p.rsplit("/", 1)[0]
    d = delta0[lin + "/" + hft.DELTA] * frozen0[p][:, None, None]
    np.testing.assert_allclose(stage1[lin + "/kernel"], frozen0[lin + "/kernel"] + d, rtol=0,
                               atol=1e-7)
    assert np.any(d != 0) == bool(frozen0[p].any())
  assert all(np.all(v == 0) for v in _flat(out["state"].trainable).values())  # Δ reset at step 6
  assert any(not np.array_equal(after[p], stage1[p]) for p in after if p.endswith("/kernel"))
  assert _losses(out)[-1] < _losses(out)[0]


@pytest.mark.parametrize("name,extra", [
    ("spiel", ["adapter.density=0.05", "adapter.reselect_every=2"]),
    ("hft", ["adapter.stage_steps=2"]),
    ("sst", ["adapter.round_steps=2", "adapter.rank=4"])])
def test_resume_mid_run_continues_same_mutable_state(tmp_path, name, extra):
  args = [f"adapter.name={name}", *extra, "steps=6", "checkpoint_every=2", "keep_checkpoints=5"]
  ref = _run(tmp_path, "ref", args)
  # A killed run: the reference's workdir with only its step-4 checkpoint (after an update).
  killed = tmp_path / "killed"
  shutil.copytree(ref["workdir"], killed)
  shutil.rmtree(killed / "checkpoints" / "6")
  resumed = _run(tmp_path, None, args, workdir=killed)
  assert resumed["step"] == 6
  a, b = _flat(ref["state"].frozen), _flat(resumed["state"].frozen)
  paths = build.mutable_paths(adapters.ADAPTERS[name], ref["state"].frozen,
                              ref["state"].trainable)
  assert paths
  for p in paths:
    np.testing.assert_array_equal(a[p], b[p])
  for x, y in zip(jax.tree.leaves(jax.device_get(ref["state"].trainable)),
                  jax.tree.leaves(jax.device_get(resumed["state"].trainable))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_checkpoint_holds_mutable_leaves_only_for_updating_adapters():
  task, frozen, trainable = _init_state(["adapter.name=spiel", "adapter.density=0.05"])
  from jaxft import train  # pylint: disable=g-import-not-at-top
  state = train.TrainState(0, frozen, trainable, {}, None)
  ck = build.checkpointed(state, task.adapter)
  assert sorted(base.flatten(ck["mutable"])) == sorted(
      p for p in base.flatten(frozen) if p.endswith(sd.IDX))
  assert "mutable" not in build.checkpointed(state)
  lora_task, f2, t2 = _init_state(["adapter.name=lora"])
  assert "mutable" not in build.checkpointed(train.TrainState(0, f2, t2, {}, None),
                                             lora_task.adapter)


def test_periodic_update_rejects_shape_changes_and_skips_off_steps():
  import types  # pylint: disable=g-import-not-at-top
  from jaxft import train  # pylint: disable=g-import-not-at-top
  grow = lambda key, state, step, task, batch: state._replace(trainable={"w": np.zeros(3)})
  adapter = types.SimpleNamespace(periodic=lambda spec: 2, update=grow)
  task = train.Task(None, adapter, {"name": "fake"}, None, {})
  cfg = config.load("tiny", [])
  state = train.TrainState(np.int32(0), {}, {"w": np.zeros(2)}, (), np.zeros(2, np.uint32))
  fn = runner.periodic_update(cfg, task, None)
  assert fn(state, 1, None) is state  # 1 % 2 != 0: not an update step
  with pytest.raises(ValueError, match="'fake'.*shapes"):
    fn(state, 2, None)
  assert runner.periodic_update(cfg, task._replace(adapter=types.SimpleNamespace()), None) is None
