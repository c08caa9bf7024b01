"""CAST end to end through `jaxft train`: AdamS + learned Weight Scaling + dense self-teacher KD.

"CAST: Continuous and Differentiable Semi-Structured Sparsity-Aware Training for Large
Language Models" with config `tiny_cast`: the loss falls, the distillation term is in
the loss and logged, the teacher (a frozen copy of the initial weights) never changes,
the trained kernels and the exported model are exactly 2:4 (zeros counted per group of
4 inputs), and the export is s * W with the learned scales folded in.
"""
import json
import os

import jax
import numpy as np
import pytest

from jaxft import adapters, build, config, extras, optimizers, runner, sharding
from jaxft.optimizers import nm_mask


def test_tiny_cast_run_distills_scales_and_exports_exact_2_4(tmp_path):
  workdir = str(tmp_path)
  cfg = config.load("tiny_cast", ["--config.steps=10", "--config.eval_every=0",
                                  "--config.checkpoint_every=10", "--config.log_every=1"])
  out = runner.run(cfg, workdir, progress=False, devices=jax.devices()[:1])
  state = out["state"]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r for r in rows if "loss" in r and r.get("split") != "eval"]
  assert steps[-1]["loss"] < steps[0]["loss"] - 0.3                    # loss falls
  for r in steps:                       # loss = ce_weight * CE + kd_weight * T^2 * KL, KL logged
    np.testing.assert_allclose(r["loss"], 1.0 * r["xent"] + 0.5 * r["kl"], rtol=1e-4)
  assert steps[0]["kl"] < 1e-6 < steps[-1]["kl"]   # step 1: student == teacher; then they part

  # The teacher is the initial model, bit for bit, after 10 donated steps.
  model = build.load_model(cfg)
  task = build.build_task(cfg, model)
  tx, _ = optimizers.build(build.section(cfg, "optimizer"), cfg.steps)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  state0, _, _ = build.init_sharded_state(cfg, model, task, tx, mesh)
  teacher, init = state.frozen[extras.TEACHER], state0.trainable
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               teacher, {k: v for k, v in init.items() if k != extras.SCALES})
  assert adapters.count_params(teacher) == adapters.count_params(model.module.init(
      jax.random.PRNGKey(0), model.cfg))
  assert not np.array_equal(state.trainable["layers"]["mlp"]["up"]["kernel"],
                            teacher["layers"]["mlp"]["up"]["kernel"])

  # AdamS's last update landed the trained kernels exactly on 2:4; the scales learned.
  _, weights, scales = extras.Extended.split(state.frozen, state.trainable)
  report = nm_mask.assert_nm(weights)
  assert len(report) == 7 and all(r["zero_fraction"] == 0.5 for r in report.values())
  log_s = np.asarray(scales["layers"]["mlp"]["up"]["scale"])
  assert log_s.shape == (2, 1, 128) and np.abs(log_s).max() > 1e-4

  # Export (what `jaxft export --format hf` writes): exactly 2:4, = s * W, teacher dropped.
  _, exported, _, step = build.restore_params(workdir)
  assert step == 10 and extras.TEACHER not in exported.params
  report = nm_mask.assert_nm(exported.params)
  assert len(report) == 7 and all(r["violations"] == 0 and r["max_nonzeros"] == 2
                                  for r in report.values())
  w = np.asarray(weights["layers"]["mlp"]["up"]["kernel"])
  np.testing.assert_allclose(exported.params["layers"]["mlp"]["up"]["kernel"],
                             np.exp(log_s) * w, rtol=1e-6)


def test_bad_switches_fail_with_the_choices():
  with pytest.raises(ValueError, match="learned"):
    build.build_task(config.load("tiny_cast", ["--config.optimizer.weight_scaling=big"]),
                     build.load_model(config.load("tiny")))
  with pytest.raises(ValueError, match="initial"):
    cfg = config.load("tiny_cast", ["--config.objective.teacher=ema"])
    build.build_task(cfg, build.load_model(cfg))


@pytest.mark.parametrize("mode", ["learned", "norm_ratio"])
@pytest.mark.parametrize("forward", ["dense", "masked"])
def test_flat_scales_match_the_tree_form(mode, forward):
  """The run's flat scale leaves give the same weights as `weight_scale.effective`/`export`."""
  from jaxft.optimizers import weight_scale
  key = jax.random.PRNGKey(3)
  params = {"layers": {"mlp": {"up": {"kernel": jax.random.normal(key, (2, 8, 3))}}},
            "embed": {"embedding": jax.numpy.ones((4, 2))}}
  flat = weight_scale.init_flat(params)
  assert list(adapters.base.flatten(flat)) == ["layers/mlp/up/scale"]
  log_s = 0.3 * jax.random.normal(jax.random.fold_in(key, 1), (2, 1, 3))
  flat = {"layers": {"mlp": {"up": {"scale": log_s}}}}
  tree = {"layers": {"mlp": {"up": {"kernel": log_s}}}, "embed": {"embedding": None}}
  ours = weight_scale.apply_flat(params, flat, mode, forward)
  ref = weight_scale.effective(params, tree, mode, forward == "masked")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, ref)
  exported = weight_scale.export_flat(params, flat, mode)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), exported,
               weight_scale.export(params, tree, mode))
  nm_mask.assert_nm(exported)
  axes = weight_scale.flat_axes({"layers": {"mlp": {"up": {"kernel": ("layers", "embed", "mlp")}}}},
                                flat)
  assert axes == {"layers": {"mlp": {"up": {"scale": ("layers", None, "mlp")}}}}
