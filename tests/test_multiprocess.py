"""Multi-host code path: two CPU processes on loopback (jax.distributed + gloo) train the tiny
config to the losses of one process with two devices and the same global batch."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxft import logbook

pytestmark = pytest.mark.multiprocess
ARGS = ["--config.steps=6", "--config.log_every=1", "--config.eval_every=3",
        "--config.checkpoint_every=3", "--no_progress"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env():
  out = dict(os.environ)
  out.pop("XLA_FLAGS", None)
  return out


def train_cmd(workdir, *extra):
  return [sys.executable, "-m", "jaxft.cli", "train", "tiny", "--workdir", str(workdir), *ARGS,
          *extra]


def metrics(workdir, split=None):
  rows = logbook.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return [r for r in rows if "loss" in r and r.get("split") == split and "event" not in r]


def test_two_processes_match_one(tmp_path):
  one = tmp_path / "one"
  subprocess.run(train_cmd(one, "--cpu_devices", "2"), check=True, env=env(),
                 capture_output=True, timeout=300)
  two = tmp_path / "two"
  port = free_port()
  procs = [subprocess.Popen(
      train_cmd(two, "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
                "--process_id", str(i)),
      env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  outs = [p.communicate(timeout=300)[0].decode() for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "2 processes" in outs[0]
  ref, got = metrics(one), metrics(two)
  assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 7))
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in ref], rtol=1e-5)
  np.testing.assert_allclose([r["perplexity"] for r in metrics(two, "eval")],
                             [r["perplexity"] for r in metrics(one, "eval")], rtol=1e-5)
  assert sorted(os.listdir(two / "checkpoints")) == ["3", "6"]
  # Resuming the two-process run works too (restores the step-6 checkpoint, trains to 8).
  port = free_port()
  procs = [subprocess.Popen(
      train_cmd(two, "--config.steps=8", "--coordinator", f"127.0.0.1:{port}", "--num_processes",
                "2", "--process_id", str(i)),
      env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  outs = [p.communicate(timeout=300)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:]
  assert [r["step"] for r in metrics(two)] == list(range(1, 9))
