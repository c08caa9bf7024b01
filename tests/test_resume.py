"""A run killed with SIGKILL and restarted logs exactly the losses of an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import pytest

from jaxft import logbook

STEPS = 300
ARGS = [f"--config.steps={STEPS}", "--config.checkpoint_every=7", "--config.log_every=1",
        "--config.eval_every=0", "--config.adapter.name=lora", "--config.adapter.dropout=0.1",
        "--no_progress"]


def command(workdir):
  return [sys.executable, "-m", "jaxft.cli", "train", "tiny", "--workdir", str(workdir), *ARGS]


def env():
  out = dict(os.environ)
  out.pop("XLA_FLAGS", None)  # one CPU device in the child, as a user would run it
  return out


def losses(workdir):
  rows = logbook.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["loss"] for r in rows if "loss" in r and "event" not in r}


def test_sigkill_then_resume_reproduces_losses(tmp_path):
  ref = tmp_path / "ref"
  subprocess.run(command(ref), check=True, env=env(), capture_output=True, timeout=300)
  expected = losses(ref)
  assert sorted(expected) == list(range(1, STEPS + 1))

  run = tmp_path / "killed"
  proc = subprocess.Popen(command(run), env=env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and len(losses(run)) < 30 and proc.poll() is None:
    time.sleep(0.05)
  killed_at = len(losses(run))
  if proc.poll() is not None:
    pytest.fail(f"the run ended (code {proc.returncode}) before it could be killed")
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert 30 <= killed_at < STEPS
  subprocess.run(command(run), check=True, env=env(), capture_output=True, timeout=300)
  rows = [r for r in logbook.read_metrics(run / "metrics.jsonl") if "loss" in r]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step exactly once
  assert losses(run) == expected  # bit-identical
