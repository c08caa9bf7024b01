"""Tests of jaxft.checkpoint: round trips, resharding, retention, corruption, two processes."""
import logging
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxft import checkpoint as ckpt_lib
from jaxft.checkpoint import MANIFEST, CheckpointCorruptError, Checkpointer

REPO = pathlib.Path(__file__).resolve().parents[1]


def _state(k: int):
  """A train-state-like tree whose values depend on `k`: params, adamw state, int step, key."""
  params = {"w": jnp.arange(32, dtype=jnp.float32).reshape(4, 8) * k, "b": jnp.full((8,), k, jnp.float32)}
  tx = optax.adamw(1e-2)
  opt = tx.init(params)
  _, opt = tx.update(jax.tree.map(jnp.ones_like, params), opt, params)
  return {"params": params, "opt": opt, "step": k, "rng": jax.random.key_data(jax.random.key(k))}


def _abstract(state, shardings=None):
  """ShapeDtypeStructs of `state`'s arrays (with `shardings`, else their own); other leaves as is."""
  shardings = shardings or jax.tree.map(lambda x: getattr(x, "sharding", None), state)

  def one(x, s):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) if isinstance(x, jax.Array) else x

  return jax.tree.map(one, state, shardings)


def _assert_same(got, want):
  """Same tree structure (NamedTuple types included), leaf types, dtypes and values."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert type(g) is type(w) or (isinstance(g, jax.Array) and isinstance(w, jax.Array))
    if isinstance(w, jax.Array):
      assert g.dtype == w.dtype and g.shape == w.shape
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    else:
      assert g == w


def _save_steps(directory, steps, keep=3):
  """Saves `_state(k)` for each k in `steps`; returns the closed Checkpointer's directory."""
  with Checkpointer(str(directory), keep=keep) as ck:
    for k in steps:
      ck.save(k, _state(k), data_state={"pos": k * 10}, config={"lr": 0.01, "k": k})
  return directory


def _data_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The largest array-data file of a step that orbax reads (the merged OCDBT store's `d/`)."""
  files = list((step_dir / "state" / "d").iterdir())
  assert files, sorted(step_dir.rglob("*"))
  return max(files, key=lambda p: p.stat().st_size)


def _corrupt(step_dir: pathlib.Path, how: str) -> None:
  """Damages a step directory the way a crash or bad disk would."""
  if how == "no_manifest":
    (step_dir / MANIFEST).unlink()
    return
  path = _data_file(step_dir)
  if how == "truncate":
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  elif how == "delete":
    path.unlink()
  elif how == "garbage":
    size = path.stat().st_size
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
  elif how == "bitflip":
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
  else:
    raise ValueError(how)


def test_round_trip_types_values_and_json(tmp_path):
  state = _state(3)
  data_state = {"pos": 123, "epoch": 1, "shard": [0, 2], "name": "gsm8k"}
  config = {"model": {"d": 64, "dtype": "bfloat16"}, "lr": 3e-4, "steps": 10, "tags": ["a", "b"]}
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(5, state, data_state=data_state, config=config)
    ck.wait()
    assert ck.steps() == [5] and ck.latest_step() == 5
    assert (tmp_path / "5" / MANIFEST).exists()
  with Checkpointer(str(tmp_path)) as ck:
    step, got, got_data, got_config = ck.restore_latest(_abstract(state))
  assert step == 5
  _assert_same(got, state)
  assert isinstance(got["opt"][0], optax.ScaleByAdamState)
  assert type(got["step"]) is int and got["rng"].dtype == jnp.uint32
  assert got_data == data_state and got_config == config


def test_restore_onto_a_different_sharding(tmp_path):
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  saved = {"w": P("data", "fsdp"), "b": P("fsdp"), "rng": P()}
  target = {"w": P("fsdp", "data"), "b": P(), "rng": P("data")}
  host = {"w": np.arange(128, dtype=np.float32).reshape(8, 16), "b": np.arange(16, dtype=np.float32),
          "rng": np.array([7, 9], np.uint32)}
  state = {k: jax.device_put(v, NamedSharding(mesh, saved[k])) for k, v in host.items()}
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state, data_state={}, config={})
    shardings = {k: NamedSharding(mesh, spec) for k, spec in target.items()}
    _, got, _, _ = ck.restore_latest(_abstract(state, shardings))
  for k, v in host.items():
    assert got[k].sharding == shardings[k] and got[k].sharding != state[k].sharding
    np.testing.assert_array_equal(np.asarray(got[k]), v)
    assert got[k].dtype == v.dtype


def test_keep_retains_the_last_two(tmp_path):
  _save_steps(tmp_path, [1, 2, 3, 4], keep=2)
  with Checkpointer(str(tmp_path), keep=2) as ck:
    assert ck.steps() == [3, 4] and ck.latest_step() == 4
    step, got, data, _ = ck.restore_latest(_abstract(_state(0)))
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]
  assert step == 4 and data == {"pos": 40}
  _assert_same(got, _state(4))


