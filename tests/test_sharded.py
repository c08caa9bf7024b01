"""Sharded == unsharded: data, FSDP, tensor and 2x2x2 meshes give one device's loss curve."""
import jax
import numpy as np
import pytest

from jaxft import config as config_lib, logbook, runner, sharding
from jaxft.adapters import base

STEPS = 4
# fp32 sums in a different order per mesh: agreement to ~1e-6 relative is the expectation;
# 1e-4 leaves room for 4 steps of Adam amplifying reduction-order noise.
RTOL = 1e-4


def run(tmp_path, name, mesh, devices=None, *extra):
  cfg = config_lib.load("tiny", [f"steps={STEPS}", "log_every=1", "eval_every=0",
                                 "checkpoint_every=100", f"mesh.data={mesh[0]}",
                                 f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}", *extra])
  out = runner.run(cfg, str(tmp_path / name), progress=False, devices=devices)
  losses = [r["loss"] for r in logbook.read_metrics(tmp_path / name / "metrics.jsonl")
            if "loss" in r and "split" not in r]
  return np.array(losses), out["state"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  return run(tmp_path_factory.mktemp("one"), "one", (1, 1, 1), [jax.devices()[0]])


@pytest.mark.parametrize("mesh", [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)])
def test_mesh_matches_single_device(mesh, single, tmp_path):
  losses, state = run(tmp_path, "m", mesh)
  ref_losses, ref_state = single
  assert len(losses) == STEPS
  np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
  for a, b in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(ref_state.trainable)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=1e-5)


def test_fsdp_divides_param_bytes(tmp_path):
  _, dp_state = run(tmp_path, "dp", (8, 1, 1))
  _, fsdp_state = run(tmp_path, "fsdp", (1, 8, 1))
  total = sum(x.nbytes for x in jax.tree.leaves(fsdp_state.trainable))
  dp = sharding.bytes_per_device(dp_state.trainable)
  fsdp = sharding.bytes_per_device(fsdp_state.trainable)
  assert set(dp.values()) == {total}  # data parallel: every device holds everything
  # FSDP: each device holds 1/8 of every weight split on 'embed' plus the (tiny) norm scales.
  norms = sum(v.nbytes for p, v in base.flatten(fsdp_state.trainable).items()
              if p.endswith("/scale"))
  assert 0 < norms < total / 100
  assert max(fsdp.values()) <= total / 8 + norms
  assert len(fsdp) == 8 and max(fsdp.values()) - min(fsdp.values()) <= norms
  opt = sharding.bytes_per_device(fsdp_state.opt_state)
  assert max(opt.values()) <= 2 * (total / 8 + norms) + 64  # Adam mu, nu follow the params


def test_mesh_shape_errors():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  with pytest.raises(sharding.MeshError, match=r"3\*1\*1 = 3 but there are 8 devices"):
    sharding.mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
  with pytest.raises(sharding.MeshError, match="at most one"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(sharding.MeshError, match="do not divide"):
    sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)


def test_logical_rules_fall_back_to_replication():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == jax.P("fsdp", "tensor")
  assert sharding.logical_to_spec(("embed", "mlp"), (63, 128), mesh) == jax.P(None, "tensor")
  assert sharding.logical_to_spec(("batch", "seq"), (8, 5), mesh) == jax.P(("data", "fsdp"), None)
  assert sharding.logical_to_spec(("batch", "seq"), (2, 5), mesh) == jax.P("data", None)
  with pytest.raises(ValueError, match="no sharding rule"):
    sharding.logical_to_spec(("bogus",), (8,), mesh)
