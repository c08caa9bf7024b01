"""End-to-end runs through the CLI (in process, 8 fake CPU devices) and its error messages."""
import json
import os

import jax
import numpy as np
import pytest

from jaxft import cli, logbook

FAST = ["--config.steps=6", "--config.log_every=1", "--config.eval_every=3",
        "--config.checkpoint_every=3", "--no_progress"]


def train(workdir, *extra):
  return cli.main(["train", "tiny", "--workdir", str(workdir), *FAST, *extra])


def records(workdir, split=None):
  out = logbook.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return [r for r in out if "loss" in r and r.get("split") == split and "event" not in r]


def test_train_tiny_logs_metrics_evaluates_and_checkpoints(tmp_path):
  assert train(tmp_path) == 0
  rows = records(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  for r in rows:
    for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s"):
      assert np.isfinite(r[key]), (key, r)
  evals = records(tmp_path, "eval")
  assert [r["step"] for r in evals] == [3, 6] and all(r["perplexity"] > 1 for r in evals)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
  assert json.load(open(tmp_path / "config.json"))["steps"] == 6


def test_lora_run_learns(tmp_path):
  """LoRA with bf16 compute and two microbatches per step, end to end."""
  assert train(tmp_path, "--config.adapter.name=lora", "--config.adapter.rank=4",
               "--config.compute_dtype=bfloat16", "--config.grad_accum=2", "--config.mesh.data=4",
               "--config.mesh.tensor=2",
               "--config.steps=12", "--config.optimizer.lr=0.02", "--config.eval_every=0") == 0
  losses = [r["loss"] for r in records(tmp_path)]
  assert losses[-1] < losses[0] - 0.1


def test_resume_continues_from_checkpoint(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a relative workdir, as in the README
  assert train("run", "--config.eval_every=0") == 0
  assert train("run", "--config.eval_every=0", "--config.steps=9") == 0
  assert [r["step"] for r in records(tmp_path / "run")] == list(range(1, 10))
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints"), key=int) == ["3", "6", "9"]


def test_truncated_newest_checkpoint_falls_back(tmp_path, caplog):
  assert train(tmp_path, "--config.eval_every=0") == 0
  newest = tmp_path / "checkpoints" / "6"
  biggest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(biggest, "r+b") as f:
    f.truncate(biggest.stat().st_size // 2)
  assert train(tmp_path, "--config.eval_every=0", "--config.steps=7") == 0
  assert "step 6" in caplog.text  # the skipped checkpoint is named
  start = [r for r in logbook.read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "start"]
  assert start[-1]["step"] == 3 and start[-1]["resumed"]
  assert [r["step"] for r in records(tmp_path)] == list(range(1, 8))


def test_nonfinite_loss_stops_with_last_good_state_saved(tmp_path, capsys):
  code = train(tmp_path, "--config.optimizer.name=sgd", "--config.optimizer.lr=1e9",
               "--config.optimizer.clip_norm=0", "--config.eval_every=0", "--config.steps=20",
               "--config.checkpoint_every=100")
  err = capsys.readouterr().err
  assert code == 1 and "non-finite loss at step" in err and "optimizer.lr" in err
  bad = [r for r in logbook.read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "nonfinite"]
  assert len(bad) == 1
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert saved and saved[-1] == bad[0]["step"] - 1


@pytest.mark.parametrize("args,message", [
    (["train", "tiyn", "--workdir", "W"], "unknown config 'tiyn'; did you mean 'tiny'"),
    (["train", "tiny", "--workdir", "W", "--config.optimizer.lrr=1"], "did you mean 'optimizer.lr'"),
    (["train", "tiny", "--workdir", "W", "--config.steps=ten"], "'steps' expects int"),
    (["train", "tiny", "--workdir", "W", "--config.mesh.data=3"], "mesh data*fsdp*tensor = 3*1*1"),
    (["train", "tiny", "--workdir", "W", "--config.adapter.name=lora",
      "--config.adapter.targets=('attn/qq$',)"], "adapter target 'attn/qq$' matches no linear layer"),
    (["train", "tiny", "--workdir", "W", "--config.model.vocab_size=100"], "100"),
])
def test_bad_input_gives_one_clear_error(args, message, tmp_path, capsys):
  args = [str(tmp_path / a) if a == "W" else a for a in args]
  assert cli.main(args) == 1
  err = capsys.readouterr().err
  assert err.startswith("jaxft: error: ") and message in err, err


def _jsonl(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_malformed_jsonl_names_file_and_line(tmp_path, capsys):
  good = json.dumps({"text": "To be, or not to be, that is the question. " * 5})
  path = _jsonl(tmp_path / "d.jsonl", [good] * 30 + ['{"text": "unterminated'] + [good] * 30)
  args = ["--config.data.name=jsonl", f"--config.data.path={path}", "--config.eval_every=0"]
  assert train(tmp_path / "run", *args) == 1
  err = capsys.readouterr().err
  assert "d.jsonl" in err and "31" in err
  assert train(tmp_path / "run2", *args, "--config.data.on_malformed=skip") == 0
  out = capsys.readouterr()
  assert "1" in out.out + out.err and "skip" in (out.out + out.err).lower()


def test_list_names_everything(capsys):
  assert cli.main(["list"]) == 0
  out = capsys.readouterr().out
  for name in ("tiny", "shakespeare", "decoder", "full", "lora", "xent", "adamw"):
    assert name in out
  assert jax.device_count() == 8


def test_cluster_environment_detection():
  assert cli.cluster_detected({}) == ""
  assert cli.cluster_detected({"TPU_WORKER_HOSTNAMES": "t1"}) == ""  # a single-host TPU VM
  assert "TPU pod" in cli.cluster_detected({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"})
  assert "SLURM" in cli.cluster_detected({"SLURM_NTASKS": "4"})
  assert cli.cluster_detected({"SLURM_NTASKS": "1"}) == ""