@pytest.mark.parametrize("how", ["truncate", "delete", "garbage", "bitflip", "no_manifest"])
def test_damaged_newest_falls_back_to_previous(tmp_path, caplog, how):
  _save_steps(tmp_path, [1, 2])
  _corrupt(tmp_path / "2", how)
  with caplog.at_level(logging.WARNING), Checkpointer(str(tmp_path)) as ck:
    step, got, data, config = ck.restore_latest(_abstract(_state(0)))
  assert step == 1 and data == {"pos": 10} and config == {"lr": 0.01, "k": 1}
  _assert_same(got, _state(1))
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("step 2" in m for m in warnings), warnings


def test_orbax_restore_error_counts_as_corrupt(tmp_path, caplog):
  """A file missing behind a (rewritten) valid manifest: orbax raises, the step is skipped."""
  _save_steps(tmp_path, [1, 2])
  (tmp_path / "2" / "state" / "manifest.ocdbt").unlink()  # the root of orbax's OCDBT store
  ckpt_lib.write_manifest(tmp_path / "2", 2)
  assert ckpt_lib.verify_manifest(tmp_path / "2", 2) is None
  with caplog.at_level(logging.WARNING), Checkpointer(str(tmp_path)) as ck:
    step, got, _, _ = ck.restore_latest(_abstract(_state(0)))
  assert step == 1
  _assert_same(got, _state(1))
  assert any("step 2" in r.getMessage() and "orbax" in r.getMessage() for r in caplog.records)


def test_all_corrupt_raises_listing_steps(tmp_path):
  _save_steps(tmp_path, [1, 2])
  _corrupt(tmp_path / "1", "garbage")
  _corrupt(tmp_path / "2", "no_manifest")
  with Checkpointer(str(tmp_path)) as ck, pytest.raises(CheckpointCorruptError) as err:
    ck.restore_latest(_abstract(_state(0)))
  assert "step 1" in str(err.value) and "step 2" in str(err.value)
  assert "crc32" in str(err.value) and MANIFEST in str(err.value)


def test_empty_directory_gives_none(tmp_path):
  with Checkpointer(str(tmp_path / "new")) as ck:
    assert ck.restore_latest(_abstract(_state(0))) is None
    assert ck.steps() == [] and ck.latest_step() is None


def test_resave_after_falling_back_replaces_the_bad_step(tmp_path):
  _save_steps(tmp_path, [1, 2])
  _corrupt(tmp_path / "2", "no_manifest")
  with Checkpointer(str(tmp_path)) as ck:
    assert ck.restore_latest(_abstract(_state(0)))[0] == 1
    ck.save(2, _state(22), data_state={"pos": 22}, config={})
    step, got, data, _ = ck.restore_latest(_abstract(_state(0)))
  assert step == 2 and data == {"pos": 22}
  _assert_same(got, _state(22))


_WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from jaxft.checkpoint import MANIFEST, CheckpointCorruptError, Checkpointer
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
host = lambda k: np.arange(32, dtype=np.float32).reshape(8, 4) + k
def state(k):
  sh = NamedSharding(mesh, P("data"))
  return {"w": jax.make_array_from_callback((8, 4), sh, lambda i: host(k)[i]), "k": k}
target = {"w": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=NamedSharding(mesh, P(None, "data"))), "k": 0}
ck = Checkpointer(directory)
for k in (1, 2):
  ck.save(k, state(k), data_state={"k": k}, config={})
multihost_utils.sync_global_devices("saved")
if pid == 0:
  os.remove(os.path.join(directory, "2", MANIFEST))
multihost_utils.sync_global_devices("corrupted")
step, got, data, _ = ck.restore_latest(target)
for shard in got["w"].addressable_shards:
  np.testing.assert_array_equal(np.asarray(shard.data), host(1)[shard.index])
assert got["w"].sharding == target["w"].sharding and got["k"] == 1 and data == {"k": 1}
print("RESTORED", step, flush=True)
if pid == 0:
  os.remove(os.path.join(directory, "1", MANIFEST))
multihost_utils.sync_global_devices("corrupted-all")
try:
  ck.restore_latest(target)
except CheckpointCorruptError:
  print("ALL-CORRUPT", flush=True)
ck.close()
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_agree_and_do_not_hang(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(textwrap.dedent(_WORKER))
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  env.pop("XLA_FLAGS", None)
  port, directory = str(_free_port()), str(tmp_path / "ckpt")
  procs = [subprocess.Popen([sys.executable, str(script), str(i), port, directory], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=120)[0])
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
    assert "RESTORED 1" in out and "ALL-CORRUPT" in out, out[-3000:]
