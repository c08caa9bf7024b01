"""Configs by name, overrides, and their error messages."""
import pytest

from jaxft import config as config_lib


def test_tiny_loads_with_every_required_field():
  cfg = config_lib.load("tiny")
  for key in ("seed", "steps", "batch_size", "seq_len", "log_every", "eval_every",
              "checkpoint_every", "mesh.data", "mesh.fsdp", "mesh.tensor", "adapter.name",
              "adapter.targets", "objective.name", "optimizer.name", "optimizer.lr"):
    node = cfg
    for part in key.split("."):
      node = node[part]
  assert cfg.model.d_model == 64 and cfg.model.norm == "rms"  # default filled in


def test_overrides_are_typed():
  cfg = config_lib.load("tiny", ["optimizer.lr=0.5", "steps=3", "compute_dtype=bfloat16",
                                 "model.qk_norm=true", "optimizer.lr=2"])
  assert cfg.optimizer.lr == 2.0 and isinstance(cfg.optimizer.lr, float)
  assert cfg.steps == 3 and cfg.compute_dtype == "bfloat16" and cfg.model.qk_norm is True


def test_switching_adapter_brings_its_fields():
  cfg = config_lib.load("tiny", ["--config.adapter.rank=4", "config.adapter.name=lora"])
  assert cfg.adapter.name == "lora" and cfg.adapter.rank == 4 and cfg.adapter.alpha == 16.0


def test_unknown_config_name_lists_close_match():
  with pytest.raises(config_lib.ConfigError, match=r"unknown config 'tiyn'.*'tiny'"):
    config_lib.load("tiyn")


def test_unknown_key_lists_close_match():
  with pytest.raises(config_lib.ConfigError, match=r"optimizer\.lrr.*'optimizer\.lr'"):
    config_lib.load("tiny", ["optimizer.lrr=1e-3"])
  with pytest.raises(config_lib.ConfigError, match=r"optimiser.*'optimizer'"):
    config_lib.load("tiny", ["optimiser.lr=1e-3"])


def test_wrong_value_type_names_key_and_type():
  with pytest.raises(config_lib.ConfigError, match=r"'steps' expects int.*'abc'"):
    config_lib.load("tiny", ["steps=abc"])
  with pytest.raises(config_lib.ConfigError, match=r"'model.qk_norm' expects a bool"):
    config_lib.load("tiny", ["model.qk_norm=maybe"])
  with pytest.raises(config_lib.ConfigError, match=r"'frozen_dtype' must be.*'bfloat16', got 'fp8'"):
    config_lib.load("tiny", ["frozen_dtype=fp8"])
  assert config_lib.load("tiny", ["frozen_dtype=bfloat16"]).frozen_dtype == "bfloat16"


def test_field_of_another_member_is_rejected():
  with pytest.raises(config_lib.ConfigError, match=r"adapter\.rank.*adapter\.targets"):
    config_lib.load("tiny", ["adapter.rank=4"])


def test_unknown_member_name():
  with pytest.raises(config_lib.ConfigError, match=r"unknown adapter.name 'lorra'.*'lora'"):
    config_lib.load("tiny", ["adapter.name=lorra"])


def test_malformed_override():
  with pytest.raises(config_lib.ConfigError, match="key=value"):
    config_lib.load("tiny", ["steps"])


def test_config_from_path(tmp_path):
  path = tmp_path / "mine.py"
  path.write_text("from jaxft_configs import tiny\n"
                  "def get_config(arg=None):\n  c = tiny.get_config()\n  c.steps = int(arg or 7)\n"
                  "  return c\n")
  assert config_lib.load(f"{path}:9").steps == 9
  assert config_lib.load(str(path)).steps == 7


def test_switching_member_of_a_config_drops_fields_the_new_member_lacks():
  # smollm2_lora_math sets adapter.rank/alpha/dropout for LoRA; `full` has none of them.
  cfg = config_lib.load("smollm2_lora_math", ["adapter.name=full"])
  assert sorted(cfg.adapter.keys()) == ["name", "targets"]
  # Shared fields survive the switch; a field the new member lacks, set on the command line,
  # is still an error.
  cfg = config_lib.load("smollm2_lora_math", ["adapter.name=rslora"])
  assert cfg.adapter.rank == 8
  with pytest.raises(config_lib.ConfigError, match="adapter.rank"):
    config_lib.load("smollm2_lora_math", ["adapter.name=full", "adapter.rank=4"])
