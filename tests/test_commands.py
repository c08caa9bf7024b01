"""`jaxft export / generate / eval` on tiny runs: exported weights load in transformers with
the same logits, generation uses the trained weights, eval reports perplexity and accuracy."""
import json

import jax
import numpy as np
import pytest

from jaxft import build, cli
from jaxft.models import decoder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run") / "lora"
  assert cli.main(["train", "tiny", "--workdir", str(workdir), "--no_progress",
                   "--config.steps=4", "--config.eval_every=0", "--config.adapter.name=lora",
                   "--config.adapter.rank=4", "--config.optimizer.lr=0.05"]) == 0
  return workdir


def test_restore_params_merges_the_trained_adapter(lora_run):
  cfg, model, _, step = build.restore_params(str(lora_run))
  assert step == 4 and cfg.adapter.name == "lora"
  flat = model.params["layers"]["attn"]["q"]
  assert set(flat) == {"kernel"}  # merged: no LoRA leaves left
  fresh = decoder.init(jax.random.PRNGKey(0), model.cfg)
  assert not np.allclose(flat["kernel"], fresh["layers"]["attn"]["q"]["kernel"])


def test_export_hf_loads_in_transformers_with_equal_logits(lora_run, tmp_path, capsys):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  out = tmp_path / "hf"
  assert cli.main(["export", str(lora_run), "--format", "hf", "--out", str(out)]) == 0
  assert "exported step 4" in capsys.readouterr().out
  _, model, _, _ = build.restore_params(str(lora_run))
  tokens = np.array([[1, 5, 9, 200, 31, 7, 1000, 3]])
  ours = np.asarray(decoder.apply(model.params, tokens, model.cfg))
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_export_rejects_unknown_format(lora_run, tmp_path, capsys):
  assert cli.main(["export", str(lora_run), "--format", "onnx", "--out", str(tmp_path)]) == 1
  assert "unknown export format 'onnx'" in capsys.readouterr().err


def test_generate_with_trained_run(lora_run, capsys):
  assert cli.main(["generate", "--adapter", str(lora_run), "--prompt", "ROMEO:", "--prompt",
                   "To be", "--max_new_tokens", "5"]) == 0
  out = capsys.readouterr().out
  assert "### ROMEO:" in out and "### To be" in out


def test_generate_needs_exactly_one_source(capsys):
  assert cli.main(["generate", "--prompt", "hi"]) == 1
  assert "exactly one of --model" in capsys.readouterr().err


def test_eval_reports_perplexity_and_task_accuracy(tmp_path, capsys):
  workdir = tmp_path / "math"
  args = ["--config.data.name=reasoning_gym", "--config.data.train_size=64",
          "--config.data.eval_size=8", "--config.eval_examples=4",
          "--config.eval_max_new_tokens=4"]
  assert cli.main(["train", "tiny", "--workdir", str(workdir), "--no_progress",
                   "--config.steps=2", "--config.eval_every=2", *args]) == 0
  capsys.readouterr()
  out_file = tmp_path / "eval.json"
  assert cli.main(["eval", str(workdir), "--out", str(out_file)]) == 0
  result = json.loads(out_file.read_text())
  assert result["step"] == 2 and result["perplexity"] > 1 and result["num_tokens"] > 0
  assert result["task"]["n"] == 4 and 0.0 <= result["task"]["accuracy"] <= 1.0


def test_eval_of_a_model_needs_a_config(capsys):
  assert cli.main(["eval", "smollm2-135m-instruct"]) == 1
  assert "--config NAME" in capsys.readouterr().err
